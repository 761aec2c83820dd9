"""The ``[fleet]`` table: forwarding to NATS JetStream (see docs/fleet.md).

Empty ``url``: no fleet, nothing is forwarded and nats-py is never imported.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .schema import between, check, positive


def _urls(v: str) -> str | None:
    for url in filter(None, (u.strip() for u in v.split(","))):
        if not re.fullmatch(r"(nats|tls)://[^\s/]+", url):
            return f"{url!r} is not nats://HOST:PORT (or tls://HOST:PORT; several: commas)"
    return None


def _stream(v: str) -> str | None:
    return None if re.fullmatch(r"[A-Za-z0-9_-]{1,64}", v) else (
        "must be 1 to 64 letters, digits, _ or -")


@dataclass(frozen=True)
class FleetConfig:
    """The ``[fleet]`` table; every key applies at the next restart."""

    url: str = field(default="", metadata=check(_urls))
    stream: str = field(default="GRACE", metadata=check(_stream))
    creds: str = ""  # a NATS .creds file (JWT and nkey seed)
    nkey_seed: str = ""  # a file holding an nkey seed
    user: str = ""
    password: str = ""
    tls_ca: str = ""  # PEM CA bundle to trust for tls:// (else the system's)
    tls_cert: str = ""  # client certificate (mutual TLS), with tls_key
    tls_key: str = ""
    replicas: int = field(default=1, metadata=check(between(1, 5)))
    max_age_days: float = field(default=30.0, metadata=check(positive))
    max_bytes_per_host: int = field(default=256 << 20, metadata=check(positive))
    in_flight: int = field(default=256, metadata=check(between(1, 65536)))
    ack_timeout: float = field(default=5.0, metadata=check(positive))
    # Behind this long (the oldest unacknowledged event waiting), connected or not:
    # graced is degraded (status exit 7).
    degraded_after: float = field(default=60.0, metadata=check(positive))
    share_knowledge: bool = True  # put this host's knowledge export in grace-knowledge
    knowledge_keys: list[str] = field(default_factory=list)  # peers whose exports to import
    knowledge_interval: float = field(default=300.0, metadata=check(positive))
