"""The pure cores of plans (graced/plan.py) and silences (graced/silences.py)."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from graced.config import PlaybookConfig, StepConfig
from graced.config.playbooks import ACTIONS, COMMON
from graced.missions.engine import Mission
from graced.plan import build, mission_values, substitute
from graced.silences import MAX_SILENCES, Silences, parse_target


def mission(subject: str = "web", value: float | None = 97.5) -> Mission:
    return Mission(id=7, detector="disk", kind="disk", subject=subject, severity="high",
                   state="open", summary="", opened_at=0.0, updated_at=0.0, last_value=value)


PB = PlaybookConfig(name="clean", detector="disk", risk="high", step=[
    StepConfig(action="run", argv=["/usr/bin/clean", "{subject}", "--over={value}"],
               env=["TARGET={subject}"]),
    StepConfig(action="restart_unit", unit="{subject}.service"),
    StepConfig(action="signal", signal="hup", process="{subject}d"),
    StepConfig(action="start_action", unit="clean-logs"),
])


def test_a_plan_is_the_steps_with_the_values_put_in() -> None:
    plan = build(PB, mission_values(mission()))
    run, restart, sig, action = plan["steps"]
    assert run["argv"] == ["/usr/bin/clean", "web", "--over=97.5"]
    assert run["env"]["TARGET"] == "sha256:" + hashlib.sha256(b"web").hexdigest()[:16]
    assert run["env"]["GRACE_MISSION"] == "7"
    assert restart["argv"] == ["/usr/bin/systemctl", "restart", "--", "web.service"]
    assert (sig["signal"], sig["process"]) == ("HUP", "webd")
    assert action["unit"] == "grace-action@clean-logs.service"
    assert action["argv"] == ["/usr/bin/systemctl", "start", "--wait", "--", action["unit"]]
    body = {k: v for k, v in plan.items() if k != "sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert plan["sha256"] == hashlib.sha256(text.encode()).hexdigest()  # as documented


def test_the_hash_changes_with_the_playbook_not_with_later_samples() -> None:
    m = mission()
    plan = build(PB, mission_values(m))
    m.last_value = 12.0  # a later sample: the frozen values keep the plan
    assert build(PB, plan["values"])["sha256"] == plan["sha256"]
    longer = dataclasses.replace(PB, step=[*PB.step[:1], dataclasses.replace(
        PB.step[1], timeout=60.0), *PB.step[2:]])
    assert build(longer, plan["values"])["sha256"] != plan["sha256"]


def test_env_values_stay_out_of_a_plan_but_still_change_its_hash() -> None:
    token = "s3cr3t-token-value"
    pb = dataclasses.replace(PB, step=[StepConfig(
        action="run", argv=["/usr/bin/curl", f"https://ops:{token}@api.invalid/x?k={token}"],
        env=[f"TOKEN={token}"])])
    plan = build(pb, mission_values(mission()))
    assert token not in json.dumps(plan)
    assert plan["steps"][0]["argv"][1] == "https://REDACTED@api.invalid/x?k=REDACTED"
    rotated = dataclasses.replace(pb, step=[dataclasses.replace(pb.step[0], env=["TOKEN=new"])])
    assert build(rotated, plan["values"])["sha256"] != plan["sha256"]
    other_url = dataclasses.replace(pb, step=[dataclasses.replace(
        pb.step[0], argv=["/usr/bin/curl", "https://ops:other@api.invalid/x?k=other"])])
    assert build(other_url, plan["values"])["sha256"] != plan["sha256"]


# A second value for every step key: each one (but max_output, which only bounds what is
# kept of the output) changes what runs, so it must change the plan and its hash.
OTHER = {"argv": ["/bin/echo other"], "shell": True, "env": ["A=2"], "cwd": "/tmp",
         "timeout": 31.0, "unit": "other", "signal": "HUP", "process": "other", "pid": 5,
         "pid_file": "/run/other.pid", "match_cmdline": True, "user": "root"}
BASE = {"run": StepConfig(action="run", argv=["/bin/echo hi"], env=["A=1"]),
        "restart_unit": StepConfig(action="restart_unit", unit="web"),
        "start_action": StepConfig(action="start_action", unit="clean"),
        "signal": StepConfig(action="signal", process="web")}


@pytest.mark.parametrize("action", sorted(ACTIONS))
def test_every_step_key_that_changes_what_runs_changes_the_plan(action: str) -> None:
    keys = [k for k in (*COMMON, *ACTIONS[action].keys) if k not in ("action", "max_output")]
    assert set(keys) <= set(OTHER), "a new step key: add it to OTHER and to the plan"
    base = PlaybookConfig(name="p", risk="high", step=[BASE[action]])
    plan = build(base, mission_values(mission()))
    for key in keys:
        changed = dataclasses.replace(base, step=[dataclasses.replace(BASE[action],
                                                                      **{key: OTHER[key]})])
        assert build(changed, plan["values"])["sha256"] != plan["sha256"], key


@given(st.text(max_size=40))
@example("{value}")  # a subject naming another placeholder: once substituted a value is never
@example("{mission}{detector}")  # searched again (it read back 'xy', the value being empty)
@example("A://0")  # a URL-like argument reaches the step as written (not lower-cased)
def test_values_are_never_interpreted(subject: str) -> None:
    # A subject that looks like a placeholder or a format string stays literal text.
    assert substitute("x{subject}y", {"subject": subject}) == f"x{subject}y"
    plan = build(PB, mission_values(mission(subject=subject)))
    assert plan["steps"][0]["argv"][1] == subject


def test_silences_cover_end_and_survive_a_dump() -> None:
    s = Silences()
    a = s.add(detector="disk", subject="/var*", duration=60, comment="move", by="ann",
              until_resolved=True, now=100.0)
    b = s.add(detector=None, subject=None, duration=10, comment="all", by="bob",
              until_resolved=False, now=100.0)
    assert s.covering("disk", "/var/log", 105.0) is a  # the longest-lasting
    assert s.covering("cpu", "host", 105.0) is b
    assert s.covering("cpu", "host", 111.0) is None  # expired, even before due() runs
    assert [(x.id, why) for x, why in s.due(111.0, set())] == [(b.id, "expired")]
    a.missions.append(3)
    assert s.due(112.0, {3}) == []
    again = Silences.load(s.dump())
    assert again.listed() == s.listed() and again.next_id == s.next_id
    assert [(x.id, why) for x, why in s.due(113.0, set())] == [(a.id, "its missions closed")]
    assert Silences.load("not json").listed() == []


@pytest.mark.parametrize("kwargs, error", [
    ({"duration": 0}, "duration"), ({"duration": 1e9}, "duration"),
    ({"comment": "  "}, "comment"), ({"detector": None, "until_resolved": True}, "--all"),
])
def test_bad_silences_are_refused(kwargs: dict, error: str) -> None:
    args = {"detector": "disk", "subject": None, "duration": 60.0, "comment": "why",
            "by": "ann", "until_resolved": False, "now": 0.0, **kwargs}
    with pytest.raises(ValueError, match=error):
        Silences().add(**args)


def test_silences_are_bounded_and_targets_parsed() -> None:
    s = Silences()
    for _ in range(MAX_SILENCES):
        s.add(detector="d", subject=None, duration=1, comment="c", by="x",
              until_resolved=False, now=0)
    with pytest.raises(ValueError, match="already"):
        s.add(detector="d", subject=None, duration=1, comment="c", by="x",
              until_resolved=False, now=0)
    assert parse_target("disk") == ("disk", None)
    assert parse_target("disk:/var:x") == ("disk", "/var:x")
    for bad in ("", ":x", "disk:"):
        with pytest.raises(ValueError):
            parse_target(bad)


@pytest.mark.parametrize("unit, runs", [
    ("clean-logs", "grace-action@clean-logs.service"),
    ("grace-action@rotate.service", "grace-action@rotate.service"),
    ("sshd.service", None), ("grace-action@x.service.service", "grace-action@x.service.service"),
    ("grace-action@../x.service", None), ("a@b", None), ("-x", "grace-action@-x.service"),
    ("{subject}", None), ("grace-action@.service", None), ("x y", None)])
def test_start_action_starts_only_installed_actions(unit: str, runs: str | None) -> None:
    """A start_action step names an action (NAME or grace-action@NAME.service); any other
    unit ("sshd.service") is refused by the config, never started."""
    from graced.config.playbooks import ACTIONS as RULES
    from graced.plan import action_unit

    rule = RULES["start_action"].rule
    assert rule is not None
    problem = rule(StepConfig(action="start_action", unit=unit))
    assert (problem is None) == (runs is not None), (unit, problem)
    if runs is not None:
        assert action_unit(unit) == runs
