"""The composition root: builds every component and runs them in one nursery.

Start order: key, journal, mesh writer, wire server, heartbeat, then READY=1.
Stop (SIGTERM or SIGINT): STOPPING=1, a final ``daemon.stopping`` event, clients are
drained and closed with 1001 (going away), the journal is flushed and closed; all
within ``shutdown_timeout``.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import fcntl
import gc
import grp
import json
import logging
import math
import os
import shutil
import signal
import socket
import sqlite3
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from . import __version__, keys, sd_notify
from .api import ROLES, Api
from .auth import Authenticator
from .config import Config
from .detectors.runner import DetectorRunner
from .errors import DaemonExit, StartupError, StateError
from .executor import Budgets, Executor
from .integration import IntegrationMonitor, budget_left, free_bytes
from .journal import Journal, JournalReader, wal_limit
from .learning import Learning
from .learning import knowledge as kb
from .learning import settings as learning_settings
from .mesh import Mesh
from .missions import store
from .missions.engine import HANDED_OVER, MissionEngine
from .protocol import Signer
from .readers import SharedReader
from .reload import ConfigRejected, Reloader, lost_subject_reason, removed_reason
from .retention import Retention, checkpoint_payload
from .safefiles import check_dir_chain, check_private_dir, make_dirs, write_new
from .silences import Silences
from .wire import Budget, Server, certificate_names, tls_context, tls_digest

log = logging.getLogger("graced")
# A heartbeat lists at most this many escalated (expired) missions that need a person
# (more: none).
MAX_BEAT_ESCALATED = 1000


def _prepare_state_dir(path: Path) -> None:
    # The directories above it first: nothing is made inside one another user may swap.
    problem = check_dir_chain(path.parent)
    if problem:
        raise StateError(f"state dir {path}: {problem}: refusing it (every directory above "
                         "it must belong to this user or root and be writable by no one "
                         "else, sticky ones such as /tmp aside)")
    try:
        make_dirs(path, 0o700)
    except OSError as exc:
        raise StateError(f"cannot create state dir {path}: {exc.strerror}") from None
    problem = check_private_dir(path)
    if problem:
        raise StateError(f"state dir {path} {problem}: refusing it (it must belong to uid "
                         f"{os.geteuid()} and be writable by no one else)")
    if not os.access(path, os.W_OK | os.X_OK):
        raise StateError(f"state dir {path} is not writable by this user")


def _lock_state_dir(path: Path) -> int:
    """Hold an exclusive lock on the state dir for the daemon's lifetime."""
    try:
        fd = os.open(path / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                     0o600)
    except OSError as exc:
        raise StateError(f"cannot open {path / 'lock'}: {exc.strerror} (a symbolic link "
                         "there is refused)") from None
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


def _missing_key(state_dir: Path, allowed: bool) -> str | None:
    """The key id that signed the journal's last event when the key file is gone (None
    when the key is there, or the journal holds no event). Unless ``allowed`` (graced run
    --new-key), that is unusable state: a new key would sign on over a chain no one can
    verify any more, so graced refuses to start (StateError, exit 4)."""
    if os.path.lexists(state_dir / keys.KEY_FILE):
        return None
    db = state_dir / "journal.db"
    if not db.exists():
        return None
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
            row = conn.execute("SELECT seq, body FROM events ORDER BY seq DESC LIMIT 1"
                               ).fetchone()
    except sqlite3.Error:
        return None  # the journal's own checks report it
    if row is None:
        return None
    try:
        kid = str(json.loads(row[1]).get("kid") or "?")
    except (ValueError, AttributeError):
        kid = "?"
    if allowed:
        log.warning("the key file %s is missing; a new key is made (--new-key): the "
                    "journal up to seq %s stays signed by key %s", state_dir / keys.KEY_FILE,
                    row[0], kid)
        return kid
    raise StateError(
        f"key file {state_dir / keys.KEY_FILE} is missing, but the journal holds events up to "
        f"seq {row[0]} signed by key {kid}: restore the key from a backup, or run graced "
        "run --new-key to make a new one (journaled; the old events stay verifiable only "
        "with the old key)")


