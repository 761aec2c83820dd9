"""``[[detector]]`` tables: the keys every detector has, and one small schema per kind.

:class:`DetectorConfig` is the typed value the detectors read. Which of its keys a table
may set, and in which range, depends on the kind: :data:`KINDS` maps each kind to a
:class:`Kind` naming its own keys (beyond :data:`COMMON`) with any range check of its own,
the keys it requires, its default threshold and its default subject.

To add a key to a kind: add the field to :class:`DetectorConfig` (type, default, and a
check if every kind shares its range), then name it in that kind's ``keys`` (with a check
if the range is the kind's own); a key every kind takes goes into :data:`COMMON` instead.
A new kind is a new :data:`KINDS` entry plus its class in
graced/detectors/base.py. Document both in man/graced.toml.5.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..redact import redact_url
from .schema import (
    Check,
    ConfigError,
    Where,
    absolute_path,
    at_least,
    between,
    build_table,
    check,
    each,
    http_url,
    kind_of,
    known_user,
    non_empty,
    non_empty_list,
    non_negative,
    one_of,
    positive,
    proxy_setting,
    regex,
    require,
    tables,
    unique_name,
    user_as_text,
)

SEVERITIES = ("low", "medium", "high", "critical")
MEMORY_EVENTS = ("low", "high", "max", "oom", "oom_kill", "oom_group_kill")


@dataclass(frozen=True)
class DetectorConfig:
    """One ``[[detector]]`` table (every kind's keys; a table sets only its kind's)."""

    name: str = field(default="", metadata=check(non_empty))
    kind: str = ""
    interval: float = field(default=5.0, metadata=check(at_least(0.01, " s")))
    severity: str = field(default="medium", metadata=check(one_of(SEVERITIES)))
    subject: str = ""
    threshold: float | None = None
    below: bool = False
    baseline: bool = False
    # the baseline's knobs (graced/detectors/baseline.py), for every kind
    sensitivity: float = field(default=1.0, metadata=check(positive))
    memory: int = field(default=200, metadata=check(positive))
    hold: int = field(default=350, metadata=check(non_negative))
    season: float = field(default=86400.0, metadata=check(non_negative))
    # a deviation smaller than this is never news (None: the kind's, from its unit)
    min_change: float | None = field(default=None, metadata=check(non_negative))
    enabled: bool = True
    # disk, inodes
    path: str = "/"
    # process, process_rss
    process: str = ""
    match_cmdline: bool = False
    # process, process_rss: only processes whose real user is this one (a name or a uid),
    # so another user's process of the same name is no decoy (review of #19, attacker 3);
    # checked as a signal step's (a name or a uid this host knows; a uid may be a TOML
    # integer), when the config is loaded
    user: str = field(default="", metadata=check(known_user))
    min_count: int = field(default=1, metadata=check(non_negative))
    # tcp
    host: str = ""
    port: int = 0
    send: str = ""
    expect: str = ""
    timeout: float = field(default=5.0, metadata=check(positive))
    # sqlite, postgres
    database: str = ""
    dsn: str = ""
    query: str = "SELECT 1"
    # command
    argv: list[str] = field(default_factory=list)
    # http
    url: str = ""
    expect_status: int = field(default=200, metadata=check(between(100, 599)))
    # "none": straight to the URL's host; "env": http_proxy/https_proxy, never for
    # loopback or what no_proxy names; or an http:// proxy URL
    proxy: str = field(default="none", metadata=check(proxy_setting))
    # http: the URL's path is a secret (a token in it): shown as a hash, never as is
    secret_path: bool = False
    # systemd: unit names or globs (none: every unit)
    units: list[str] = field(default_factory=list, metadata=check(each(non_empty)))
    # log, journald
    file: str = ""
    unit: str = ""
    pattern: str = field(default="ERROR", metadata=check(regex))
    request_pattern: str = field(default="", metadata=check(regex))
    window: float = field(default=60.0, metadata=check(positive))
    max_ratio: float | None = field(default=None, metadata=check(
        between(0, 1, open_low=True)))
    max_rate: float | None = field(default=None, metadata=check(positive))
    min_lines: int = field(default=5, metadata=check(non_negative))
    # psi_memory, psi_cpu, psi_io
    stall: str = field(default="some", metadata=check(one_of(("some", "full"))))
    stall_window: float = field(default=2.0, metadata=check(between(0.5, 10)))
    cgroup: str = ""
    # cgroup_memory: which counters of memory.events count
    memory_events: list[str] = field(default_factory=lambda: ["max", "oom", "oom_kill"],
                                     metadata=check(each(one_of(MEMORY_EVENTS))))

    @property
    def effective_threshold(self) -> float | None:
        if self.threshold is not None:
            return self.threshold
        kind = KINDS.get(self.kind)
        return kind.threshold if kind else None

    @property
    def effective_min_change(self) -> float:
        if self.min_change is not None:
            return self.min_change
        kind = KINDS.get(self.kind)
        return kind.min_change if kind else 0.0

    @property
    def effective_subject(self) -> str:
        if self.subject:
            return self.subject
        kind = KINDS.get(self.kind)
        return kind.subject(self) if kind else "host"


Rule = Callable[[DetectorConfig], "tuple[str, str] | None"]


SHELLS = ("sh", "bash", "dash", "zsh", "ksh", "ash", "busybox")
SUBJECT_MAX = 60


def command_subject(argv: list[str] | tuple[str, ...]) -> str:
    """A command probe's default subject: the program (argv[0]), or for a shell's ``-c``
    the script itself (whitespace folded, cut to 60 characters with …), so that two
    ``sh -c`` checks are told apart."""
    if not argv:
        return ""
    if len(argv) >= 3 and argv[0].rsplit("/", 1)[-1] in SHELLS and argv[1] == "-c":
        script = " ".join(argv[2].split())
        return script if len(script) <= SUBJECT_MAX else script[:SUBJECT_MAX - 1] + "…"
    return argv[0]


def public_dsn(dsn: str) -> str:
    """A PostgreSQL connection string without its password (a mission's subject)."""
    text = re.sub(r"(?i)\bpassword\s*=\s*('(?:[^'\\]|\\.)*'|\S+)", "password=***", dsn)
    return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", text)


@dataclass(frozen=True)
class Kind:
    """One detector kind: its own keys (with the kind's own range check, or None), the keys
    it requires, its default threshold, default subject and any rule across keys."""

    keys: Mapping[str, Check | None] = field(default_factory=dict)
    requires: tuple[str, ...] = ()
    threshold: float | None = None
    subject: Callable[[DetectorConfig], str] = lambda d: "host"
    rule: Rule | None = None
    min_change: float = 0.0  # the baseline's smallest news, in the kind's unit


# Keys every kind has.
COMMON = ("name", "kind", "interval", "severity", "subject", "threshold", "below",
          "baseline", "sensitivity", "memory", "hold", "season", "min_change", "enabled")

_PERCENT: dict[str, Check | None] = {"threshold": between(0, 100)}
_MS: dict[str, Check | None] = {"threshold": positive, "timeout": None}
_LOG: dict[str, Check | None] = {"threshold": non_negative, "pattern": None,
                                 "request_pattern": None, "window": None,
                                 "max_ratio": None, "max_rate": None, "min_lines": None}


_PSI: dict[str, Check | None] = {"threshold": between(0, 100, open_low=True), "stall": None,
                                 "stall_window": None, "cgroup": absolute_path}


PCT = 1.0
"""The baseline's smallest news for a percentage: a point (disk at 40.0 % then 40.4 %)."""
MS = 1.0
"""... and for a latency in milliseconds: 1 ms (a query at 0.2 ms, then 0.9 ms)."""


def _load_window(v: float) -> str | None:
    return None if v in (60, 300, 900) else "must be 60, 300 or 900 (the kernel's averages)"


def _cgroup_rule(d: DetectorConfig) -> tuple[str, str] | None:
    if bool(d.cgroup) == bool(d.unit):
        return "cgroup", "set either cgroup (a cgroup v2 directory) or unit"
    if not d.memory_events:
        return "memory_events", "name at least one counter of memory.events"
    return None


def _log_rule(d: DetectorConfig) -> tuple[str, str] | None:
    if d.max_ratio is None and d.max_rate is None:
        return "max_ratio", "set max_ratio and/or max_rate for a log detector"
    return None


def _needs_threshold(d: DetectorConfig) -> tuple[str, str] | None:
    if d.threshold is None and not d.baseline:
        return "threshold", f'kind "{d.kind}" needs a threshold or baseline = true'
    return None


PROBES = frozenset({"tcp", "sqlite", "postgres", "command", "http"})
"""Kinds that probe a target: a failed sample is the target failing (integration's
'failing'); for the other kinds a failed sample (no process running) is the anomaly itself."""

KINDS: dict[str, Kind] = {
    "memory": Kind(_PERCENT, min_change=PCT, threshold=90.0),
    "swap": Kind(_PERCENT, min_change=PCT, threshold=80.0),
    "cpu": Kind({**_PERCENT, "window": None}, threshold=95.0, min_change=PCT),
    "load": Kind({"threshold": positive, "window": _load_window}, threshold=2.0,
                 min_change=0.05),
    "disk": Kind({**_PERCENT, "path": absolute_path}, threshold=90.0, min_change=PCT,
                 subject=lambda d: d.path),
    "inodes": Kind({**_PERCENT, "path": absolute_path}, threshold=90.0, min_change=PCT,
                   subject=lambda d: d.path),
    "process": Kind({"threshold": non_negative, "process": non_empty, "match_cmdline": None,
                     "min_count": None, "user": None}, requires=("process",),
                    subject=lambda d: d.process),
    "process_rss": Kind({"threshold": positive, "process": non_empty, "match_cmdline": None,
                         "user": None},
                        requires=("process",), subject=lambda d: d.process,
                        rule=_needs_threshold, min_change=1.0),
    "tcp": Kind({**_MS, "host": non_empty, "port": between(1, 65535), "send": None,
                 "expect": None}, requires=("host", "port"), threshold=1000.0, min_change=MS,
                subject=lambda d: f"{d.host}:{d.port}"),
    "sqlite": Kind({**_MS, "database": non_empty, "query": non_empty},
                   requires=("database",), threshold=1000.0, min_change=MS,
                   subject=lambda d: d.database),
    "postgres": Kind({**_MS, "dsn": non_empty, "query": non_empty}, requires=("dsn",),
                     threshold=100.0, min_change=MS, subject=lambda d: public_dsn(d.dsn)),
    "command": Kind({**_MS, "argv": non_empty_list}, requires=("argv",), threshold=5000.0,
                    min_change=MS,
                    subject=lambda d: command_subject(d.argv)),
    "http": Kind({**_MS, "url": http_url, "expect_status": None, "proxy": None,
                  "secret_path": None}, requires=("url",), threshold=2000.0, min_change=MS,
                 subject=lambda d: redact_url(d.url, hide_path=d.secret_path)),
    "log": Kind({**_LOG, "file": absolute_path}, requires=("file",),
                subject=lambda d: d.file, rule=_log_rule),
    "journald": Kind({**_LOG, "unit": non_empty, "timeout": None}, requires=("unit",),
                     subject=lambda d: d.unit, rule=_log_rule),
    "systemd": Kind({"units": None, "timeout": None}, subject=lambda d: "units"),
    "psi_memory": Kind(_PSI, threshold=10.0, min_change=PCT,
                       subject=lambda d: d.cgroup or "host"),
    "psi_cpu": Kind(_PSI, threshold=50.0, min_change=PCT,
                    subject=lambda d: d.cgroup or "host"),
    "psi_io": Kind(_PSI, threshold=30.0, min_change=PCT,
                   subject=lambda d: d.cgroup or "host"),
    "cgroup_memory": Kind({"cgroup": absolute_path, "unit": non_empty, "timeout": None,
                           "memory_events": None}, subject=lambda d: d.unit or d.cgroup,
                          rule=_cgroup_rule),
    "value": Kind({"file": absolute_path}, requires=("file",), subject=lambda d: d.file,
                  rule=_needs_threshold),
}
DETECTOR_KINDS = tuple(KINDS)
KIND_DEFAULT_THRESHOLD: dict[str, float | None] = {k: v.threshold for k, v in KINDS.items()}


def keys_of_kind(kind: str) -> list[str]:
    """Every key a detector of this kind may set."""
    return [*COMMON, *(k for k in KINDS[kind].keys if k not in COMMON)]


def build_detectors(value: Any, where: Where) -> list[DetectorConfig]:
    """The ``detector`` array: each table checked against its kind's schema."""
    out: list[DetectorConfig] = []
    names: set[str] = set()
    for item, at, label in tables(value, "detector", where):
        name = kind_of(item, "kind", DETECTOR_KINDS, at, label, "detector")
        kind = KINDS[name]
        item = user_as_text(item, "detector", at, label)
        det = build_table(DetectorConfig, item, "detector", at, label,
                          allowed=keys_of_kind(name), owner=f'kind "{name}"', ranges=kind.keys)
        unique_name(det.name, names, at, label, "detector")
        require(item, kind.requires, at, label, "detector", f'kind "{name}"')
        problem = kind.rule(det) if kind.rule else None
        if problem:
            raise ConfigError(f"{at('detector', problem[0])}{label} {problem[0]}: {problem[1]}")
        out.append(det)
    return out


def default_detectors() -> list[DetectorConfig]:
    """The host detectors the embedded config turns on."""
    return [
        DetectorConfig(name="memory", kind="memory", severity="high"),
        DetectorConfig(name="swap", kind="swap", severity="medium"),
        # Saturation that lasts, not a busy minute: a shared host running someone's build or
        # test suite is busy, not broken (10 minutes of CPU, the 15-minute load).
        DetectorConfig(name="cpu", kind="cpu", severity="medium", window=600.0),
        DetectorConfig(name="load", kind="load", severity="medium", window=900.0),
        DetectorConfig(name="disk", kind="disk", path="/", severity="high"),
        DetectorConfig(name="inodes", kind="inodes", path="/", severity="high"),
    ]


def compact(det: DetectorConfig) -> dict[str, Any]:
    """The keys of a detector that differ from the defaults (for ``config default``)."""
    defaults = DetectorConfig()
    return {k: v for k, v in dataclasses.asdict(det).items()
            if v is not None and (k in ("name", "kind") or v != getattr(defaults, k))}
