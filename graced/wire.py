"""The WebSocket server: a Unix socket (default) and optional TCP listeners.

Each client gets a reader task (requests in) and a sender task (frames out) fed by a
bounded channel of ``client_queue`` frames. Mesh fan-out puts frames on that channel
without blocking; when it is full, or one send takes longer than ``send_timeout``,
the client is dropped with a close reason, so it never slows the publisher or other
clients. Everything a client sends is checked; a bad request gets an error reply and
nothing a client sends can take the daemon down.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import hashlib
import json
import logging
import math
import os
import pwd
import socket as pysocket
import ssl
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import trio
import trio_websocket
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest

from .auth import CONTROL, RANK, Authenticator, AuthError, LogBudget, Refusals
from .errors import DaemonExit, StartupError
from .journal import JournalReader
from .mesh import Mesh, Subscription
from .protocol import CanonicalError, SignedEvent, Signer, canonical_text, format_ts
from .protocol.canonical import json_safe
from .protocol.topics import compile_patterns
from .protocol.wire import (
    CLOSE_REVOKED,
    Request,
    RequestError,
    error_response,
    loopback_host,
    parse_request,
    response,
)
from .safefiles import check_dir_chain, make_dirs
from .wsconn import wrap_server_stream

log = logging.getLogger("graced.wire")

GOING_AWAY = 1001
POLICY = 1008
TRY_AGAIN = 1013
MAX_PATTERNS = 64
MAX_PATTERN_LEN = 200
REPLAY_CHUNK = 2000
# Bytes of events read back from the journal for replays and not yet sent, all clients
# together, and one client's share: each replay makes copies of its own (the memory ring
# shares one copy between clients), so 40 readers who never read grew RSS by 365 MB.
REPLAY_BYTES = 32 << 20
REPLAY_SHARE = 8 << 20
JOURNAL_READS = 4  # replays reading the journal at once (each a connection and its cache)
COALESCE_BYTES = 256 << 10  # frames joined into one message, at most
UNPROVEN_REQUESTS = 4  # requests (hello, refusals) a TCP connection may send before a key
# An unproven connection still in its TLS/WebSocket handshake after this many seconds is
# the first to give way (a client finishes it in milliseconds): see _first_to_go.
STALE_HANDSHAKE = 1.0
COALESCE = 512
LISTEN_BACKLOG = 1024


def tls_context(cert: str, key: str) -> ssl.SSLContext | None:
    """The server's TLS context from ``[daemon] tls_cert``/``tls_key``, or None for none."""
    if not cert and not key:
        return None
    if not (cert and key):
        raise StartupError("[daemon] tls_cert and tls_key go together: give both",
                           DaemonExit.CONFIG)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise StartupError(f"cannot load [daemon] tls_cert {cert} / tls_key {key}: "
                           f"{getattr(exc, 'strerror', None) or exc}", DaemonExit.CONFIG) from None
    return ctx


def tls_digest(cert: str, key: str) -> str:
    """SHA-256 of the certificate and key files' contents ("" without TLS or a file)."""
    if not cert and not key:
        return ""
    h = hashlib.sha256()
    for path in (cert, key):
        try:
            with open(path, "rb") as fh:
                h.update(fh.read(1 << 20))
        except OSError:
            return ""
        h.update(b"\0")
    return h.hexdigest()


def certificate_names(cert: str) -> set[str]:
    """The DNS names and addresses a PEM certificate is for (a Host header may be one)."""
    if not cert:
        return set()
    try:
        decoded = ssl._ssl._test_decode_cert(cert)  # type: ignore[attr-defined]
    except (AttributeError, OSError, ssl.SSLError):
        return set()
    return {str(value) for _, value in decoded.get("subjectAltName", ())}


SO_PEERGROUPS = getattr(pysocket, "SO_PEERGROUPS", 59)  # Linux >= 4.13


def user_name(uid: int | None) -> str:
    """A Unix user as refusals and logs name it: ``name (uid N)``, or ``uid N`` when the
    host has no such user."""
    if uid is None:
        return "an unknown user"
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


@dataclass
class Peer:
    """Who is on the other end: transport and, over the Unix socket, uid/gid/groups.

    A Unix peer's credentials are the ones the kernel recorded when it connected
    (SO_PEERCRED, SO_PEERGROUPS), taken once at accept and never looked up again: the
    pid is only shown in logs, because by the time a request arrives it may belong to
    another process (the connecting one can hand its socket on and exit).
    """

    transport: str  # "unix" or "tcp"
    uid: int | None = None
    gid: int | None = None
    pid: int | None = None
    address: str = ""
    groups: frozenset[int] = frozenset()

    def describe(self) -> str:
        if self.transport == "unix":
            return f"unix uid={self.uid} pid={self.pid}"
        return f"tcp {self.address}"


def unix_peer(sock: Any) -> Peer:
    """The credentials of a connected Unix socket's peer, as of its connect()."""
    peer = Peer("unix")
    try:
        creds = sock.getsockopt(pysocket.SOL_SOCKET, pysocket.SO_PEERCRED,
                                struct.calcsize("3i"))
        peer.pid, peer.uid, peer.gid = struct.unpack("3i", creds)
    except OSError:
        return peer  # no credentials: treated as nobody
    groups = _peer_groups(sock)
    if groups is None:
        # No SO_PEERGROUPS: the user's groups from the group database, by uid.
        try:
            name = pwd.getpwuid(peer.uid).pw_name
            groups = set(os.getgrouplist(name, peer.gid))
        except (KeyError, OSError):
            groups = set()
    peer.groups = frozenset({peer.gid, *groups}) if peer.gid is not None else frozenset(groups)
    return peer