def _daemon_id(state_dir: Path) -> str:
    path = state_dir / "daemon-id"
    try:
        value = path.read_text().strip()
        if value:
            return value
    except FileNotFoundError:
        pass
    value = str(uuid.uuid4())
    write_new(path, (value + "\n").encode(), 0o644)
    return value


class Daemon:
    """graced itself. :meth:`run` returns after a clean shutdown."""

    def __init__(self, config: Config, config_path: Path | None = None, *,
                 new_key: bool = False) -> None:
        self.config = config
        # graced run --new-key: a missing key may be replaced over a journal signed by it.
        self.new_key = new_key
        # The file found once at start (None: the embedded default). Every reload reads
        # this file again, never another one: a file moved away is refused, not replaced.
        self.config_path = config_path
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
        self.fleet: Any = None  # graced.fleet.Forwarder with [fleet] url
        # Stored patterns quarantined at start (reported in status).
        self.quarantine: dict[str, Any] = {"rows": 0, "this_start": 0, "reasons": []}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        cfg = self.config
        state = cfg.state_dir
        _prepare_state_dir(state)
        self._lock_fd = _lock_state_dir(state)
        replaced = _missing_key(state, self.new_key)
        signer, created = keys.load_or_create(state)
        self.signer = signer
        self.daemon_id = _daemon_id(state)
        journal = await trio.to_thread.run_sync(
            lambda: Journal(state / "journal.db", synchronous=cfg.journal.synchronous,
                            wal_limit=wal_limit(cfg.journal.max_size))
        )
        mesh = Mesh(journal, signer, batch_max=cfg.journal.batch_max)
        self.mesh = mesh
        engine, states = await trio.to_thread.run_sync(self._load_missions, journal)
        self.engine = engine
        meta: dict[str, str] = {
            str(k): str(v) for k, v in await trio.to_thread.run_sync(
                journal.query, "SELECT key, value FROM meta")}
        knowledge = await trio.to_thread.run_sync(self._load_knowledge, journal)
        reads = self.reads = SharedReader(lambda: JournalReader(journal.path))
        learning = Learning(cfg.learning, knowledge, journal.path)
        # Open both read connections now (see graced/readers.py): steady descriptors.
        await reads.run(lambda reader: reader.query("SELECT COUNT(*) FROM meta", ()))
        await learning.read(lambda reader: reader.query("SELECT COUNT(*) FROM patterns"))
        self.learning = learning
        executor = Executor(config=cfg.remediation, playbooks=list(cfg.playbook),
                            notifiers=list(cfg.notifier), mesh=mesh, engine=engine,
                            paused=meta.get("paused") == "1",
                            budgets=Budgets.load(meta.get("budgets")), learning=learning,
                            silences=Silences.load(meta.get("silences")))
        self.executor = executor
        runner = DetectorRunner(list(cfg.detector), mesh, engine, states, executor.consider,
                                learning.outcome)
        self.runner = runner
        executor.interval_of = runner.interval_of
        runner.notify = executor.notify
        server = Server(
            mesh=mesh,
            signer=signer,
            journal_path=journal.path,
            socket_path=cfg.socket_path,
            socket_mode=int(cfg.daemon.socket_mode, 8),
            socket_gid=(grp.getgrnam(cfg.daemon.socket_group).gr_gid
                        if cfg.daemon.socket_group else None),
            listen=list(cfg.daemon.listen),
            allowed_origins=list(cfg.daemon.allowed_origins),
            tls=tls_context(cfg.daemon.tls_cert, cfg.daemon.tls_key),
            server_names=certificate_names(cfg.daemon.tls_cert),
            max_request_bytes=cfg.daemon.max_request_bytes,
            budget=Budget.from_config(cfg.daemon),
            client_queue=cfg.daemon.client_queue,
            client_queue_bytes=cfg.daemon.client_queue_bytes,
            send_timeout=cfg.daemon.send_timeout,
            handlers={},
            authenticator=Authenticator(self.daemon_id),  # keys: Api.set_config
            clock=time.time,
        )
        self.server = server
        api = Api(config=cfg, daemon_id=self.daemon_id, hostname=self.hostname,
                  started_at=self.started_at, started_mono=self.started_mono, signer=signer,
                  mesh=mesh, server=server, executor=executor, learning=learning,
                  runner=runner, reads=reads, quarantine=self.quarantine)
        reloader = Reloader(config=cfg, locate=lambda: self.config_path, mesh=mesh,
                            engine=engine, runner=runner, executor=executor, learning=learning)
        reloader.listeners += [lambda new: setattr(self, "config", new), api.set_config,
                               lambda new: setattr(server, "budget",
                                                   Budget.from_config(new.daemon))]
        api.reloader = reloader
        reloader.load_tls = lambda new: server.prepare_tls(new.daemon.tls_cert,
                                                           new.daemon.tls_key)
        reloader.tls_digest = tls_digest(cfg.daemon.tls_cert, cfg.daemon.tls_key)
        forwarder = None
        if cfg.fleet.url:
            from .fleet import make_forwarder

            forwarder = make_forwarder(cfg.fleet, daemon_id=self.daemon_id, mesh=mesh,
                                       journal_path=journal.path,
                                       acked=meta.get("fleet_acked"),
                                       acked_at=meta.get("fleet_acked_at"),
                                       answer=server.answer,
                                       screen=server.authenticator.screen,
                                       hostname=self.hostname, signer=signer,
                                       learning=learning, knowledge_lock=api.knowledge_lock)
            api.fleet = self.fleet = forwarder
        retention = Retention(
            mesh=mesh, reads=reads, max_size=cfg.journal.max_size,
            max_age=cfg.journal.max_age,
            checkpoint_interval=lambda: self.config.daemon.checkpoint_interval,
            request_window=lambda: self.config.remediation.request_window,
            pinned=server.oldest_replay)
        api.retention = retention
        reloader.listeners.append(
            lambda new: retention.configure(new.journal.max_size, new.journal.max_age))
        server.handlers = api.handlers()
        server.may_approve = executor.may_approve  # approvers may take reserved slots
        server.roles = dict(ROLES)
        try:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT,
                                           signal.SIGHUP) as signals:
                async with trio.open_nursery() as nursery:
                    await nursery.start(server.run)
                    await nursery.start(mesh.run)
                    kid_event = "crypto.key_created" if created else "crypto.key_loaded"
                    mesh.publish_nowait(kid_event, {
                        "kid": signer.kid,
                        "public_key": keys.format_public_key(signer.public_key).split()[1],
                        # A key made over a journal another key signed (--new-key): which.
                        **({"replaces": replaced, "reason": "the key was missing; a new one "
                            "was made at the operator's request (graced run --new-key)"}
                           if created and replaced else {})})
                    await mesh.publish("daemon.started", api.identity())
                    nursery.start_soon(self._load_imported, api, mesh, journal.path)
                    await nursery.start(executor.run)
                    await nursery.start(runner.run)
                    monitor = IntegrationMonitor(
                        read=self._health_figures, publish=mesh.publish_nowait,
                        interval=lambda: self.config.daemon.integration_interval)
                    await nursery.start(monitor.run)
                    api.integration = monitor.current
                    if forwarder is not None:
                        await nursery.start(forwarder.run)
                    nursery.start_soon(_trim_heap, 60.0, server.trim_due)
                    await nursery.start(retention.run)
                    hb_scope = trio.CancelScope()
                    nursery.start_soon(self._heartbeat, hb_scope)
                    interval = sd_notify.watchdog_interval()
                    if interval:
                        nursery.start_soon(self._watchdog, interval, api)
                    # Long-lived start-up objects need no more cyclic-GC scans.
                    gc.freeze()
                    sd_notify.notify(f"READY=1\nSTATUS=serving on {cfg.socket_path}")
                    self._banner()
                    task_status.started()
                    async for signum in signals:
                        if signum == signal.SIGHUP:
                            nursery.start_soon(_reload, reloader, "SIGHUP")
                            continue
                        log.info("received %s; stopping", signal.Signals(signum).name)
                        break
                    sd_notify.notify("STOPPING=1")
                    with trio.move_on_after(self.config.daemon.shutdown_timeout) as cs:
                        hb_scope.cancel()
                        runner.save_state()
                        await mesh.publish("daemon.stopping", {"head_seq": mesh.delivered_seq + 1,
                                                               "reason": "signal"})
                        server.going_away("graced is stopping")
                        await server.wait_all_closed()
                        if forwarder is not None:
                            await forwarder.drain()
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

    def _load_knowledge(self, journal: Journal) -> kb.Knowledge:
        """Load this host's own patterns (the imported ones: :meth:`_load_imported`, once
        graced serves); rows out of bounds are moved to ``patterns_quarantine``, logged
        and counted in ``status``, never used."""
        now = time.time()
        stored = journal.query("SELECT value FROM meta WHERE key = ?", (kb.SOURCES_KEY,))
        sources, notes = kb.load_sources(stored[0][0] if stored else None, now)
        knowledge = kb.Knowledge(_pattern_rows(journal.path, local=True),
                                 settings=learning_settings(self.config.learning),
                                 sources=sources, now=now)
        knowledge.loading = True
        bad = knowledge.quarantined
        writes = _quarantine_writes(bad, now)
        for note in notes:
            log.error("learning: stored knowledge source out of bounds: %s", note)
        if notes:
            writes.append(knowledge.sources_write(knowledge.sources))
        journal.append([], writes)
        (total,) = journal.query("SELECT COUNT(*) FROM patterns_quarantine")[0]
        self.quarantine = {"rows": int(str(total)), "this_start": len(bad) + len(notes),
                           "reasons": sorted({r for *_, r, _ in bad} | set(notes))[:5]}
        return knowledge

    async def _load_imported(self, api: Api, mesh: Mesh, path: Path) -> None:
        """Load the imported patterns once graced serves: 100,000 records take seconds
        to check, and status must answer within one. Parsed in a worker thread, added in
        steps on the event loop, under the knowledge lock (no import, reset or fleet
        import meanwhile); until then missions are ranked on local evidence alone."""
        assert self.learning is not None
        knowledge = self.learning.knowledge
        async with api.knowledge_lock:
            now = time.time()
            try:
                # Abandoned on stop (it reads on a connection of its own): a stop
                # during the load does not wait for it.
                parsed, bad = await trio.to_thread.run_sync(_parse_imported, path, now,
                                                            abandon_on_cancel=True)
            except (sqlite3.Error, MemoryError) as exc:  # never fatal: local ones serve
                log.error("learning: imported knowledge not loaded: %s", exc)
                knowledge.loading = False
                return
            for i in range(0, len(parsed), 5000):
                bad += knowledge.merge(parsed[i:i + 5000])
                await trio.lowlevel.checkpoint()
            knowledge.set_order(await self.learning.off_loop(knowledge.order))
            knowledge.version += 1
            knowledge.loading = False
            if bad:
                mesh.store(_quarantine_writes(bad, now))
                q = self.quarantine
                q["rows"] += len(bad)
                q["this_start"] += len(bad)
                q["reasons"] = sorted(set(q["reasons"]) | {r for *_, r, _ in bad})[:5]
        log.info("learning: %d imported records loaded", len(parsed))

    def _mend_missions(self, journal: Journal) -> None:
        """Mission rows whose data SQLite cannot parse (a bare NaN or Infinity, stored by
        0.1.0 or by an edit) would fail the queries below, and with them the start.
        Numbers are mended (a non-finite one becomes null, as from_row reads it); a row
        that is not JSON at all is moved to ``missions_quarantine`` and logged."""
        bad = journal.query("SELECT id, data FROM missions WHERE NOT json_valid(data)")
        writes: list[Any] = []
        for mid, data in bad:
            try:
                text = data if isinstance(data, (str, bytes)) else str(data)
                extra = json.loads(text, parse_constant=lambda _: None)
                if not isinstance(extra, dict):
                    raise ValueError("not an object")
            except (TypeError, ValueError, RecursionError) as exc:
                log.error("missions: quarantined stored mission %s: data is not JSON (%s)",
                          mid, str(exc)[:200])
                writes.append(("INSERT INTO missions_quarantine (id, reason, row, at) "
                               "VALUES (?, ?, ?, ?)", (mid, f"data: not JSON: {exc}"[:300],
                                                       repr(data)[:100_000], time.time())))
                writes.append(("DELETE FROM missions WHERE id = ?", (mid,)))
                continue
            log.warning("missions: stored mission %s held a number that is not finite: "
                        "kept as null", mid)
            writes.append(("UPDATE missions SET data = ? WHERE id = ?",
                           (store.dumps(extra), mid)))
        if writes:
            journal.append([], writes)

    def _load_missions(self, journal: Journal) -> tuple[MissionEngine, dict[str, Any]]:
        """Rebuild the engine from the missions table (the source of truth)."""
        self._mend_missions(journal)
        active = [store.from_row(r) for r in journal.query(*store.active_query())]
        (next_id,) = journal.query("SELECT COALESCE(MAX(id), 0) + 1 FROM missions")[0]
        resolved = journal.query(
            "SELECT detector, subject, MAX(closed_at) FROM missions "
            "WHERE state = 'resolved' AND json_array_length(data, '$.steps') = 0 "
            "AND data NOT LIKE '%\"to\": \"executing\"%' "
            # cleared before approval: no flap (engine.py)
            "AND data NOT LIKE '%\"reason\": \"cleared before approval%' "
            "GROUP BY detector, subject")
        # Keys whose last mission handed the symptom to a person (a rejection holds until
        # the symptom is seen normal, across restarts) — not those expired because their
        # detector left the config or stopped reporting the subject (reload.py's
        # reasons): that handed nothing over. Nor those of a detector no longer in the
        # config, or disabled (changed while graced was stopped): nothing would ever see
        # the symptom clear, and an escalated or expired hold keeps graced degraded.
        sampled = {d.name for d in self.config.detector if d.enabled}
        last = journal.query(  # SQLite: the bare columns come from the MAX(id) row
            "SELECT detector, subject, state, MAX(id) FROM missions GROUP BY detector, subject")
        held: dict[tuple[str, str], tuple[str, int]] = {}
        for d, s, state, mid in last:
            if state not in HANDED_OVER or str(d) not in sampled:
                continue
            # Read in Python: a row 0.1.0 wrote (a bare NaN) is not JSON to SQLite.
            (data,) = journal.query("SELECT data FROM missions WHERE id = ?", (mid,))[0]
            try:
                reason = json.loads(str(data), parse_constant=lambda _: None).get("reason")
            except (ValueError, AttributeError):
                reason = None
            if reason not in (removed_reason(str(d)), lost_subject_reason(str(d), str(s))):
                held[(str(d), str(s))] = (str(state), int(str(mid)))
        states: dict[str, Any] = {}
        for name, data in journal.query("SELECT name, data FROM detector_state"):
            try:
                states[str(name)] = json.loads(str(data), parse_constant=lambda _: None)
            except ValueError:
                continue  # a damaged state: that detector starts learning again
        mc = self.config.missions
        engine = MissionEngine(
            resolve_after=mc.resolve_after, flap_window=mc.flap_window,
            update_interval=mc.update_interval, next_id=int(str(next_id)), active=active,
            last_resolved={(str(d), str(s)): float(str(t)) for d, s, t in resolved},
            held=held)
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
        serving = f"serving on {sock} (state {cfg.state_dir}, key {self.signer.kid})"
        if sd_notify.stderr_is_journal():
            log.info("graced %s %s", __version__, serving)
            return
        print(
            f"graced {__version__}: {serving}\n"
            f"graced: watch it from another shell with: {ctl} tail   "
            f"(or: {ctl} status)",
            file=sys.stderr,
            flush=True,
        )

    async def _heartbeat(self, scope: trio.CancelScope) -> None:
        """Heartbeats every heartbeat_interval; a signed checkpoint (the head's seq and
        hash, for keeping off the host) now and every checkpoint_interval."""
        assert self.mesh is not None
        mesh = self.mesh
        last_beat = last_checkpoint = -math.inf
        with scope:
            while True:
                # A reload may change either interval.
                interval = self.config.daemon.heartbeat_interval
                every = self.config.daemon.checkpoint_interval
                now = trio.current_time()
                if last_beat == -math.inf:
                    last_beat = now
                if now >= last_checkpoint + every:
                    mesh.publish_nowait("daemon.checkpoint", checkpoint_payload(mesh, every))
                    last_checkpoint = now
                if now >= last_beat + interval:
                    beat: dict[str, Any] = {
                        "interval": interval,
                        "uptime": round(time.monotonic() - self.started_mono, 3),
                    }
                    if self.fleet is not None:  # for fleet ls: lag, host, open missions
                        beat["fleet_lag"] = self.fleet.status()["lag_events"]
                        beat["host"] = self.hostname
                        if self.engine is not None:
                            beat["open_missions"] = len(self.engine.active)
                            # The escalated and expired missions that still need a
                            # person (status's lists), bounded: the fleet view drops the
                            # others.
                            for name, ids in (("escalated", self.engine.needs_person()),
                                              ("expired", self.engine.expired_unanswered())):
                                if len(ids) <= MAX_BEAT_ESCALATED:
                                    beat[name] = ids
                    mesh.publish_nowait("daemon.heartbeat", beat)
                    last_beat = now
                await trio.sleep_until(min(last_beat + interval, last_checkpoint + every))

    def _health_figures(self) -> dict[str, Any]:
        """What :func:`graced.integration.snapshot` reads, from each component."""
        assert self.runner and self.executor and self.mesh and self.server
        mesh, ex = self.mesh, self.executor
        ex_status = ex.status()
        return {
            "detectors": self.runner.status,
            "notifiers": {nt.name: ex.notifier_stats.get(nt.name, {}) for nt in ex.notifiers},
            "journal": {"failing_since": mesh.failing_since, "last_error": mesh.last_error,
                        "commit_latency_ms": mesh.commit_seconds_last * 1000,
                        "size_bytes": mesh.journal.size_bytes(),
                        "free_bytes": free_bytes(self.config.state_dir)},
            "executor": {"paused": ex.paused, "mode": ex.config.mode,
                         "running_steps": len(ex.running), "budget_left": budget_left(ex_status)},
            "wire": self.server.status(),
            "fleet": self.fleet.status() if self.fleet is not None else None,
        }

    async def _watchdog(self, interval: float, api: Api) -> None:
        """WATCHDOG=1 only while the daemon works, not merely while a timer fires: sent
        from the event loop (a stalled loop sends none), only when every detector has
        sampled recently (:meth:`DetectorRunner.stalled`) and a request to the API
        answers. systemd restarts a graced that stops sending it for WatchdogSec."""
        assert self.runner is not None
        runner = self.runner
        warned = False
        while True:
            stalled = runner.stalled(trio.current_time())
            answers = False
            with trio.move_on_after(interval):
                answers = await api.answers()
            if not stalled and answers:
                sd_notify.notify("WATCHDOG=1")
                warned = False
            elif not warned:
                why = (f"detectors not sampling: {', '.join(stalled[:5])}" if stalled
                       else "status does not answer")
                log.error("watchdog: not petting systemd (%s)", why)
                sd_notify.notify(f"STATUS=unhealthy: {why}")
                warned = True
            await trio.sleep(interval)

