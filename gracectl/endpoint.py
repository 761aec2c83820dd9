"""Where graced is: a Unix socket path or a ws:// or wss:// URL (no I/O here)."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Endpoint:
    """Where the daemon is: a Unix socket path or a ws:// or wss:// URL.

    ``cacert``: a PEM file of the CA (or the self-signed certificate) to trust for
    wss:// instead of the system's store.
    """

    socket: str | None = None
    url: str | None = None
    key_file: str | None = None
    cacert: str | None = None

    @property
    def name(self) -> str:
        return self.url or f"unix:{os.path.abspath(self.socket or '')}"
