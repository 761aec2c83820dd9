"""The whole file: parse every section, check references across them, print the default."""

from __future__ import annotations

import dataclasses
import fnmatch
import grp
import hashlib
import os
import pwd
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import tomli_w

from .. import cgroupfs, paths
from ..errors import install_extra
from ..protocol.wire import loopback_host
from ..safefiles import foreign_or_writable
from .daemon import (
    SECTIONS,
    DaemonConfig,
    JournalConfig,
    LearningConfig,
    MissionsConfig,
    RemediationConfig,
)
from .detectors import (
    DETECTOR_KINDS,
    SEVERITIES,
    DetectorConfig,
    build_detectors,
    compact,
    default_detectors,
    public_dsn,
)
from .fleet import FleetConfig
from .notifiers import NotifierConfig, build_notifiers
from .playbooks import PlaybookConfig, build_playbooks
from .schema import ConfigError, Locator, Where, build_table, internal

CONFIG_VERSION = 1
EMBEDDED = "<embedded default>"


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
    fleet: FleetConfig = field(default_factory=FleetConfig)
    playbook: list[PlaybookConfig] = field(default_factory=list)
    notifier: list[NotifierConfig] = field(default_factory=list)
    source: str = field(default=EMBEDDED, metadata=internal())
    # SHA-256 of the file's bytes ("" for the embedded default): daemon.config_reloaded.
    digest: str = field(default="", metadata=internal())
    # The file held nothing but whitespace (a reload refuses that: a save in progress).
    blank: bool = field(default=False, metadata=internal())
    # Things that are valid but surely not meant ("FILE:LINE: ..." lines).
    warnings: tuple[str, ...] = field(default=(), metadata=internal())

    @property
    def state_dir(self) -> Path:
        return Path(self.daemon.state_dir)

    @property
    def socket_path(self) -> Path:
        return Path(self.daemon.socket)


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


def _never_matches(pb: PlaybookConfig, detectors: list[DetectorConfig]) -> str | None:
    """Why ``pb`` can match no mission of these detectors, or None."""
    if pb.detector:
        det = next(d for d in detectors if d.name == pb.detector)
        if not det.enabled:
            return f"detector {det.name!r} is disabled (enabled = false)"
        if pb.kind and pb.kind != det.kind:
            return f"detector {det.name!r} is of kind {det.kind!r}, not {pb.kind!r}"
        if not fnmatch.fnmatchcase(det.effective_subject, pb.subject or "*"):
            return (f"detector {det.name!r} reports subject {det.effective_subject!r}, "
                    f"which subject {pb.subject!r} does not match")
        candidates = [det]
    else:
        candidates = [d for d in detectors if d.enabled and (not pb.kind or d.kind == pb.kind)]
        if not candidates:
            return f"no enabled detector of kind {pb.kind!r}"
    if pb.severities:
        # A mission has its detector's severity, one level higher when it flaps.
        possible: set[str] = set()
        for d in candidates:
            i = SEVERITIES.index(d.severity)
            possible.update(SEVERITIES[i:i + 2])
        if not possible & set(pb.severities):
            return ("its severities " + ", ".join(pb.severities) + " are never those of "
                    "its detectors' missions (" + ", ".join(sorted(possible)) + ")")
    return None


def _check_references(cfg: Config, where: Where) -> tuple[str, ...]:
    """Errors for references to nothing; warnings for playbooks that can never match."""
    names = [d.name for d in cfg.detector]
    warnings = []
    for index, pb in enumerate(cfg.playbook):
        label = f"[[playbook]] #{index + 1} ({pb.name})"
        if pb.detector and pb.detector not in names:
            raise ConfigError(f"{where('playbook', 'detector', index)}{label} detector: no "
                              f"detector named {pb.detector!r} (detectors: "
                              f"{', '.join(names) or 'none'})")
        if pb.kind and pb.kind not in DETECTOR_KINDS:
            raise ConfigError(f"{where('playbook', 'kind', index)}{label} kind: no detector "
                              f"kind {pb.kind!r} (kinds: {', '.join(DETECTOR_KINDS)})")
        why = _never_matches(pb, cfg.detector)
        if why:
            warnings.append(f"{where('playbook', None, index)}{label} never matches: {why}")
    return tuple(warnings)


