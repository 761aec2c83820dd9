"""The mission state machine, with plain values."""

from __future__ import annotations

from graced.missions.engine import MissionEngine


def feed(engine: MissionEngine, anomalous: bool, now: float, subject: str = "/",
         value: float = 1.0) -> list[str]:
    out = engine.observe(detector="disk", kind="disk", subject=subject, severity="medium",
                         anomalous=anomalous, score=0.9 if anomalous else 0.1,
                         summary="disk full" if anomalous else "ok", value=value, now=now)
    return [t.topic for t in out if t.topic]


def test_one_mission_per_key_repeats_update_it() -> None:
    e = MissionEngine(resolve_after=3, update_interval=10)
    assert feed(e, True, 0) == ["mission.opened"]
    assert feed(e, True, 1, value=2.0) == []
    assert feed(e, True, 11, value=3.0) == ["mission.updated"]
    assert feed(e, True, 12, subject="/var") == ["mission.opened"]
    m = e.active[("disk", "/")]
    assert m.occurrences == 3 and m.last_value == 3.0 and m.id == 1
    assert e.active[("disk", "/var")].id == 2
    assert [t["to"] for t in m.timeline] == ["detected", "open"]


def test_resolves_after_n_consecutive_normal_samples_only() -> None:
    e = MissionEngine(resolve_after=3)
    feed(e, True, 0)
    assert feed(e, False, 1) == [] and feed(e, False, 2) == []
    assert feed(e, True, 3) == []  # the streak starts again
    assert feed(e, False, 4) == [] and feed(e, False, 5) == []
    assert feed(e, False, 6) == ["mission.resolved"]
    assert ("disk", "/") not in e.active
    assert feed(e, False, 7) == []


def test_reopening_within_the_window_is_flapping_and_raises_severity() -> None:
    e = MissionEngine(resolve_after=1, flap_window=60)
    feed(e, True, 0)
    feed(e, False, 1)
    out = e.observe(detector="disk", kind="disk", subject="/", severity="medium",
                    anomalous=True, score=1, summary="again", value=1, now=30)
    m = out[0].mission
    assert m.flapping and m.severity == "high" and m.id == 2
    feed(e, False, 31)
    out = e.observe(detector="disk", kind="disk", subject="/", severity="medium",
                    anomalous=True, score=1, summary="later", value=1, now=200)
    assert not out[0].mission.flapping and out[0].mission.severity == "medium"


def test_critical_stays_critical_when_flapping() -> None:
    e = MissionEngine(resolve_after=1, flap_window=60)
    for now in (0, 1, 2):
        e.observe(detector="d", kind="tcp", subject="s", severity="critical",
                  anomalous=now != 1, score=1, summary="x", value=None, now=now)
    assert e.active[("d", "s")].severity == "critical"


def test_journald_json_lines_are_parsed_including_byte_array_messages() -> None:
    from graced.detectors.logs import parse_journal_json

    raw = (b'{"__CURSOR":"c1","MESSAGE":"ERROR disk"}\n'
           b'{"__CURSOR":"c2","MESSAGE":[69,82,82,79,82,32,255]}\n'
           b"not json\n")
    entries = parse_journal_json(raw)
    assert [e["__CURSOR"] for e in entries] == ["c1", "c2"]
    assert entries[1]["MESSAGE"].startswith("ERROR ")


def test_a_mission_awaiting_approval_clears_before_approval() -> None:
    e = MissionEngine(resolve_after=2)
    feed(e, True, 0)
    m = e.active[("disk", "/")]
    e.transition(m, "awaiting_approval", 1, "needs approval")
    assert feed(e, False, 2) == []
    assert feed(e, False, 3) == ["mission.resolved"]
    assert m.reason is not None and m.reason.startswith("cleared before approval")
    assert m.held_back is not None and m.held_back["setting"] == "missions.resolve_after"
    assert ("disk", "/") not in e.active


def test_a_failed_mission_reopening_without_a_normal_sample_is_the_same_incident() -> None:
    e = MissionEngine(resolve_after=1, flap_window=0)
    feed(e, True, 0)
    first = e.active[("disk", "/")]
    assert first.incident == first.id
    e.transition(first, "failed", 1, "verification failed")
    feed(e, True, 2)
    second = e.active[("disk", "/")]
    assert second.id != first.id and second.incident == first.id
    e.transition(second, "failed", 3, "verification failed")
    feed(e, False, 4)  # the detector saw it normal: the next anomaly is a new incident
    feed(e, True, 5)
    third = e.active[("disk", "/")]
    assert third.incident == third.id


