"""graced.toml -> a frozen, typed :class:`Config`.

Unknown keys, wrong types and bad values are errors that name the file, the line
(where it can be found), the key and the reason. With no file, :func:`default_config`
gives the embedded default.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import tomli_w

from . import paths

CONFIG_VERSION = 1


class ConfigError(Exception):
    """A config file that cannot be used; the message says where and why."""


def _positive(v: float) -> str | None:
    return None if v > 0 else "must be greater than 0"


def _mode(v: str) -> str | None:
    if not re.fullmatch(r"0?[0-7]{3}", v):
        return "must be an octal file mode such as \"0660\""
    return None


def _listen(v: list[str]) -> str | None:
    for item in v:
        m = re.fullmatch(r"\[?([0-9A-Za-z.:-]+?)\]?:(\d{1,5})", item)
        if not m or not 0 <= int(m.group(2)) <= 65535:
            return f"{item!r} is not HOST:PORT"
    return None


def _sync(v: str) -> str | None:
    return None if v in ("full", "normal") else 'must be "full" or "normal"'


def _log_level(v: str) -> str | None:
    return None if v in ("debug", "info", "warning", "error") else (
        'must be one of "debug", "info", "warning", "error"'
    )


def _check(fn: Any) -> dict[str, Any]:
    return {"check": fn}


@dataclass(frozen=True)
class DaemonConfig:
    """The ``[daemon]`` table."""

    state_dir: str = ""
    socket: str = ""
    socket_mode: str = field(default="0660", metadata=_check(_mode))
    listen: list[str] = field(default_factory=list, metadata=_check(_listen))
    allowed_origins: list[str] = field(default_factory=list)
    heartbeat_interval: float = field(default=5.0, metadata=_check(_positive))
    max_request_bytes: int = field(default=65536, metadata=_check(_positive))
    max_clients: int = field(default=256, metadata=_check(_positive))
    client_queue: int = field(default=8192, metadata=_check(_positive))
    send_timeout: float = field(default=5.0, metadata=_check(_positive))
    shutdown_timeout: float = field(default=5.0, metadata=_check(_positive))
    log_level: str = field(default="info", metadata=_check(_log_level))


@dataclass(frozen=True)
class JournalConfig:
    """The ``[journal]`` table."""

    synchronous: str = field(default="normal", metadata=_check(_sync))
    batch_max: int = field(default=4096, metadata=_check(_positive))


SEVERITIES = ("low", "medium", "high", "critical")
DETECTOR_KINDS = ("memory", "swap", "cpu", "load", "disk", "inodes", "process", "process_rss",
                  "tcp", "sqlite", "command", "http", "log", "journald", "value")


def _severity(v: str) -> str | None:
    return None if v in SEVERITIES else "must be one of " + ", ".join(f'"{x}"' for x in SEVERITIES)


def _kind(v: str) -> str | None:
    return None if v in DETECTOR_KINDS else (
        "must be one of " + ", ".join(f'"{x}"' for x in DETECTOR_KINDS))


def _non_empty(v: str) -> str | None:
    return None if v.strip() else "must not be empty"


def _unit_interval(v: float) -> str | None:
    return None if 0 < v < 1 else "must be between 0 and 1"


def _non_negative(v: float) -> str | None:
    return None if v >= 0 else "must not be negative"


# What each detector kind needs, and what its value means.
KIND_REQUIRES: dict[str, tuple[str, ...]] = {
    "process": ("process",), "process_rss": ("process",), "tcp": ("host", "port"),
    "sqlite": ("database",), "command": ("argv",), "http": ("url",),
    "log": ("file",), "journald": ("unit",), "value": ("file",),
}
KIND_DEFAULT_THRESHOLD: dict[str, float | None] = {
    "memory": 90.0, "swap": 80.0, "cpu": 95.0, "load": 2.0, "disk": 90.0, "inodes": 90.0,
    "process": None, "process_rss": None, "tcp": 1000.0, "sqlite": 1000.0, "command": 5000.0,
    "http": 2000.0, "log": None, "journald": None, "value": None,
}


@dataclass(frozen=True)
class DetectorConfig:
    """One ``[[detector]]`` table."""

    name: str = field(default="", metadata=_check(_non_empty))
    kind: str = field(default="", metadata=_check(_kind))
    interval: float = field(default=5.0, metadata=_check(_positive))
    severity: str = field(default="medium", metadata=_check(_severity))
    subject: str = ""
    threshold: float | None = None
    below: bool = False
    baseline: bool = False
    enabled: bool = True
    # disk, inodes
    path: str = "/"
    # process, process_rss
    process: str = ""
    match_cmdline: bool = False
    min_count: int = field(default=1, metadata=_check(_non_negative))
    # tcp
    host: str = ""
    port: int = 0
    send: str = ""
    expect: str = ""
    timeout: float = field(default=5.0, metadata=_check(_positive))
    # sqlite
    database: str = ""
    query: str = "SELECT 1"
    # command
    argv: list[str] = field(default_factory=list)
    # http
    url: str = ""
    expect_status: int = 200
    # log, journald
    file: str = ""
    unit: str = ""
    pattern: str = "ERROR"
    window: float = field(default=60.0, metadata=_check(_positive))
    max_ratio: float | None = None
    max_rate: float | None = None
    min_lines: int = field(default=5, metadata=_check(_non_negative))

    @property
    def effective_threshold(self) -> float | None:
        return self.threshold if self.threshold is not None else KIND_DEFAULT_THRESHOLD.get(
            self.kind)

    @property
    def effective_subject(self) -> str:
        if self.subject:
            return self.subject
        return {
            "disk": self.path, "inodes": self.path, "process": self.process,
            "process_rss": self.process, "tcp": f"{self.host}:{self.port}",
            "sqlite": self.database, "command": " ".join(self.argv[:1]), "http": self.url,
            "log": self.file, "journald": self.unit, "value": self.file,
        }.get(self.kind, "host")

    def problem(self) -> tuple[str, str] | None:
        """(key, reason) if this detector cannot work as configured."""
        for key in KIND_REQUIRES.get(self.kind, ()):
            if not getattr(self, key):
                return key, f"required for kind \"{self.kind}\""
        if self.kind == "tcp" and not 0 < self.port < 65536:
            return "port", "must be 1-65535"
        if self.kind in ("log", "journald"):
            try:
                re.compile(self.pattern)
            except re.error as exc:
                return "pattern", f"not a valid regular expression: {exc}"
            if self.max_ratio is None and self.max_rate is None:
                return "max_ratio", "set max_ratio and/or max_rate for a log detector"
        if self.max_ratio is not None and not 0 < self.max_ratio <= 1:
            return "max_ratio", "must be in (0, 1]"
        if (self.effective_threshold is None and not self.baseline
                and self.kind in ("process_rss", "value")):
            return "threshold", f"kind \"{self.kind}\" needs a threshold or baseline = true"
        return None


def default_detectors() -> list[DetectorConfig]:
    """The host detectors the embedded config turns on."""
    return [
        DetectorConfig(name="memory", kind="memory", severity="high"),
        DetectorConfig(name="swap", kind="swap", severity="medium"),
        DetectorConfig(name="cpu", kind="cpu", severity="medium"),
        DetectorConfig(name="load", kind="load", severity="medium"),
        DetectorConfig(name="disk", kind="disk", path="/", severity="high"),
        DetectorConfig(name="inodes", kind="inodes", path="/", severity="high"),
    ]


RISKS = ("low", "medium", "high", "critical")
ACTIONS = ("run", "restart_unit", "signal")
SIGNALS = ("TERM", "KILL", "HUP", "INT", "QUIT", "USR1", "USR2", "STOP", "CONT")


def _risk(v: str) -> str | None:
    return None if v in RISKS else "must be one of " + ", ".join(f'"{x}"' for x in RISKS)


def _action(v: str) -> str | None:
    return None if v in ACTIONS else "must be one of " + ", ".join(f'"{x}"' for x in ACTIONS)


def _signal(v: str) -> str | None:
    return None if v.upper().removeprefix("SIG") in SIGNALS else (
        "must be one of " + ", ".join(SIGNALS))


def _act_mode(v: str) -> str | None:
    return None if v in ("act", "observe") else 'must be "act" or "observe"'


def _env_list(v: list[str]) -> str | None:
    bad = [e for e in v if "=" not in e or e.startswith("=")]
    return f"{bad[0]!r} is not NAME=VALUE" if bad else None


@dataclass(frozen=True)
class StepConfig:
    """One ``[[playbook.step]]``: an action with its own timeout."""

    action: str = field(default="", metadata=_check(_action))
    argv: list[str] = field(default_factory=list)
    shell: bool = False
    env: list[str] = field(default_factory=list, metadata=_check(_env_list))
    cwd: str = ""
    timeout: float = field(default=30.0, metadata=_check(_positive))
    unit: str = ""
    signal: str = field(default="TERM", metadata=_check(_signal))
    process: str = ""
    pid: int = 0
    pid_file: str = ""
    max_output: int = field(default=65536, metadata=_check(_positive))

    def problem(self) -> tuple[str, str] | None:
        if not self.action:
            return "action", "missing"
        if self.action == "run" and not self.argv:
            return "argv", 'required for action "run"'
        if self.action == "run" and self.shell and len(self.argv) != 1:
            return "argv", "with shell = true, argv is one command line"
        if self.action == "restart_unit" and not self.unit:
            return "unit", 'required for action "restart_unit"'
        if self.action == "signal" and not (self.process or self.pid or self.pid_file):
            return "process", 'action "signal" needs process, pid or pid_file'
        return None


@dataclass(frozen=True)
class PlaybookConfig:
    """One ``[[playbook]]``: which missions it matches, its risk, steps and verification."""

    name: str = field(default="", metadata=_check(_non_empty))
    detector: str = ""
    kind: str = ""
    subject: str = "*"
    severities: list[str] = field(default_factory=list)
    risk: str = field(default="", metadata=_check(_risk))
    budget: int = field(default=3, metadata=_check(_positive))
    budget_window: float = field(default=3600.0, metadata=_check(_positive))
    verify_timeout: float = field(default=60.0, metadata=_check(_positive))
    step: list[StepConfig] = field(default_factory=list)


@dataclass(frozen=True)
class NotifierConfig:
    """One ``[[notifier]]``: a command that gets the mission as JSON, or a webhook."""

    name: str = field(default="", metadata=_check(_non_empty))
    kind: str = ""
    argv: list[str] = field(default_factory=list)
    url: str = ""
    timeout: float = field(default=10.0, metadata=_check(_positive))
    on: list[str] = field(default_factory=lambda: ["awaiting_approval", "escalated", "failed"])


@dataclass(frozen=True)
class RemediationConfig:
    """The ``[remediation]`` table."""

    mode: str = field(default="act", metadata=_check(_act_mode))
    max_actions_per_hour: int = field(default=20, metadata=_check(_positive))
    approval_timeout: float = field(default=3600.0, metadata=_check(_positive))
    approvers: list[str] = field(default_factory=list)
    approver_groups: list[str] = field(default_factory=list)
    authorized_keys: list[str] = field(default_factory=list)
    request_window: float = field(default=60.0, metadata=_check(_positive))


def _strategy(v: str) -> str | None:
    from .learning.ranking import STRATEGIES

    return None if v in STRATEGIES else "must be one of " + ", ".join(
        f'"{x}"' for x in STRATEGIES)


def _fraction(v: float) -> str | None:
    return None if 0 <= v <= 1 else "must be between 0 and 1"


@dataclass(frozen=True)
class LearningConfig:
    """The ``[learning]`` table."""

    strategy: str = field(default="thompson", metadata=_check(_strategy))
    demote_after: int = field(default=3, metadata=_check(_positive))
    demote_below: float = field(default=0.25, metadata=_check(_fraction))
    similar_limit: int = field(default=10, metadata=_check(_positive))
    text_weight: float = field(default=0.5, metadata=_check(_fraction))


@dataclass(frozen=True)
class MissionsConfig:
    """The ``[missions]`` table."""

    resolve_after: int = field(default=3, metadata=_check(_positive))
    flap_window: float = field(default=600.0, metadata=_check(_non_negative))
    update_interval: float = field(default=60.0, metadata=_check(_positive))


@dataclass(frozen=True)
class Config:
    """The whole configuration; every value typed and checked."""

    version: int = CONFIG_VERSION
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    journal: JournalConfig = field(default_factory=JournalConfig)
    missions: MissionsConfig = field(default_factory=MissionsConfig)
    detector: list[DetectorConfig] = field(default_factory=default_detectors)
    remediation: RemediationConfig = field(default_factory=RemediationConfig)
    learning: LearningConfig = field(default_factory=LearningConfig)
    playbook: list[PlaybookConfig] = field(default_factory=list)
    notifier: list[NotifierConfig] = field(default_factory=list)
    source: str = field(default="<embedded default>", metadata={"internal": True})

    @property
    def state_dir(self) -> Path:
        return Path(self.daemon.state_dir)

    @property
    def socket_path(self) -> Path:
        return Path(self.daemon.socket)


class _Locator:
    """Finds the line of ``[table] key = ...`` in the TOML text, for error messages."""

    def __init__(self, text: str) -> None:
        self.lines = text.splitlines()

    def line_of(self, table: str, key: str | None, index: int = 0) -> int | None:
        """Line of ``key`` in the ``index``-th ``[table]`` (or its header if key is None)."""
        current, seen = "", -1
        for no, raw in enumerate(self.lines, 1):
            line = raw.strip()
            header = re.fullmatch(r"\[\[?\s*([^\]]+?)\s*\]\]?(\s*#.*)?", line)
            if header:
                current = header.group(1)
                if current == table:
                    seen += 1
                    if key is None and seen == index:
                        return no
                continue
            m = re.match(r"([A-Za-z0-9_\-\"']+)\s*=", line)
            if (m and current == table and m.group(1).strip("\"'") == key
                    and (seen == index or table == "")):
                return no
        return None


def _type_name(value: Any) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string",
            list: "array", dict: "table"}.get(type(value), type(value).__name__)


def _coerce(value: Any, hint: Any) -> tuple[bool, Any]:
    """Return (ok, value) for a TOML value against a type hint."""
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        for arg in get_args(hint):
            ok, out = _coerce(value, arg)
            if ok:
                return ok, out
        return False, None
    if hint is type(None):
        return False, None
    if origin is list:
        (inner,) = get_args(hint)
        if not isinstance(value, list):
            return False, None
        out = []
        for item in value:
            ok, v = _coerce(item, inner)
            if not ok:
                return False, None
            out.append(v)
        return True, out
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        return False, None
    if hint is int:
        return (isinstance(value, int) and not isinstance(value, bool)), value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is str:
        return isinstance(value, str), value
    return False, None


def _expected(hint: Any) -> str:
    if get_origin(hint) is list:
        return "an array of " + _expected(get_args(hint)[0]) + "s"
    return {float: "a number", int: "an integer", bool: "a boolean", str: "a string"}.get(
        hint, str(hint)
    )


def _build_table(cls: type, data: Any, table: str, where: Any, label: str = "") -> Any:
    label = label or f"[{table}]"
    if not isinstance(data, dict):
        raise ConfigError(f"{where(table, None)}{label} must be a table")
    hints = get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in known:
            choices = ", ".join(sorted(known))
            raise ConfigError(
                f"{where(table, key)}{label} {key}: unknown key (known keys: {choices})"
            )
        hint = hints[key]
        ok, out = _coerce(value, hint)
        if not ok:
            raise ConfigError(
                f"{where(table, key)}{label} {key}: expected {_expected(hint)}, "
                f"got {_type_name(value)} {value!r}"
            )
        check = known[key].metadata.get("check")
        problem = check(out) if check else None
        if problem:
            raise ConfigError(f"{where(table, key)}{label} {key}: {problem}")
        kwargs[key] = out
    return cls(**kwargs)


def _tables(value: Any, name: str, where: Any) -> Iterator[tuple[Any, Any, str]]:
    """Each table of an array of tables, with its locator and a label for messages."""
    if not isinstance(value, list):
        raise ConfigError(f"{where('', name)}{name}: must be an array of tables ([[{name}]])")
    for index, item in enumerate(value):
        def at(table: str, key: str | None, index: int = index) -> str:
            return where(table, key, index)

        title = item.get("name") if isinstance(item, dict) else None
        label = f"[[{name}]] #{index + 1}" + (f" ({title})" if isinstance(title, str) else "")
        if not isinstance(item, dict):
            raise ConfigError(f"{at(name, None)}{label} must be a table")
        yield item, at, label


def _named(obj: Any, required: tuple[str, ...], names: set[str], at: Any, label: str,
           table: str) -> None:
    """Required keys are present and the name is unique among its kind."""
    for key in required:
        if not getattr(obj, key):
            raise ConfigError(f"{at(table, None)}{label} {key}: missing")
    if obj.name in names:
        raise ConfigError(f"{at(table, 'name')}{label} name: duplicate {table} name")
    names.add(obj.name)


def _build_detectors(value: Any, where: Any) -> list[DetectorConfig]:
    out: list[DetectorConfig] = []
    names: set[str] = set()
    for item, at, label in _tables(value, "detector", where):
        det = _build_table(DetectorConfig, item, "detector", at, label)
        _named(det, ("name", "kind"), names, at, label, "detector")
        problem = det.problem()
        if problem:
            raise ConfigError(f"{at('detector', problem[0])}{label} {problem[0]}: {problem[1]}")
        out.append(det)
    return out


def _build_playbooks(value: Any, where: Any) -> list[PlaybookConfig]:
    out: list[PlaybookConfig] = []
    names: set[str] = set()
    step_index = 0
    for item, at, label in _tables(value, "playbook", where):
        raw_steps = item.get("step", [])
        body = {k: v for k, v in item.items() if k != "step"}
        pb = _build_table(PlaybookConfig, body, "playbook", at, label)
        _named(pb, ("name", "risk"), names, at, label, "playbook")
        bad = [s for s in pb.severities if s not in SEVERITIES]
        if bad:
            raise ConfigError(f"{at('playbook', 'severities')}{label} severities: {bad[0]!r} "
                              "is not a severity")
        if not isinstance(raw_steps, list) or not raw_steps:
            raise ConfigError(f"{at('playbook', None)}{label} step: at least one "
                              "[[playbook.step]] is required")
        steps = []
        for n, raw in enumerate(raw_steps):
            def step_at(table: str, key: str | None, i: int = step_index) -> str:
                return where("playbook.step", key, i)

            slabel = f"{label} step {n + 1}"
            st = _build_table(StepConfig, raw, "playbook.step", step_at, slabel)
            problem = st.problem()
            if problem:
                raise ConfigError(f"{step_at('', problem[0])}{slabel} {problem[0]}: "
                                  f"{problem[1]}")
            steps.append(st)
            step_index += 1
        out.append(dataclasses.replace(pb, step=steps))
    return out


def _build_notifiers(value: Any, where: Any) -> list[NotifierConfig]:
    out: list[NotifierConfig] = []
    names: set[str] = set()
    for item, at, label in _tables(value, "notifier", where):
        nt = _build_table(NotifierConfig, item, "notifier", at, label)
        _named(nt, ("name",), names, at, label, "notifier")
        if nt.kind not in ("command", "webhook"):
            raise ConfigError(f"{at('notifier', 'kind')}{label} kind: must be \"command\" "
                              "or \"webhook\"")
        if nt.kind == "command" and not nt.argv:
            raise ConfigError(f"{at('notifier', 'argv')}{label} argv: required for a command")
        if nt.kind == "webhook" and not nt.url.startswith(("http://", "https://")):
            raise ConfigError(f"{at('notifier', 'url')}{label} url: an http(s) URL is required")
        out.append(nt)
    return out


def _with_default_paths(cfg: Config) -> Config:
    d = cfg.daemon
    return dataclasses.replace(
        cfg,
        daemon=dataclasses.replace(
            d,
            state_dir=d.state_dir or str(paths.default_state_dir()),
            socket=d.socket or str(paths.default_socket()),
        ),
    )


def parse_config(text: str, source: str) -> Config:
    """Parse TOML text into a Config; raises :class:`ConfigError`."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: invalid TOML: {exc}") from None
    loc = _Locator(text)

    def where(table: str, key: str | None, index: int = 0) -> str:
        line = loc.line_of(table, key, index) or (loc.line_of(table, None, index) if table
                                                  else None)
        return f"{source}:{line}: " if line else f"{source}: "

    version = data.pop("version", CONFIG_VERSION)
    if not isinstance(version, int) or isinstance(version, bool):
        raise ConfigError(f"{where('', 'version')}version: expected an integer")
    if version > CONFIG_VERSION:
        raise ConfigError(
            f"{where('', 'version')}version: config version {version} is newer than this "
            f"graced understands ({CONFIG_VERSION}); upgrade graced"
        )
    if version < 1:
        raise ConfigError(f"{where('', 'version')}version: must be at least 1")
    tables = {"daemon": DaemonConfig, "journal": JournalConfig, "missions": MissionsConfig,
              "remediation": RemediationConfig, "learning": LearningConfig}
    built: dict[str, Any] = {}
    for key, value in data.items():
        if key == "detector":
            built[key] = _build_detectors(value, where)
            continue
        if key == "playbook":
            built[key] = _build_playbooks(value, where)
            continue
        if key == "notifier":
            built[key] = _build_notifiers(value, where)
            continue
        if key not in tables:
            known = ", ".join(["version", *tables, "detector", "playbook", "notifier"])
            raise ConfigError(f"{source}: unknown top-level key {key!r} (known: {known})")
        built[key] = _build_table(tables[key], value, key, where)
    cfg = Config(version=version, source=source, **built)
    return _with_default_paths(cfg)


