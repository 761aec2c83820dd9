"""A playbook's *plan* for a mission: exactly what would run, and its hash. Pure code.

Theory of operation
-------------------
A plan is a playbook's steps with the mission's values put in: for ``run`` the argv after
placeholders (``{subject}``, ``{value}``, ``{detector}``, ``{mission}``), the step's
environment and working directory; for ``restart_unit`` the unit and the systemctl argv;
for ``signal`` the signal and its targets (a process name, a pid or a pid file). The
values are frozen in the plan when it is made, so the plan an approver reads is the plan
that runs, whatever the detector samples afterwards.

The plan's ``sha256`` is the SHA-256 of its JSON with sorted keys and compact separators
(``json.dumps(plan, sort_keys=True, separators=(",", ":"), ensure_ascii=False)``, UTF-8),
computed over every field but ``sha256`` itself. An approval names this hash: if the
playbook changed since (a config reload), the same values give another hash and the
approval is refused.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from typing import Any

from .config import PlaybookConfig, StepConfig
from .missions.engine import Mission

PLACEHOLDERS = ("subject", "value", "detector", "mission")


def mission_values(m: Mission) -> dict[str, str]:
    """The values placeholders stand for, as they are now."""
    return {"subject": m.subject,
            "value": "" if m.last_value is None else f"{m.last_value:g}",
            "detector": m.detector, "mission": str(m.id)}


def substitute(text: str, values: dict[str, str]) -> str:
    """Literal placeholder replacement (no format(): nothing in a value is interpreted)."""
    for key in PLACEHOLDERS:
        text = text.replace("{" + key + "}", values.get(key, ""))
    return text


def matches(pb: PlaybookConfig, m: Mission) -> bool:
    """Whether a playbook's match keys select this mission."""
    return ((not pb.detector or pb.detector == m.detector)
            and (not pb.kind or pb.kind == m.kind)
            and fnmatch.fnmatchcase(m.subject, pb.subject or "*")
            and (not pb.severities or m.severity in pb.severities))


def step_env(st: StepConfig, values: dict[str, str]) -> dict[str, str]:
    """The variables a run step gets on top of graced's environment."""
    env = {"GRACE_MISSION": values.get("mission", ""), "GRACE_SUBJECT": values.get(
        "subject", ""), "GRACE_DETECTOR": values.get("detector", ""),
           "GRACE_VALUE": values.get("value", "")}
    for item in st.env:
        name, _, val = item.partition("=")
        env[name] = substitute(val, values)
    return env


def describe(st: StepConfig, values: dict[str, str]) -> dict[str, Any]:
    """One step as it would run."""
    if st.action == "run":
        argv = ["/bin/sh", "-c", st.argv[0]] if st.shell else [
            substitute(a, values) for a in st.argv]
        return {"action": "run", "argv": argv, "env": step_env(st, values),
                "cwd": st.cwd or None, "timeout": st.timeout}
    if st.action == "restart_unit":
        unit = substitute(st.unit, values)
        return {"action": "restart_unit", "unit": unit,
                "argv": ["systemctl", "restart", "--", unit], "timeout": st.timeout}
    if st.action == "start_action":
        unit = action_unit(substitute(st.unit, values))
        return {"action": "start_action", "unit": unit,
                "argv": ["systemctl", "start", "--wait", "--", unit], "timeout": st.timeout}
    return {"action": "signal", "signal": st.signal.upper().removeprefix("SIG"),
            "process": substitute(st.process, values), "pid": st.pid,
            "pid_file": substitute(st.pid_file, values) if st.pid_file else "",
            "timeout": st.timeout}


def action_unit(name: str) -> str:
    """The unit an administrator installed for action ``name``: grace-action@NAME.service."""
    return name if name.endswith(".service") else f"grace-action@{name}.service"


def digest(plan: dict[str, Any]) -> str:
    body = {k: v for k, v in plan.items() if k != "sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def build(pb: PlaybookConfig, values: dict[str, str]) -> dict[str, Any]:
    """The plan of ``pb`` for these values, with its ``sha256``."""
    plan: dict[str, Any] = {"playbook": pb.name, "risk": pb.risk, "values": dict(values),
                            "verify_timeout": pb.verify_timeout,
                            "steps": [{"step": i, **describe(st, values)}
                                      for i, st in enumerate(pb.step, 1)]}
    plan["sha256"] = digest(plan)
    return plan
