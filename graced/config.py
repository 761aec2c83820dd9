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


@dataclass(frozen=True)
class Config:
    """The whole configuration; every value typed and checked."""

    version: int = CONFIG_VERSION
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    journal: JournalConfig = field(default_factory=JournalConfig)
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

    def line_of(self, table: str, key: str) -> int | None:
        current = ""
        for no, raw in enumerate(self.lines, 1):
            line = raw.strip()
            header = re.fullmatch(r"\[\[?\s*([^\]]+?)\s*\]\]?(\s*#.*)?", line)
            if header:
                current = header.group(1)
                continue
            m = re.match(r"([A-Za-z0-9_\-\"']+)\s*=", line)
            if m and current == table and m.group(1).strip("\"'") == key:
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


def _build_table(cls: type, data: Any, table: str, where: Any) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where(table, None)}[{table}] must be a table")
    hints = get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in known:
            choices = ", ".join(sorted(known))
            raise ConfigError(
                f"{where(table, key)}[{table}] {key}: unknown key (known keys: {choices})"
            )
        hint = hints[key]
        ok, out = _coerce(value, hint)
        if not ok:
            raise ConfigError(
                f"{where(table, key)}[{table}] {key}: expected {_expected(hint)}, "
                f"got {_type_name(value)} {value!r}"
            )
        check = known[key].metadata.get("check")
        problem = check(out) if check else None
        if problem:
            raise ConfigError(f"{where(table, key)}[{table}] {key}: {problem}")
        kwargs[key] = out
    return cls(**kwargs)


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

    def where(table: str, key: str | None) -> str:
        line = loc.line_of(table, key) if key else None
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
    tables = {"daemon": DaemonConfig, "journal": JournalConfig}
    built: dict[str, Any] = {}
    for key, value in data.items():
        if key not in tables:
            known = ", ".join(["version", *tables])
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


def default_config() -> Config:
    return _with_default_paths(Config())


def to_toml(cfg: Config) -> str:
    """The config as TOML text (what ``graced config default`` prints)."""
    data: dict[str, Any] = {"version": cfg.version}
    for f in dataclasses.fields(cfg):
        if f.name in ("version", "source"):
            continue
        data[f.name] = dataclasses.asdict(getattr(cfg, f.name))
    header = (
        "# graced configuration (see graced.toml(5)).\n"
        "# This is the embedded default; paths are resolved for this environment.\n"
    )
    return header + tomli_w.dumps(data)
