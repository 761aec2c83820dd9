"""Forward every signed event to NATS JetStream; serve requests that come by NATS.

Theory of operation: the journal is the source of truth, so the forwarder reads it,
never the mesh's fan-out (a mesh subscriber that falls behind would be dropped). A mesh
subscription only wakes the forwarder when the head moves. On its own asyncio thread
(:mod:`graced.fleet.bridge`) it reads events ``acked+1 ..`` from the journal on a read
connection of its own, publishes up to ``in_flight`` at a time to
``grace.<daemon-id>.<topic>`` with ``Nats-Msg-Id: <kid>:<seq>:<sha256 of the body>``, and
advances ``acked`` over the contiguous prefix JetStream acknowledged. Any failure (a
timeout, a lost connection, NATS down for minutes) sends again from ``acked+1``:
JetStream drops the copies it already holds by message id, so the stream gets no gap and
no duplicate. A "duplicate" ack is taken only when the message JetStream holds under that
id is byte for byte the one sent; anything else (a message someone else published with
that id, or one purged since) is counted, alerted (``status``, the fleet component of
``integration``) and the event sent again under a fresh id. The acked seq is kept in the
journal's ``meta`` (``fleet_acked``), with the stream seq JetStream stored it at
(``fleet_acked_at``: ``SEQ:STREAM_SEQ``). After a restart, and when the stream was deleted
under it, forwarding resumes from that acked seq; it goes back below it only when the
stream really lacks the event acked: the stream's last message for this host is an
earlier event of its journal (a last message that is not this host's journaled event
counts for nothing) *and* the message at the acked event's stream seq is not that very
event (purged, or the stream made anew). So anyone on NATS publishing an old genuine
event of this host again cannot make graced send its journal again.

Nothing here ever blocks trio: publishing, acks and reconnects happen on the asyncio
thread; graced only lags, and ``status`` says by how much (:meth:`Forwarder.status`).

Requests by NATS (``grace-rpc.<daemon-id>``, request/reply) are handed to the wire's
:meth:`graced.wire.Server.answer`: the same parsing, signature and role checks as a
request read from a TCP client. Anyone on NATS may send them, so they are screened
before trio sees them, here on the asyncio thread, one between two turns of its other
tasks (reading the socket, forwarding): the subscription holds at most
``RPC_PENDING_MSGS`` (nats-py drops the rest); a request whose signature verifies with a
key that has a role, bound to this daemon and fresh (the wire's own checks but the
nonce's, :meth:`graced.auth.Authenticator.screen`) is served ``MAX_RPC`` at a time with
at most ``MAX_RPC_WAITING`` waiting; the same request sent again (a client resending
while it waits for the answer) is dropped, its answer is on its way; anything else (no
signature, a forged or unknown one, another daemon's, stale, unparsable: it can only be
refused) is answered only while no other such is being answered, else dropped at once.
So a flood of requests that cannot be signed, however they look, never queues ahead of
a signed one; it costs a signature check each at most. ``status`` counts what was
dropped (``requests_dropped``) and the resends (``requests_resent``).

Channels owned: none. Threads: one (the asyncio loop), plus asyncio's executor for
requests waiting on trio.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import secrets
import ssl
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from ..auth import AuthError
from ..config.fleet import FleetConfig
from ..journal import JournalReader
from ..mesh import Mesh
from ..protocol import SignedEvent
from ..protocol import fleet as names
from ..protocol.signing import parse_ts
from ..protocol.wire import Request, RequestError, parse_request
from ..redact import redact_text, redact_url
from .bridge import AsyncioThread
from .knowledge import KnowledgeShare

log = logging.getLogger("graced.fleet")

META_KEY = "fleet_acked"
AT_KEY = "fleet_acked_at"  # "SEQ:STREAM_SEQ": where JetStream stored event SEQ
MAX_RPC = 8  # signed requests by NATS served at once
MAX_RPC_WAITING = 32  # signed requests waiting for a slot; more are dropped
MAX_RPC_BYTES = 1 << 20
# The subscription's own queue: excess is dropped by nats-py (a slow consumer), never held.
RPC_PENDING_MSGS, RPC_PENDING_BYTES = 1024, 8 << 20
ALERT_FOR = 300.0  # seconds the fleet component stays "failing" after a refused duplicate
# Signed requests screened in, remembered (kid:nonce) to know a resend: at most this many,
# for at most this long (a client resends while it waits, a few seconds).
MAX_ADMITTED, ADMITTED_FOR = 4096, 300.0


def connect_options(cfg: FleetConfig, name: str) -> dict[str, Any]:
    """nats.connect() keyword arguments for ``[fleet]``; reconnects forever."""
    servers = [u.strip() for u in cfg.url.split(",") if u.strip()]
    opts: dict[str, Any] = {
        "servers": servers, "name": name, "allow_reconnect": True,
        "max_reconnect_attempts": -1, "reconnect_time_wait": 0.5, "connect_timeout": 2,
        "ping_interval": 5, "max_outstanding_pings": 2,
        # No buffering while disconnected: a publish then fails at once and is sent again
        # from the last acked seq, rather than flushed late behind newer ones.
        "pending_size": 0,
    }
    if cfg.creds:
        opts["user_credentials"] = cfg.creds
    if cfg.nkey_seed:
        opts["nkeys_seed"] = cfg.nkey_seed
    if cfg.user:
        opts["user"], opts["password"] = cfg.user, cfg.password
    if cfg.tls_ca or cfg.tls_cert or any(s.startswith("tls://") for s in servers):
        ctx = ssl.create_default_context(cafile=cfg.tls_ca or None)
        if cfg.tls_cert:
            ctx.load_cert_chain(cfg.tls_cert, cfg.tls_key or None)
        opts["tls"] = ctx
    return opts


STREAM_HOSTS = 16  # the stream graced creates holds max_bytes_per_host for this many
MAX_MSG_SIZE = 16 << 20  # graced's largest event


def stream_config(cfg: FleetConfig) -> dict[str, Any]:
    """The stream graced creates when it finds none (an existing one is left as it is):
    bounded in age, bytes (the oldest go first) and message size."""
    return {
        "name": cfg.stream, "subjects": [f"{names.PREFIX}.>"],
        "max_age": cfg.max_age_days * 86400.0, "num_replicas": cfg.replicas,
        "max_msgs_per_subject": -1, "duplicate_window": 600.0,
        "max_bytes": cfg.max_bytes_per_host * STREAM_HOSTS, "max_msg_size": MAX_MSG_SIZE,
        "discard": "old",
    }


class Forwarder:
    """Forwards the journal to JetStream; :meth:`run` never returns unless cancelled."""

    def __init__(self, cfg: FleetConfig, *, daemon_id: str, mesh: Mesh, journal_path: Path,
                 acked: int | None, answer: Callable[[str, str], Awaitable[str]],
                 acked_at: tuple[int, int] | None = None,
                 screen: Callable[[Request], str] | None = None,
                 knowledge: KnowledgeShare | None = None) -> None:
        self.cfg = cfg
        self.knowledge = knowledge
        self.daemon_id = daemon_id
        self.mesh = mesh
        self.journal_path = journal_path
        self.local_acked = acked
        # (seq, stream seq) of an acked event: one tuple, set at once (read by trio's _save).
        self._acked_at = acked_at if acked is not None else None
        self.answer = answer
        self.screen = screen  # None: no key may sign (every request can only be refused)
        self.acked = acked or 0
        self.connected = False
        self.down_since: float | None = time.time()  # when it last lost NATS (or started)
        self.last_error: str | None = None
        self.forwarded = 0
        self.resumed_from: int | None = None
        self.rpc_served = 0
        self.rpc_dropped = 0
        self.rpc_resent = 0
        self._admitted: OrderedDict[str, float] = OrderedDict()  # kid:nonce -> when
        self.overwritten = 0  # times this host's knowledge entry was found overwritten
        self._shared: bytes | None = None  # the export last put in the bucket
        self._reshare = asyncio.Event()
        self._rpc_waiting = 0
        self._refusable_busy = False
        self._rpc_tasks: set[asyncio.Future[None]] = set()  # held: asyncio keeps weak refs
        self.refused_duplicates = 0
        self._alert: tuple[float, str] | None = None
        # When the oldest event not yet acknowledged came (None: caught up), and why
        # JetStream refused the last publishes while connected (None: it did not).
        self._behind_since: float | None = None
        self._started = time.time()
        self._refused: str | None = None
        # The last "permissions violation for publish" NATS reported (monotonic time, text):
        # a publish it denies is only a timeout to the publisher.
        self._violation: tuple[float, str] | None = None
        self._head = mesh.delivered_seq
        self._wake: asyncio.Event | None = None
        self._bridge: AsyncioThread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._saved = self.acked
        self._saved_at = 0.0
        self._waiters: list[tuple[int, trio.Event]] = []

    # -- trio side ------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._token = trio.lowlevel.current_trio_token()
        bridge = self._bridge = AsyncioThread("graced-fleet")
        bridge.start()
        sub = self.mesh.subscribe(["*"], self._on_event)
        fut = bridge.submit(self._main())
        task_status.started()
        try:
            await trio.sleep_forever()
        finally:
            sub.close()
            with trio.CancelScope(shield=True):
                await self.drain()
            fut.cancel()
            bridge.stop()

    async def drain(self) -> None:
        """At shutdown, while the mesh still commits: give the last events (daemon.stopping)
        a moment to reach JetStream, and keep where forwarding got for the restart (a
        stale value costs copies once JetStream's duplicate window has passed)."""
        with trio.move_on_after(2):
            self._poke(self.mesh.delivered_seq)
            if self.connected:
                await self.wait_acked(self.mesh.delivered_seq)
        self._save(force=True)

    def _on_event(self, ev: SignedEvent) -> None:
        """A mesh subscriber: never blocks, only wakes the forwarder."""
        self._poke(ev.seq)

    def _poke(self, seq: int) -> None:
        self._head = seq
        if self._behind_since is None:
            self._behind_since = time.time()
        if self._bridge is not None and self._wake is not None:
            self._bridge.call_soon(self._wake.set)

    async def wait_acked(self, seq: int) -> None:
        """Wait until JetStream has acknowledged every event up to ``seq``."""
        if self.acked >= seq:
            return
        done = trio.Event()
        self._waiters.append((seq, done))
        await done.wait()

    def _save(self, force: bool = False) -> None:
        """On trio, after the acked seq moved: wake its waiters, and keep it in the
        journal's meta (committed with the next group; ``force``: now, not at most once a
        second)."""
        if self._waiters:
            waiting = []
            for seq, done in self._waiters:
                if self.acked >= seq:
                    done.set()
                else:
                    waiting.append((seq, done))
            self._waiters = waiting
        now = time.monotonic()
        # At most once a second: a stale value costs copies that JetStream drops by message
        # id when forwarding resumes (within its duplicate window, 2 minutes by default).
        at = self._acked_at
        acked = at[0] if at is not None else self.acked
        if acked != self._saved and (force or now - self._saved_at >= 1.0):
            self._saved, self._saved_at = acked, now
            sql = "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)"
            rows = [(sql, (META_KEY, str(acked)))]
            if at is not None:
                rows.append((sql, (AT_KEY, f"{at[0]}:{at[1]}")))
            try:
                self.mesh.store(rows)
            except trio.ClosedResourceError:
                pass

    def disconnected_for(self, now: float) -> float:
        """Seconds since forwarding lost NATS (or started without it); 0 if connected."""
        since = self.down_since
        return 0.0 if self.connected or since is None else max(0.0, now - since)

    def behind_for(self, now: float) -> float:
        """Seconds the oldest event not yet acknowledged by JetStream has waited; 0 if none."""
        behind = self._behind_since
        if self.mesh.delivered_seq <= self.acked or behind is None:
            return 0.0
        return max(0.0, now - behind)

    def degraded(self, now: float) -> str | None:
        """Why forwarding makes graced degraded: behind (its oldest unacknowledged event
        waiting) for longer than ``[fleet] degraded_after``, connected or not (a fleet
        that sees nothing of this host, as a Prometheus alert on a lag would fire), and
        why: disconnected, or the publishes JetStream refused; else None."""
        lag = max(0, self.mesh.delivered_seq - self.acked)
        behind = self.behind_for(now)
        if not lag or behind < self.cfg.degraded_after:
            return None
        if not self.connected:
            why = f"disconnected for {self.disconnected_for(now):.0f} s"
        elif self._refused is not None:
            why = f"publishes refused: {self._refused}"
        else:
            why = "publishes not acknowledged yet"
        return (f"fleet forwarding to {redact_url(self.cfg.url)} {lag} events behind for "
                f"{behind:.0f} s (more than [fleet] degraded_after "
                f"{self.cfg.degraded_after:g} s): {why}")

    def status(self) -> dict[str, Any]:
        head = self.mesh.delivered_seq
        lag = max(0, head - self.acked)
        return {
            "url": redact_url(self.cfg.url), "stream": self.cfg.stream,
            "connected": self.connected, "acked_seq": self.acked, "head_seq": head,
            "lag_events": lag,
            "disconnected_seconds": round(self.disconnected_for(time.time()), 3),
            "degraded_after": self.cfg.degraded_after,
            "lag_seconds": round(self.behind_for(time.time()), 3),
            "forwarded": self.forwarded, "resumed_from": self.resumed_from,
            "requests_served": self.rpc_served, "requests_dropped": self.rpc_dropped,
            "requests_resent": self.rpc_resent,
            "last_error": self.last_error,
            "refused_duplicates": self.refused_duplicates, "alert": self.alert(),
            "knowledge": {**self.knowledge.status(), "overwritten": self.overwritten}
            if self.knowledge else None,
        }

    def alert(self) -> str | None:
        """Why forwarding was tampered with lately (JetStream dropped an event as a copy
        of a message graced did not send), or None."""
        if self._alert is None or time.time() - self._alert[0] > ALERT_FOR:
            return None
        return self._alert[1]

    # -- asyncio side -----------------------------------------------------------------

    def _trio_soon(self, fn: Callable[[], None]) -> None:
        assert self._token is not None
        try:
            self._token.run_sync_soon(fn)
        except trio.RunFinishedError:
            pass

    async def _main(self) -> None:
        import nats  # the optional extra fleet
        from nats.js.errors import NotFoundError

        self._wake = asyncio.Event()
        loop = asyncio.get_running_loop()
        reader = await loop.run_in_executor(None, JournalReader, self.journal_path)

        async def disconnected() -> None:
            if self.connected:
                self.down_since = time.time()
            self.connected = False

        async def reconnected() -> None:
            self.connected = True
            self.down_since = None

        rpc_subject = names.rpc_subject(self.daemon_id)

        async def error(exc: Exception) -> None:
            if isinstance(exc, nats.errors.SlowConsumerError) and exc.subject == rpc_subject:
                self.rpc_dropped += 1  # a request its full subscription had no room for
                return
            self.last_error = redact_text(f"{type(exc).__name__}: {exc}")[:300]
            if "permissions violation for publish" in str(exc):
                self._violation = (time.monotonic(), self.last_error)

        backoff = 0.2
        while True:
            try:
                nc = await nats.connect(
                    **connect_options(self.cfg, f"graced {self.daemon_id}"),
                    disconnected_cb=disconnected, reconnected_cb=reconnected, error_cb=error)
                break
            except Exception as exc:  # noqa: BLE001 - NATS down at start: keep trying
                await error(exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
        self.connected = True
        self.down_since = None
        js = nc.jetstream(timeout=self.cfg.ack_timeout)
        rpc_slots = asyncio.Semaphore(MAX_RPC)
        await nc.subscribe(rpc_subject,
                           cb=functools.partial(self._on_rpc, rpc_slots),
                           pending_msgs_limit=RPC_PENDING_MSGS,
                           pending_bytes_limit=RPC_PENDING_BYTES)
        sharing = asyncio.ensure_future(self._share(js)) if self.knowledge else None
        try:
            await self._resume(js, reader, NotFoundError)
            await self._forward(js, reader, NotFoundError)
        finally:
            if sharing is not None:
                sharing.cancel()
            reader.close()
            await nc.close()

    async def _resume(self, js: Any, reader: JournalReader,
                      not_found: type[Exception]) -> None:
        """Where to start: our acked seq, unless the stream lacks that event; then
        JetStream's last for this host (which counts only if it is byte for byte the
        event this host journaled). See the module's docstring."""
        backoff = 0.2
        local = self.local_acked
        while True:
            try:
                await self._ensure_stream(js, not_found)
                at: tuple[int, int] | None = None
                try:
                    last = await js.get_last_msg(self.cfg.stream,
                                                 names.host_filter(self.daemon_id))
                    stored = self._own_seq(reader, bytes(last.data or b""))
                    if stored is not None:
                        at = (stored, int(last.seq))
                except not_found:
                    stored = 0
                if stored is None:  # not this host's event: trust only our own acked seq
                    stored = local or 0
                if local is None:
                    start = stored
                elif stored >= local or await self._holds(js, reader, not_found):
                    start, at = local, self._acked_at  # never below what JetStream acked
                else:
                    start = stored  # the stream lost what we sent: send it again
                break
            except Exception as exc:  # noqa: BLE001 - NATS unreachable: retry
                self.last_error = self._refused = \
                    redact_text(f"resume: {type(exc).__name__}: {exc}")[:300]
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
        self.acked = start
        self._acked_at = at if at is not None and at[0] == start else None
        self.resumed_from = start + 1
        log.info("forwarding to %s stream %s from seq %d (JetStream holds up to %d)",
                 redact_url(self.cfg.url), self.cfg.stream, start + 1, stored)

    async def _holds(self, js: Any, reader: JournalReader,
                     not_found: type[Exception]) -> bool:
        """Whether the stream still holds the event we acked, looked up at the stream seq
        JetStream stored it at: byte for byte, on its subject."""
        at = self._acked_at
        if at is None or at[0] != self.local_acked:
            return False  # where it was stored is not known: the stream's word stands
        try:
            held = await js.get_msg(self.cfg.stream, seq=at[1])
        except not_found:
            return False
        body = reader.read(at[0], at[0], 1)
        if not body or bytes(held.data or b"") != body[0].encode():
            return False
        return bool(held.subject == names.subject_for(self.daemon_id, _fields(body[0])[2]))

    @staticmethod
    def _own_seq(reader: JournalReader, data: bytes) -> int | None:
        """The seq of ``data`` if it is exactly an event of this host's journal, else None."""
        try:
            seq = _fields(data.decode())[1]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            return None
        held = reader.read(seq, seq, 1)
        return seq if held and held[0].encode() == data else None

    async def _ensure_stream(self, js: Any, not_found: type[Exception]) -> None:
        try:
            await js.stream_info(self.cfg.stream)
        except not_found:
            await js.add_stream(**stream_config(self.cfg))

    async def _forward(self, js: Any, reader: JournalReader,
                       not_found: type[Exception]) -> None:
        from nats.js.errors import NoStreamResponseError

        assert self._wake is not None
        backoff = 0.1
        while True:
            head = max(self._head, self.mesh.delivered_seq)
            if self.acked >= head:
                self._behind_since = None
                self._trio_soon(self._save)
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), 1.0)
                except TimeoutError:
                    pass
                continue
            bodies = reader.read(self.acked + 1, head, self.cfg.in_flight)
            if not bodies:
                await asyncio.sleep(0.05)
                continue
            # The oldest event waiting: since it was made (graced running), not since
            # forwarding last moved.
            self._behind_since = self._made_at(bodies[0])
            sends, seqs, msgs = [], [], []
            for body in bodies:
                kid, seq, topic = _fields(body)
                seqs.append(seq)
                subject = names.subject_for(self.daemon_id, topic)
                data = body.encode()
                msgs.append((subject, data, kid, seq))
                sends.append(js.publish(subject, data, stream=self.cfg.stream, headers={
                    names.MSG_ID_HEADER: names.msg_id(kid, seq, data)}))
            if seqs[0] != self.acked + 1:
                # Retention pruned the journal behind a checkpoint before these were sent
                # (NATS away for longer than the journal keeps events): the fleet view
                # will show that gap; say so here too.
                self.last_error = (f"events {self.acked + 1}..{seqs[0] - 1} were pruned from "
                                   "the journal before they could be forwarded")
                log.error("%s", self.last_error)
            sent_at = time.monotonic()
            results: list[Any] = list(await asyncio.gather(*sends, return_exceptions=True))
            ok = 0
            for i, res in enumerate(results):
                if not isinstance(res, BaseException) and getattr(res, "duplicate", False):
                    results[i] = res = await self._check_duplicate(js, res, *msgs[i])
                if isinstance(res, BaseException):
                    break
                ok += 1
            if ok:
                self.acked = seqs[ok - 1]
                self._acked_at = (self.acked, int(results[ok - 1].seq))
                self.forwarded += ok
                self._behind_since = (self._made_at(bodies[ok]) if ok < len(bodies)
                                      else None if self.acked >= self._head else time.time())
                self._trio_soon(self._save)
            if ok < len(results):
                exc = results[ok]
                why, denied = f"{type(exc).__name__}: {exc}", self._violation
                if isinstance(exc, TimeoutError) and denied and denied[0] >= sent_at:
                    why = denied[1]  # why no ack came: NATS said so, to the error callback
                self.last_error = self._refused = redact_text(f"publish: {why}")[:300]
                if isinstance(exc, (not_found, NoStreamResponseError)):
                    # The stream was deleted: make it again, and resend what it lost.
                    try:
                        self.local_acked = self.acked
                        await self._resume(js, reader, not_found)
                    except Exception:  # noqa: BLE001
                        pass
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            else:
                backoff = 0.1
                self._refused = None

    def _made_at(self, body: str) -> float:
        """When the journaled event ``body`` was made (not before graced started, not
        after now)."""
        try:
            made = parse_ts(str(json.loads(body)["ts"]))
        except (ValueError, KeyError, TypeError):
            made = time.time()
        return min(time.time(), max(self._started, made))

    async def _check_duplicate(self, js: Any, ack: Any, subject: str, data: bytes, kid: str,
                               seq: int) -> Any:
        """JetStream dropped event ``seq`` as a copy: fine if what it holds under that id is
        this very message; else someone else published under its id (or it was purged):
        alert, and send it again under a fresh id. Returns the ack to count, or the
        exception that stops this batch."""
        try:
            held = await js.get_msg(self.cfg.stream, ack.seq)
            if bytes(held.data or b"") == data and held.subject == subject:
                return ack
        except Exception as exc:  # noqa: BLE001 - not found (purged), or NATS away
            from nats.js.errors import NotFoundError

            if not isinstance(exc, NotFoundError):
                return exc
        self.refused_duplicates += 1
        why = (f"JetStream dropped event {seq} as a duplicate of a message graced did not "
               f"send (stream seq {ack.seq}); sent again under a fresh id")
        self._alert = (time.time(), why)
        self.last_error = why
        log.error("%s", why)
        try:
            return await js.publish(subject, data, stream=self.cfg.stream, headers={
                names.MSG_ID_HEADER: names.msg_id(kid, seq, data, secrets.token_hex(8))})
        except Exception as exc:  # noqa: BLE001 - the batch is sent again from here
            return exc

    # -- shared knowledge (asyncio side; see graced/fleet/knowledge.py) ------------------

    def _on_trio(self, fn: Callable[..., Any], *args: Any, sync: bool = False) -> Any:
        """An executor-thread call of ``fn`` on trio (never blocks the asyncio loop)."""
        loop = asyncio.get_running_loop()
        run = trio.from_thread.run_sync if sync else trio.from_thread.run
        return loop.run_in_executor(None, functools.partial(run, fn, *args,
                                                            trio_token=self._token))

    async def _bucket(self, js: Any) -> Any:
        from nats.js.errors import BucketNotFoundError

        backoff = 0.5
        while True:
            try:
                try:
                    return await js.key_value(names.KNOWLEDGE_BUCKET)
                except BucketNotFoundError:
                    return await js.create_key_value(bucket=names.KNOWLEDGE_BUCKET,
                                                     history=1, replicas=self.cfg.replicas)
            except Exception as exc:  # noqa: BLE001 - NATS away: retry
                self.last_error = redact_text(f"knowledge bucket: {exc}")[:300]
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)

    async def _share(self, js: Any) -> None:
        """Put this host's export in the bucket now and then; import what peers put.
        Anyone who may write to the bucket may overwrite this host's entry: its own key
        is watched, and put again whenever what the bucket holds is not what was put."""
        assert self.knowledge is not None
        kv = await self._bucket(js)
        watching = asyncio.ensure_future(self._watch(kv)) if self.cfg.knowledge_keys else None
        self._reshare = asyncio.Event()
        guarding = asyncio.ensure_future(self._guard(kv)) if self.cfg.share_knowledge else None
        last = ""
        try:
            while self.cfg.share_knowledge:
                try:
                    digest, value = await self._on_trio(self.knowledge.export_bytes, last,
                                                        sync=True)
                    if value:  # its records changed (or it is the first)
                        await kv.put(self.daemon_id, value)
                        last, self._shared = digest, value
                    elif self._shared is not None and await self._held(kv) != self._shared:
                        self.overwritten += 1
                        self.last_error = ("knowledge: this host's entry in the bucket was "
                                           "overwritten or deleted; put again")
                        log.warning("%s", self.last_error)
                        await kv.put(self.daemon_id, self._shared)
                except Exception as exc:  # noqa: BLE001 - too big, or NATS away: next time
                    self.last_error = redact_text(f"knowledge put: {exc}")[:300]
                self._reshare.clear()
                try:
                    await asyncio.wait_for(self._reshare.wait(), self.cfg.knowledge_interval)
                except TimeoutError:
                    pass
            if watching is not None:
                await watching
        finally:
            for task in (watching, guarding):
                if task is not None:
                    task.cancel()

    async def _held(self, kv: Any) -> bytes | None:
        """What the bucket holds under this host's id (None: nothing)."""
        from nats.js.errors import KeyNotFoundError

        try:
            entry = await kv.get(self.daemon_id)
        except KeyNotFoundError:  # deleted or purged too
            return None
        return bytes(entry.value) if entry.value else None

    async def _guard(self, kv: Any) -> None:
        """Wake the sharing loop when this host's entry changes to anything but its own."""
        import nats.errors

        while True:
            try:
                watcher = await kv.watch(self.daemon_id)
                while True:
                    try:
                        entry = await watcher.updates(timeout=5.0)
                    except nats.errors.TimeoutError:
                        continue
                    if entry is None or self._shared is None:
                        continue
                    if (bytes(entry.value) if entry.value else None) != self._shared:
                        self._reshare.set()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a lost watcher: watch again
                self.last_error = redact_text(f"knowledge watch: {exc}")[:300]
                await asyncio.sleep(1.0)

    async def _watch(self, kv: Any) -> None:
        import nats.errors

        assert self.knowledge is not None
        while True:
            try:
                watcher = await kv.watchall()
                while True:
                    try:
                        entry = await watcher.updates(timeout=5.0)
                    except nats.errors.TimeoutError:
                        continue
                    if entry is None or not entry.value or entry.key == self.daemon_id:
                        continue
                    await self._on_trio(self.knowledge.accept, entry.key, entry.value)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a lost watcher: watch again
                self.last_error = redact_text(f"knowledge watch: {exc}")[:300]
                await asyncio.sleep(1.0)

    async def _on_rpc(self, slots: asyncio.Semaphore, msg: Any) -> None:
        """One request by NATS, as nats-py delivers them (one at a time): screened, then
        dropped or answered in a task of its own."""
        # nats-py hands over a full queue without a pause: one request, then the loop's
        # other tasks (reading the socket, forwarding), so a flood is read as fast as it
        # comes and what finds the queue full is dropped there, unscreened.
        await asyncio.sleep(0)
        if not msg.reply or len(msg.data) > MAX_RPC_BYTES:
            self.rpc_dropped += 1
            return
        admitted = self._admit(msg.data)
        if admitted is None:
            if self._refusable_busy:  # a flood of what can only be refused: not served
                self.rpc_dropped += 1
                return
            self._refusable_busy = True
            self._spawn(self._serve_refusable(msg))
            return
        if admitted in self._admitted:  # sent again while it waits: its answer will come
            self.rpc_resent += 1
            return
        if self._rpc_waiting >= MAX_RPC + MAX_RPC_WAITING:
            self.rpc_dropped += 1
            return
        now = time.monotonic()
        self._admitted[admitted] = now
        while len(self._admitted) > MAX_ADMITTED or \
                next(iter(self._admitted.values())) < now - ADMITTED_FOR:
            self._admitted.popitem(last=False)
        self._rpc_waiting += 1
        self._spawn(self._serve_signed(slots, msg))

    def _admit(self, data: bytes) -> str | None:
        """``kid:nonce`` of a request that passes the wire's checks but the nonce's; None
        for one that can only be refused. Costs a signature check at most."""
        if self.screen is None:
            return None
        try:
            req = parse_request(data.decode("utf-8"), MAX_RPC_BYTES)
            if req.auth is None:
                return None
            return f"{self.screen(req)}:{req.nonce}"
        except (UnicodeDecodeError, RequestError, AuthError, ValueError, TypeError):
            return None  # the wire says why, if this one is answered

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._rpc_tasks.add(task)
        task.add_done_callback(self._rpc_tasks.discard)

    async def _serve_refusable(self, msg: Any) -> None:
        try:
            await self._serve(msg)
        finally:
            self._refusable_busy = False

    async def _serve_signed(self, slots: asyncio.Semaphore, msg: Any) -> None:
        try:
            async with slots:
                await self._serve(msg)
        finally:
            self._rpc_waiting -= 1

    async def _serve(self, msg: Any) -> None:
        """Answered by the wire, on trio, as a TCP client's request."""
        text = msg.data.decode("utf-8", "replace")
        peer = f"nats:{msg.subject}"
        assert self._token is not None
        loop = asyncio.get_running_loop()
        try:
            reply = await loop.run_in_executor(None, functools.partial(
                trio.from_thread.run, self.answer, text, peer, trio_token=self._token))
        except Exception as exc:  # noqa: BLE001 - graced is stopping
            log.warning("request by NATS not answered: %s", exc)
            return
        self.rpc_served += 1
        if reply:
            try:
                await msg.respond(reply.encode())
            except Exception as exc:  # noqa: BLE001 - the asker went away
                log.info("could not send a reply: %s", exc)


def _fields(body: str) -> tuple[str, int, str]:
    """An event's kid, seq and topic from its journaled text."""
    event = json.loads(body)
    return str(event["kid"]), int(event["seq"]), str(event["topic"])