def _check_daemon(cfg: Config, where: Where) -> None:
    """What graced would refuse at start: half a TLS pair, plain ws:// off loopback."""
    d = cfg.daemon
    if bool(d.tls_cert) != bool(d.tls_key):
        given, missing = ("tls_cert", "tls_key") if d.tls_cert else ("tls_key", "tls_cert")
        raise ConfigError(f"{where('daemon', given)}[daemon] {given} without {missing}: "
                          "the two go together, give both or neither")
    if d.socket_group:
        try:
            grp.getgrnam(d.socket_group)
        except KeyError:
            raise ConfigError(f"{where('daemon', 'socket_group')}[daemon] socket_group: no "
                              f"group {d.socket_group!r} on this host") from None
    if not d.tls_cert:
        for item in d.listen:
            host = item.rpartition(":")[0].strip("[]")
            if not loopback_host(host):
                raise ConfigError(
                    f"{where('daemon', 'listen')}[daemon] listen {item!r}: plain ws:// is "
                    "served only on loopback; set [daemon] tls_cert and tls_key to serve "
                    "wss:// there")


def _account_warnings(cfg: Config, where: Where) -> tuple[str, ...]:
    """Approvers and approver groups this host does not know: nobody approves through
    them (a typo, or an account not made yet)."""
    warnings = []
    for key, lookup in (("approvers", pwd.getpwnam), ("approver_groups", grp.getgrnam)):
        for name in getattr(cfg.remediation, key):
            try:
                lookup(name)
            except KeyError:
                what = "user" if key == "approvers" else "group"
                warnings.append(f"{where('remediation', key)}[remediation] {key}: no "
                                f"{what} {name!r} on this host: nobody approves through it")
    return tuple(warnings)


def _verification_warnings(cfg: Config, where: Where) -> tuple[str, ...]:
    """Where a playbook's verify_timeout and its detectors' sampling do not fit: a fix
    is seen by the first normal sample after the steps, which must come within
    verify_timeout; the ``resolve_after`` samples that confirm it may run past it."""
    warnings = []
    after = cfg.missions.resolve_after
    for index, pb in enumerate(cfg.playbook):
        label = f"[[playbook]] #{index + 1} ({pb.name})"
        dets = [d for d in cfg.detector if d.enabled
                and (not pb.detector or d.name == pb.detector)
                and (not pb.kind or d.kind == pb.kind)]
        if not dets:
            continue
        slowest = max(dets, key=lambda d: d.interval)
        at = where("playbook", "verify_timeout", index)
        if slowest.interval >= pb.verify_timeout:
            warnings.append(
                f"{at}{label} verify_timeout: {pb.verify_timeout:g} s is not longer than "
                f"detector {slowest.name!r}'s interval ({slowest.interval:g} s): the first "
                "sample after the steps may come after it, and a run that fixed the fault "
                "is then counted a failure; make verify_timeout longer than the interval")
        elif after * slowest.interval > pb.verify_timeout:
            warnings.append(
                f"{at}{label} verify_timeout: {pb.verify_timeout:g} s is shorter than "
                f"[missions] resolve_after x detector {slowest.name!r}'s interval ({after} x "
                f"{slowest.interval:g} s): a fix seen normal within verify_timeout is "
                f"confirmed after it, up to {after * slowest.interval:g} s after the steps")
    return tuple(warnings)


# Detector kinds that need a module graced does not depend on: kind -> (module, extra).
OPTIONAL = {"postgres": ("psycopg", "postgres")}


def _host_warnings(cfg: Config, where: Where) -> tuple[str, ...]:
    """What this host lacks for the config to work, though the config is valid: a path a
    detector watches that does not exist (a detector failure once it runs, see
    graced.toml(5)) and an optional module a kind needs."""
    warnings = []
    for index, d in enumerate(cfg.detector):
        label = f"[[detector]] #{index + 1} ({d.name})"
        key = {"disk": "path", "inodes": "path", "log": "file", "value": "file"}.get(d.kind)
        if d.enabled and key and not os.path.lexists(getattr(d, key)):
            warnings.append(f"{where('detector', key, index)}{label} {key}: "
                            f"{getattr(d, key)} does not exist (yet): the detector fails "
                            "until it does")
        cgroup_file = ("memory.events" if d.kind == "cgroup_memory" else
                       f"{d.kind[4:]}.pressure" if d.kind.startswith("psi_") else "")
        if d.enabled and d.cgroup and cgroup_file:
            warnings += [f"{where('detector', 'cgroup', index)}{label} cgroup: {why}"
                         for why in cgroupfs.problems(d.cgroup, cgroup_file)]
        if d.enabled and d.kind in OPTIONAL:
            module, extra = OPTIONAL[d.kind]
            try:
                __import__(module)
            except ImportError as exc:
                warnings.append(f"{where('detector', 'kind', index)}{label} kind: "
                                f"{d.kind} needs the Python module {module} ({exc}): install "
                                f"it ({install_extra(extra)}) or the detector fails")
    return tuple(warnings)


