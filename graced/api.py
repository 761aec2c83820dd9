"""graced's public API: the handler of every request method the wire serves.

Each handler takes the :class:`~graced.wire.Client` that asked and its parsed
:class:`~graced.protocol.wire.Request` and returns the result to sign and send, or
raises :class:`~graced.protocol.wire.RequestError` (an error reply, never a crash).
Who may call what is decided here and in :mod:`graced.wire`; :mod:`graced.app`, the
composition root, builds the components this module is given.
"""

from __future__ import annotations

import base64
import itertools
import logging
import math
import os
import pwd
import time
from typing import Any

import psutil
import trio

from . import __version__, keys, targets
from .auth import CONTROL, READ, PerKeyBudget
from .config import Config
from .detectors.runner import DetectorRunner
from .executor import AUTO_RISKS, MAX_STEP_ERROR, Executor, NotWaiting, PlanChanged
from .integration import detector_health
from .journal import JournalReader
from .learning import Learning
from .learning import knowledge as kb
from .mesh import Mesh
from .missions import store
from .missions.engine import ACTIVE, CLEARED_REPEATS, SEVERITIES, STATES
from .plan import build as build_plan
from .plan import matches, plan_values
from .protocol import Signer
from .protocol import knowledge as pk
from .protocol.text import local_time
from .protocol.times import is_instant, same_instant, shown
from .protocol.topics import user_topic_error
from .protocol.wire import Request, RequestError
from .readers import SharedReader
from .reload import ConfigRejected, Reloader
from .retention import Retention
from .silences import parse_target
from .wire import Client, Handler, Server, user_name

log = logging.getLogger("graced.api")
def _when(t: float | str) -> str:
    """A time in a message: the ISO form (a string given was checked to be one)."""
    return t if isinstance(t, str) else str(shown(t))


def not_waiting(closed: Any, verb: str) -> str:
    """Why a closed mission takes no decision and no run (exit 9), in one line: its
    state and the reason it closed ("cleared before approval")."""
    return (f"mission {closed.id} is {closed.state}, not waiting for a decision: "
            f"{closed.reason}; {verb} refused")


OPENED = ("params.opened must be the mission's opened_at: its number, or its ISO 8601 "
          "form as --json prints it")

MAX_EMIT = 10_000_000
MAX_COMMENT = 1024  # bytes of UTF-8: a comment is journaled with the decision
REFUSALS_JOURNALED = 10  # a local user's refused decisions journaled per minute, per uid

# The role a TCP client's signed request needs for each method (None: anyone).
# Over the Unix socket the peer's uid decides (see the handlers and graced.wire).
ROLES: dict[str, str | None] = {
    "hello": None,
    "status": READ, "subscribe": READ, "keys": READ, "checkpoint": READ, "missions.list": READ,
    "missions.get": READ, "missions.similar": READ, "detectors": READ,
    "knowledge.list": READ, "knowledge.show": READ, "knowledge.export": READ,
    "knowledge.stats": READ, "knowledge.sources": READ,
    "missions.approve": CONTROL, "missions.reject": CONTROL, "pause": CONTROL,
    "resume": CONTROL, "emit": CONTROL, "reload": CONTROL,
    # A dry run of an import only reads; a real one needs an approver (the handlers).
    "knowledge.import": READ, "knowledge.upload": READ,
    # A dry run only reads; a real run checks control rights in the handler.
    "playbooks.list": READ, "playbooks.run": READ, "silence.list": READ,
    "silence.add": CONTROL, "silence.remove": CONTROL,
}


def controllers() -> str:
    """Who controls graced over the Unix socket: root and graced's own user, named once
    when graced runs as root."""
    uid = os.geteuid()
    if uid == 0:
        return "root (uid 0)"
    try:
        name = f" ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        name = ""
    return f"root or uid {uid}{name}"


