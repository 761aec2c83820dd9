"""Shared knowledge: each host's export in a JetStream key-value bucket, peers imported.

Every ``[fleet] knowledge_interval`` seconds a host puts its knowledge export (the very
body ``gracectl knowledge export`` writes, signed by the daemon's key) under its daemon
id in the bucket ``grace-knowledge``. Each host watches the bucket and imports a peer's
export when it is signed by a key listed in ``[fleet] knowledge_keys``, through the same
public entry points as ``gracectl knowledge import`` (:func:`graced.protocol.knowledge
.check_header`, :func:`~graced.protocol.knowledge.check`,
:func:`~graced.protocol.knowledge.verify_export`,
:meth:`graced.learning.knowledge.Knowledge.import_`): a bounded, fading prior weighted
by ``[learning] import_weight``, replacing that peer's earlier import. An export signed
by any other key is counted and ignored: whoever can write to NATS cannot teach graced.

This module runs on trio; the forwarder's asyncio thread calls :meth:`export_bytes`
and :meth:`accept` through the trio token.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Any

from ..auth import parse_keys
from ..learning import Learning
from ..mesh import Mesh
from ..protocol import Signer, canonical_text
from ..protocol import knowledge as pk

log = logging.getLogger("graced.fleet")


class KnowledgeShare:
    """Publishes this host's export and imports trusted peers'."""

    def __init__(self, *, daemon_id: str, hostname: str, signer: Signer, mesh: Mesh,
                 learning: Learning, trusted: list[str]) -> None:
        self.daemon_id = daemon_id
        self.hostname = hostname
        self.signer = signer
        self.mesh = mesh
        self.learning = learning
        self.trusted = parse_keys(trusted, "[fleet] knowledge_keys")
        self.imported = 0
        self.refused = 0
        self.last_error: str | None = None
        self._seen: dict[str, str] = {}  # peer -> digest of the export last imported

    def export_bytes(self) -> bytes:
        """This host's export, signed (as ``gracectl knowledge export`` writes it)."""
        body = self.learning.knowledge.export(self.daemon_id, self.hostname, time.time())
        return canonical_text(self.signer.sign_frame(body)).encode()

    async def accept(self, key: str, value: bytes) -> str:
        """Import one peer's export if it is trusted and new; returns what was done."""
        if key == self.daemon_id or not value:
            return "own or empty"
        digest = hashlib.sha256(value).hexdigest()
        if self._seen.get(key) == digest:
            return "unchanged"
        try:
            if len(value) > pk.MAX_FILE_BYTES:
                raise ValueError(f"{len(value)} bytes; at most {pk.MAX_FILE_BYTES}")
            data = json.loads(value)
            pk.check_header(data)
            if data["source"] != key:
                raise ValueError(f"source: {data['source'][:60]!r} put under key {key!r}")
            public = self.trusted.get(data["kid"])
            if public is None:
                self.refused += 1
                return f"key {data['kid'][:20]} is not in [fleet] knowledge_keys"
            pk.verify_export(data, public)
            patterns = pk.check(data["patterns"])
        except (ValueError, RecursionError, TypeError) as exc:
            self.refused += 1
            self.last_error = f"export of {key[:40]} refused: {exc}"[:300]
            log.warning("fleet: %s", self.last_error)
            return self.last_error
        knowledge = self.learning.knowledge
        writes = knowledge.import_(key, patterns, True, host=data["host"], kid=data["kid"],
                                   now=time.time(), span=None)
        await self.mesh.publish("learning.imported", {
            "source": key, "host": data["host"], "kid": data["kid"],
            "patterns": len(patterns), "replace": True, "by": "fleet"}, writes=writes)
        self._seen[key] = digest
        self.imported += 1
        return f"imported {len(patterns)} records"

    def status(self) -> dict[str, Any]:
        return {"trusted_keys": len(self.trusted), "imports": self.imported,
                "refused": self.refused, "last_error": self.last_error}