async def _reload(reloader: Reloader, by: str) -> None:
    """A reload nobody waits for (SIGHUP): a rejected config is logged and published."""
    try:
        await reloader.reload(by)
    except ConfigRejected:
        pass  # logged and published
    except Exception:  # noqa: BLE001 - SIGHUP never stops graced
        log.exception("reload (%s) failed while applying the config", by)


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


async def _trim_heap(interval: float = 60.0,
                     due: Callable[[], Awaitable[None]] | None = None) -> None:
    """Hand freed heap back to the OS now and then (glibc keeps it otherwise), and soon
    (within 2 s) after ``due()`` returns: a replay from the journal ended.

    Under steady load the big transient strings (coalesced frames, replay chunks) leave
    free but unreturned memory behind, which shows as RSS creeping up over hours; 40
    replays once left 400 MB behind.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return  # not glibc
    while True:
        with trio.move_on_after(interval):
            if due is not None:
                await due()
                await trio.sleep(2)  # others ending at about the same time
            else:
                await trio.sleep_forever()
        await trio.to_thread.run_sync(trim, 0)


def _pattern_rows(path: Path, *, local: bool) -> list[tuple[Any, ...]]:
    """This host's own stored patterns (``local``) or the imported ones, each row ending
    with its rowid, by which a bad one is moved aside. Read on a connection of its own
    that decodes any bytes: a row whose text is not UTF-8 is quarantined like any other
    bad row, never fatal."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        conn.text_factory = lambda b: b.decode("utf-8", "surrogateescape")
        rows = conn.execute(kb.SELECT.replace("SELECT ", "SELECT rowid, ", 1)
                            + f" WHERE source {'=' if local else '!='} ?",
                            (kb.LOCAL,)).fetchall()
    finally:
        conn.close()
    return [(*r[1:], r[0]) for r in rows]