def test_a_fault_a_playbook_fixed_is_not_flapping_when_it_comes_back() -> None:
    e = MissionEngine(resolve_after=1, flap_window=600)
    feed(e, True, 0)
    m = e.active[("disk", "/")]
    m.steps = [{"step": 1, "ok": True}]
    e.transition(m, "verifying", 1, "playbook done")
    assert feed(e, False, 2) == ["mission.resolved"]
    feed(e, True, 30)
    again = e.active[("disk", "/")]
    assert not again.flapping and again.severity == "medium"
    # It clears by itself this time (nothing ran): coming back now is flapping.
    feed(e, False, 31)
    feed(e, True, 40)
    assert e.active[("disk", "/")].flapping


def test_a_mission_cleared_before_approval_does_not_start_the_flap_window() -> None:
    """Finding 3: "cleared before approval" counted as resolving by itself, so a real
    critical fault that came back within flap_window was escalated as flapping and could
    not be approved. It opens as an ordinary mission again."""
    e = MissionEngine(resolve_after=1, flap_window=600)
    feed(e, True, 0)
    e.transition(e.active[("disk", "/")], "awaiting_approval", 1, "needs approval")
    assert feed(e, False, 2) == ["mission.resolved"]
    feed(e, True, 30)
    again = e.active[("disk", "/")]
    assert not again.flapping and again.severity == "medium"


def verifying(e: MissionEngine, started: float, timeout: float) -> None:
    """The executor's part: the playbook ran and verification began at ``started``."""
    m = e.active[("disk", "/")]
    e.transition(m, "verifying", started, "playbook done")
    m.verify_started, m.verify_until = started, started + timeout


def test_a_fix_seen_normal_within_verify_timeout_resolves_after_it() -> None:
    """The newcomer's P1: interval 30 s, resolve_after 3, verify_timeout 60 s. The first
    normal sample (30 s after the steps) is within the window; the confirming two come
    at 60 s and 90 s, past it: the fix is credited, never "still anomalous"."""
    e = MissionEngine(resolve_after=3)
    feed(e, True, 0)
    verifying(e, 1, 60)
    assert feed(e, False, 31, value=0) == []
    assert feed(e, False, 61, value=0) == []
    out = e.observe(detector="disk", kind="disk", subject="/", severity="medium",
                    anomalous=False, score=0.1, summary="ok", value=0, now=91)
    (tr,) = out
    assert tr.topic == "mission.resolved"
    v = tr.mission.verification
    assert v is not None and v["result"] == "passed" and v["normal_after_s"] == 30
    assert "normal 30 s after the steps" in v["detail"]
    assert "past verify_timeout" in v["detail"]


def test_an_anomalous_sample_past_verify_timeout_fails_the_confirmation() -> None:
    e = MissionEngine(resolve_after=3)
    feed(e, True, 0)
    verifying(e, 1, 60)
    assert feed(e, False, 31, value=0) == []
    assert feed(e, True, 50, value=7) == []  # within the window: it may still clear
    assert feed(e, False, 55, value=0) == []
    out = e.observe(detector="disk", kind="disk", subject="/", severity="medium",
                    anomalous=True, score=0.9, summary="full", value=9, now=70)
    (tr,) = out
    assert tr.topic == "mission.failed" and ("disk", "/") not in e.active
    assert tr.mission.reason is not None
    assert "was normal again, then anomalous (value 9)" in tr.mission.reason
    assert "after 1 of the 3 normal samples" in tr.mission.reason


def test_an_anomalous_sample_past_verify_timeout_with_no_normal_one_fails() -> None:
    e = MissionEngine(resolve_after=3)
    feed(e, True, 0)
    verifying(e, 1, 10)
    (tr,) = e.observe(detector="disk", kind="disk", subject="/", severity="medium",
                      anomalous=True, score=0.9, summary="full", value=9, now=12)
    assert tr.topic == "mission.failed"
    assert tr.mission.reason == "verification failed: disk still anomalous (value 9) after 11 s"


def test_a_failure_with_no_value_says_so_not_python_s_none() -> None:
    e = MissionEngine(resolve_after=3)
    feed(e, True, 0)
    verifying(e, 1, 10)
    (tr,) = e.observe(detector="disk", kind="disk", subject="/", severity="medium",
                      anomalous=True, score=1.0, summary="unreadable", value=None, now=12)
    assert tr.mission.reason == ("verification failed: disk still anomalous (no value) "
                                 "after 11 s")
