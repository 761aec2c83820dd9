"""The fleet: forwarding to NATS JetStream, requests by NATS (see docs/fleet.md).

Imported only when ``[fleet] url`` is set; nats-py (the ``fleet`` extra) is
imported on the forwarder's own thread, so a missing module is an error at start.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from ..config.fleet import FleetConfig
from ..errors import StartupError, install_extra
from ..learning import Learning
from ..mesh import Mesh
from ..protocol import Signer
from ..protocol.wire import Request
from .forwarder import Forwarder
from .knowledge import KnowledgeShare

__all__ = ["Forwarder", "make_forwarder"]


def make_forwarder(cfg: FleetConfig, *, daemon_id: str, mesh: Mesh, journal_path: Path,
                   acked: str | None, answer: Callable[[str, str], Awaitable[str]],
                   acked_at: str | None = None,
                   screen: Callable[[Request], str], hostname: str, signer: Signer,
                   learning: Learning, knowledge_lock: trio.Lock | None = None) -> Forwarder:
    """A forwarder for ``[fleet]``; raises StartupError if it cannot run here."""
    from ..protocol.fleet import valid_daemon_id

    try:
        import nats  # noqa: F401
    except ImportError:
        raise StartupError("[fleet] url is set but nats-py is not installed "
                           f"({install_extra('fleet')})") from None
    if not valid_daemon_id(daemon_id):
        raise StartupError(f"[fleet] needs a daemon id that is a UUID (the daemon-id file "
                           f"holds {daemon_id[:60]!r})")
    start = int(acked) if acked and acked.isdigit() else None
    seq, _, stream_seq = (acked_at or "").partition(":")
    at = (int(seq), int(stream_seq)) if seq.isdigit() and stream_seq.isdigit() else None
    share = None
    if cfg.share_knowledge or cfg.knowledge_keys:
        share = KnowledgeShare(daemon_id=daemon_id, hostname=hostname, signer=signer,
                               mesh=mesh, learning=learning, trusted=list(cfg.knowledge_keys),
                               lock=knowledge_lock)
    return Forwarder(cfg, daemon_id=daemon_id, mesh=mesh, journal_path=journal_path,
                     acked=start, acked_at=at, answer=answer, screen=screen, knowledge=share)