def parse_config(text: str, source: str, *, raw: bytes | None = None) -> Config:
    """Parse TOML text into a Config; raises :class:`ConfigError`.

    ``raw``, the file's bytes, gives the digest (sha256sum's); else the text's UTF-8.
    """
    try:
        return _parse(text, source, raw)
    except RecursionError:
        raise ConfigError(f"{source}: arrays or tables nested too deeply") from None


def _parse(text: str, source: str, raw: bytes | None) -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: invalid TOML: {exc}") from None
    loc = Locator(text)

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
    arrays = {"detector": build_detectors, "playbook": build_playbooks,
              "notifier": build_notifiers}
    built: dict[str, Any] = {}
    for key, value in data.items():
        if key in arrays:
            built[key] = arrays[key](value, where)
        elif key in SECTIONS:
            built[key] = build_table(SECTIONS[key], value, key, where)
        else:
            known = ", ".join(["version", *SECTIONS, *arrays])
            raise ConfigError(f"{source}: unknown top-level key {key!r} (known: {known})")
    cfg = Config(version=version, source=source,
                 digest=hashlib.sha256(text.encode() if raw is None else raw).hexdigest(),
                 blank=not text.strip(), **built)
    _check_daemon(cfg, where)
    cfg = dataclasses.replace(cfg, warnings=(*_check_references(cfg, where),
                                             *_verification_warnings(cfg, where),
                                             *_host_warnings(cfg, where),
                                             *_account_warnings(cfg, where)))
    return _with_default_paths(cfg)


def locate(path: str | None) -> Path | None:
    """The file graced reads: ``path`` (--config), $GRACED_CONFIG, the system or user file,
    or None for the embedded default."""
    if path:
        return Path(path)
    if os.environ.get("GRACED_CONFIG"):
        return Path(os.environ["GRACED_CONFIG"])
    return paths.default_config_file()


# Larger than any real config: a bigger file is a mistake or an attack, never read.
MAX_CONFIG_BYTES = 4 * 1024 * 1024


def _url_secret(url: str) -> bool:
    try:
        parts = urlsplit(url)
        return bool(parts.username or parts.password or parts.query)
    except ValueError:
        return True


def secrets_held(cfg: Config) -> list[str]:
    """Where the config holds secrets: URL credentials or query strings, a password in a
    DSN, a step's env values."""
    out = [f"[[notifier]] {n.name} url" for n in cfg.notifier if n.url and _url_secret(n.url)]
    for d in cfg.detector:
        if d.url and _url_secret(d.url):
            out.append(f"[[detector]] {d.name} url")
        if d.dsn and public_dsn(d.dsn) != d.dsn:
            out.append(f"[[detector]] {d.name} dsn")
    out += [f"[[playbook]] {pb.name} step {i} env" for pb in cfg.playbook
            for i, st in enumerate(pb.step, 1) if st.env]
    return out


def _exposed(path: Path, st: os.stat_result, cfg: Config) -> str | None:
    """A warning when a config that holds secrets may be read by others than graced (as
    sshd warns of a private key others may read), else None."""
    mode = stat.S_IMODE(st.st_mode)
    if not mode & (stat.S_IRGRP | stat.S_IROTH):
        return None
    held = secrets_held(cfg)
    if not held:
        return None
    who = "everyone" if mode & stat.S_IROTH else f"group {_group_name(st.st_gid)}"
    more = f" and {len(held) - 3} more" if len(held) > 3 else ""
    return (f"{path}: holds secrets ({', '.join(held[:3])}{more}) and {who} may read it "
            f"(mode {mode:04o}): chmod go-r, and chown it to graced's user if graced "
            "reads it through its group")


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _read_config(path: Path) -> tuple[bytes, os.stat_result]:
    """The file's bytes, read whole and stable (blocking; never waits on a FIFO).

    Opened with O_NONBLOCK, so a FIFO or device cannot block the open; only a regular
    file of at most MAX_CONFIG_BYTES is read. If its size or mtime moved while it was
    read (an editor saving in place), it is read again.
    """
    for _ in range(5):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
        try:
            before = os.fstat(fd)
            if not stat.S_ISREG(before.st_mode):
                raise ConfigError(f"{path}: not a regular file")
            # Checked on the open file: what is checked is what is read.
            problem = foreign_or_writable(before, allow_root=True)
            if problem:
                raise ConfigError(f"{path}: {problem}: refusing it (its commands would run "
                                  f"as uid {os.geteuid()}; chown it to root and chmod go-w)")
            if before.st_size > MAX_CONFIG_BYTES:
                raise ConfigError(f"{path}: {before.st_size} bytes, more than a config may "
                                  f"hold ({MAX_CONFIG_BYTES})")
            chunks = []
            size = 0
            while size <= MAX_CONFIG_BYTES:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
            after = os.fstat(fd)
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
        finally:
            os.close(fd)
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: more than a config may hold ({MAX_CONFIG_BYTES} "
                              "bytes)")
        raw = b"".join(chunks)
        if (before.st_size == after.st_size == len(raw)
                and before.st_mtime_ns == after.st_mtime_ns):
            return raw, after
    raise ConfigError(f"{path}: changed each time it was read (being written?)")