def _peer_groups(sock: Any) -> set[int] | None:
    """Supplementary groups of the peer via SO_PEERGROUPS, or None where unsupported."""
    for count in (64, 65536):
        try:
            raw = sock.getsockopt(pysocket.SOL_SOCKET, SO_PEERGROUPS, 4 * count)
        except OSError as exc:
            if exc.errno == errno.ERANGE:
                continue
            return None
        return {g for (g,) in struct.iter_unpack("I", raw[: len(raw) // 4 * 4])}
    return None


Handler = Callable[["Client", Request], Awaitable[Any]]


@dataclass(frozen=True)
class Budget:
    """How many connections graced serves, so no one can take every slot.

    ``max_clients`` Unix clients, at most ``per_user`` of one user (root and graced's own
    aside), plus ``reserved`` more that only root, graced's own user and approvers may
    take; ``max_tcp`` TCP clients, at most ``per_address`` from one address;
    at most ``handshakes`` connections (Unix and TCP) still in their TLS/WebSocket
    handshake, each for at most ``handshake_timeout`` s; a TCP client that is not
    subscribed and sends nothing for ``idle_timeout`` s is closed. Over budget, a
    connection is closed at once, before any handshake.
    """

    max_clients: int = 256
    per_user: int = 32
    reserved: int = 8
    max_tcp: int = 64
    per_address: int = 8
    handshakes: int = 32
    handshake_timeout: float = 10.0
    idle_timeout: float = 300.0
    unproven: int = 16
    unproven_per_address: int = 4
    auth_timeout: float = 10.0

    @classmethod
    def from_config(cls, d: Any) -> Budget:
        return cls(max_clients=d.max_clients, per_user=d.max_clients_per_user,
                   reserved=d.reserved_clients,
                   max_tcp=d.max_tcp_clients, per_address=d.max_clients_per_address,
                   handshakes=d.max_handshakes, handshake_timeout=d.handshake_timeout,
                   idle_timeout=d.idle_timeout, unproven=d.max_unauthenticated,
                   unproven_per_address=d.max_unauthenticated_per_address,
                   auth_timeout=d.auth_timeout)


@dataclass(eq=False)
class Unproven:
    """A TCP connection that has not proved a key yet (no signed request verified).

    Such connections have a budget of their own (``Budget.unproven`` at once, at most
    ``unproven_per_address`` from one address), ``auth_timeout`` seconds from accept to
    prove a key whatever they send (hello resets nothing), and at most
    :data:`UNPROVEN_REQUESTS` requests. When the budget is full a newcomer is not
    refused: the oldest unproven connection of the address holding the most is closed
    instead; so is the oldest unproven connection of the newcomer's address when that
    address is at ``per_address`` (and of the address holding the most at ``max_tcp``),
    so nobody holding idle connections keeps a client with a key out, not even from the
    same address (everyone behind an SSH tunnel or a proxy comes from 127.0.0.1); one
    stalled in its handshake for over :data:`STALE_HANDSHAKE` s goes before the oldest.
    One that proved a key never gives way to one that has not. A connection giving way
    counts against no limit from then on; while it closes (up to 3 s, telling the peer
    why) it is one of at most ``per_address`` such per address and ``max_tcp`` in all,
    beyond which it is closed at once without a word.
    """

    host: str
    since: float
    scope: trio.CancelScope
    client: Client | None = None
    requests: int = 0
    # Made room for a newcomer: "closing" (counted in Server.giving_way) or "cut" (at once).
    gave_way: str = ""

    def close(self, reason: str) -> None:
        """Close it: with 1008 and ``reason`` once it is a WebSocket client, else at once."""
        if self.client is not None and not self.client.closing.is_set():
            self.client.drop(POLICY, reason, quiet=True)
            self.scope.deadline = min(self.scope.deadline, trio.current_time() + 3)
        else:
            self.scope.cancel()


@dataclass(eq=False)
class Client:
    """One connected WebSocket client."""

    server: Server
    ws: WebSocketConnection
    stream: trio.abc.Stream
    peer: Peer
    send: trio.MemorySendChannel[str] = field(init=False)
    recv: trio.MemoryReceiveChannel[str] = field(init=False)
    subscription: Subscription | None = None
    close_code: int | None = None
    close_reason: str = ""
    closing: trio.Event = field(default_factory=trio.Event)
    send_broken: bool = False
    frames_sent: int = 0
    # A file sent in parts (knowledge.upload), for the request that takes it; dropped
    # with the connection.
    upload: bytearray = field(default_factory=bytearray)
    upload_dry: bool = False  # ... for a dry run (read rights suffice)
    sub_kid: str | None = None  # over TCP: the key its subscription was signed by
    unproven: Unproven | None = None  # over TCP, until a signed request verifies
    queued_bytes: int = 0  # of the frames on its send queue
    replay_bytes: int = 0  # of those, copies read from the journal for its replay
    replayed_total: int = 0  # bytes its replays read from the journal

    def __post_init__(self) -> None:
        self.send, self.recv = trio.open_memory_channel(self.server.client_queue)

    def queue(self, text: str) -> bool:
        """Put a frame on the send queue without blocking; drop the client when full."""
        if self.closing.is_set():
            return False
        if self.queued_bytes + len(text) > self.server.client_queue_bytes:
            self.drop(POLICY, "slow consumer: send queue full "
                              f"({self.server.client_queue_bytes} bytes)")
            return False
        try:
            self.send.send_nowait(text)
        except trio.WouldBlock:
            self.drop(POLICY, f"slow consumer: send queue full ({self.server.client_queue} frames)")
            return False
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            return False
        self.queued_bytes += len(text)
        return True

    def deliver(self, event: SignedEvent) -> None:
        self.queue(event.text)

    def drop(self, code: int, reason: str, *, quiet: bool = False) -> None:
        """Close with ``code`` and ``reason``; logged unless ``quiet`` (the caller counted
        it in a rate-limited log of its own)."""
        if self.closing.is_set():
            return
        self.close_code, self.close_reason = code, reason
        if self.subscription is not None:
            self.subscription.close()
        if reason and code != GOING_AWAY and not quiet:
            log.warning("dropping client %s: %s", self.peer.describe(), reason)
        self.closing.set()

    def respond(self, req_id: Any, nonce: Any, result: Any) -> None:
        ts = format_ts(self.server.clock())
        try:
            frame = self.server.signer.sign_frame(response(req_id, nonce, ts, result))
        except CanonicalError:
            # Data stored before non-finite numbers were refused (a NaN sample written
            # by 0.1.0): answer with them as null rather than fail the request.
            frame = self.server.signer.sign_frame(response(req_id, nonce, ts,
                                                           json_safe(result)))
        self.queue(canonical_text(frame))

    def respond_error(self, req_id: Any, nonce: Any, code: str, message: str) -> None:
        ts = format_ts(self.server.clock())
        try:
            frame = self.server.signer.sign_frame(error_response(req_id, nonce, ts, code,
                                                                 message))
        except CanonicalError:
            # A message quoting what the client sent (a string with no UTF-8 form): sent
            # with U+FFFD in its place rather than not at all.
            frame = self.server.signer.sign_frame(json_safe(error_response(
                req_id, nonce, ts, code, message)))
        self.queue(canonical_text(frame))

    def can_control(self) -> bool:
        return self.server.is_controller(self.peer)


_ROUTINE = (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionClosed)


def _disconnected(exc: BaseException) -> bool:
    """Whether ``exc`` (or every error a nursery grouped in it) is only the peer going
    away: no fault of graced's, nothing to log above debug."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_disconnected(e) for e in exc.exceptions)
    return isinstance(exc, _ROUTINE)


class Server:
    """Serves the wire protocol; :meth:`run` never returns unless cancelled."""

    def __init__(
        self,
        *,
        mesh: Mesh,
        signer: Signer,
        journal_path: Path,
        socket_path: Path,
        socket_mode: int,
        listen: list[str],
        allowed_origins: list[str],
        tls: ssl.SSLContext | None,
        server_names: set[str],
        max_request_bytes: int,
        budget: Budget,
        client_queue: int,
        send_timeout: float,
        client_queue_bytes: int = 16 << 20,
        handlers: dict[str, Handler],
        authenticator: Authenticator,
        clock: Callable[[], float],
        socket_gid: int | None = None,
    ) -> None:
        self.mesh = mesh
        self.socket_gid = socket_gid
        self.signer = signer
        self.journal_path = journal_path
        self.socket_path = socket_path
        self.socket_mode = socket_mode
        self.listen = listen
        self.allowed_origins = allowed_origins
        self.tls = tls
        self.server_names = server_names
        self.max_request_bytes = max_request_bytes
        self.budget = budget
        self.unix_clients = 0
        self.tcp_clients = 0
        self.handshaking = 0
        self.per_address: dict[str, int] = {}
        # TCP connections that have not proved a key, per address, oldest first.
        self.unproven: dict[str, list[Unproven]] = {}
        self.unproven_count = 0
        self.unproven_closed = 0  # evicted, out of time or out of requests
        # Per address: unproven connections that gave way and are closing (see Unproven).
        self.giving_way: dict[str, int] = {}
        self.per_uid: dict[int | None, int] = {}
        self.refusing: dict[str, int] = {}  # per address: over-budget peers being told why
        # Whether a Unix peer (uid, groups) is an approver: the reserved slots are theirs
        # too (set by the composition root; the wire knows no executor).
        self.may_approve: Callable[[int | None, frozenset[int]], bool] | None = None
        self.client_queue = client_queue
        self.client_queue_bytes = client_queue_bytes
        self.replay_bytes = 0  # see REPLAY_BYTES
        self._replay_room = trio.Event()
        self._journal_reads = trio.Semaphore(JOURNAL_READS)
        self.trim_wanted = trio.Event()  # set when a replay from the journal ends
        self.send_timeout = send_timeout
        self.handlers = handlers
        self.roles: dict[str, str | None] = {}  # method -> role a TCP request needs
        self.authenticator = authenticator
        self.refusals = Refusals()
        self.handler_failures = LogBudget("failed requests (tracebacks)")
        self.serve_failures = LogBudget("failed connections (tracebacks)")
        # trio logs every accept that fails (EMFILE: 96 lines in 10 s): rate-limited too.
        accept_errors = LogBudget("failed accepts")
        logging.getLogger("trio.serve_listeners").addFilter(
            lambda record: accept_errors.allow())
        self.clock = clock
        self.clients: set[Client] = set()
        # Where each replay in progress is: retention prunes nothing it has still to send.
        self.replaying: dict[Client, int] = {}
        self.tcp_ports: list[int] = []
        self.connections_total = 0
        self.refused_total = 0
        self.dropped_total = 0
        self._nursery: trio.Nursery | None = None
        self._idle = trio.Event()
        self._listen_scope = trio.CancelScope()

    # -- authorisation -----------------------------------------------------------

    def prepare_tls(self, cert: str, key: str) -> tuple[Callable[[], None], str]:
        """Load a TLS certificate and key (raises StartupError when they cannot be);
        returns what serves them to new connections, and their contents' digest."""
        context = tls_context(cert, key)
        names = certificate_names(cert)

        def apply() -> None:
            self.tls, self.server_names = context, names
        return apply, tls_digest(cert, key)

    def is_controller(self, peer: Peer) -> bool:
        """Control over the Unix socket: root or the daemon's own uid."""
        return peer.transport == "unix" and peer.uid in (0, os.geteuid())

    # -- listeners ---------------------------------------------------------------

    async def _unix_listener(self) -> trio.SocketListener:
        path = self.socket_path
        # Its directory, and every one above it, must be this user's or root's and
        # writable by no one else: whoever may rename entries there could swap the
        # socket for a symlink (and the socket's mode onto another file) or serve in
        # graced's place. Checked before anything is made there, and after.
        self._check_socket_dir()
        try:
            make_dirs(path.parent, 0o755)
        except OSError as exc:
            raise StartupError(f"cannot create the socket's directory {path.parent}: "
                               f"{exc.strerror}", DaemonExit.SOCKET) from None
        self._check_socket_dir()
        if path.exists() or path.is_symlink():
            probe = trio.socket.socket(pysocket.AF_UNIX, pysocket.SOCK_STREAM)
            try:
                await probe.connect(str(path))
            except OSError:
                path.unlink()  # stale socket from a daemon that died
            else:
                raise StartupError(
                    f"another graced is already serving on {path}", DaemonExit.SOCKET
                )
            finally:
                probe.close()
        sock = trio.socket.socket(pysocket.AF_UNIX, pysocket.SOCK_STREAM)
        old = os.umask(0o777 & ~self.socket_mode)
        try:
            await sock.bind(str(path))
        except OSError as exc:
            sock.close()
            raise StartupError(f"cannot bind {path}: {exc.strerror}", DaemonExit.SOCKET) from None
        finally:
            os.umask(old)
        # The umask gave the socket its mode as bind made it: no chmod by path, which
        # would follow a symlink put there since.
        if self.socket_gid is not None:
            try:  # the link itself if one was put there since, never what it points to
                os.chown(path, -1, self.socket_gid, follow_symlinks=False)
            except OSError as exc:
                sock.close()
                raise StartupError(f"cannot give {path} to [daemon] socket_group (gid "
                                   f"{self.socket_gid}): {exc.strerror}",
                                   DaemonExit.SOCKET) from None
        # A deep backlog: a burst of clients connecting at once must queue, not stall
        # (a Unix-socket connect() to a full backlog fails with EAGAIN).
        sock.listen(LISTEN_BACKLOG)
        return trio.SocketListener(sock)

    def _check_socket_dir(self) -> None:
        problem = check_dir_chain(self.socket_path.parent)
        if problem:
            raise StartupError(
                f"socket {self.socket_path}: {problem}: refusing it (the socket's directory "
                "and every one above it must belong to this user or root and be writable "
                "by no one else, sticky ones such as /tmp above it aside)",
                DaemonExit.SOCKET)

    async def _tcp_listeners(self) -> list[trio.SocketListener]:
        out: list[trio.SocketListener] = []
        for item in self.listen:
            host, _, port = item.rpartition(":")
            host = host.strip("[]")
            if self.tls is None and not loopback_host(host):
                raise StartupError(
                    f"[daemon] listen {item!r}: plain ws:// is served only on loopback; "
                    "set [daemon] tls_cert and tls_key to serve wss:// there",
                    DaemonExit.CONFIG)
            try:
                ls = await trio.open_tcp_listeners(int(port), host=host,
                                                   backlog=LISTEN_BACKLOG)
            except OSError as exc:
                raise StartupError(
                    f"cannot listen on {item}: {exc.strerror}", DaemonExit.SOCKET
                ) from None
            for lst in ls:
                self.tcp_ports.append(lst.socket.getsockname()[1])
            out.extend(ls)
        return out

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        unix = await self._unix_listener()
        tcp = await self._tcp_listeners()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                # Listeners run under their own scope, so going_away() can stop
                # accepting while the connections (in `nursery`) drain.
                groups: list[tuple[list[trio.SocketListener], Any]] = [
                    ([unix], self._handle_unix)]
                if tcp:
                    groups.append((tcp, self._handle_tcp))
                nursery.start_soon(self._accept, groups, nursery)
                task_status.started()
        finally:
            try:
                self.socket_path.unlink()
            except OSError:
                pass

    async def _accept(self, groups: list[tuple[list[trio.SocketListener], Any]],
                      handler_nursery: trio.Nursery) -> None:
        try:
            with self._listen_scope:
                async with trio.open_nursery() as nursery:
                    for listeners, handler in groups:
                        nursery.start_soon(functools.partial(
                            trio.serve_listeners, handler, listeners,
                            handler_nursery=handler_nursery))
        finally:
            for listeners, _ in groups:
                for listener in listeners:
                    listener.socket.close()

    def spawn(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(fn, *args)

    # -- connections -------------------------------------------------------------

    async def _handle_unix(self, stream: trio.SocketStream) -> None:
        peer = unix_peer(stream.socket)
        b = self.budget
        owner = peer.uid in (0, os.geteuid())
        kept = owner or (self.may_approve is not None
                         and self.may_approve(peer.uid, peer.groups))
        limit = b.max_clients + (b.reserved if kept else 0)
        mine = self.per_uid.get(peer.uid, 0)
        refuse = ""
        if self.unix_clients >= limit:
            refuse = (f"too many clients (limit {b.max_clients}, {b.reserved} more for root, "
                      "graced's user and approvers)")
        elif not owner and mine >= b.per_user:
            refuse = (f"too many clients of user {user_name(peer.uid)} (limit {b.per_user} "
                      "a user: [daemon] max_clients_per_user)")
        if refuse:
            if self.handshaking >= b.handshakes:
                self._over_budget(stream, f"{peer.describe()}: {self.handshaking} "
                                  f"connections in handshake (limit {b.handshakes})")
                return
            # A local user is told why (close code 1013), after a bounded handshake.
            self.refused_total += 1
            self.refusals.refuse(peer.describe(), "connect", refuse)
            await self._handle(stream, peer, gated=True, refuse=refuse)
            return
        self.unix_clients += 1
        self.per_uid[peer.uid] = mine + 1
        try:
            await self._handle(stream, peer)
        finally:
            self.unix_clients -= 1
            _count_down(self.per_uid, peer.uid)

    def _over_budget(self, stream: trio.SocketStream, why: str) -> None:
        """Close a connection the budget has no room for, at once and without a word."""
        self.refused_total += 1
        self.refusals.refuse(why.partition(":")[0], "connect", why)
        stream.socket.close()

    async def _handle_tcp(self, stream: trio.SocketStream) -> None:
        try:
            host, port = stream.socket.getpeername()[:2]
            addr = f"{host}:{port}"
        except OSError:
            host, addr = "?", "?"
        b = self.budget
        self._make_room_for_newcomer(host)
        from_here = self.per_address.get(host, 0)
        if self.tcp_clients >= b.max_tcp or from_here >= b.per_address \
                or self.handshaking >= b.handshakes:
            why = (f"tcp {addr}: {self.tcp_clients} TCP clients (limit {b.max_tcp}), "
                   f"{from_here} from {host} (limit {b.per_address}), {self.handshaking} "
                   f"in handshake (limit {b.handshakes})")
            if self.handshaking >= b.handshakes or self.refusing.get(host, 0):
                self._over_budget(stream, why)
                return
            # One at a time per address, within the handshake cap: told why (HTTP 503)
            # rather than met with a bare EOF.
            self.refused_total += 1
            self.refusals.refuse(why.partition(":")[0], "connect", why)
            self.refusing[host] = 1
            try:
                await self._handle_tcp_counted(stream, Peer("tcp", address=addr), None, refuse=(
                    f"too many clients: {from_here} from {host} (limit {b.per_address}), "
                    f"{self.tcp_clients} over TCP (limit {b.max_tcp})"))
            finally:
                del self.refusing[host]
            return
        self._make_room_for_unproven(host)
        entry = Unproven(host, trio.current_time(), trio.CancelScope(
            deadline=trio.current_time() + b.auth_timeout + 3))  # a hard stop after
        self.unproven.setdefault(host, []).append(entry)
        self.unproven_count += 1
        self.tcp_clients += 1
        self.per_address[host] = self.per_address.get(host, 0) + 1
        try:
            with entry.scope:
                await self._handle_tcp_counted(stream, Peer("tcp", address=addr), entry)
        finally:
            self._proven(entry)
            if entry.gave_way == "closing":
                _count_down(self.giving_way, host)
            elif not entry.gave_way:
                self.tcp_clients -= 1
                _count_down(self.per_address, host)

    def _make_room_for_newcomer(self, host: str) -> None:
        """Before a new TCP connection from ``host``, at ``per_address`` or ``max_tcp``:
        the oldest unproven connection of ``host`` (at ``max_tcp``: of the address holding
        the most) gives way, so connections that proved no key lock out nobody."""
        b = self.budget
        from_here = self.per_address.get(host, 0)
        mine = self.unproven.get(host)
        if from_here >= b.per_address and mine:
            self._give_way(_first_to_go(mine), f"{from_here} connections from {host} (limit "
                                    f"{b.per_address}); the oldest that has not proved a "
                                    "key gives way")
        if self.tcp_clients >= b.max_tcp and self.unproven_count:
            self._give_way(self._most_held(), f"{self.tcp_clients} TCP clients (limit "
                                              f"{b.max_tcp}); the oldest that has not proved "
                                              "a key, from the address holding the most, "
                                              "gives way")

    def _most_held(self) -> Unproven:
        """The oldest unproven connection of the address holding the most of them."""
        most = max((entries for entries in self.unproven.values() if entries),
                   key=lambda entries: (len(entries), -entries[0].since))
        return _first_to_go(most)

    def _make_room_for_unproven(self, host: str) -> None:
        """Before a new TCP connection from ``host``: close the unproven connection that
        must give way, if the budget for them is full (see :class:`Unproven`)."""
        b = self.budget
        mine = self.unproven.get(host, [])
        if len(mine) >= b.unproven_per_address:
            self._give_way(_first_to_go(mine), (
                f"{len(mine)} connections from {host} have not proved a key (limit "
                f"{b.unproven_per_address}); the oldest gives way"))
        elif self.unproven_count >= b.unproven:
            self._give_way(self._most_held(), f"{self.unproven_count} connections have not "
                                              f"proved a key (limit {b.unproven}); the oldest "
                                              "from the address holding the most gives way")

    def _give_way(self, victim: Unproven, why: str) -> None:
        """Close ``victim`` (unproven) to make room: from now on it counts against no
        limit, only against the bound on connections giving way (see :class:`Unproven`)."""
        self._proven(victim)  # it no longer counts: the newcomer takes its place
        self.unproven_closed += 1
        self.refusals.refuse(f"tcp {victim.host}", "connect", why)
        self.tcp_clients -= 1
        _count_down(self.per_address, victim.host)
        if self.giving_way.get(victim.host, 0) >= self.budget.per_address \
                or sum(self.giving_way.values()) >= self.budget.max_tcp:
            victim.gave_way = "cut"
            victim.scope.cancel()  # too many closing already: at once, without a word
        else:
            victim.gave_way = "closing"
            self.giving_way[victim.host] = self.giving_way.get(victim.host, 0) + 1
            victim.close(why)

    def _proven(self, entry: Unproven) -> None:
        """``entry`` leaves the unproven budget (it proved a key, gave way or ended)."""
        entries = self.unproven.get(entry.host)
        if entries is None or entry not in entries:
            return
        entries.remove(entry)
        if not entries:
            del self.unproven[entry.host]
        self.unproven_count -= 1

    async def _handle_tcp_counted(self, stream: trio.SocketStream, peer: Peer,
                                  entry: Unproven | None, refuse: str = "") -> None:
        if self.tls is None:
            await self._handle(stream, peer, gated=True, unproven=entry, refuse=refuse,
                               reject=bool(refuse))
            return
        addr = peer.address
        tls = trio.SSLStream(stream, self.tls, server_side=True)
        try:
            self.handshaking += 1
            try:
                with trio.fail_after(self.budget.handshake_timeout):
                    await tls.do_handshake()
            finally:
                self.handshaking -= 1
        except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError,
                ssl.SSLError, OSError) as exc:
            log.debug("TLS handshake with %s failed: %s", addr, exc)
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)
            return
        await self._handle(tls, peer, gated=True, unproven=entry, refuse=refuse,
                           reject=bool(refuse))

    def _check_http(self, request: WebSocketRequest, peer: Peer) -> str | None:
        """Origin and Host checks for TCP (trio-websocket does none)."""
        if peer.transport != "tcp":
            return None
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in request.headers}
        origin = headers.get("origin")
        if origin is not None and origin not in self.allowed_origins:
            return f"origin {_cut(origin)!r} is not allowed"
        # wsproto keeps Host out of extra_headers: read it from the request event.
        event = getattr(request, "_event", None)
        host = str(getattr(event, "host", "") or headers.get("host", ""))
        hostname = urlsplit("//" + host).hostname or ""
        allowed = {"localhost", "127.0.0.1", "::1", *self.server_names}
        allowed.update(h.rpartition(":")[0].strip("[]") for h in self.listen)
        if hostname not in allowed:
            return f"host {_cut(host)!r} is not one this daemon listens on"
        return None

    async def _handle(self, stream: trio.abc.Stream, peer: Peer, refuse: str = "",
                      gated: bool = False, unproven: Unproven | None = None,
                      reject: bool = False) -> None:
        """Serve one connection. ``gated``: its handshake counts against the cap on
        connections in handshake (TCP, and Unix peers being refused); ``refuse``: close
        it with 1013 and this reason once the handshake is done (``reject``: answer the
        WebSocket handshake with HTTP 503 and the reason instead)."""
        self.connections_total += 1
        try:
            async with trio.open_nursery() as nursery:
                self.handshaking += gated
                try:
                    with trio.fail_after(self.budget.handshake_timeout):
                        request = await wrap_server_stream(
                            nursery, stream,
                            max_message_size=max(4 * self.max_request_bytes, 1 << 20),
                            message_queue_size=4,
                        )
                except (trio.TooSlowError, ConnectionClosed, trio_websocket.HandshakeError,
                        trio.BrokenResourceError, trio.ClosedResourceError):
                    nursery.cancel_scope.cancel()
                    return
                finally:
                    self.handshaking -= gated
                problem = self._check_http(request, peer)
                if refuse and reject:
                    with trio.move_on_after(2):
                        await request.reject(503, body=refuse.encode())
                    nursery.cancel_scope.cancel()
                    return
                if problem:
                    # Counted and logged like any refusal (rate-limited, cut short); the
                    # answer echoes nothing the peer sent.
                    self.refusals.refuse(peer.describe(), "handshake", problem)
                    with trio.move_on_after(2):
                        await request.reject(403, body=b"forbidden: Origin or Host not "
                                                       b"allowed\n")
                    nursery.cancel_scope.cancel()
                    return
                with trio.move_on_after(5) as cs:
                    ws = await request.accept()
                if cs.cancelled_caught:
                    nursery.cancel_scope.cancel()
                    return
                if refuse:
                    with trio.move_on_after(2):
                        await ws.aclose(TRY_AGAIN, refuse)
                    nursery.cancel_scope.cancel()
                    return
                client = Client(self, ws, stream, peer)
                if unproven is not None and unproven in self.unproven.get(unproven.host, ()):
                    client.unproven = unproven
                    unproven.client = client
                self.clients.add(client)
                try:
                    await self._serve_client(client)
                finally:
                    self.clients.discard(client)
                    self._replayed_sent(client, client.replay_bytes)
                    if client.replayed_total >= 1 << 20:
                        self.trim_wanted.set()
                    if not self.clients:
                        self._idle.set()
                    if client.subscription is not None:
                        client.subscription.close()
                nursery.cancel_scope.cancel()
        except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionClosed):
            pass
        except Exception as exc:  # noqa: BLE001 - a client must never take the daemon down
            if _disconnected(exc):
                # A client gone mid-handshake (or mid-accept): routine, whoever it was.
                log.debug("%s left during the handshake", peer.describe())
            # Out of descriptors, every connection may fail so: rate-limited.
            elif self.serve_failures.allow():
                log.exception("unexpected error serving %s", peer.describe())
        finally:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)

    async def _serve_client(self, client: Client) -> None:
        async with trio.open_nursery() as nursery:
            sender_done = trio.Event()

            async def sender() -> None:
                try:
                    await self._sender(client)
                finally:
                    sender_done.set()

            nursery.start_soon(sender)
            nursery.start_soon(self._reader, client, nursery)
            await client.closing.wait()
            # Stop reading; let the sender finish what it is sending (or drain, when
            # the daemon is going away), bounded by send_timeout.
            client.send.close()
            with trio.move_on_after(self.send_timeout):
                await sender_done.wait()
            nursery.cancel_scope.cancel()
        if client.close_code == POLICY:
            self.dropped_total += 1
        if not client.send_broken and client.ws.closed is None:
            with trio.move_on_after(2):
                await client.ws.aclose(client.close_code or 1000, client.close_reason or None)

    async def _sender(self, client: Client) -> None:
        recv = client.recv
        ws = client.ws
        while True:
            try:
                first = await recv.receive()
            except (trio.EndOfChannel, trio.ClosedResourceError):
                return
            frames = [first]
            size = len(first)
            while len(frames) < COALESCE and size < COALESCE_BYTES:
                try:
                    frames.append(recv.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                    break
                size += len(frames[-1])
            draining = client.closing.is_set() and client.close_code == GOING_AWAY
            if client.closing.is_set() and not draining:
                return
            with trio.move_on_after(self.send_timeout) as cs:
                try:
                    await ws.send_message("\n".join(frames))
                except ConnectionClosed:
                    client.send_broken = True
                    client.drop(1000, "")
                    return
            if cs.cancelled_caught:
                client.send_broken = True
                client.drop(POLICY, f"slow consumer: a send took over {self.send_timeout:g} s")
                return
            client.frames_sent += len(frames)
            client.queued_bytes -= size
            # Replayed frames are queued before any live one: the first bytes sent
            # are the journal's copies.
            self._replayed_sent(client, min(client.replay_bytes, size))

    async def _reader(self, client: Client, nursery: trio.Nursery) -> None:
        ws = client.ws
        while True:
            idle = self.budget.idle_timeout
            if client.peer.transport != "tcp" or client.subscription is not None:
                idle = math.inf
            unproven = client.unproven
            if unproven is not None:
                # Whatever it sends: from accept, not from its last message.
                left = unproven.since + self.budget.auth_timeout - trio.current_time()
                idle = min(idle, max(left, 0))
            with trio.move_on_after(idle) as cs:
                try:
                    message = await ws.get_message()
                except ConnectionClosed:
                    client.drop(1000, "")
                    return
            if cs.cancelled_caught:
                if client.unproven is not None:
                    self.unproven_closed += 1
                    self.refusals.refuse(client.peer.describe(), "connect",
                                         "no key proved in time")
                    client.drop(POLICY, f"no signed request within {self.budget.auth_timeout:g}"
                                        " s of connecting (auth_timeout)", quiet=True)
                else:
                    client.drop(1000, f"idle for {idle:g} s (not subscribed)")
                return
            if client.unproven is not None:
                client.unproven.requests += 1
                if client.unproven.requests > UNPROVEN_REQUESTS:
                    self.unproven_closed += 1
                    self.refusals.refuse(client.peer.describe(), "request",
                                         "too many requests before proving a key")
                    client.drop(POLICY, f"at most {UNPROVEN_REQUESTS} requests before one "
                                        "signed by a key (hello, then sign)", quiet=True)
                    return
            await self._dispatch(client, message, nursery)

    async def _dispatch(self, client: Client, message: str | bytes,
                        nursery: trio.Nursery | None) -> None:
        """Parse one request, check its signature and role, run its handler; the answer
        goes on the client's queue. ``nursery`` None: no subscription (request/reply)."""
        try:
            req = parse_request(message, self.max_request_bytes)
        except RequestError as exc:
            client.respond_error(exc.req_id, exc.nonce, exc.code, exc.message)
            return
        handler = self.handlers.get(req.method)
        if handler is None:
            client.respond_error(
                req.id, req.nonce, "unknown_method",
                f"unknown method {req.method[:64]!r} "
                f"(known: {', '.join(sorted(self.handlers))})",
            )
            return
        try:
            req = self._admit(client, req)
        except RequestError as exc:
            client.respond_error(req.id, req.nonce, exc.code, exc.message)
            return
        if req.method == "subscribe":
            if nursery is None:
                client.respond_error(req.id, req.nonce, "invalid",
                                     "subscribe needs a connection (the fleet reads JetStream)")
                return
            nursery.start_soon(self._run_handler, client, req, handler)
        else:
            await self._run_handler(client, req, handler)

    async def answer(self, message: str, address: str) -> str:
        """Serve one request that came by request/reply (NATS), not by a connection.

        The peer counts as a TCP client at ``address``: the request goes through the very
        checks a TCP client's does (:meth:`_dispatch`: parsing, signature, daemon id,
        freshness, nonce, role; then the handler's own, e.g. an approval's mission and
        plan). Returns the signed response frame, or "" when there is none.
        """
        client = Client(self, cast(Any, None), cast(Any, None), Peer("tcp", address=address))
        try:
            await self._dispatch(client, message, None)
        finally:
            client.send.close()
        try:
            return client.recv.receive_nowait()
        except (trio.WouldBlock, trio.EndOfChannel):
            return ""

    def _admit(self, client: Client, req: Request) -> Request:
        """Check a request's signature, if any, and the role its method needs over TCP.

        Returns the request with the signer's ``kid`` and ``role`` set. A refusal is
        counted and logged (rate-limited), never journaled: the peer is unknown.
        """
        peer = client.peer
        if req.auth is not None:
            try:
                kid, role = self.authenticator.verify(req)
            except AuthError as exc:
                self.refusals.refuse(peer.describe(), req.method, str(exc))
                raise RequestError("not_authorised", str(exc)) from None
            req = dataclasses.replace(req, kid=kid, role=role)
            if client.unproven is not None:
                # A key is proved: the connection leaves the unproven budget.
                self._proven(client.unproven)
                client.unproven.scope.deadline = math.inf
                client.unproven = None
        need = self.roles.get(req.method, CONTROL)
        if peer.transport == "tcp" and RANK[req.role] < RANK[need]:
            if req.kid is None:
                reason = (f"over TCP, {req.method} must be signed by a key with the {need} "
                          "role ([remediation] read_keys or control_keys; see gracectl keys "
                          "generate)")
            else:
                reason = f"key {req.kid} has the {req.role} role; {req.method} needs {need}"
            self.refusals.refuse(peer.describe(), req.method, reason)
            raise RequestError("not_authorised", reason)
        return req

    async def _run_handler(self, client: Client, req: Request, handler: Handler) -> None:
        try:
            result = await handler(client, req)
        except RequestError as exc:
            client.respond_error(req.id, req.nonce, exc.code, exc.message)
        except Exception as exc:  # noqa: BLE001
            # A bug a client can trigger at will must not fill the log: a traceback at
            # most LOG_BURST times a LOG_PERIOD, then one count of the rest.
            if self.handler_failures.allow():
                log.exception("handler %s failed", req.method)
            client.respond_error(req.id, req.nonce, "internal", f"internal error: {exc}")
        else:
            if result is not _NO_REPLY:
                client.respond(req.id, req.nonce, result)

    # -- subscribe ---------------------------------------------------------------

    async def subscribe(self, client: Client, req: Request) -> Any:
        """Replay from the journal from ``since``, then continue live: no gap, no duplicate."""
        if client.subscription is not None:
            raise RequestError("invalid", "already subscribed on this connection")
        patterns = req.params.get("patterns", ["*"])
        if patterns is None:
            patterns = ["*"]
        if (
            not isinstance(patterns, list)
            or len(patterns) > MAX_PATTERNS
            or not all(isinstance(p, str) and 0 < len(p) <= MAX_PATTERN_LEN for p in patterns)
        ):
            raise RequestError(
                "bad_request",
                f"params.patterns must be a list of at most {MAX_PATTERNS} non-empty strings",
            )
        since = req.params.get("since")
        if since is not None and (
            not isinstance(since, int) or isinstance(since, bool) or since < 1 or since > 2**62
        ):
            raise RequestError("bad_request", "params.since must be a positive integer or null")
        first = self.mesh.journal.first_seq
        if since is not None and since < first:
            raise RequestError("pruned", f"events before seq {first} were pruned (journal "
                                         f"retention); the oldest kept is seq {first}")
        match = compile_patterns(patterns)
        if client.peer.transport == "tcp":
            client.sub_kid = req.kid  # a reload that revokes it closes this stream
        head = self.mesh.delivered_seq
        client.respond(req.id, req.nonce, {"head_seq": head, "since": since,
                                            "patterns": patterns})
        if since is not None:
            self.replaying[client] = since  # before any wait: retention sees it
            try:
                await self._replay(client, since, match)
            finally:
                del self.replaying[client]
            if client.closing.is_set():
                return _NO_REPLY
        # No checkpoint between reading delivered_seq in _replay and registering:
        # every later event reaches this subscription, every earlier one was replayed.
        client.subscription = self.mesh.subscribe(patterns, client.deliver)
        return _NO_REPLY

    def _replayed_sent(self, client: Client, size: int) -> None:
        """``size`` bytes of ``client``'s journal copies are sent (or dropped with it)."""
        if size <= 0:
            return
        client.replay_bytes -= size
        self.replay_bytes -= size
        self._replay_room.set()
        self._replay_room = trio.Event()

    async def _room_to_replay(self, client: Client) -> int:
        """Wait until ``client`` may read more of the journal; returns how many bytes
        (0: it is closing). See REPLAY_BYTES."""
        while not client.closing.is_set():
            room = min(REPLAY_SHARE - client.replay_bytes, REPLAY_BYTES - self.replay_bytes,
                       self.client_queue_bytes // 2 - client.queued_bytes)
            if room > 0:
                return room
            await self._replay_room.wait()
        return 0

    async def _replay(self, client: Client, since: int, match: Callable[[str], bool]) -> None:
        """Send events ``since..delivered_seq``, waiting on the client's queue as it drains.

        Returns with nothing left to replay and no checkpoint since the last check, so
        the caller can register the live subscription without a gap.
        """
        nxt = since
        try:
            while nxt <= self.mesh.delivered_seq and not client.closing.is_set():
                recent = self.mesh.recent(nxt)
                stats = client.send.statistics()
                room = stats.max_buffer_size - stats.current_buffer_used
                if recent is not None and len(recent) <= room // 2:
                    # The rest fits: queue it without yielding, so no event slips in.
                    for ev in recent:
                        if match(ev.topic) and not client.queue(ev.text):
                            return
                    return
                if recent is not None:
                    texts = [ev.text for ev in recent[:REPLAY_CHUNK] if match(ev.topic)]
                    count = min(len(recent), REPLAY_CHUNK)
                else:
                    room = await self._room_to_replay(client)
                    if not room:
                        return
                    # Reserved before the read, so replays reading at once share the room.
                    client.replay_bytes += room
                    self.replay_bytes += room
                    try:
                        async with self._journal_reads:  # a few read connections at once
                            bodies = await trio.to_thread.run_sync(
                                _read_journal, self.journal_path, nxt,
                                self.mesh.delivered_seq, room)
                    finally:
                        self._replayed_sent(client, room)  # the reservation ends
                    if not bodies:
                        raise RequestError("internal", f"journal has no event {nxt}")
                    texts = [b for b in bodies if _topic_ok(b, match)]
                    count = len(bodies)
                    del bodies
                    copied = sum(len(t) for t in texts)
                    client.replay_bytes += copied
                    client.replayed_total += copied
                    self.replay_bytes += copied
                for text in texts:
                    await client.send.send(text)
                    client.queued_bytes += len(text)
                del texts
                nxt += count
                self.replaying[client] = nxt
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            return
        finally:
            if client.replayed_total >= 1 << 20:
                self.trim_wanted.set()  # copies freed: hand the memory back soon

    def revoke(self) -> int:
        """Close every TCP stream whose key no longer holds the read role (after a
        reload took it out of the config); returns how many were closed. A request
        on a connection that is not subscribed is checked against the keys anyway."""
        closed = 0
        for client in list(self.clients):
            kid = client.sub_kid
            if kid is None or client.closing.is_set():
                continue
            role = self.authenticator.roles.get(kid)
            if RANK[role] < RANK[self.roles.get("subscribe", CONTROL)]:
                client.drop(CLOSE_REVOKED, f"key {kid} no longer has the read role "
                                    "(the config was reloaded)")
                closed += 1
        return closed

    async def trim_due(self) -> None:
        """Until a replay that read from the journal has ended (its copies are freed)."""
        await self.trim_wanted.wait()
        self.trim_wanted = trio.Event()

    def oldest_replay(self) -> int | None:
        """The lowest seq a replay in progress has still to send (None: no replay)."""
        return min(self.replaying.values(), default=None)

    # -- shutdown ----------------------------------------------------------------

    async def wait_all_closed(self) -> None:
        """Block until no client is connected."""
        while self.clients:
            self._idle = trio.Event()
            await self._idle.wait()

    def going_away(self, reason: str) -> None:
        self._listen_scope.cancel()
        for client in list(self.clients):
            client.drop(GOING_AWAY, reason)

    def status(self) -> dict[str, Any]:
        return {
            "clients": len(self.clients),
            "subscribers": self.mesh.subscriber_count,
            "connections_total": self.connections_total,
            "refused_total": self.refused_total,
            "dropped_total": self.dropped_total,
            "refused_requests": self.refusals.total,
            "unix_clients": self.unix_clients,
            "tcp_clients": self.tcp_clients,
            "handshaking": self.handshaking,
            "unauthenticated": self.unproven_count,
            "unauthenticated_closed": self.unproven_closed,
            "giving_way": sum(self.giving_way.values()),
            "socket": str(self.socket_path),
            "tcp_ports": self.tcp_ports,
        }


_NO_REPLY = object()


def _read_journal(path: Path, first: int, last: int, max_bytes: int) -> list[str]:
    """Events ``first..last`` (at most REPLAY_CHUNK, about ``max_bytes``) on a read
    connection of its own, closed at once: an idle one would keep its page cache."""
    reader = JournalReader(path)
    try:
        return reader.read(first, last, REPLAY_CHUNK, max_bytes)
    finally:
        reader.close()


def _first_to_go(entries: list[Unproven]) -> Unproven:
    """Which of one address's unproven connections (oldest first) gives way: the oldest
    still in its handshake after :data:`STALE_HANDSHAKE` s, else the oldest. A client
    finishes its handshake in milliseconds: connections stalled in theirs go first, before
    one that is through it (or just starting it) and racing to prove its key."""
    now = trio.current_time()
    for entry in entries:
        if entry.client is None and now - entry.since > STALE_HANDSHAKE:
            return entry
    return entries[0]


def _count_down(counts: dict[Any, int], key: Any) -> None:
    """One less for ``key``; a count that reaches 0 leaves ``counts``."""
    left = counts[key] - 1
    if left:
        counts[key] = left
    else:
        del counts[key]


def _cut(value: str, limit: int = 100) -> str:
    """A header's value, cut short for a log line."""
    return value if len(value) <= limit else value[:limit] + "…"


def _topic_ok(body: str, match: Callable[[str], bool]) -> bool:
    try:
        return match(json.loads(body)["topic"])
    except (ValueError, KeyError, TypeError):
        return False

