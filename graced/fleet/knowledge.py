"""Shared knowledge: each host's export in a JetStream key-value bucket, peers imported.

Every ``[fleet] knowledge_interval`` seconds a host puts its knowledge export (the very
body ``gracectl knowledge export`` writes, signed by the daemon's key) under its daemon
id in the bucket ``grace-knowledge``. Each host watches the bucket and imports a peer's
export when it is signed by a key listed in ``[fleet] knowledge_keys`` *for that daemon
id* (:func:`trusted_keys`: the ids written after the key, or else the first id the key
was imported under, pinned), through the same
public entry points as ``gracectl knowledge import`` (:func:`graced.protocol.knowledge
.parse_export`, :func:`~graced.protocol.knowledge.verify_export`,
:meth:`graced.learning.knowledge.Knowledge.plan_import`, ``import_writes`` and
``apply_import``): a bounded, fading prior weighted
by ``[learning] import_weight``, replacing that peer's earlier import. An export signed
by any other key is counted and ignored: whoever can write to NATS cannot teach graced;
and a trusted peer speaks for its own daemon id(s) only: it cannot squat another peer's id
nor fill the places of MAX_SOURCES daemons with ids of its own making.
An export whose source is not a daemon id (a UUID), or is this daemon's own id or
``local`` (this host's own records), is refused as ``knowledge.import`` refuses it: a
trusted peer may add a prior, never overwrite what this host learned. An import runs
under the API's knowledge lock (never at once with a manual import or a reset), its plan
made in a worker thread and used only if the knowledge base did not change meanwhile.

This module runs on trio; the forwarder's asyncio thread calls :meth:`export_bytes`
and :meth:`accept` through the trio token.
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from typing import Any

import trio

from .. import keys
from ..learning import Learning
from ..learning import knowledge as kb
from ..mesh import Mesh
from ..protocol import Signer, canonical_text
from ..protocol import knowledge as pk
from ..protocol.fleet import valid_daemon_id
from ..protocol.signing import key_id
from ..protocol.times import shown

log = logging.getLogger("graced.fleet")


def trusted_keys(lines: list[str]) -> dict[str, tuple[bytes, frozenset[str]]]:
    """``[fleet] knowledge_keys``: ``{kid: (public key, daemon ids it may speak for)}``.

    A line is a key as ``key.pub`` holds it (``ed25519 BASE64 KID``), then the daemon
    id(s) that key signs for (``gracectl status`` shows a daemon's id); the same key on
    several lines speaks for every id named. A key named with no id speaks for one
    daemon: the first it is imported under, pinned from then on. A line that does not
    parse (no key, or a word that is neither the key, its id nor a daemon id: a mistyped
    id must not leave the key free) is logged and skipped."""
    out: dict[str, tuple[bytes, frozenset[str]]] = {}
    for line in lines:
        try:
            public = keys.parse_public_key(line)
        except ValueError:
            log.warning("ignoring a key in [fleet] knowledge_keys that cannot be parsed: "
                        "%r", line[:60])
            continue
        kid = key_id(public)
        ids: set[str] = set()
        bad = None
        for token in line.split():
            if token in ("ed25519", kid) or _is_key(token, public):
                continue
            daemon_id = _daemon_id(token)
            if daemon_id is None:
                bad = token
                break
            ids.add(daemon_id)
        if bad is not None:
            log.warning("ignoring a key in [fleet] knowledge_keys: %r is not a daemon id "
                        "(a UUID)", bad[:60])
            continue
        _, before = out.get(kid, (public, frozenset()))
        out[kid] = (public, before | ids)
    return out


def _daemon_id(token: str) -> str | None:
    try:
        return str(uuid.UUID(token)) if token.count("-") == 4 else None
    except ValueError:
        return None


def _is_key(token: str, public: bytes) -> bool:
    try:
        return keys.parse_public_key(token) == public
    except ValueError:
        return False


class KnowledgeShare:
    """Publishes this host's export and imports trusted peers'."""

    def __init__(self, *, daemon_id: str, hostname: str, signer: Signer, mesh: Mesh,
                 learning: Learning, trusted: list[str],
                 lock: trio.Lock | None = None) -> None:
        self.lock = lock or trio.Lock()  # the API's knowledge lock (import, reset)
        self.daemon_id = daemon_id
        self.hostname = hostname
        self.signer = signer
        self.mesh = mesh
        self.learning = learning
        self.trusted = trusted_keys(trusted)
        self.imported = 0
        self.refused = 0
        self.last_error: str | None = None
        self._seen: dict[str, str] = {}  # peer -> digest of the export last imported

    def export_bytes(self, last: str) -> tuple[str, bytes]:
        """This host's export, signed (as ``gracectl knowledge export`` signs it), and
        the digest of its records; no bytes when that digest is ``last`` (unchanged)."""
        body = self.learning.knowledge.export(self.daemon_id, self.hostname, time.time())
        digest = hashlib.sha256(canonical_text(body["patterns"]).encode()).hexdigest()
        if digest == last:
            return digest, b""
        return digest, canonical_text(self.signer.sign_frame(body)).encode()

    async def accept(self, key: str, value: bytes) -> str:
        """Import one peer's export if it is trusted and new; returns what was done."""
        if key == self.daemon_id or not value:
            return "own or empty"
        digest = hashlib.sha256(value).hexdigest()
        if self._seen.get(key) == digest:
            return "unchanged"
        def check() -> tuple[dict[str, Any], list[dict[str, Any]]]:
            # Parsing and canonicalising a large export takes a while: not on the loop.
            data, patterns = pk.parse_export(value, time.time())
            if key in (self.daemon_id, kb.LOCAL) or not valid_daemon_id(key):
                raise ValueError(f"source: {key[:60]!r} is not another daemon's id")
            if data["source"] != key:
                raise ValueError(f"source: {data['source'][:60]!r} put under key {key!r}")
            entry = self.trusted.get(data["kid"])
            if entry is None:
                raise LookupError(f"key {data['kid'][:20]} is not in [fleet] knowledge_keys")
            public, ids = entry
            if ids and key not in ids:
                raise ValueError(f"source: key {data['kid']} speaks for daemon "
                                 f"{', '.join(sorted(ids))} ([fleet] knowledge_keys), not "
                                 f"for {key}")
            pk.verify_export(data, public)
            return data, patterns

        async with self.lock:
            return await self._accept(key, digest, check)

    async def _accept(self, key: str, digest: str, check: Any) -> str:
        knowledge = self.learning.knowledge
        try:
            data, patterns = await trio.to_thread.run_sync(check)
            if not self.trusted[data["kid"]][1]:
                # A key named with no daemon id: the first id it was imported under.
                bound = next((s for s, m in knowledge.sources.items()
                              if m["kid"] == data["kid"] and s != key), None)
                if bound is not None:
                    raise ValueError(f"source: key {data['kid']} speaks for daemon {bound} "
                                     "(the first it was imported under; name the daemon "
                                     "id after the key in [fleet] knowledge_keys to "
                                     f"choose), not for {key}")
            known = knowledge.sources.get(key)
            exported_at = float(data["exported_at"])
            if known is not None and known["kid"] != data["kid"]:
                raise ValueError(f"kid: imported before signed by key {known['kid']}, now by "
                                 f"{data['kid']} (gracectl knowledge import --replace-key "
                                 "takes a changed key)")
            if known is not None and exported_at <= known["exported_at"]:
                self._seen[key] = digest
                return "not newer than the export imported already"
            plan = await self._plan(key, patterns, data, exported_at)
        except (ValueError, LookupError, RecursionError, TypeError) as exc:
            self.refused += 1
            self._seen[key] = digest
            self.last_error = f"export of {key[:40]} refused: {exc}"[:300]
            log.warning("%s", self.last_error)
            return self.last_error
        # Journaled first, with its event; applied once committed (as knowledge.import).
        await self.mesh.publish("learning.imported", {
            "source": key, "host": data["host"], "kid": data["kid"],
            "exported_at": shown(exported_at),
            "patterns": len(patterns), "counts": plan.counts,
            "key_replaced": False, "by": "fleet"}, writes=knowledge.import_writes(plan))
        knowledge.apply_import(plan)
        self._seen[key] = digest
        self.imported += 1
        return f"imported {len(patterns)} records"

    async def _plan(self, key: str, patterns: list[dict[str, Any]], data: dict[str, Any],
                    exported_at: float) -> kb.ImportPlan:
        """The import's plan, made in a worker thread (100,000 records take seconds);
        made again if the knowledge base changed meanwhile (learning goes on)."""
        knowledge = self.learning.knowledge

        def plan() -> kb.ImportPlan:
            return knowledge.plan_import(key, patterns, host=data["host"], kid=data["kid"],
                                         exported_at=exported_at, now=time.time())

        for _ in range(3):
            try:
                done = await trio.to_thread.run_sync(plan)
            except (RuntimeError, KeyError):  # changed under it (a dict resized): again
                continue
            if done.version == knowledge.version:
                return done
        raise LookupError("the knowledge base kept changing during the import; next time")

    def status(self) -> dict[str, Any]:
        return {"trusted_keys": len(self.trusted), "imports": self.imported,
                "refused": self.refused, "last_error": self.last_error}