def load_config(path: Path | None) -> Config:
    """Load ``path``, or the embedded default when it is None."""
    if path is None:
        return default_config()
    raw, st = _read_config(path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text: {exc}") from None
    cfg = parse_config(text, str(path), raw=raw)
    exposed = _exposed(path, st, cfg)
    if exposed:
        cfg = dataclasses.replace(cfg, warnings=(*cfg.warnings, exposed))
    swappable = _swappable_dir(path)
    if swappable:
        cfg = dataclasses.replace(cfg, warnings=(*cfg.warnings, swappable))
    return cfg


def _swappable_dir(path: Path) -> str | None:
    """A warning when others may replace the config file: its directory is writable by
    group or others without the sticky bit (the file's own checks then protect nothing)."""
    where = path.absolute().parent
    try:
        st = os.stat(where)
    except OSError:
        return None
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
        return (f"{path}: its directory {where} is writable by group or others (mode "
                f"{stat.S_IMODE(st.st_mode):04o}): they could replace the file: chmod go-w "
                f"{where}")
    return None


def default_config() -> Config:
    return _with_default_paths(Config())


_HEADER = """\
# graced configuration: see graced.toml(5); `graced config check` checks it.
# Sections left as comments take the defaults shown (state_dir and socket are found at
# start: /var/lib/graced and /run/graced under systemd, XDG paths otherwise). To change
# one, uncomment its header and the keys you change, or append the section, e.g. from
# graced.toml(5)'s examples. Tables such as [[detector]], [[playbook]] and [[notifier]]
# may be appended at the end.
"""


def _commented(text: str) -> str:
    return "".join(f"# {line}\n" if line else "#\n" for line in text.splitlines())


def to_toml(cfg: Config) -> str:
    """The config as TOML text (what ``graced config default`` prints).

    Sections equal to the default are printed as comments, so that any section can be
    appended; state_dir and socket are printed only when set to something else than what
    graced finds by itself at start.
    """
    default = default_config()
    out = [_HEADER, f"\nversion = {cfg.version}\n"]
    if not cfg.detector:
        out.append("detector = []\n")
    for name in SECTIONS:
        value, base = getattr(cfg, name), getattr(default, name)
        table = {k: v for k, v in dataclasses.asdict(value).items() if v is not None}
        if value != base:
            changed = {k: v for k, v in table.items() if v != getattr(base, k)}
            out.append("\n" + tomli_w.dumps({name: changed}))
            continue
        text = tomli_w.dumps({name: table})
        if name == "daemon":
            for key in ("state_dir", "socket"):
                text = text.replace(f"{key} = {tomli_w.dumps({'v': table[key]})[4:]}",
                                    f'{key} = ""   # found at start; here: {table[key]}\n')
        out.append("\n" + _commented(text))
    for name in ("detector", "playbook", "notifier"):
        for item in getattr(cfg, name):
            out.append(f"\n[[{name}]]\n" + tomli_w.dumps(_non_default(item)))
            for step in getattr(item, "step", ()):
                out.append(f"\n[[{name}.step]]\n" + tomli_w.dumps(_non_default(step)))
    return "".join(out)


def _non_default(item: Any) -> dict[str, Any]:
    """A table's keys that differ from their defaults (``name``, ``kind``, ``action`` always)."""
    if isinstance(item, DetectorConfig):
        return compact(item)
    defaults = type(item)()
    return {f.name: getattr(item, f.name) for f in dataclasses.fields(item)
            if f.name != "step" and getattr(item, f.name) is not None
            and (f.name in ("name", "kind", "action")
                 or getattr(item, f.name) != getattr(defaults, f.name))}
