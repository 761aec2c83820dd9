"""A playbook's *plan* for a mission: exactly what would run, and its hash. Pure code.

Theory of operation
-------------------
A plan is a playbook's steps with the mission's values put in: for ``run`` the argv after
placeholders (``{subject}``, ``{value}``, ``{detector}``, ``{mission}``), the step's
environment and working directory; for ``restart_unit`` the unit and the systemctl argv;
for ``signal`` the signal and its targets (a process name, a pid or a pid file, and whose
processes: ``user``). The values are frozen in the plan when it is made, so the plan an
approver reads is the plan that runs, whatever the detector samples afterwards: every
later plan of that mission (a dry run, a run by hand, a replan after a reload) puts in the
same values (:func:`plan_values`), so an unchanged playbook gives the same hash.

The plan's ``sha256`` is the SHA-256 of its JSON with sorted keys and compact separators
(``json.dumps(plan, sort_keys=True, separators=(",", ":"), ensure_ascii=False)``, UTF-8),
computed over every field but ``sha256`` itself. An approval names this hash: if the
playbook changed since (a config reload), the same values give another hash and the
approval is refused.

Secrets stay in the executor. A ``run`` step's ``env`` values (an API token) are never in
a plan: the plan shows each variable the config sets by name, with ``sha256:`` and the
first 16 hex digits of the SHA-256 of its value (graced's own ``GRACE_*`` variables, the
mission's values, are shown as they are), so a changed value still changes the plan's
hash. An argv shows URLs redacted (graced/redact.py: no password, user or query
values); when that hid something, ``argv_sha256`` is the SHA-256 of the real argv's JSON.
:func:`command` gives what actually runs.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import re
from typing import Any

from .config import Config, PlaybookConfig, StepConfig
from .missions.engine import Mission
from .owners import uid_name
from .redact import HIDDEN, redact_text

# A plan may be named by a prefix of its SHA-256 this long, at least (missions show prints 16).
PLAN_PREFIX = 12


def names_plan(named: str, sha256: str) -> bool:
    """Whether ``named`` (a hash, or a prefix of at least PLAN_PREFIX hex digits) names
    the plan of hash ``sha256``."""
    return len(named) >= PLAN_PREFIX and sha256.startswith(named)

PLACEHOLDERS = ("subject", "value", "detector", "mission")
# systemd's tools by their fixed paths, never through PATH (whoever sets graced's
# environment does not choose what runs).
SYSTEMCTL = "/usr/bin/systemctl"
JOURNALCTL = "/usr/bin/journalctl"
ACTION_PREFIX = "grace-action@"


def mission_values(m: Mission) -> dict[str, str]:
    """The values placeholders stand for, as they are now."""
    return {"subject": m.subject,
            "value": "" if m.last_value is None else f"{m.last_value:g}",
            "detector": m.detector, "mission": str(m.id)}


def plan_values(m: Mission) -> dict[str, str]:
    """The values a plan for ``m`` puts in: those frozen in its plan once it has one (the
    plan missions show prints), else as they are now. Every sample moves ``value``: a
    plan made from the latest one would hash differently from the plan a person read."""
    return dict(m.plan["values"]) if m.plan and isinstance(m.plan.get("values"), dict) \
        else mission_values(m)


_PLACEHOLDER = re.compile("{(" + "|".join(re.escape(k) for k in PLACEHOLDERS) + ")}")


def substitute(text: str, values: dict[str, str]) -> str:
    """Literal placeholder replacement in one pass over ``text`` (no format(), and a
    value is never searched again: a subject spelled '{value}' stays that text)."""
    return _PLACEHOLDER.sub(lambda m: values.get(m.group(1), ""), text)


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


def command(st: StepConfig, values: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """What a step runs: its argv and the variables it gets (the secrets: never shown)."""
    if st.action == "run":
        argv = ["/bin/sh", "-c", st.argv[0]] if st.shell else [
            substitute(a, values) for a in st.argv]
        return argv, step_env(st, values)
    if st.action == "restart_unit":
        return [SYSTEMCTL, "restart", "--", substitute(st.unit, values)], {}
    if st.action == "start_action":
        return [SYSTEMCTL, "start", "--wait", "--",
                action_unit(substitute(st.unit, values))], {}
    return [], {}


def hidden(value: str) -> str:
    """How a plan shows a secret value: enough of its hash to see that it changed."""
    return "sha256:" + hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def describe(st: StepConfig, values: dict[str, str]) -> dict[str, Any]:
    """One step as it would run, as anyone may see it (no env value, URLs redacted)."""
    argv, env = command(st, values)
    if st.action == "run":
        shown = [redact_text(a) for a in argv]
        own = {item.partition("=")[0] for item in st.env}
        desc: dict[str, Any] = {
            "action": "run", "argv": shown,
            "env": {k: hidden(v) if k in own else v for k, v in env.items()},
            "cwd": st.cwd or None, "timeout": st.timeout}
        if shown != argv:
            desc["argv_sha256"] = hashlib.sha256(
                _json(argv).encode("utf-8", "surrogatepass")).hexdigest()
        return desc
    if st.action in ("restart_unit", "start_action"):
        return {"action": st.action, "unit": argv[-1], "argv": argv, "timeout": st.timeout}
    desc = {"action": "signal", "signal": st.signal.upper().removeprefix("SIG"),
            "process": substitute(st.process, values), "pid": st.pid,
            "pid_file": substitute(st.pid_file, values) if st.pid_file else "",
            "match_cmdline": st.match_cmdline, "user": st.user, "timeout": st.timeout}
    if (name := uid_name(st.user)) is not None:
        # A uid: the plan names the user this host knows by it ("rev9nu (1010)").
        desc["user_name"] = name
    return desc


def secrets(st: StepConfig, values: dict[str, str]) -> list[str]:
    """The values of the variables a step's config sets, to hide from its output."""
    own = {item.partition("=")[0] for item in st.env}
    return [v for k, v in step_env(st, values).items() if k in own and len(v) >= 4]