def load_config(path: Path | None) -> Config:
    """Load ``path``, or the embedded default when it is None."""
    if path is None:
        return default_config()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text: {exc}") from None
    return parse_config(text, str(path))


def _compact(table: dict[str, Any], cls: type) -> dict[str, Any]:
    """Only the keys that differ from the defaults (TOML has no null, so None is left out)."""
    defaults = cls()
    return {k: v for k, v in table.items()
            if v is not None and (k in ("name", "kind") or v != getattr(defaults, k))}


def default_config() -> Config:
    return _with_default_paths(Config())


def to_toml(cfg: Config) -> str:
    """The config as TOML text (what ``graced config default`` prints)."""
    data: dict[str, Any] = {"version": cfg.version}
    arrays: list[str] = []
    for f in dataclasses.fields(cfg):
        if f.name in ("version", "source"):
            continue
        value = getattr(cfg, f.name)
        if isinstance(value, list):
            for item in value:
                table = _compact(dataclasses.asdict(item), type(item))
                arrays.append(f"[[{f.name}]]\n" + tomli_w.dumps(table))
            if not value:
                data[f.name] = []
        else:
            data[f.name] = dataclasses.asdict(value)
    header = (
        "# graced configuration (see graced.toml(5)).\n"
        "# This is the embedded default; paths are resolved for this environment.\n"
    )
    return header + tomli_w.dumps(data) + "".join("\n" + a for a in arrays)
