"""The second attacker review of learning (issue #22), the pure-core findings by value:
each test failed on the code the review broke."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from graced.learning.knowledge import MAX_SKEW, PAGE_BYTES, PAGE_RECORDS, Knowledge
from graced.protocol.knowledge import check


def rec(sig: str = "web:api", playbook: str = "p", **over: Any) -> dict[str, Any]:
    det, subj = sig.split(":", 1)
    return {"signature": sig, "detector": det, "subject": subj, "playbook": playbook,
            "successes": 5, "failures": 0, "ttr_total": 0.0, "ttr_count": 0,
            "first_seen": 1.0, "last_seen": 2.0, **over}


def imported(k: Knowledge, source: str, patterns: list[dict[str, Any]], now: float = 10.0,
             exported_at: float | None = None) -> None:
    k.apply_import(k.plan_import(source, check(patterns), host="h", kid="k", now=now,
                                 exported_at=now if exported_at is None else exported_at))


def test_a_page_of_patterns_is_bounded_in_records_and_bytes() -> None:
    """Finding 1: two imports of 64 playbooks for each pattern made the default page
    (1000 patterns) 128,000 records: ~20 s on the event loop and a reply over 16 MB. A
    page ends at PAGE_RECORDS records (and PAGE_BYTES), and the pages still cover all."""
    k = Knowledge()
    wide = [rec(f"q:s{i:04}", f"pb{j:02}", last_seen=2.0 + i) for i in range(80)
            for j in range(64)]
    imported(k, "a", wide)
    imported(k, "b", wide)
    page = k.summaries(20.0, 1000)
    assert len(page) == PAGE_RECORDS // 128 < 80
    assert [p["pattern"] for p in page[:2]] == ["q:s0079", "q:s0078"]
    assert len(json.dumps(page)) <= PAGE_BYTES
    assert sum(len(pb["sources"]) for p in page for pb in p["playbooks"]) <= PAGE_RECORDS
    seen, offset = [], 0
    while offset < len(k.patterns):
        more = k.summaries(20.0, 1000, offset)
        assert more
        seen += [p["pattern"] for p in more]
        offset += len(more)
    assert sorted(seen) == sorted(k.patterns) and len(seen) == 80
    # A pattern larger than the budget is still shown, alone.
    assert len(k.summaries(20.0, 1000, records=10)) == 1
    assert len(k.summaries(20.0, 1000, size=10)) == 1


def test_one_step_failure_does_not_unlock_demotion_and_a_sole_playbook_is_tried() -> None:
    """Finding 2: a user who owns what a step acts on (a file in a sticky world-writable
    directory the step must remove) made one step fail; with held incidents around it,
    that one failure demoted a working playbook. Demotion now needs own step failures in
    demote_after distinct incidents; and a demoted playbook that is the only candidate
    runs once in each incident before the mission escalates."""
    from graced.config import LearningConfig
    from graced.learning import Learning
    from graced.missions.engine import Mission

    config = LearningConfig(demote_after=3, demote_span=0.0, retry_after=86400.0)
    k = Knowledge()
    learning = Learning(config, k, Path("/nonexistent/journal.db"))

    def fail(incident: int, at: float, own: bool) -> None:
        k.learn(sig="web:api", detector="web", subject="api", playbook="fix",
                success=False, ttr=None, now=at, incident=incident, own=own)

    fail(1, 10.0, True)  # the attacker's file: one step failed
    fail(2, 20.0, False)  # then held incidents: the steps succeeded
    fail(3, 30.0, False)
    is_demoted, held = k.demotion("web:api", "fix", 40.0)
    assert not is_demoted
    assert "own steps failed in 1 distinct incident within" in (held or ""), held
    fail(2, 21.0, True)
    assert not k.demotion("web:api", "fix", 40.0)[0]
    fail(3, 31.0, True)
    assert k.demotion("web:api", "fix", 40.0) == (True, None)
    # Demoted, yet the only playbook for the symptom: once in each new incident.
    m = Mission(id=9, detector="web", kind="value", subject="api", severity="medium",
                state="open", summary="latency", opened_at=50.0, updated_at=50.0)
    m.incident = 9
    blocked, notes = learning.blocked(m, ["fix"], 60.0)
    assert not blocked and "the only playbook for this symptom" in notes[0], notes
    fail(9, 61.0, True)  # it failed in this incident: now a person is asked
    blocked, notes = learning.blocked(m, ["fix"], 70.0)
    assert blocked["fix"].startswith("demoted") and not notes
    # With another candidate, a demoted playbook is not run at all.
    m.incident = 10
    assert learning.blocked(m, ["fix", "other"], 80.0)[0]["fix"].startswith("demoted")


def rows_of(k: Knowledge) -> list[tuple[Any, ...]]:
    """The stored rows of a knowledge base, imported ones first (as SQLite may give)."""
    out = [(sig, pb, src, e.detector, e.subject, e.successes, e.failures, e.ttr_total,
            e.ttr_count, e.first_seen, e.last_seen, json.dumps(e.data()))
           for sig, pbs in k.patterns.items() for pb, srcs in pbs.items()
           for src, e in srcs.items()]
    return sorted(out, key=lambda r: r[2] == "local")


def test_imports_never_push_local_records_over_the_pattern_cap() -> None:
    """Finding 3: an import with 64 playbooks for a symptom, then a local run of another
    playbook: at the next start the local row was quarantined ("over the caps") and this
    host's own evidence lost. Local rows load first and count only against the local
    playbooks; imports get what is left; learn() itself keeps the caps."""
    k = Knowledge()
    imported(k, "peer", [rec("web:api", f"pb{j:02}") for j in range(64)])
    writes, new = k.learn(sig="web:api", detector="web", subject="api", playbook="mine",
                          success=True, ttr=3.0, now=20.0, incident=1)
    assert writes and new
    again = Knowledge(rows_of(k))
    assert "mine" in again.patterns["web:api"]
    assert again.patterns["web:api"]["mine"]["local"].successes == 1
    assert [(q[1], q[2]) for q in again.quarantined] == [("pb63", "peer")]
    assert len(again.patterns["web:api"]) == 64
    # learn() keeps the caps: at most 64 local playbooks for one pattern.
    full = Knowledge()
    for j in range(64):
        assert full.learn(sig="web:api", detector="web", subject="api", playbook=f"l{j}",
                          success=False, ttr=None, now=1.0, incident=j)[0]
    assert full.learn(sig="web:api", detector="web", subject="api", playbook="l64",
                      success=False, ttr=None, now=1.0, incident=64) == ([], False)
    assert len(full.patterns["web:api"]) == 64 and not Knowledge(rows_of(full)).quarantined


def test_outcome_rows_edited_to_infinity_never_reach_a_missions_data(tmp_path: Path) -> None:
    """Finding 4: an outcomes row edited to Infinity (ttr, closed_at 9e999) flowed through
    the similar-missions lookup into a new mission's data as the bare word Infinity,
    which SQLite cannot parse: the next start failed. Outcome figures are checked on
    read (finite, or null), and mission data is written as JSON SQLite parses."""
    import sqlite3

    from graced.journal import Journal
    from graced.learning import memory
    from graced.missions import store
    from graced.missions.engine import Mission

    journal = Journal(tmp_path / "journal.db", synchronous="normal")
    m = Mission(id=1, detector="web", kind="value", subject="api", severity="medium",
                state="resolved", summary="latency high", opened_at=1.0, updated_at=2.0,
                closed_at=2.0, samples=[])
    m.playbook, m.steps = "fix", [{"step": 1, "action": "run", "ok": True}]
    journal.append([], memory.outcome_writes(memory.outcome_of(m)))
    journal.append([], [("UPDATE outcomes SET ttr = 9e999, closed_at = 9e999, "
                         "success = 7", ())])
    reader = memory.MemoryReader(journal.path)
    try:
        found = reader.similar(detector="web", kind="value", subject="api",
                               severity="medium", summary="latency high", before=5)
    finally:
        reader.close()
    assert [(f["ttr"], f["closed_at"], f["success"]) for f in found] == [(None, None, None)]
    new = Mission(id=2, detector="web", kind="value", subject="api", severity="medium",
                  state="open", summary="latency high", opened_at=3.0, updated_at=3.0)
    new.similar = [{"ttr": float("inf"), "score": float("nan")}]  # however it came
    journal.append([], [store.upsert(new)])
    conn = sqlite3.connect(journal.path)
    assert conn.execute("SELECT json_valid(data), json_extract(data, '$.similar[0].ttr') "
                        "FROM missions WHERE id = 2").fetchone() == (1, None)
    conn.close()
    journal.close()


def test_resetting_a_sources_last_record_frees_its_place() -> None:
    """Finding 6: the 100-source cap never freed: a source whose records were all reset
    still counted. A source with no record left no longer counts (its pinned key and
    export time stay: third review, finding 2), and nothing is written for it."""
    k = Knowledge()
    for i in range(100):
        imported(k, f"d{i:03}", [rec(f"web:s{i:03}", "p")])
    with pytest.raises(ValueError, match="knowledge from 100 daemons"):
        k.plan_import("new", check([rec("web:new", "p")]), host="h", kid="k",
                      exported_at=10.0, now=10.0)
    writes, removed = k.reset("web:s007")
    assert removed == 1 and k.held_sources() == 100 - 1 and "d007" in k.sources
    assert writes == [("DELETE FROM patterns WHERE signature = ?", ("web:s007",))]
    imported(k, "new", [rec("web:new", "p")])
    assert k.held_sources() == 100
    # A playbook reset that empties several sources frees them all.
    writes, removed = k.reset("p")
    assert k.held_sources() == 0 and len(k.sources) == 101 and removed == 100


def test_an_export_dated_in_the_future_is_refused() -> None:
    """Finding 7: an export dated 2286 claiming a daemon id locked that id out for ever
    (every genuine export is "older"). Beyond MAX_SKEW ahead of now it is refused."""
    k = Knowledge()
    with pytest.raises(ValueError, match="exported_at: .* in the future"):
        k.plan_import("d", check([rec()]), host="h", kid="k", exported_at=9.9e9,
                      now=1000.0)
    plan = k.plan_import("d", check([rec()]), host="h", kid="k",
                         exported_at=1000.0 + MAX_SKEW, now=1000.0)
    assert plan.meta["exported_at"] == 1000.0 + MAX_SKEW


def test_a_symptom_toggled_while_awaiting_approval_pages_a_few_times_then_waits() -> None:
    """Finding 8: "cleared before approval is not a flap" let anyone toggling the
    symptom open a new mission, and a new approval request, at every return (17 in
    30 s). After CLEARED_REPEATS clears within flap_window the mission awaiting approval
    is kept open for a person: the toggles no longer page."""
    from graced.missions.engine import CLEARED, CLEARED_REPEATS, MissionEngine

    engine = MissionEngine(resolve_after=1, flap_window=600.0)
    opened: list[int] = []
    resolved: list[str] = []

    def see(anomalous: bool, now: float) -> None:
        for t in engine.observe(detector="queue", kind="value", subject="q",
                                severity="critical", anomalous=anomalous, score=1.0,
                                summary="queue high", value=99.0 if anomalous else 1.0,
                                now=now):
            if t.topic == "mission.opened":
                opened.append(t.mission.id)
                engine.transition(engine.active[("queue", "q")], "awaiting_approval", now,
                                  "needs approval")
            elif t.topic == "mission.resolved":
                resolved.append(t.mission.reason or "")

    for i in range(17):
        see(True, 10.0 + 2 * i)
        see(False, 11.0 + 2 * i)
    assert len(opened) == CLEARED_REPEATS + 1, opened
    assert len(resolved) == CLEARED_REPEATS and all(r.startswith(CLEARED) for r in resolved)
    kept = engine.active[("queue", "q")]
    assert kept.state == "awaiting_approval" and kept.flapping is False
    assert sum(1 for t in kept.timeline if t.get("note") == "kept open") == 1
    # Beyond flap_window the count starts again: a fault that returns a day later is
    # approvable as usual (it clears, and its next return opens a new mission).
    engine.transition(kept, "expired", 100.0, "approval timed out")
    see(False, 101.0)
    see(True, 2000.0)
    see(False, 2001.0)
    assert len(opened) == CLEARED_REPEATS + 2 and len(resolved) == CLEARED_REPEATS + 1
