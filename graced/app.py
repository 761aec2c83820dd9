"""The composition root: builds every component and runs them in one nursery.

Start order: key, journal, mesh writer, wire server, heartbeat, then READY=1.
Stop (SIGTERM or SIGINT): STOPPING=1, a final ``daemon.stopping`` event, clients are
drained and closed with 1001 (going away), the journal is flushed and closed; all
within ``shutdown_timeout``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import gc
import json
import logging
import os
import pwd
import shutil
import signal
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import trio

from . import __version__, keys, sd_notify
from .config import Config
from .detectors.runner import DetectorRunner
from .errors import DaemonExit, StartupError, StateError
from .executor import Budgets, Executor
from .journal import Journal, JournalReader
from .learning import Learning
from .learning import knowledge as kb
from .mesh import Mesh
from .missions import store
from .missions.engine import ACTIVE, SEVERITIES, STATES, MissionEngine
from .protocol import Signer, check_signature, key_id
from .protocol.wire import Request, RequestError, request_signing_bytes
from .readers import SharedReader
from .wire import Client, Server

log = logging.getLogger("graced")

MAX_EMIT = 10_000_000


def _prepare_state_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise StateError(f"cannot create state dir {path}: {exc.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise StateError(f"state dir {path} is not writable by this user")


def _lock_state_dir(path: Path) -> int:
    """Hold an exclusive lock on the state dir for the daemon's lifetime."""
    fd = os.open(path / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        other = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise StartupError(
            f"another graced (pid {other}) is using the state dir {path}", DaemonExit.SOCKET
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _daemon_id(state_dir: Path) -> str:
    path = state_dir / "daemon-id"
    try:
        value = path.read_text().strip()
        if value:
            return value
    except FileNotFoundError:
        pass
    value = str(uuid.uuid4())
    tmp = path.with_suffix(".tmp")
    tmp.write_text(value + "\n")
    os.rename(tmp, path)
    return value


class Daemon:
    """graced itself. :meth:`run` returns after a clean shutdown."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.started_at = time.time()
        self.started_mono = time.monotonic()
        self.hostname = socket.gethostname()
        self.signer: Signer | None = None
        self.mesh: Mesh | None = None
        self.server: Server | None = None
        self.daemon_id = ""
        self.engine: MissionEngine | None = None
        self.runner: DetectorRunner | None = None
        self.executor: Executor | None = None
        self.learning: Learning | None = None
        self.reads: SharedReader[JournalReader] | None = None  # the handlers' reads
        self.used_nonces: set[str] = set()
        self.authorized_keys: list[bytes] = []
        for line in config.remediation.authorized_keys:
            try:
                self.authorized_keys.append(keys.parse_public_key(line))
            except ValueError:
                log.warning("ignoring an authorized key that cannot be parsed: %r", line[:60])

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        cfg = self.config
        state = cfg.state_dir
        _prepare_state_dir(state)
        self._lock_fd = _lock_state_dir(state)
        signer, created = keys.load_or_create(state)
        self.signer = signer
        self.daemon_id = _daemon_id(state)
        journal = await trio.to_thread.run_sync(
            lambda: Journal(state / "journal.db", synchronous=cfg.journal.synchronous)
        )
        mesh = Mesh(journal, signer, batch_max=cfg.journal.batch_max)
        self.mesh = mesh
        engine, states = await trio.to_thread.run_sync(self._load_missions, journal)
        self.engine = engine
        meta: dict[str, str] = {
            str(k): str(v) for k, v in await trio.to_thread.run_sync(
                journal.query, "SELECT key, value FROM meta")}
        patterns = await trio.to_thread.run_sync(
            journal.query, "SELECT signature, playbook, source, detector, subject, successes, "
            "failures, ttr_total, ttr_count, first_seen, last_seen FROM patterns")
        reads = self.reads = SharedReader(lambda: JournalReader(journal.path))
        learning = Learning(cfg.learning, kb.Knowledge(patterns), journal.path)
        # Open both read connections now (see graced/readers.py): steady descriptors.
        await self._read("SELECT COUNT(*) FROM meta", ())
        await learning.read(lambda reader: reader.query("SELECT COUNT(*) FROM patterns"))
        self.learning = learning
        executor = Executor(config=cfg.remediation, playbooks=list(cfg.playbook),
                            notifiers=list(cfg.notifier), mesh=mesh, engine=engine,
                            paused=meta.get("paused") == "1",
                            budgets=Budgets.load(meta.get("budgets")), learning=learning)
        self.executor = executor
        runner = DetectorRunner(list(cfg.detector), mesh, engine, states, executor.consider,
                                learning.outcome)
        self.runner = runner
        server = Server(
            mesh=mesh,
            signer=signer,
            journal_path=journal.path,
            socket_path=cfg.socket_path,
            socket_mode=int(cfg.daemon.socket_mode, 8),
            listen=list(cfg.daemon.listen),
            allowed_origins=list(cfg.daemon.allowed_origins),
            max_request_bytes=cfg.daemon.max_request_bytes,
            max_clients=cfg.daemon.max_clients,
            client_queue=cfg.daemon.client_queue,
            send_timeout=cfg.daemon.send_timeout,
            handlers={
                "hello": self._hello,
                "status": self._status,
                "subscribe": self._subscribe,
                "emit": self._emit,
                "keys": self._keys,
                "missions.list": self._missions_list,
                "missions.get": self._missions_get,
                "detectors": self._detectors,
                "missions.approve": self._approve,
                "missions.reject": self._reject,
                "missions.similar": self._missions_similar,
                "knowledge.list": self._knowledge_list,
                "knowledge.show": self._knowledge_show,
                "knowledge.export": self._knowledge_export,
                "knowledge.import": self._knowledge_import,
                "knowledge.stats": self._knowledge_stats,
                "pause": self._pause,
                "resume": self._resume,
            },
            clock=time.time,
        )
        self.server = server
        try:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async with trio.open_nursery() as nursery:
                    await nursery.start(server.run)
                    await nursery.start(mesh.run)
                    kid_event = "crypto.key_created" if created else "crypto.key_loaded"
                    mesh.publish_nowait(kid_event, {"kid": signer.kid,
                                                    "public_key": keys.format_public_key(
                                                        signer.public_key).split()[1]})
                    await mesh.publish("daemon.started", self._identity())
                    await nursery.start(executor.run)
                    await nursery.start(runner.run)
                    nursery.start_soon(_trim_heap)
                    hb_scope = trio.CancelScope()
                    nursery.start_soon(self._heartbeat, hb_scope)
                    interval = sd_notify.watchdog_interval()
                    if interval:
                        nursery.start_soon(self._watchdog, interval)
                    # Long-lived start-up objects need no more cyclic-GC scans.
                    gc.freeze()
                    sd_notify.notify(f"READY=1\nSTATUS=serving on {cfg.socket_path}")
                    self._banner()
                    task_status.started()
                    async for signum in signals:
                        log.info("received %s; stopping", signal.Signals(signum).name)
                        break
                    sd_notify.notify("STOPPING=1")
                    with trio.move_on_after(cfg.daemon.shutdown_timeout) as cs:
                        hb_scope.cancel()
                        runner.save_state()
                        await mesh.publish("daemon.stopping", {"head_seq": mesh.delivered_seq + 1,
                                                               "reason": "signal"})
                        server.going_away("graced is stopping")
                        await server.wait_all_closed()
                    if cs.cancelled_caught:
                        log.warning("shutdown deadline reached; closing remaining clients")
                    nursery.cancel_scope.cancel()
        finally:
            mesh.close()
            learning.close()
            reads.close()
            await trio.to_thread.run_sync(journal.close)
            os.close(self._lock_fd)
        log.info("stopped cleanly at seq %d", mesh.delivered_seq)

    def _load_missions(self, journal: Journal) -> tuple[MissionEngine, dict[str, Any]]:
        """Rebuild the engine from the missions table (the source of truth)."""
        active = [store.from_row(r) for r in journal.query(*store.active_query())]
        (next_id,) = journal.query("SELECT COALESCE(MAX(id), 0) + 1 FROM missions")[0]
        resolved = journal.query(
            "SELECT detector, subject, MAX(closed_at) FROM missions "
            "WHERE state = 'resolved' GROUP BY detector, subject")
        states: dict[str, Any] = {}
        for name, data in journal.query("SELECT name, data FROM detector_state"):
            try:
                states[str(name)] = json.loads(str(data))
            except ValueError:
                continue  # a damaged state: that detector starts learning again
        mc = self.config.missions
        engine = MissionEngine(
            resolve_after=mc.resolve_after, flap_window=mc.flap_window,
            update_interval=mc.update_interval, next_id=int(str(next_id)), active=active,
            last_resolved={(str(d), str(s)): float(str(t)) for d, s, t in resolved})
        return engine, states

    def _banner(self) -> None:
        cfg = self.config
        from .paths import client_socket

        sock = cfg.socket_path
        ctl = shutil.which("gracectl") and "gracectl"
        if not ctl:
            beside = Path(sys.executable).parent / "gracectl"
            ctl = str(beside) if beside.exists() else "gracectl"
        if client_socket() != sock:
            ctl += f" --socket {sock}"
        assert self.signer is not None
        print(
            f"graced {__version__}: serving on {sock} (state {cfg.state_dir}, "
            f"key {self.signer.kid})\n"
            f"graced: watch it from another shell with: {ctl} tail   "
            f"(or: {ctl} status)",
            file=sys.stderr,
            flush=True,
        )

    async def _heartbeat(self, scope: trio.CancelScope) -> None:
        assert self.mesh is not None
        interval = self.config.daemon.heartbeat_interval
        with scope:
            while True:
                await trio.sleep(interval)
                self.mesh.publish_nowait("daemon.heartbeat", {
                    "interval": interval,
                    "uptime": round(time.monotonic() - self.started_mono, 3),
                })

    async def _watchdog(self, interval: float) -> None:
        while True:
            sd_notify.notify("WATCHDOG=1")
            await trio.sleep(interval)

    # -- request handlers --------------------------------------------------------

    def _identity(self) -> dict[str, Any]:
        assert self.signer is not None
        return {
            "daemon_id": self.daemon_id,
            "version": __version__,
            "host": self.hostname,
            "pid": os.getpid(),
            "kid": self.signer.kid,
        }

    async def _hello(self, client: Client, req: Request) -> Any:
        assert self.mesh is not None and self.signer is not None
        return {
            **self._identity(),
            "public_key": keys.format_public_key(self.signer.public_key).split()[1],
            "head_seq": self.mesh.delivered_seq,
            "heartbeat_interval": self.config.daemon.heartbeat_interval,
            "peer": {"transport": client.peer.transport, "uid": client.peer.uid},
            "can_control": client.can_control(),
        }

    async def _keys(self, client: Client, req: Request) -> Any:
        assert self.signer is not None
        return {
            "kid": self.signer.kid,
            "public_key": keys.format_public_key(self.signer.public_key).split()[1],
            "algorithm": "ed25519",
        }

    async def _status(self, client: Client, req: Request) -> Any:
        assert self.mesh is not None and self.server is not None
        mesh = self.mesh
        return {
            **self._identity(),
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
                "last_error": mesh.last_error,
                "failing_since": mesh.failing_since,
                "pending": len(mesh._pending),
            },
            "wire": self.server.status(),
            "executor": self.executor.status() if self.executor else None,
            "learning": await self._learning_summary(),
        }

    async def _learning_summary(self) -> dict[str, Any] | None:
        if self.learning is None:
            return None
        st = await self.learning.stats(time.time(), weeks=1, days=1)
        return {k: st[k] for k in ("strategy", "patterns", "outcomes", "playbook_runs",
                                   "success_rate", "success_rate_7d", "consulted_share")}

    async def _read(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        """Run a read query on the handlers' connection, in a worker thread."""
        assert self.reads is not None
        return await self.reads.run(lambda reader: reader.query(sql, params))

    async def _missions_list(self, client: Client, req: Request) -> Any:
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
        if not p.get("all") and not states:
            states = list(ACTIVE)
        rows = await self._read(*store.list_query(states, severities, limit))
        return {"missions": [store.from_row(r).public() for r in rows], "now": time.time()}

    async def _missions_get(self, client: Client, req: Request) -> Any:
        return {"mission": (await self._mission(req)).public(), "now": time.time()}

    async def _mission(self, req: Request) -> Any:
        mid = req.params.get("id")
        if not isinstance(mid, int) or isinstance(mid, bool):
            raise RequestError("bad_request", "params.id must be an integer")
        rows = await self._read(f"{store.SELECT} WHERE id = ?", (mid,))
        if not rows:
            raise RequestError("not_found", f"no mission {mid}")
        return store.from_row(rows[0])

    async def _missions_similar(self, client: Client, req: Request) -> Any:
        assert self.learning is not None
        limit = req.params.get("limit", self.config.learning.similar_limit)
        if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= 1000:
            raise RequestError("bad_request", "params.limit must be an integer 1-1000")
        m = await self._mission(req)
        started = time.perf_counter()
        similar = await self.learning.similar(m, limit)
        return {"mission": m.brief(), "similar": similar,
                "lookup_ms": round((time.perf_counter() - started) * 1000, 3),
                "recorded": m.similar if m.decision is not None else None}

    async def _knowledge_list(self, client: Client, req: Request) -> Any:
        assert self.learning is not None
        return {"patterns": self.learning.patterns(), "now": time.time()}

    async def _knowledge_show(self, client: Client, req: Request) -> Any:
        assert self.learning is not None
        sig = req.params.get("pattern")
        if not isinstance(sig, str):
            raise RequestError("bad_request", "params.pattern must be a string")
        known = self.learning.knowledge.patterns
        if sig not in known:
            near = [p for p in known if sig in p][:5]
            raise RequestError("not_found", f"no pattern {sig!r}" + (
                f" (did you mean: {', '.join(near)})" if near else ""))
        cfg = self.config.learning
        recent = await self._read(
            "SELECT mission_id, playbook, outcome, success, ttr, closed_at FROM outcomes "
            "WHERE signature = ? ORDER BY mission_id DESC LIMIT 20", (sig,))
        return {"pattern": self.learning.knowledge.summary(sig, cfg.demote_after,
                                                           cfg.demote_below),
                "recent": [dict(zip(("id", "playbook", "outcome", "success", "ttr",
                                     "closed_at"), r, strict=True)) for r in recent],
                "now": time.time()}

    async def _knowledge_export(self, client: Client, req: Request) -> Any:
        assert self.learning is not None
        return self.learning.knowledge.export(self.daemon_id, self.hostname, time.time())

    async def _knowledge_import(self, client: Client, req: Request) -> Any:
        assert self.learning is not None and self.executor is not None
        assert self.mesh is not None
        peer = client.peer
        if peer.transport != "unix" or not self.executor.may_approve(peer.uid, peer.gid,
                                                                     peer.pid):
            raise RequestError("not_authorised", "knowledge import needs an approver over the "
                               "Unix socket")
        p = req.params
        source, host, replace = p.get("source"), p.get("host", ""), p.get("replace", True)
        if not isinstance(source, str) or not source or len(source) > 200:
            raise RequestError("bad_request", "params.source must be a non-empty string")
        if source in (self.daemon_id, kb.LOCAL):
            raise RequestError("invalid", "this knowledge was exported by this daemon; "
                               "importing it would count its outcomes twice")
        if not isinstance(host, str) or not isinstance(replace, bool):
            raise RequestError("bad_request", "params.host must be a string, params.replace "
                               "a boolean")
        try:
            patterns = kb.check(p.get("patterns"))
        except ValueError as exc:
            raise RequestError("bad_request", f"params.{exc}") from None
        writes = self.learning.knowledge.import_(source, patterns, replace)
        await self.mesh.publish("learning.imported", {
            "source": source, "host": host, "patterns": len(patterns), "replace": replace,
            "by_uid": peer.uid}, writes=writes)
        return {"imported": len(patterns), "source": source,
                "patterns": len(self.learning.knowledge.patterns)}

    async def _knowledge_stats(self, client: Client, req: Request) -> Any:
        assert self.learning is not None
        return await self.learning.stats(time.time())

    async def _decide(self, client: Client, req: Request, approve: bool) -> Any:
        assert self.executor is not None and self.mesh is not None
        mid = req.params.get("id")
        comment = req.params.get("comment", "")
        if not isinstance(mid, int) or isinstance(mid, bool):
            raise RequestError("bad_request", "params.id must be an integer")
        if not isinstance(comment, str) or len(comment) > 2000:
            raise RequestError("bad_request", "params.comment must be a string (<= 2000)")
        peer = client.peer
        verb = "approve" if approve else "reject"
        who: dict[str, Any]
        if peer.transport == "unix" and req.auth is None:
            if not self.executor.may_approve(peer.uid, peer.gid, peer.pid):
                await self._refuse(mid, verb, peer.describe(), (
                    f"uid {peer.uid} may not {verb} missions (allowed: root, uid "
                    f"{os.geteuid()}, [remediation] approvers and approver_groups)"))
            try:
                user = pwd.getpwuid(peer.uid).pw_name if peer.uid is not None else "?"
            except KeyError:
                user = str(peer.uid)
            who = {"user": user, "uid": peer.uid, "auth": "unix peer credentials"}
        else:
            kid = await self._check_signed(req, verb, peer.describe())
            who = {"user": f"key {kid}", "key": kid, "auth": f"signed request (ed25519 {kid})"}
        try:
            m = await self.executor.decide(mid, approve, who, comment)
        except LookupError as exc:
            raise RequestError("not_found", str(exc)) from None
        except ValueError as exc:
            raise RequestError("invalid", str(exc)) from None
        return {"mission": m.public()}

    async def _refuse(self, mid: Any, verb: str, peer: str, reason: str) -> None:
        assert self.mesh is not None
        await self.mesh.publish("mission.approval_refused", {
            "mission": mid, "decision": verb, "peer": peer, "reason": reason})
        raise RequestError("not_authorised", reason)

    async def _check_signed(self, req: Request, verb: str, peer: str) -> str:
        """Authenticate a signed request: known key, fresh timestamp, unused nonce."""
        assert self.mesh is not None
        mid = req.params.get("id")
        auth = req.auth
        if auth is None:
            await self._refuse(mid, verb, peer, f"{verb} over TCP must be signed by a key in "
                               "[remediation] authorized_keys (gracectl keys generate)")
        assert auth is not None
        keys_by_kid = {key_id(k): k for k in self.authorized_keys}
        public = keys_by_kid.get(auth["kid"])
        if public is None:
            await self._refuse(mid, verb, peer, f"key {auth['kid']} is not in "
                               "[remediation] authorized_keys")
        assert public is not None
        data = request_signing_bytes(req.id, req.nonce, req.method, req.params, auth["ts"],
                                     auth["kid"])
        if not check_signature({"sig": auth["sig"]}, public, data=data):
            await self._refuse(mid, verb, peer, "bad signature on the request")
        window = self.config.remediation.request_window
        skew = time.time() - float(auth["ts"])
        if abs(skew) > window:
            await self._refuse(mid, verb, peer, f"stale request: its timestamp is {skew:.0f} s "
                               f"off (window {window:g} s)")
        nonce_key = f"{auth['kid']}:{req.nonce}"
        if nonce_key in self.used_nonces or await self._read(
                "SELECT 1 FROM used_nonces WHERE nonce = ?", (nonce_key,)):
            await self._refuse(mid, verb, peer, "replayed request: its nonce was used before")
        self.used_nonces.add(nonce_key)
        # Durable before the decision is acted on: a replay after a restart is refused too.
        await self.mesh.publish("mission.request_authenticated", {
            "mission": mid, "decision": verb, "kid": auth["kid"], "peer": peer},
            writes=[("INSERT OR IGNORE INTO used_nonces (nonce, kid, ts) VALUES (?, ?, ?)",
                     (nonce_key, auth["kid"], float(auth["ts"])))])
        return str(auth["kid"])

    async def _approve(self, client: Client, req: Request) -> Any:
        return await self._decide(client, req, True)

    async def _reject(self, client: Client, req: Request) -> Any:
        return await self._decide(client, req, False)

    async def _set_paused(self, client: Client, paused: bool) -> Any:
        assert self.executor is not None and self.mesh is not None
        if not self.executor.may_approve(client.peer.uid, client.peer.gid, client.peer.pid) \
                or client.peer.transport != "unix":
            raise RequestError("not_authorised", "pause/resume needs an approver over the "
                               "Unix socket")
        changed = self.executor.paused != paused
        self.executor.paused = paused
        await self.mesh.publish(
            "executor.paused" if paused else "executor.resumed",
            {"by_uid": client.peer.uid, "changed": changed},
            writes=[("INSERT OR REPLACE INTO meta (key, value) VALUES ('paused', ?)",
                     ("1" if paused else "0",))])
        if not paused and changed:
            await self.executor.resume()
        return {"paused": paused, "changed": changed}

    async def _pause(self, client: Client, req: Request) -> Any:
        return await self._set_paused(client, True)

    async def _resume(self, client: Client, req: Request) -> Any:
        return await self._set_paused(client, False)

    async def _detectors(self, client: Client, req: Request) -> Any:
        assert self.runner is not None
        history = req.params.get("history", 0)
        if not isinstance(history, int) or isinstance(history, bool) or history < 0:
            raise RequestError("bad_request", "params.history must be a non-negative integer")
        out = {}
        for name, st in self.runner.status.items():
            entry = dict(st)
            if history:
                entry["history"] = {
                    subj: [v for _, v in list(self.runner.history.get((name, subj), []))[
                        -history:]] for subj in st["subjects"]}
            out[name] = entry
        return {"detectors": out, "now": time.time()}

    async def _subscribe(self, client: Client, req: Request) -> Any:
        assert self.server is not None
        return await self.server.subscribe(client, req)

    async def _emit(self, client: Client, req: Request) -> Any:
        """Publish ``user.*`` events: annotations, and load for tests and benchmarks."""
        assert self.mesh is not None and self.server is not None
        if not client.can_control():
            raise RequestError(
                "not_authorised", f"emit needs root or uid {os.geteuid()} over the Unix socket"
            )
        p = req.params
        topic = p.get("topic")
        if not isinstance(topic, str) or not topic.startswith("user.") or len(topic) > 200:
            raise RequestError("bad_request", "params.topic must be a string starting 'user.'")
        payload = p.get("payload", {})
        count = p.get("count", 1)
        rate = p.get("rate")
        if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= MAX_EMIT:
            raise RequestError("bad_request", f"params.count must be an integer 1-{MAX_EMIT}")
        if rate is not None and (not isinstance(rate, (int, float)) or isinstance(rate, bool)
                                 or not 0 < rate <= 1e6):
            raise RequestError("bad_request", "params.rate must be a number of events/s or null")
        if count == 1:
            try:
                ev = await self.mesh.publish(topic, payload)
            except (ValueError, TypeError) as exc:
                raise RequestError("bad_request", f"payload is not JSON-safe: {exc}") from None
            assert ev is not None
            return {"first_seq": ev.seq, "last_seq": ev.seq, "count": 1}
        try:
            from .protocol import canonical_bytes

            canonical_bytes(payload)
        except (ValueError, TypeError) as exc:
            raise RequestError("bad_request", f"payload is not JSON-safe: {exc}") from None
        if p.get("wait", True) is False:
            self.server.spawn(self._emit_many, topic, payload, count, rate)
            return {"queued": count, "rate": rate}
        last = await self._emit_many(topic, payload, count, rate)
        return {"count": count, "last_seq": last}

    async def _emit_many(self, topic: str, payload: Any, count: int, rate: float | None) -> int:
        """Publish ``count`` events (paced at ``rate``/s if given); returns the last seq."""
        assert self.mesh is not None
        mesh = self.mesh
        body = _as_dict(payload)
        start = trio.current_time()
        for i in range(count - 1):
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


def _as_dict(payload: Any) -> dict[str, Any]:
    return payload if isinstance(payload, dict) else {"value": payload}


M_ARENA_MAX = -8  # glibc <malloc.h>


def limit_malloc_arenas(arenas: int = 2) -> None:
    """Cap glibc's malloc arenas (as ``MALLOC_ARENA_MAX`` would) before any thread starts.

    Every worker thread that signs and commits a group otherwise gets an arena of its
    own, and strings freed on the event loop's thread leave holes in those arenas:
    RSS creeps up under steady load. Done here, not only in the systemd unit, so
    graced behaves the same however it is started. No-op off glibc, and when
    ``MALLOC_ARENA_MAX`` is set (the operator's choice wins).
    """
    if "MALLOC_ARENA_MAX" in os.environ:
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(M_ARENA_MAX, arenas)
    except (OSError, AttributeError):
        pass


async def _trim_heap(interval: float = 60.0) -> None:
    """Hand freed heap back to the OS now and then (glibc keeps it otherwise).

    Under steady load the big transient strings (coalesced frames, replay chunks) leave
    free but unreturned memory behind, which shows as RSS creeping up over hours.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return  # not glibc
    while True:
        await trio.sleep(interval)
        await trio.to_thread.run_sync(trim, 0)