def _parse_imported(path: Path, now: float) -> tuple[list[Any], list[Any]]:
    """The imported rows, parsed in steps: between two, the event loop's thread gets the
    GIL at once (status stays quick while 100,000 rows are checked)."""
    rows = _pattern_rows(path, local=False)
    parsed: list[Any] = []
    bad: list[Any] = []
    for i in range(0, len(rows), 1000):
        more, wrong = kb.Knowledge.parse_rows(rows[i:i + 1000], now)
        parsed += more
        bad += wrong
        time.sleep(0)  # releases the GIL: a thread waiting for it runs now
    return parsed, bad


def _quarantine_writes(bad: list[tuple[Any, Any, Any, str, tuple[Any, ...]]],
                       now: float) -> list[Any]:
    """Move bad stored patterns to ``patterns_quarantine`` (and log them)."""
    writes: list[Any] = []
    for sig, pb, source, reason, row in bad:
        # The row as text (repr, bounded): a BLOB or a deeply nested value is kept for a
        # person to look at, never parsed again.
        kept = json.dumps([repr(v)[:4000] for v in row[3:12]])
        writes.append((
            "INSERT INTO patterns_quarantine (signature, playbook, source, reason, "
            "row, at) VALUES (?, ?, ?, ?, ?, ?)",
            (_text(sig), _text(pb), _text(source), reason, kept, now)))
        writes.append(("DELETE FROM patterns WHERE rowid = ?", (row[-1],)))
    for sig, pb, source, reason, _ in bad[:20]:
        log.error("learning: quarantined stored pattern %.80r / %.80r from %.40r: %s",
                  sig, pb, source, reason)
    if len(bad) > 20:
        log.error("learning: quarantined %d more stored patterns", len(bad) - 20)
    return writes


def _text(v: Any) -> str:
    """A stored key as text (a BLOB or a number in a TEXT column, as its repr)."""
    text = v if isinstance(v, str) else repr(v)
    return text[:4000].encode("utf-8", "backslashreplace").decode("utf-8")
