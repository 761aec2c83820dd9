"""``[[playbook]]`` tables and their ``[[playbook.step]]`` steps, one schema per action.

To add a key to a step action: add the field to :class:`StepConfig` and name it in that
action's entry of :data:`ACTIONS`; a playbook key goes into :class:`PlaybookConfig`.
References to detectors are checked once every table is read (graced/config/file.py).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .detectors import SEVERITIES
from .schema import (
    Check,
    ConfigError,
    Where,
    build_table,
    check,
    each,
    kind_of,
    known_user,
    non_empty,
    non_empty_list,
    one_of,
    positive,
    require,
    tables,
    unique_name,
    user_as_text,
)

RISKS = ("low", "medium", "high", "critical")
SIGNALS = ("TERM", "KILL", "HUP", "INT", "QUIT", "USR1", "USR2", "STOP", "CONT")


def _signal(v: str) -> str | None:
    return None if v.upper().removeprefix("SIG") in SIGNALS else (
        "must be one of " + ", ".join(SIGNALS))


def _env_list(v: list[str]) -> str | None:
    bad = [i for i, e in enumerate(v, 1) if "=" not in e or e.startswith("=")]
    # Not echoed: an entry may be a secret value.
    return f"entry {bad[0]} is not NAME=VALUE" if bad else None


@dataclass(frozen=True)
class StepConfig:
    """One ``[[playbook.step]]``: an action with its own timeout."""

    action: str = ""
    argv: list[str] = field(default_factory=list)
    shell: bool = False
    env: list[str] = field(default_factory=list, metadata=check(_env_list))
    cwd: str = ""
    timeout: float = field(default=30.0, metadata=check(positive))
    unit: str = ""
    signal: str = field(default="TERM", metadata=check(_signal))
    process: str = ""
    pid: int = field(default=0, metadata=check(positive))
    pid_file: str = ""
    match_cmdline: bool = False
    # signal: only processes whose real user is this one (a name or a uid this host
    # knows; a uid may be a TOML integer); without it, never a login user's process
    # found by name (graced.owners)
    user: str = field(default="", metadata=check(known_user))
    max_output: int = field(default=65536, metadata=check(positive))


StepRule = Callable[[StepConfig], "tuple[str, str] | None"]


@dataclass(frozen=True)
class Action:
    """One step action: its own keys (with any range check of its own) and rules."""

    keys: Mapping[str, Check | None]
    requires: tuple[str, ...] = ()
    rule: StepRule | None = None


def _run_rule(st: StepConfig) -> tuple[str, str] | None:
    if st.shell and len(st.argv) != 1:
        return "argv", "with shell = true, argv is one command line"
    return None


def _signal_rule(st: StepConfig) -> tuple[str, str] | None:
    if not (st.process or st.pid or st.pid_file):
        return "process", 'action "signal" needs process, pid or pid_file'
    if st.pid == 1:
        return "pid", "graced never signals pid 1 (init)"
    return None


def _action_rule(st: StepConfig) -> tuple[str, str] | None:
    # An installed action is chosen by the config alone: no placeholder, no path, and
    # only an action unit (grace-action@NAME.service): "sshd.service" is not an action.
    full = re.fullmatch(r"grace-action@(.*)\.service", st.unit)
    name = full.group(1) if full else st.unit
    if not re.fullmatch(r"[A-Za-z0-9_:-][A-Za-z0-9_.:-]{0,99}", name) or (
            not full and name.endswith(".service")):
        return "unit", ("an installed action's name: NAME or grace-action@NAME.service (NAME: "
                        "letters, digits and _.:- only, no placeholders)")
    return None


# systemd's unit-name grammar (unit_name_is_valid): letters, digits and ":-_.\\" (a
# systemd-escape'd name keeps its \x2d), one "@" before an instance that may hold more,
# at most 255 characters. The type suffix may be left to systemctl (".service").
_UNIT_NAME = re.compile(r"[A-Za-z0-9:_.\\-]+(@[A-Za-z0-9:_.\\@-]*)?")


def _unit_name(v: str) -> str | None:
    probe = re.sub(r"\{[a-z]+\}", "x", v)  # a placeholder is filled in when the step runs
    if len(probe) > 255 or probe.startswith(("-", ".")) or not _UNIT_NAME.fullmatch(probe):
        return ("not a systemd unit name (letters, digits and :-_.\\ only, one @ before an "
                "instance, placeholders such as {subject} allowed, at most 255 characters)")
    return None


# Keys every step has.
COMMON = ("action", "timeout")
ACTIONS: dict[str, Action] = {
    "run": Action({"argv": non_empty_list, "shell": None, "env": None, "cwd": None,
                   "max_output": None}, requires=("argv",), rule=_run_rule),
    "restart_unit": Action({"unit": _unit_name, "max_output": None}, requires=("unit",)),
    # An action the administrator installed: grace-action@UNIT.service (graced.8).
    "start_action": Action({"unit": non_empty, "max_output": None}, requires=("unit",),
                           rule=_action_rule),
    "signal": Action({"signal": None, "process": non_empty, "pid": None, "pid_file": None,
                      "match_cmdline": None, "user": None},
                     rule=_signal_rule),
}


@dataclass(frozen=True)
class PlaybookConfig:
    """One ``[[playbook]]``: which missions it matches, its risk, steps and verification."""

    name: str = field(default="", metadata=check(non_empty))
    detector: str = ""
    kind: str = ""
    subject: str = "*"
    severities: list[str] = field(default_factory=list, metadata=check(each(one_of(SEVERITIES))))
    risk: str = field(default="", metadata=check(one_of(RISKS)))
    budget: int = field(default=3, metadata=check(positive))
    budget_window: float = field(default=3600.0, metadata=check(positive))
    verify_timeout: float = field(default=60.0, metadata=check(positive))
    step: list[StepConfig] = field(default_factory=list)


def _build_step(raw: Any, at: Where, label: str) -> StepConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{at('playbook.step', None)}{label} must be a table")
    name = kind_of(raw, "action", tuple(ACTIONS), at, label, "playbook.step")
    action = ACTIONS[name]
    raw = user_as_text(raw, "playbook.step", at, label)
    st = build_table(StepConfig, raw, "playbook.step", at, label,
                     allowed=[*COMMON, *action.keys], owner=f'action "{name}"',
                     ranges=action.keys)
    require(raw, action.requires, at, label, "playbook.step", f'action "{name}"')
    problem = action.rule(st) if action.rule else None
    if problem:
        raise ConfigError(f"{at('playbook.step', problem[0])}{label} {problem[0]}: "
                          f"{problem[1]}")
    return st


def build_playbooks(value: Any, where: Where) -> list[PlaybookConfig]:
    """The ``playbook`` array; references are checked later, against the detectors."""
    out: list[PlaybookConfig] = []
    names: set[str] = set()
    step_index = 0
    for item, at, label in tables(value, "playbook", where):
        raw_steps = item.get("step", [])
        body = {k: v for k, v in item.items() if k != "step"}
        pb = build_table(PlaybookConfig, body, "playbook", at, label)
        unique_name(pb.name, names, at, label, "playbook")
        if not pb.risk:
            raise ConfigError(f"{at('playbook', None)}{label} risk: missing")
        if not isinstance(raw_steps, list) or not raw_steps:
            raise ConfigError(f"{at('playbook', None)}{label} step: at least one "
                              "[[playbook.step]] is required")
        steps = []
        for n, raw in enumerate(raw_steps):
            def step_at(table: str, key: str | None, i: int = step_index) -> str:
                return where("playbook.step", key, i)

            steps.append(_build_step(raw, step_at, f"{label} step {n + 1}"))
            step_index += 1
        out.append(dataclasses.replace(pb, step=steps))
    return out