class Api:
    """The request handlers, bound to the daemon's running components."""

    def __init__(self, *, config: Config, daemon_id: str, hostname: str, started_at: float,
                 started_mono: float, signer: Signer, mesh: Mesh, server: Server,
                 executor: Executor, learning: Learning, runner: DetectorRunner,
                 reads: SharedReader[JournalReader],
                 quarantine: dict[str, Any] | None = None) -> None:
        self.config = config
        self.daemon_id = daemon_id
        self.hostname = hostname
        self.started_at = started_at
        self.started_mono = started_mono
        self.signer = signer
        self.mesh = mesh
        self.server = server
        self.executor = executor
        self.learning = learning
        self.runner = runner
        self.reads = reads
        self.quarantine = quarantine or {"rows": 0, "this_start": 0, "reasons": []}
        # Imports and resets one at a time: each changes memory and the journal together.
        # Knowledge imports and resets, one at a time (the fleet's imports take it too).
        self.knowledge_lock = self._knowledge_lock = trio.Lock()
        # One knowledge upload (and its parse) at a time, daemon-wide: its connection,
        # and when it last sent a part (an upload idle UPLOAD_IDLE s may be dropped).
        self._uploader: Client | None = None
        self._upload_at = 0.0
        self.reloader: Reloader | None = None
        # The components' health as last published (graced.integration), for status.
        self.integration: dict[str, dict[str, Any]] = {}
        self.fleet: Any = None  # graced.fleet.Forwarder when [fleet] url is set
        self.retention: Retention | None = None
        self._refusals_journaled = PerKeyBudget(REFUSALS_JOURNALED, 60.0)
        self.set_config(config)

    def set_config(self, config: Config) -> None:
        """Serve with this config from now on (at start, and after each reload)."""
        self.config = config
        rem = config.remediation
        self.server.authenticator.configure(
            read_keys=list(rem.read_keys), control_keys=list(rem.control_keys),
            authorized_keys=list(rem.authorized_keys), window=rem.request_window)
        self.server.revoke()

    def handlers(self) -> dict[str, Handler]:
        """The wire's method table: method name -> handler."""
        return {
            "hello": self.hello,
            "status": self.status,
            "subscribe": self.subscribe,
            "emit": self.emit,
            "keys": self.daemon_keys,
            "checkpoint": self.checkpoint,
            "missions.list": self.missions_list,
            "missions.get": self.missions_get,
            "detectors": self.detectors,
            "missions.approve": self.approve,
            "missions.reject": self.reject,
            "missions.similar": self.missions_similar,
            "knowledge.list": self.knowledge_list,
            "knowledge.show": self.knowledge_show,
            "knowledge.export": self.knowledge_export,
            "knowledge.import": self.knowledge_import,
            "knowledge.upload": self.knowledge_upload,
            "knowledge.stats": self.knowledge_stats,
            "knowledge.sources": self.knowledge_sources,
            "knowledge.reset": self.knowledge_reset,
            "pause": self.pause,
            "resume": self.resume,
            "reload": self.reload,
            "playbooks.list": self.playbooks_list,
            "playbooks.run": self.playbooks_run,
            "silence.add": self.silence_add,
            "silence.list": self.silence_list,
            "silence.remove": self.silence_remove,
        }

    def identity(self) -> dict[str, Any]:
        return {
            "daemon_id": self.daemon_id,
            "version": __version__,
            "host": self.hostname,
            "pid": os.getpid(),
            "kid": self.signer.kid,
        }

    async def hello(self, client: Client, req: Request) -> Any:
        return {
            **self.identity(),
            "public_key": keys.format_public_key(self.signer.public_key).split()[1],
            "head_seq": self.mesh.delivered_seq,
            "first_seq": self.mesh.journal.first_seq,
            "heartbeat_interval": self.config.daemon.heartbeat_interval,
            "peer": {"transport": client.peer.transport, "uid": client.peer.uid},
            "can_control": client.can_control(),
        }

    async def checkpoint(self, client: Client, req: Request) -> Any:
        """The latest daemon.checkpoint event, exactly as signed and journaled."""
        ev = self.mesh.last_checkpoint
        if ev is None:
            raise RequestError("not_found", "no checkpoint published yet")
        return {"event": ev.text}

    async def daemon_keys(self, client: Client, req: Request) -> Any:
        return {
            "kid": self.signer.kid,
            "public_key": keys.format_public_key(self.signer.public_key).split()[1],
            "algorithm": "ed25519",
        }

    async def status(self, client: Client, req: Request) -> Any:
        mesh = self.mesh
        return {
            **self.identity(),
            "started_at": self.started_at,
            "uptime": round(time.monotonic() - self.started_mono, 3),
            "head_seq": mesh.delivered_seq,
            "config": self.config.source,
            "state_dir": str(self.config.state_dir),
            "journal": {
                "path": str(mesh.journal.path),
                "size_bytes": mesh.journal.size_bytes(),
                "commit_latency_ms": round(mesh.commit_seconds_last * 1000, 3),
                "commits": mesh.commit_count,
                "commit_errors": mesh.commit_errors,
                "dropped": mesh.dropped,
                "last_error": mesh.last_error,
                "failing_since": mesh.failing_since,
                "pending": len(mesh._pending),
                "first_seq": mesh.journal.first_seq,
                "retention": self.retention.status() if self.retention else None,
            },
            "wire": self.server.status(),
            "executor": self.executor.status(),
            "integration": self.integration,
            "learning": await self._learning_summary(),
            "fleet": self.fleet.status() if self.fleet is not None else None,
            **self._health(),
        }

    async def answers(self) -> bool:
        """For the watchdog: what a status request needs (the event loop, a worker
        thread, the journal's read connection) works now."""
        try:
            await self._learning_summary()
            self._health()
        except Exception:  # noqa: BLE001 - a failing status is not an answer
            log.exception("watchdog: status fails")
            return False
        return True

    def _health(self) -> dict[str, Any]:
        """Active missions by severity, failing detectors, and why graced is degraded."""
        by_severity = dict.fromkeys(SEVERITIES, 0)
        awaiting = 0
        for m in self.executor.engine.active.values():
            by_severity[m.severity] = by_severity.get(m.severity, 0) + 1
            awaiting += m.state == "awaiting_approval"
        failing = {name: {"errors": st["errors"], "last_error": st["last_error"]}
                   for name, st in self.runner.status.items() if st["state"] == "error"}
        # A probe whose target fails (refused, timed out): its mission says so; graced is
        # not degraded, but status says it as top's health does (integration's word).
        probes = {name: {"last_error": h["last_error"]}
                  for name, h in ((n, detector_health(n, st))
                                  for n, st in self.runner.status.items())
                  if h["state"] == "failing"}
        degraded = []
        escalated = self.executor.engine.needs_person()
        if escalated:
            degraded.append(f"{len(escalated)} escalated (needs a person): mission "
                            + ", ".join(f"#{i}" for i in escalated))
        expired = self.executor.engine.expired_unanswered()
        if expired:
            degraded.append(f"{len(expired)} expired, nobody decided, symptom still there "
                            "(no new mission while it lasts): mission "
                            + ", ".join(f"#{i}" for i in expired))
        if self.mesh.failing_since is not None:
            degraded.append(f"journal commits failing: {self.mesh.last_error}")
        degraded += [f"detector {name} failing: {d['last_error']}"
                     for name, d in failing.items()]
        fleet_down = self.fleet.degraded(time.time()) if self.fleet is not None else None
        if fleet_down:
            degraded.append(fleet_down)
        return {"missions": by_severity, "awaiting_approval": awaiting,
                "escalated": escalated, "held": self.executor.engine.held_by_person(),
                "expired": expired,
                "failing_detectors": failing,
                "failing_probes": probes,
                "detectors_total": len(self.runner.status), "degraded": degraded}

    async def _learning_summary(self) -> dict[str, Any] | None:
        st = await self.learning.stats(time.time(), weeks=1, days=0)
        knowledge = self.learning.knowledge
        return {**{k: st[k] for k in ("strategy", "patterns", "outcomes", "playbook_runs",
                                      "success_rate", "success_rate_7d", "consulted_share")},
                "quarantined": self.quarantine, "sources": knowledge.held_sources(),
                "pinned": len(knowledge.sources), "loading": knowledge.loading}

    async def _read(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        """Run a read query on the handlers' connection, in a worker thread."""
        return await self.reads.run(lambda reader: reader.query(sql, params))

    async def missions_list(self, client: Client, req: Request) -> Any:
        p = req.params
        states = p.get("states")
        severities = p.get("severities")
        limit = p.get("limit", 200)
        for name, value, allowed in (("states", states, STATES), ("severities", severities,
                                                                   SEVERITIES)):
            if value is not None and (not isinstance(value, list)
                                      or not all(v in allowed for v in value)):
                raise RequestError("bad_request", f"params.{name} must be a list of: "
                                   + ", ".join(allowed))
        if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= 10000:
            raise RequestError("bad_request", "params.limit must be an integer 1-10000")
        rows = []
        if not p.get("all") and not states:
            # The default view: the active missions and the escalated or expired ones a
            # person has not seen the symptom of clear yet.
            states = list(ACTIVE)
            engine = self.executor.engine
            waiting = sorted([*engine.needs_person(), *engine.expired_unanswered()])[-limit:]
            if waiting:
                rows = await self._read(*store.list_query(None, severities, limit, waiting))
        rows = sorted([*rows, *await self._read(*store.list_query(states, severities, limit))],
                      key=lambda r: -r[0])[:limit]
        return {"missions": [store.from_row(r).public() for r in rows], "now": time.time()}

    async def missions_get(self, client: Client, req: Request) -> Any:
        return {"mission": (await self._mission(req.params.get("id"))).public(), "now": time.time()}

    async def _mission(self, mid: Any, key: str = "id") -> Any:
        mid = row_id(mid, key)
        rows = await self._read(f"{store.SELECT} WHERE id = ?", (mid,))
        if not rows:
            raise RequestError("not_found", f"no mission {mid}")
        return store.from_row(rows[0])

    async def missions_similar(self, client: Client, req: Request) -> Any:
        limit = req.params.get("limit", self.config.learning.similar_limit)
        if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= 1000:
            raise RequestError("bad_request", "params.limit must be an integer 1-1000")
        m = await self._mission(req.params.get("id"))
        started = time.perf_counter()
        similar = await self.learning.similar(m, limit)
        return {"mission": m.brief(), "similar": similar,
                "lookup_ms": round((time.perf_counter() - started) * 1000, 3),
                "recorded": m.similar if m.decision is not None else None}

    async def knowledge_list(self, client: Client, req: Request) -> Any:
        limit = _page_param(req.params, "limit", 1000, 1, 1000)
        offset = _page_param(req.params, "offset", 0, 0, pk.MAX_TOTAL_RECORDS)
        held = await self.learning.held_back()
        now = time.time()
        page = await self.learning.patterns(now, limit, offset)
        total = len(self.learning.knowledge.patterns)
        return {"patterns": [{**p, "held_back": held.get(p["pattern"], {})} for p in page],
                "total": total, "offset": offset,
                "next_offset": offset + len(page) if offset + len(page) < total else None,
                "now": now}

    async def knowledge_show(self, client: Client, req: Request) -> Any:
        sig = req.params.get("pattern")
        if not isinstance(sig, str) or len(sig) > 2 * pk.MAX_TEXT + 1:
            raise RequestError("bad_request", "params.pattern must be a string")
        limit = _page_param(req.params, "limit", pk.MAX_PLAYBOOKS, 1, pk.MAX_PLAYBOOKS)
        offset = _page_param(req.params, "offset", 0, 0, pk.MAX_PLAYBOOKS)
        known = self.learning.knowledge.patterns
        if sig not in known:
            # Bounded: the first patterns that start with the name (not a scan of all).
            near = list(itertools.islice((p for p in known if p.startswith(sig)), 5)) \
                if len(known) <= 10_000 else []
            raise RequestError("not_found", f"no pattern {sig!r}" + (
                f" (did you mean: {', '.join(near)})" if near else ""))
        # A mission that named a playbook which never ran (rejected, expired, escalated):
        # its proposed playbook, so the list agrees with missions ls.
        recent = await self._read(
            "SELECT o.mission_id, o.playbook, o.outcome, o.success, o.ttr, o.closed_at, "
            "o.held_back, CASE WHEN o.ran = 0 AND json_valid(m.data) "
            "THEN json_extract(m.data, '$.playbook') END FROM outcomes AS o "
            "LEFT JOIN missions AS m ON m.id = o.mission_id WHERE o.signature = ? "
            "ORDER BY o.mission_id DESC LIMIT 20", (sig,))
        now = time.time()
        try:
            summary = await self.learning.summary(sig, now)
        except KeyError:
            raise RequestError("not_found", f"no pattern {sig!r}") from None
        playbooks = summary["playbooks"]
        summary["playbooks"] = playbooks[offset:offset + limit]
        return {"pattern": {**summary, "playbooks_total": len(playbooks), "offset": offset,
                            "held_back": (await self.learning.held_back(sig)).get(sig, {})},
                "recent": [dict(zip(("id", "playbook", "outcome", "success", "ttr",
                                     "closed_at", "held_back", "not_run"), r, strict=True))
                           for r in recent],
                "now": now}

    async def knowledge_export(self, client: Client, req: Request) -> Any:
        body = self.learning.knowledge.export(self.daemon_id, self.hostname, time.time())
        return {"export": self.signer.sign_frame(body)}

    def _may_import(self, client: Client, what: str = "knowledge import") -> None:
        peer = client.peer
        if peer.transport != "unix" or not self.executor.may_approve(peer.uid, peer.groups):
            raise RequestError("not_authorised", f"{what} needs an approver over the Unix "
                               "socket")

    async def knowledge_upload(self, client: Client, req: Request) -> Any:
        """One part of an export file (base64), appended to this connection's upload;
        ``offset`` 0 starts a new one. The file is read by knowledge.import.

        An upload for a dry run (params.dry_run) needs only read rights; an approver's
        upload takes the place of a dry run's that is not being read yet."""
        dry = req.params.get("dry_run", False)
        if not isinstance(dry, bool):
            raise RequestError("bad_request", "params.dry_run must be a boolean")
        if not dry:
            self._may_import(client)
        offset, data = req.params.get("offset"), req.params.get("data")
        if not isinstance(offset, int) or isinstance(offset, bool) or not isinstance(data, str):
            raise RequestError("bad_request", "params.offset must be an integer and "
                               "params.data a base64 string")
        if offset == 0:
            client.upload = bytearray()
            client.upload_dry = dry
            self._take_upload(client)
        elif dry != client.upload_dry:
            raise RequestError("bad_request", "params.dry_run: every part of an upload "
                               "says the same")
        elif self._uploader is not client:
            client.upload = bytearray()
            raise RequestError("invalid", f"params.offset: this connection's upload was "
                               f"dropped (idle more than {UPLOAD_IDLE:g} s while another "
                               "waited); start again at offset 0")
        self._upload_at = time.monotonic()
        if offset != len(client.upload):
            raise RequestError("bad_request", f"params.offset: {offset}, but "
                               f"{len(client.upload)} bytes were uploaded")
        try:
            part = base64.b64decode(data, validate=True)
        except ValueError:
            raise RequestError("bad_request", "params.data must be base64") from None
        if offset == 0 and part.lstrip()[:1] != b"{":
            self._release_upload(client)
            raise RequestError("invalid", "not a knowledge export: it does not start as a "
                               "JSON object")
        if len(client.upload) + len(part) > pk.MAX_FILE_BYTES:
            self._release_upload(client)
            client.upload = bytearray()
            raise RequestError("invalid", f"an export file holds at most "
                               f"{pk.MAX_FILE_BYTES // 2**20} MB")
        client.upload += part
        return {"received": len(client.upload)}

    async def knowledge_import(self, client: Client, req: Request) -> Any:
        """Import the export file uploaded on this connection, verified here.

        graced checks the file itself: the bounds, the signature against the key the
        client names (params.key, which must be the key pinned for that source once one
        is, unless params.replace_key), and that it is not older than the last export
        taken from that source. The whole file is planned first: the dry run answers
        the plan, the import journals it in one transaction, then applies it. A dry run
        needs read rights only (it changes nothing); an import, an approver."""
        p = req.params
        dry_run = p.get("dry_run", False)
        if not isinstance(dry_run, bool) or not dry_run or not client.upload_dry:
            self._may_import(client)
        key_b64, replace_key = p.get("key"), p.get("replace_key", False)
        if not isinstance(key_b64, str) or not isinstance(replace_key, bool) \
                or not isinstance(dry_run, bool):
            raise RequestError("bad_request", "params.key must be the exporting daemon's "
                               "public key (base64), params.replace_key and params.dry_run "
                               "booleans")
        try:
            key = base64.b64decode(key_b64, validate=True)
        except ValueError:
            key = b""
        if len(key) != 32:
            raise RequestError("bad_request", "params.key must be a base64 Ed25519 public key")
        raw, client.upload = bytes(client.upload), bytearray()
        if not raw or self._uploader is not client:
            raise RequestError("bad_request", "no export file uploaded on this connection "
                               "(knowledge.upload; one dropped idle is gone)")
        # Held through the parse: the one document built in memory at a time.
        self._upload_at = math.inf
        try:
            return await self._import_file(client, raw, key, replace_key, dry_run)
        finally:
            self._release_upload(client)

    def _take_upload(self, client: Client) -> None:
        """Make ``client`` the one connection uploading (or being parsed): a daemon-wide
        bound on what uploads hold in memory (one 32 MB file and its parse, not one per
        connection). Another's upload is taken over only once it is idle past
        UPLOAD_IDLE or its connection has gone; its bytes are dropped then."""
        other = self._uploader
        # A dry run's upload (anyone who may read) never keeps an approver waiting,
        # unless its file is being read already (the one parse in memory at a time).
        yields = other is not None and other.upload_dry and not client.upload_dry \
            and self._upload_at != math.inf
        if other is not None and other is not client and not other.closing.is_set() \
                and time.monotonic() - self._upload_at < UPLOAD_IDLE and not yields:
            raise RequestError("unavailable", "another knowledge import is being uploaded "
                               "or read; try again shortly")
        if other is not None and other is not client:
            other.upload = bytearray()
        self._uploader = client

    def _release_upload(self, client: Client) -> None:
        client.upload = bytearray()
        if self._uploader is client:
            self._uploader = None

    async def _import_file(self, client: Client, raw: bytes, key: bytes, replace_key: bool,
                           dry_run: bool) -> Any:

        def check() -> tuple[dict[str, Any], list[dict[str, Any]]]:
            try:
                data, patterns = pk.parse_export(raw, time.time())
            except ValueError as exc:
                raise RequestError("invalid", str(exc)) from None
            try:
                pk.verify_export(data, key)
            except ValueError as exc:
                raise RequestError("bad_signature", str(exc)) from None
            return data, patterns

        # Parsing and canonicalising 32 MB takes seconds: not on the event loop.
        data, patterns = await trio.to_thread.run_sync(check)
        async with self._knowledge_lock:
            return await self._import(client, data, patterns, replace_key, dry_run)

    async def _import(self, client: Client, data: dict[str, Any],
                      patterns: list[dict[str, Any]], replace_key: bool,
                      dry_run: bool) -> Any:
        """The checks against what is held from that daemon, the plan, then (unless a dry
        run) its journal entry and its application; under the knowledge lock."""
        source, host, kid = data["source"], data["host"], data["kid"]
        exported_at = float(data["exported_at"])
        if source in (self.daemon_id, kb.LOCAL):
            raise RequestError("invalid", "this knowledge was exported by this daemon; "
                               "importing it would count its outcomes twice")
        knowledge = self.learning.knowledge
        known = knowledge.sources.get(source)
        notes = []
        if known is not None and known["kid"] != kid:
            if not replace_key:
                raise RequestError("key_changed", (
                    f"daemon {source} ({known['host'] or 'unknown host'}) was imported "
                    f"signed by key {known['kid']}, this file by key {kid}: refused; if "
                    "that daemon's key really changed, import with --replace-key"))
            notes.append(f"the key of daemon {source} is replaced: {known['kid']} -> {kid}")
        if known is not None and exported_at < known["exported_at"] and replace_key \
                and known["kid"] != kid:
            # Journaled with the import (key_replaced): the operator vouches for the new
            # key, so the export time the old key claimed no longer holds.
            notes.append(f"the export time stored for daemon {source} "
                         f"({local_time(known['exported_at'])}) is reset with its key")
        elif known is not None and exported_at < known["exported_at"]:
            raise RequestError("invalid", (
                f"exported_at: this export of daemon {source} ({local_time(exported_at)}) is "
                f"older than the one imported already ({local_time(known['exported_at'])}): "
                "refused"))
        plan, writes = await self._plan_import(source, patterns, host, kid, exported_at,
                                               dry_run)
        self._note_unmatched(plan.changes, patterns)
        answer = {"source": source, "host": host, "kid": kid, "records": len(patterns),
                  "counts": plan.counts, "changes": plan.changes,
                  "changes_total": sum(plan.counts.values()), "notes": notes}
        if dry_run:
            return {**answer, "dry_run": True}
        # Journaled first, in one transaction with the event; applied only once that
        # is committed, so memory and the journal never disagree.
        await self.mesh.publish("learning.imported", {
            "source": source, "host": host, "kid": kid,
            "exported_at": shown(exported_at),
            "patterns": len(patterns), "counts": plan.counts,
            "key_replaced": bool(notes), "by_uid": client.peer.uid},
            writes=writes)
        knowledge.apply_import(plan)
        return {**answer, "imported": len(patterns), "patterns": len(knowledge.patterns)}

    async def _plan_import(self, source: str, patterns: list[dict[str, Any]], host: str,
                           kid: str, exported_at: float,
                           dry_run: bool) -> tuple[kb.ImportPlan, list[Any]]:
        """Plan an import, and its writes, in a worker thread (100,000 records take
        seconds): read-only work on the knowledge base, retried if a reset or another
        import changed it meanwhile, so only the apply runs on the event loop."""
        knowledge = self.learning.knowledge

        def plan() -> tuple[kb.ImportPlan, list[Any]]:
            p = knowledge.plan_import(source, patterns, host=host, kid=kid,
                                      exported_at=exported_at, now=time.time())
            return p, [] if dry_run else knowledge.import_writes(p)

        for _ in range(3):
            try:
                done = await trio.to_thread.run_sync(plan)
            except ValueError as exc:
                raise RequestError("invalid", str(exc)) from None
            except (RuntimeError, KeyError):  # changed under it (a dict resized): again
                continue
            if done[0].version == knowledge.version:
                return done
        raise RequestError("unavailable", "knowledge changed during the import (a reset or "
                           "another import); try again")

    def _note_unmatched(self, changes: list[dict[str, Any]],
                        patterns: list[dict[str, Any]]) -> None:
        """A record applies to missions of exactly its DETECTOR:SUBJECT: note the records
        that nothing here reports (a detector not configured, or a subject not seen)."""
        where = {(p["signature"], p["playbook"]): (p["detector"], p["subject"])
                 for p in patterns}
        status = self.runner.status
        for c in changes:
            if c["change"] == "removed" or (c["pattern"], c["playbook"]) not in where:
                continue
            detector, subject = where[(c["pattern"], c["playbook"])]
            if detector not in status:
                c["note"] = f"no local detector named {detector}"
            elif subject not in status[detector]["subjects"]:
                c["note"] = "no local detector reports this subject"

    async def knowledge_reset(self, client: Client, req: Request) -> Any:
        """Forget what was learned about a pattern or a playbook (control rights), or
        forget an imported source: its records, pinned key and export time
        (params.source; an approver, as for an import)."""
        source = req.params.get("source")
        if source is not None:
            self._may_import(client, "knowledge reset --source")
            if not isinstance(source, str) or not source or len(source) > 200:
                raise RequestError("bad_request", "params.source must be a daemon id")
            async with self._knowledge_lock:
                return await self._forget(client, source)
        if not client.can_control():
            raise RequestError("not_authorised", f"knowledge reset needs {controllers()} over "
                               "the Unix socket")
        target = req.params.get("target")
        if not isinstance(target, str) or not target or len(target) > 2001:
            raise RequestError("bad_request", "params.target must be a pattern "
                               "(DETECTOR:SUBJECT) or a playbook name")
        async with self._knowledge_lock:  # imported records load after start under it
            known = self.learning.knowledge.patterns
            if target not in known and not any(target in pbs for pbs in known.values()):
                raise RequestError("not_found", f"no pattern or playbook {target!r} in "
                                   "knowledge")
            kind = "pattern" if target in known else "playbook"
            return await self._reset(client, target, kind)

    async def _reset(self, client: Client, target: str, kind: str) -> Any:
        writes, removed = self.learning.reset(target)
        await self.mesh.publish("learning.reset", {
            "target": target, "kind": kind, "records": removed,
            "by_uid": client.peer.uid}, writes=writes)
        return {"target": target, "records": removed}

    async def _forget(self, client: Client, source: str) -> Any:
        knowledge = self.learning.knowledge
        meta = knowledge.sources.get(source)
        if meta is None:
            raise RequestError("not_found", f"no imported source {source!r} in knowledge "
                               "(gracectl knowledge sources lists them)")
        writes, removed = knowledge.forget_source(source)
        await self.mesh.publish("learning.reset", {
            "target": source, "kind": "source", "records": removed, "host": meta["host"],
            "kid": meta["kid"], "exported_at": meta["exported_at"],
            "by_uid": client.peer.uid}, writes=writes)
        return {"target": source, "records": removed, "kid": meta["kid"]}

    async def knowledge_sources(self, client: Client, req: Request) -> Any:
        """The imported sources remembered: pinned key, last export time, records."""
        knowledge = self.learning.knowledge
        return {"sources": knowledge.source_list(), "held": knowledge.held_sources(),
                "max_sources": pk.MAX_SOURCES, "max_pinned": pk.MAX_PINNED,
                "loading": knowledge.loading}

    async def knowledge_stats(self, client: Client, req: Request) -> Any:
        return await self.learning.stats(time.time())

    async def _decide(self, client: Client, req: Request, approve: bool) -> Any:
        mid = row_id(req.params.get("id"))
        comment = req.params.get("comment", "")
        opened = req.params.get("opened")
        if not isinstance(comment, str) or len(comment.encode("utf-8", "surrogatepass")) \
                > MAX_COMMENT:
            raise RequestError("bad_request", f"params.comment must be a string of at most "
                               f"{MAX_COMMENT} bytes")
        if opened is not None and not is_instant(opened):
            raise RequestError("bad_request", OPENED)
        peer = client.peer
        verb = "approve" if approve else "reject"
        who: dict[str, Any]
        if req.kid is None:
            if peer.transport != "unix":  # the wire admits no unsigned decision over TCP
                raise RequestError("not_authorised", f"{verb} over TCP must be signed")
            if not self.executor.may_approve(peer.uid, peer.groups):
                await self._refuse(client, req, mid, verb, (
                    f"{user_name(peer.uid)} may not {verb} missions (allowed: "
                    f"{controllers()}, [remediation] approvers and approver_groups)"))
            try:
                user = pwd.getpwuid(peer.uid).pw_name if peer.uid is not None else "?"
            except KeyError:
                user = str(peer.uid)
            who = {"user": user, "uid": peer.uid, "auth": "unix peer credentials"}
        else:
            if opened is None:
                raise RequestError("bad_request", f"a signed {verb} must name the mission's "
                                   "opened time (params.opened)")
            kid = await self._check_signed(client, req, verb)
            who = {"user": f"key {kid}", "key": kid, "auth": f"signed request (ed25519 {kid})"}
        # Checked once the caller is known to be allowed: an outsider learns nothing more.
        plan = req.params.get("plan")
        if plan is not None and (not isinstance(plan, str) or len(plan) > 64):
            raise RequestError("bad_request", "params.plan must be the sha256 of the plan "
                               "approved (missions.get: mission.plan.sha256)")
        clearing_ok = req.params.get("clearing", False)
        if not isinstance(clearing_ok, bool):
            raise RequestError("bad_request", "params.clearing must be a boolean")
        # The symptom as the approver decided: its latest sample normal means it may be
        # clearing (not yet resolved as cleared). Running a playbook against a symptom
        # that is going away fixes nothing and teaches nothing (the run is not
        # credited): refused, unless the approver says to run it anyway.
        before = self.executor.engine.by_id(mid)
        seen = (before.normal_streak, before.last_value) if before is not None else (0, None)
        if approve and seen[0] > 0 and before is not None \
                and before.state == "awaiting_approval" and not clearing_ok:
            value = "" if seen[1] is None else f" (value {seen[1]:g})"
            latest = (f"the latest sample of {before.detector} {before.subject} was "
                      f"normal{value}" if seen[0] == 1 else
                      f"the latest {seen[0]} samples of {before.detector} {before.subject} "
                      f"were normal{value}")
            if any(t.get("note") == "kept open" for t in before.timeline):
                why = (f"{latest}; it was kept open for a person (it cleared before approval "
                       f"{CLEARED_REPEATS} times within missions.flap_window) instead of "
                       f"resolving as cleared; approval refused, nothing run: reject it if "
                       "the fault is gone (gracectl missions reject), or approve with "
                       "--even-if-clearing to run the playbook anyway")
            else:
                why = (f"{latest}, and {self.executor.engine.resolve_after} in a row resolve "
                       "it as cleared before approval (missions.resolve_after); approval "
                       "refused, nothing run (approve with --even-if-clearing to run it "
                       "anyway)")
            raise RequestError("clearing", f"mission {mid}: the symptom is clearing: {why}")
        try:
            m = await self.executor.decide(mid, approve, who, comment, opened, plan)
        except PlanChanged as exc:
            raise RequestError("plan_changed", str(exc)) from None
        except NotWaiting as exc:  # exit 9: approved already, executing...
            raise RequestError("not_waiting", f"{exc}; {verb} refused") from None
        except LookupError:
            rows = await self._read(f"{store.SELECT} WHERE id = ?", (mid,))
            if rows:
                closed = store.from_row(rows[0])
                # Exit 9, not 5 (no such mission), with the reason: "cleared before
                # approval".
                raise RequestError("not_waiting", not_waiting(closed, verb)) from None
            raise RequestError("not_found", f"no mission {mid}") from None
        except ValueError as exc:
            raise RequestError("invalid", str(exc)) from None
        if approve and seen[0] > 0:
            value = "" if seen[1] is None else f" (value {seen[1]:g})"
            return {"mission": m.public(), "warning": (
                f"the latest sample of {m.detector} {m.subject} was normal{value}: the "
                f"symptom may be clearing ({seen[0]} normal of the "
                f"{self.executor.engine.resolve_after} that resolve it as cleared); "
                f"the plan runs as approved (--even-if-clearing)")}
        return {"mission": m.public()}

    async def _refuse(self, client: Client, req: Request, mid: int, verb: str,
                      reason: str) -> None:
        """Refuse a local user's decision. Journaled (that user is known by uid), but only
        for a mission that is active, and at most REFUSALS_JOURNALED a minute per uid,
        the next one journaled carrying how many were not: anyone may open the socket,
        and an unbounded stream of refusals would have retention prune every event
        worth keeping. The rest are counted and logged (rate-limited), as refusals of
        unauthenticated requests are."""
        peer = client.peer
        skipped = (self._refusals_journaled.take(peer.uid)
                   if self.executor.engine.by_id(mid) is not None else None)
        if skipped is None:
            self.server.refusals.refuse(peer.describe(), req.method, reason)
            raise RequestError("not_authorised", reason)
        payload: dict[str, Any] = {"mission": mid, "decision": verb,
                                   "peer": peer.describe(), "reason": reason}
        if skipped:
            payload["not_journaled"] = skipped
        await self.mesh.publish("mission.approval_refused", payload)
        raise RequestError("not_authorised", reason)

    async def _fresh_nonce(self, client: Client, req: Request,
                           verb: str) -> list[tuple[str, tuple[Any, ...]]]:
        """A signed request that acts (its signature checked by the wire): control role
        and a nonce never used, even before a restart. Returns the write that records the
        nonce: commit it with (or before) the event of what the request did. Refusals are
        counted, never journaled."""
        kid = req.kid
        assert kid is not None and req.auth is not None
        reason = ""
        nonce_key = f"{kid}:{req.nonce}"
        if req.role != CONTROL:
            reason = f"key {kid} has the {req.role} role; {verb} needs control"
        elif await self._read("SELECT 1 FROM used_nonces WHERE nonce = ?", (nonce_key,)):
            reason = "replayed request: its nonce was used before"
        if reason:
            self.server.refusals.refuse(client.peer.describe(), req.method, reason)
            raise RequestError("not_authorised", reason)
        return [("INSERT OR IGNORE INTO used_nonces (nonce, kid, ts) VALUES (?, ?, ?)",
                 (nonce_key, kid, float(req.auth["ts"])))]

    async def _check_signed(self, client: Client, req: Request, verb: str) -> str:
        """A signed decision: :meth:`_fresh_nonce`, made durable before it is acted on."""
        kid = req.kid
        assert kid is not None
        writes = await self._fresh_nonce(client, req, verb)
        # Durable before the decision is acted on: a replay after a restart is refused too.
        await self.mesh.publish("mission.request_authenticated", {
            "mission": req.params["id"], "decision": verb, "kid": kid,
            "peer": client.peer.describe()}, writes=writes)
        return kid

    async def approve(self, client: Client, req: Request) -> Any:
        return await self._decide(client, req, True)

    async def reject(self, client: Client, req: Request) -> Any:
        return await self._decide(client, req, False)

    async def _set_paused(self, client: Client, req: Request, paused: bool) -> Any:
        peer = client.peer
        if req.role != CONTROL and not (peer.transport == "unix"
                                        and self.executor.may_approve(peer.uid, peer.groups)):
            raise RequestError("not_authorised", "pause/resume needs an approver over the "
                               "Unix socket or a request signed by a control key")
        nonce = [] if req.kid is None else await self._fresh_nonce(client, req, req.method)
        changed = self.executor.paused != paused
        self.executor.paused = paused
        await self.mesh.publish(
            "executor.paused" if paused else "executor.resumed",
            {"by": self._who(client, req), "by_uid": client.peer.uid, "changed": changed},
            writes=[*nonce, ("INSERT OR REPLACE INTO meta (key, value) VALUES ('paused', ?)",
                             ("1" if paused else "0",))])
        if not paused and changed:
            await self.executor.resume()
        return {"paused": paused, "changed": changed}

    async def reload(self, client: Client, req: Request) -> Any:
        """Re-read the config and apply it (who may control graced may reload it)."""
        if not client.can_control() or self.reloader is None:
            raise RequestError("not_authorised", f"reload needs {controllers()} over the Unix "
                               "socket")
        try:
            return await self.reloader.reload(f"gracectl (uid {client.peer.uid})")
        except ConfigRejected as exc:
            raise RequestError("invalid", f"config rejected, the running one kept: {exc}"
                               ) from None

    async def pause(self, client: Client, req: Request) -> Any:
        return await self._set_paused(client, req, True)

    async def resume(self, client: Client, req: Request) -> Any:
        return await self._set_paused(client, req, False)

    async def detectors(self, client: Client, req: Request) -> Any:
        history = req.params.get("history", 0)
        if not isinstance(history, int) or isinstance(history, bool) or history < 0:
            raise RequestError("bad_request", "params.history must be a non-negative integer")
        times = req.params.get("times", False) is True  # [ts, value] pairs (the web page)
        out = {}
        for name, st in self.runner.status.items():
            entry = {k: v for k, v in st.items() if k not in ("sampled_at", "timeout")}
            if history:
                entry["history"] = {
                    subj: [[t, v] if times else v for t, v in list(
                        self.runner.history.get((name, subj), []))[-history:]]
                    for subj in st["subjects"]}
            out[name] = entry
        return {"detectors": out, "now": time.time()}

    async def subscribe(self, client: Client, req: Request) -> Any:
        return await self.server.subscribe(client, req)

    async def emit(self, client: Client, req: Request) -> Any:
        """Publish ``user.*`` events: annotations, and load for tests and benchmarks."""
        if not client.can_control() and req.role != CONTROL:
            raise RequestError(
                "not_authorised", f"emit needs {controllers()} over the Unix socket, or a "
                "request signed by a control key")
        p = req.params
        topic = p.get("topic")
        bad = user_topic_error(topic)
        if bad or not isinstance(topic, str):
            raise RequestError("bad_request", f"params.topic: {bad}")
        payload = p.get("payload", {})
        count = p.get("count", 1)
        rate = p.get("rate")
        if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= MAX_EMIT:
            raise RequestError("bad_request", f"params.count must be an integer 1-{MAX_EMIT}")
        if rate is not None and (not isinstance(rate, (int, float)) or isinstance(rate, bool)
                                 or not 0 < rate <= 1e6):
            raise RequestError("bad_request", "params.rate must be a number of events/s or null")
        # A signed emit's nonce is kept durably, with its first event, as an approval's
        # is: replayed after a restart (when the memory of nonces is gone) it is refused.
        nonce = ([] if req.kid is None or client.can_control()
                 else await self._fresh_nonce(client, req, "emit"))
        if count == 1:
            try:
                ev = await self.mesh.publish(topic, payload, writes=nonce)
            except (ValueError, TypeError) as exc:
                raise RequestError("bad_request", f"payload is not JSON-safe: {exc}") from None
            assert ev is not None
            return {"first_seq": ev.seq, "last_seq": ev.seq, "count": 1}
        try:
            from .protocol import canonical_bytes

            canonical_bytes(payload)
        except (ValueError, TypeError) as exc:
            raise RequestError("bad_request", f"payload is not JSON-safe: {exc}") from None
        first = 0
        if nonce:
            # The first event carries the nonce, committed before the rest is queued.
            await self.mesh.publish(topic, {"i": 0, **_as_dict(payload)}, writes=nonce)
            first = 1
        if p.get("wait", True) is False:
            self.server.spawn(self._emit_many, topic, payload, count, rate, first)
            return {"queued": count, "rate": rate}
        last = await self._emit_many(topic, payload, count, rate, first)
        return {"count": count, "last_seq": last}

    async def _emit_many(self, topic: str, payload: Any, count: int, rate: float | None,
                         first: int = 0) -> int:
        """Publish events ``first..count-1`` of ``count`` (paced at ``rate``/s if given);
        returns the last seq."""
        mesh = self.mesh
        body = _as_dict(payload)
        start = trio.current_time()
        for i in range(first, count - 1):
            if rate is not None:
                await trio.sleep_until(start + i / rate)
            elif i % 256 == 0:
                await mesh.wait_room()
                await trio.lowlevel.checkpoint()
            mesh.publish_nowait(topic, {"i": i, **body}, checked=True)
        if rate is not None:
            await trio.sleep_until(start + (count - 1) / rate)
        ev = await mesh.publish(topic, {"i": count - 1, **body})
        assert ev is not None
        return ev.seq


    # -- playbooks ---------------------------------------------------------------------

    async def playbooks_list(self, client: Client, req: Request) -> Any:
        """Each playbook: what it matches, its risk, budget left and learned record."""
        ex = self.executor
        now = time.time()
        out = []
        for pb in ex.playbooks:
            used = ex.budgets.used(pb, now)
            out.append({
                "name": pb.name,
                "match": {"detector": pb.detector or None, "kind": pb.kind or None,
                          "subject": pb.subject or "*", "severities": list(pb.severities)},
                "risk": pb.risk, "auto": pb.risk in ("low", "medium"),
                "steps": [st.action for st in pb.step],
                "budget": pb.budget, "budget_window": pb.budget_window,
                "budget_used": used,
                "budget_left": pb.budget - max(used.values(), default=0),
                # The records knowledge ls/show read: credited runs, after any reset.
                "learned": self.learning.knowledge.playbook_record(pb.name, now),
            })
        return {"playbooks": out, "mode": ex.config.mode, "paused": ex.paused,
                "global_left": max(0, ex.config.max_actions_per_hour
                                   - len([t for t in ex.budgets.global_runs if now - t < 3600])),
                "now": now}

    async def playbooks_run(self, client: Client, req: Request) -> Any:
        """Run a playbook by hand for a mission, or (``dry_run``) show exactly what would run."""
        p = req.params
        name, dry_run = p.get("name"), p.get("dry_run", False)
        if not isinstance(name, str) or not name or len(name) > 200:
            raise RequestError("bad_request", "params.name must be a playbook name")
        if not isinstance(dry_run, bool):
            raise RequestError("bad_request", "params.dry_run must be a boolean")
        pb = next((x for x in self.executor.playbooks if x.name == name), None)
        if pb is None:
            raise RequestError("not_found", f"no playbook {name!r} (gracectl playbooks ls)")
        m = await self._mission(p.get("mission"), "mission")
        if not matches(pb, m):
            raise RequestError("invalid", f"playbook {name} does not match mission {m.id} "
                               f"({m.detector}:{m.subject}, {m.kind}, {m.severity})")
        if dry_run:
            # The values frozen in the mission's plan: the hash missions show prints.
            plan = build_plan(pb, plan_values(m))
            for st, step in zip(pb.step, plan["steps"], strict=True):
                if st.action == "signal":
                    try:
                        found = await trio.to_thread.run_sync(
                            self.executor.pids, st, plan["values"])
                        step["matching_pids"] = [
                            t.pid for t in found.targets[:targets.MAX_PIDS]]
                        step["matching_count"] = len(found.targets)
                        step["skipped"] = found.skipped
                        step["skipped_count"] = found.skipped_count
                    except (OSError, ValueError, psutil.Error) as exc:
                        step["matching_pids"] = []
                        step["error"] = targets.clip(str(exc), MAX_STEP_ERROR)
            return {"dry_run": True, "mission": m.brief(), "plan": plan}
        user = self._controller(client, req, "running a playbook by hand")
        who = {"user": user, "uid": client.peer.uid, "auth": (
            f"signed request (ed25519 {req.kid})" if user.startswith("key ")
            else "unix peer credentials")}
        opened, named = p.get("opened"), p.get("plan")
        if opened is not None and not is_instant(opened):
            raise RequestError("bad_request", OPENED)
        if named is not None and (not isinstance(named, str) or len(named) > 64):
            raise RequestError("bad_request", "params.plan must be the sha256 of the plan "
                               "(playbooks.run with dry_run: plan.sha256)")
        writes: list[tuple[str, tuple[Any, ...]]] = []
        if req.kid is not None:
            # A key runs a playbook by hand with what an approval needs: bound to the
            # mission, to the plan it saw (high and critical risk), never replayed.
            if opened is None or (named is None and pb.risk not in AUTO_RISKS):
                raise RequestError("bad_request", "a signed run names the mission's opened "
                                   "time (params.opened) and, for a playbook of risk "
                                   f"{pb.risk}, the plan it runs (params.plan), as an "
                                   "approval does")
            writes = await self._fresh_nonce(client, req, "running a playbook by hand")
        if opened is not None and not same_instant(opened, m.opened_at):
            raise RequestError("invalid", f"the request names mission {m.id} opened at "
                               f"{_when(opened)}, but mission {m.id} opened at "
                               f"{_when(m.opened_at)}")
        try:
            # Checked against the live mission where the plan is built, with no
            # checkpoint between: what runs is the plan named.
            done = await self.executor.run_by_hand(m.id, pb, who, writes, named)
        except PlanChanged as exc:
            raise RequestError("plan_changed", str(exc)) from None
        except NotWaiting as exc:  # exit 9, as approve says for a closed mission
            raise RequestError("not_waiting", str(exc) if self.executor.engine.by_id(m.id)
                               else not_waiting(m, "run")) from None
        except LookupError as exc:
            raise RequestError("not_found", str(exc)) from None
        except ValueError as exc:
            raise RequestError("invalid", str(exc)) from None
        return {"dry_run": False, "mission": done.public()}

    # -- silences ----------------------------------------------------------------------

    def _controller(self, client: Client, req: Request, what: str) -> str:
        """Who asks, if they have control rights (root or graced's uid over the Unix socket,
        or a request signed by a control key); else not_authorised."""
        if req.role == CONTROL and req.kid is not None:
            return f"key {req.kid}"
        if not client.can_control():
            raise RequestError("not_authorised", f"{what} needs control rights ({controllers()} "
                               "over the Unix socket, or a request signed by a control key)")
        return self._who(client, req)

    @staticmethod
    def _who(client: Client, req: Request) -> str:
        """Who asks, as a journaled ``by``: ``key KID`` for a signed request, else the Unix
        peer's user name (its uid when it has none)."""
        if req.kid is not None:
            return f"key {req.kid}"
        try:
            return pwd.getpwuid(client.peer.uid).pw_name if client.peer.uid is not None \
                else "?"
        except KeyError:
            return str(client.peer.uid)

    async def silence_add(self, client: Client, req: Request) -> Any:
        p = req.params
        user = self._controller(client, req, "adding a silence")
        nonce = [] if req.kid is None else await self._fresh_nonce(client, req,
                                                                   "adding a silence")
        target, duration = p.get("target"), p.get("duration")
        comment, until_resolved = p.get("comment"), p.get("until_resolved", False)
        if target is not None and not isinstance(target, str):
            raise RequestError("bad_request", "params.target must be DETECTOR[:SUBJECT] or "
                               "null (all)")
        if not isinstance(duration, (int, float)) or isinstance(duration, bool):
            raise RequestError("bad_request", "params.duration must be a number of seconds")
        if not isinstance(comment, str) or not isinstance(until_resolved, bool):
            raise RequestError("bad_request", "params.comment must be a string, "
                               "params.until_resolved a boolean")
        try:
            detector, subject = parse_target(target) if target is not None else (None, None)
            s = self.executor.silences.add(
                detector=detector, subject=subject, duration=float(duration),
                comment=comment, by=user, until_resolved=until_resolved, now=time.time())
        except ValueError as exc:
            raise RequestError("invalid", str(exc)) from None
        known = {d.name for d in self.config.detector}
        warning = None if detector is None or detector in known else (
            f"no detector named {detector!r} is configured; the silence covers nothing now")
        try:
            await self.mesh.publish("silence.added", s.event(uid=client.peer.uid),
                                    writes=[*nonce, self.executor.silences.write()])
        except Exception:
            # Not journaled, so not in force either (nor after a restart).
            self.executor.silences.remove(s.id)
            raise
        self.executor.silence_added()
        return {"silence": s.public(), "warning": warning}

    async def silence_list(self, client: Client, req: Request) -> Any:
        return {"silences": self.executor.silences.listed(), "now": time.time()}

    async def silence_remove(self, client: Client, req: Request) -> Any:
        user = self._controller(client, req, "removing a silence")
        sid = row_id(req.params.get("id"))
        nonce = [] if req.kid is None else await self._fresh_nonce(client, req,
                                                                   "removing a silence")
        s = self.executor.silences.remove(sid)
        if s is None:
            raise RequestError("not_found", f"no silence {sid} (gracectl silence ls)")
        await self.mesh.publish("silence.removed", s.event(removed_by=user,
                                                           uid=client.peer.uid),
                                writes=[*nonce, self.executor.silences.write()])
        await self.executor.silence_ended()
        return {"silence": s.public()}


MAX_ROW_ID = 2**63 - 1  # SQLite's largest integer


def row_id(value: Any, key: str = "id") -> int:
    """``params.KEY`` as an id SQLite can hold (a bigger one is the client's error)."""
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_ROW_ID:
        raise RequestError("bad_request", f"params.{key} must be an integer 0-{MAX_ROW_ID}")
    return value


UPLOAD_IDLE = 30.0  # s without a part after which another connection may take the upload


def _page_param(params: dict[str, Any], key: str, default: int, low: int, high: int) -> int:
    v = params.get(key, default)
    if not isinstance(v, int) or isinstance(v, bool) or not low <= v <= high:
        raise RequestError("bad_request", f"params.{key} must be an integer {low}-{high}")
    return v


def _as_dict(payload: Any) -> dict[str, Any]:
    return payload if isinstance(payload, dict) else {"value": payload}
