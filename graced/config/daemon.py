"""The single-table sections: ``[daemon]``, ``[journal]``, ``[missions]``, ``[remediation]``,
``[learning]``.

To add a key: add a field (its type, its default and, if it has a range, a check) to the
section's dataclass, and document it in man/graced.toml.5 (tests/test_docs.py holds them
together). A new section also goes into :data:`SECTIONS`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .fleet import FleetConfig
from .schema import check, one_of, positive


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


def _fraction(v: float) -> str | None:
    return None if 0 <= v <= 1 else "must be between 0 and 1"


def _import_weight(v: float) -> str | None:
    return None if 0 <= v <= 1000 else "must be between 0 and 1000 (runs)"


def _non_negative(v: float) -> str | None:
    return None if v >= 0 else "must not be negative"


def _max_size(v: int) -> str | None:
    return None if v == 0 or v >= 1 << 20 else "must be 0 (no limit) or at least 1048576 (1 MiB)"


def _key_lines(v: list[str]) -> str | None:
    """Each entry is an Ed25519 public key line, and names its own key id if it names one
    (graced would otherwise ignore the entry at run time: nobody gets in with it)."""
    from ..keys import parse_public_key
    from ..protocol import key_id

    for n, line in enumerate(v, 1):
        try:
            public = parse_public_key(line)
        except ValueError:
            kind = " (an ssh key: use 'gracectl keys generate')" if line.lstrip().startswith(
                "ssh-") else ""
            return (f"entry {n} is not an Ed25519 public key{kind}: expected the line "
                    "'gracectl keys generate' prints, 'ed25519 BASE64 KEYID'")
        fields = line.split()
        if (len(fields) >= 3 and fields[0] == "ed25519" and re.fullmatch(r"[0-9a-f]{16}",
                                                                         fields[2])
                and fields[2] != key_id(public)):
            return (f"entry {n} names key id {fields[2]}, but its key's id is "
                    f"{key_id(public)}")
    return None


def _strategy(v: str) -> str | None:
    from ..learning.ranking import STRATEGIES

    return one_of(STRATEGIES)(v)


@dataclass(frozen=True)
class DaemonConfig:
    """The ``[daemon]`` table."""

    state_dir: str = ""
    socket: str = ""
    socket_mode: str = field(default="0660", metadata=check(_mode))
    socket_group: str = ""  # the socket's group (name): its members may read
    listen: list[str] = field(default_factory=list, metadata=check(_listen))
    allowed_origins: list[str] = field(default_factory=list)
    tls_cert: str = ""  # PEM certificate (chain) for the TCP listeners: wss://
    tls_key: str = ""  # its PEM private key
    heartbeat_interval: float = field(default=5.0, metadata=check(positive))
    checkpoint_interval: float = field(default=300.0, metadata=check(positive))
    integration_interval: float = field(default=60.0, metadata=check(positive))
    max_request_bytes: int = field(default=65536, metadata=check(positive))
    max_clients: int = field(default=256, metadata=check(positive))
    max_clients_per_user: int = field(default=32, metadata=check(positive))
    # The connection budget (reloadable): see graced.toml(5) and graced/wire.py.
    max_tcp_clients: int = field(default=64, metadata=check(positive))
    max_clients_per_address: int = field(default=8, metadata=check(positive))
    reserved_clients: int = field(default=8, metadata=check(positive))
    max_handshakes: int = field(default=32, metadata=check(positive))
    handshake_timeout: float = field(default=10.0, metadata=check(positive))
    idle_timeout: float = field(default=300.0, metadata=check(positive))
    # TCP connections that have not proved a key yet (graced/wire.py, "unproven").
    max_unauthenticated: int = field(default=16, metadata=check(positive))
    max_unauthenticated_per_address: int = field(default=4, metadata=check(positive))
    auth_timeout: float = field(default=10.0, metadata=check(positive))
    client_queue: int = field(default=8192, metadata=check(positive))
    client_queue_bytes: int = field(default=16 << 20, metadata=check(positive))
    send_timeout: float = field(default=5.0, metadata=check(positive))
    shutdown_timeout: float = field(default=5.0, metadata=check(positive))
    log_level: str = field(default="info", metadata=check(one_of(
        ("debug", "info", "warning", "error"))))


@dataclass(frozen=True)
class JournalConfig:
    """The ``[journal]`` table."""

    synchronous: str = field(default="normal", metadata=check(one_of(("full", "normal"))))
    batch_max: int = field(default=4096, metadata=check(positive))
    # Retention (graced/retention.py): bytes of journal.db and its WAL, and seconds.
    max_size: int = field(default=1 << 30, metadata=check(_max_size))
    max_age: float = field(default=90 * 86400.0, metadata=check(_non_negative))


@dataclass(frozen=True)
class MissionsConfig:
    """The ``[missions]`` table."""

    resolve_after: int = field(default=3, metadata=check(positive))
    flap_window: float = field(default=600.0, metadata=check(_non_negative))
    update_interval: float = field(default=60.0, metadata=check(positive))


@dataclass(frozen=True)
class RemediationConfig:
    """The ``[remediation]`` table."""

    mode: str = field(default="act", metadata=check(one_of(("act", "observe"))))
    max_actions_per_hour: int = field(default=20, metadata=check(positive))
    approval_timeout: float = field(default=3600.0, metadata=check(positive))
    approvers: list[str] = field(default_factory=list)
    approver_groups: list[str] = field(default_factory=list)
    authorized_keys: list[str] = field(default_factory=list, metadata=check(_key_lines))
    read_keys: list[str] = field(default_factory=list, metadata=check(_key_lines))
    control_keys: list[str] = field(default_factory=list, metadata=check(_key_lines))
    request_window: float = field(default=60.0, metadata=check(positive))


@dataclass(frozen=True)
class LearningConfig:
    """The ``[learning]`` table."""

    strategy: str = field(default="thompson", metadata=check(_strategy))
    demote_after: int = field(default=3, metadata=check(positive))
    demote_below: float = field(default=0.25, metadata=check(_fraction))
    similar_limit: int = field(default=10, metadata=check(positive))
    text_weight: float = field(default=0.5, metadata=check(_fraction))
    demote_span: float = field(default=3600.0, metadata=check(_non_negative))
    half_life: float = field(default=30 * 86400.0, metadata=check(positive))
    import_weight: float = field(default=5.0, metadata=check(_import_weight))
    exploration: float = field(default=0.3, metadata=check(_fraction))
    retry_after: float = field(default=86400.0, metadata=check(_non_negative))


# The single-table sections, in the order `graced config default` prints them.
SECTIONS: dict[str, type] = {
    "daemon": DaemonConfig, "journal": JournalConfig, "missions": MissionsConfig,
    "remediation": RemediationConfig, "learning": LearningConfig, "fleet": FleetConfig,
}