def redact_output(text: str, hide: list[str]) -> str:
    """A step's output or error as shown: URLs redacted, the step's env values hidden."""
    for value in sorted(hide, key=len, reverse=True):
        text = text.replace(value, HIDDEN)
    return redact_text(text)


def action_unit(name: str) -> str:
    """The unit an administrator installed for action ``name`` (``NAME`` or
    ``grace-action@NAME.service``): always grace-action@NAME.service, never another unit."""
    if name.startswith(ACTION_PREFIX):
        name = name.removeprefix(ACTION_PREFIX).removesuffix(".service")
    return f"{ACTION_PREFIX}{name}.service"


def digest(plan: dict[str, Any]) -> str:
    body = {k: v for k, v in plan.items() if k != "sha256"}
    return hashlib.sha256(_json(body).encode("utf-8", "surrogatepass")).hexdigest()


def build(pb: PlaybookConfig, values: dict[str, str]) -> dict[str, Any]:
    """The plan of ``pb`` for these values, with its ``sha256``."""
    plan: dict[str, Any] = {"playbook": pb.name, "risk": pb.risk, "values": dict(values),
                            "verify_timeout": pb.verify_timeout,
                            "steps": [{"step": i, **describe(st, values)}
                                      for i, st in enumerate(pb.step, 1)]}
    plan["sha256"] = digest(plan)
    return plan


def _by_hand(pb: PlaybookConfig, i: int, unit: str, why: str) -> str:
    return (f'playbook {pb.name} step {i} restarts "{unit}": {why}; list the units it may '
            "restart in the polkit rule by hand (graced(8), PRIVILEGED ACTIONS)")


def restart_units(cfg: Config) -> tuple[list[str], list[str]]:
    """The units restart_unit steps may restart, for the polkit rule, and warnings.

    A unit with placeholders is expanded where its values are known before anything
    runs: ``{subject}`` from the names a systemd detector's ``units`` lists (those the
    playbook's subject glob allows), ``{detector}`` from the detectors the playbook
    matches. A glob, a detector watching every unit or of another kind, ``{value}`` or
    ``{mission}``: those units cannot be listed; a warning says so.
    """
    units: set[str] = set()
    warnings: list[str] = []
    for pb in cfg.playbook:
        dets = [d for d in cfg.detector if d.enabled and (not pb.detector or d.name == pb.detector)
                and (not pb.kind or d.kind == pb.kind)]
        for i, st in enumerate(pb.step, 1):
            if st.action != "restart_unit":
                continue
            if "{" not in st.unit:
                units.add(st.unit)
                continue
            if "{value}" in st.unit or "{mission}" in st.unit:
                warnings.append(_by_hand(pb, i, st.unit, "{value} and {mission} are known "
                                         "only when it runs"))
                continue
            if not dets:
                warnings.append(_by_hand(pb, i, st.unit, "no detector matches the playbook"))
            for d in dets:
                values = {"detector": d.name}
                if "{subject}" not in st.unit:
                    units.add(substitute(st.unit, values))
                elif d.kind != "systemd" or not d.units:
                    why = (f"detector {d.name} watches every unit" if d.kind == "systemd"
                           else f"the subjects of detector {d.name} (kind {d.kind}) are not "
                                "unit names known before it runs")
                    warnings.append(_by_hand(pb, i, st.unit, why))
                else:
                    for name in d.units:
                        if any(c in name for c in "*?["):
                            warnings.append(_by_hand(pb, i, st.unit, f"detector {d.name} "
                                                     f'watches units by the glob "{name}"'))
                        elif fnmatch.fnmatchcase(name, pb.subject or "*"):
                            units.add(substitute(st.unit, {**values, "subject": name}))
    return sorted(units), warnings
