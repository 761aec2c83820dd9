"""``gracectl fleet``: every host's events, missions and approvals, through NATS JetStream.

The fleet view reads the stream each graced forwards to (``grace.<daemon-id>.<topic>``)
and verifies each host's chain against the key pinned for that host
(:mod:`gracectl.fleetview`); an approval is a signed request sent to that host's graced
by NATS request/reply (``grace-rpc.<daemon-id>``), checked there as a TCP client's is,
and its signed answer is checked here against the host's pinned key
(:class:`gracectl.client.Connection`, as over a WebSocket).

nats-py is asyncio only: it runs on an event loop in a thread of its own
(:class:`Nats`); the trio side (the approval's :class:`~gracectl.client.Connection`)
waits for it in a worker thread.
"""

from __future__ import annotations

import asyncio
import base64
import json
import shlex
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import click
import trio
from trio_websocket import CloseReason, ConnectionClosed

from graced.errors import install_extra
from graced.protocol import ExitCode, Violation, key_id, parse_event_line
from graced.protocol import fleet as names
from graced.protocol.times import epoch
from graced.protocol.topics import compile_patterns

from . import out, trust
from .client import Connection, decide, sole_exception
from .command import Finite, read_key_file, utc_option, wide_option
from .errors import CtlError, NotFound, Unreachable
from .fleetview import (
    PERSON_STATES,
    SEVERITY_RANK,
    FleetView,
    HostView,
    dumps,
    event_time,
    in_view,
    resolve_host,
)
from .tail import format_event

T = TypeVar("T")


class Nats:
    """One NATS connection on an asyncio loop in its own thread."""

    def __init__(self, url: str, creds: str | None, timeout: float) -> None:
        self.url, self.creds, self.timeout = url, creds, timeout
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.nc: Any = None
        self.js: Any = None

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop; blocks this thread until it is done."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def connect(self) -> None:
        try:
            import nats
        except ImportError:
            raise CtlError("gracectl fleet needs nats-py: "
                           + install_extra("fleet", "gracectl")) from None

        async def quiet(*_: Any) -> None:
            """nats-py prints a traceback per failed attempt by default; gracectl says
            one line (below)."""

        async def go() -> None:
            opts: dict[str, Any] = {"servers": [u.strip() for u in self.url.split(",")],
                                    "connect_timeout": self.timeout, "allow_reconnect": False,
                                    "max_reconnect_attempts": 1, "reconnect_time_wait": 0.2,
                                    "name": "gracectl fleet",
                                    "error_cb": quiet, "disconnected_cb": quiet,
                                    "closed_cb": quiet}
            if self.creds:
                opts["user_credentials"] = self.creds
            self.nc = await nats.connect(**opts)
            self.js = self.nc.jetstream(timeout=self.timeout)

        try:
            self.run(go())
        except Exception as exc:  # noqa: BLE001 - nats-py raises many kinds
            raise Unreachable(f"cannot reach NATS at {_redact(self.url)}: "
                              f"{type(exc).__name__}: {exc}") from None

    def close(self) -> None:
        if self.nc is not None:
            try:
                self.run(self.nc.close())
            except Exception:  # noqa: BLE001 - closing anyway
                pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(2)

    def read(self, stream: str, subject: str, on_message: Callable[[str, bytes], None],
             follow: bool, on_idle: Callable[[], None] | None = None) -> int:
        """Feed every message of ``stream`` on ``subject`` to ``on_message`` (on this
        loop's thread), from the first, each once and in stream order, by an ordered
        consumer; with ``follow``, then live (``on_idle`` is called whenever it has
        caught up) until interrupted. Without ``follow`` it ends once the consumer has
        nothing left and its server has reached the stream's last seq as its leader
        gave it when the read began (a replica may lag the leader).

        A read that times out inside NATS (a JetStream request not answered, or no
        message while some are left: a cluster electing a leader after losing a node,
        the node that held the consumer gone, a stalled server) is tried again, the
        read resuming with a new consumer after the last message taken, up to
        :data:`READ_ATTEMPTS` times in a row (anything received starts the count
        again); then :class:`Unreachable` (exit 3)."""

        async def go() -> int:
            from nats.js.errors import NotFoundError

            patience = _Patience(f"reading stream {stream}", self.timeout)
            try:
                stream_info = await patience.call(lambda: self.js.stream_info(stream))
            except NotFoundError:
                raise CtlError(f"no stream {stream} on NATS at {_redact(self.url)} (no graced "
                               "has forwarded to it yet)", ExitCode.NOT_FOUND) from None
            replicas = consumer_replicas(stream_info)
            end = stream_info.state.last_seq or 0  # the stream's last seq, by its leader
            count = left = 0
            after = 0  # the stream seq of the last message taken
            while True:
                def consumer(start: int = after + 1) -> Coroutine[Any, Any, Any]:
                    nonlocal replicas
                    made = _ordered(self.nc, self.js, stream, subject, start, replicas)
                    # Any try after this one follows a timeout: its consumer may have been
                    # placed on a peer that is gone. From then on, replicated as the stream.
                    replicas = stream_replicas(stream_info)
                    return made

                sub = await patience.call(consumer)
                try:
                    # Without follow, read until nothing matching is left: a stall is
                    # tried again, then an error, never a view cut short without a word.
                    info = await patience.call(sub.consumer_info)
                    # Some may be delivered already, waiting in the client's queue. A
                    # resumed read keeps its own count too: nats-server 2.9 may count
                    # fewer pending (by about the start seq) for a filtered consumer that
                    # starts at a seq.
                    resumed = after > 0
                    left = max(left if resumed else 0,
                               info.num_pending + (info.delivered.consumer_seq or 0))
                    last_cseq = 0  # the consumer seq of the last message taken from sub
                    while True:
                        while follow or left:
                            try:
                                msg = await sub.next_msg(
                                    timeout=0.25 if follow else self.timeout)
                            except TimeoutError:
                                if not follow:
                                    patience.timed_out(f"{left} messages left")
                                    break  # resume after the last message taken
                                if on_idle is not None:
                                    on_idle()
                                continue
                            patience.answered()
                            after = msg.metadata.sequence.stream
                            last_cseq = msg.metadata.sequence.consumer
                            on_message(msg.subject, msg.data)
                            count += 1
                            left = max(left - 1 if resumed else 0, msg.metadata.num_pending)
                            if left == 0 and on_idle is not None:
                                on_idle()
                        else:
                            # Nothing left by the consumer's count; but it counts what
                            # the server it lives on holds, and a replica may not yet
                            # have applied all the stream's leader acknowledged (a
                            # cluster just after losing a node): done once it has looked
                            # as far as the stream reached when this read began.
                            left = await _settled(sub, end, last_cseq, patience)
                            if left:
                                continue
                            return count
                        break
                except NotFoundError:
                    # The consumer NATS just made is unknown to it (a new replicated
                    # consumer with no leader yet, one a lost node held, one NATS removed
                    # as idle under load): resume after the last message taken.
                    patience.timed_out("the consumer was not found")
                finally:
                    await sub.unsubscribe()

        try:
            return self.run(go())
        except CtlError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise Unreachable(f"reading stream {stream} failed: {type(exc).__name__}: "
                              f"{exc}") from None


READ_ATTEMPTS = 3  # tries of a read that times out inside NATS, in a row


def stream_replicas(info: Any) -> int:
    """How many copies the stream keeps (1 on a single server)."""
    return max(1, int(getattr(info.config, "num_replicas", None) or 1))


def consumer_replicas(info: Any) -> int:
    """Copies of a read's consumer: 1 while every peer of the stream is current; the
    stream's own count once one is not.

    nats-py's ordered consumer is R1, and nats-server (2.9) places an R1 consumer on
    any peer of the stream it still counts as up: for a while after a node dies (killed,
    not shut down), a third of the consumers of an R3 stream land on the dead node and
    their creation is never answered (measured, session 10). A consumer replicated as
    the stream is lives wherever a quorum of the stream lives, at the cost of a raft
    group (0.2-0.8 s to create on a healthy cluster, where R1 takes milliseconds)."""
    peers = getattr(getattr(info, "cluster", None), "replicas", None) or []
    if all(p.current and not p.offline for p in peers):
        return 1
    return stream_replicas(info)


async def _ordered(nc: Any, js: Any, stream: str, subject: str, start: int,
                   replicas: int) -> Any:
    """nats-py's ordered consumer on ``subject`` from stream seq ``start`` (what
    ``js.subscribe(..., ordered_consumer=True)`` makes), with ``replicas`` copies. A
    config of its own each try: a consumer a timed-out try made may still push to the
    deliver subject of that one. Its resets after a gap keep the config (and the copies)."""
    from nats.js import api

    config = api.ConsumerConfig(
        deliver_subject=nc.new_inbox(), filter_subject=subject,
        deliver_policy=(api.DeliverPolicy.ALL if start == 1
                        else api.DeliverPolicy.BY_START_SEQUENCE),
        opt_start_seq=None if start == 1 else start,
        flow_control=True, idle_heartbeat=5.0, ack_policy=api.AckPolicy.NONE,
        max_deliver=1, ack_wait=22 * 3600, num_replicas=replicas, mem_storage=True)
    info = await js.add_consumer(stream, config=config)
    return await js.subscribe_bind(stream, config, info.name, ordered_consumer=True)


async def _settled(sub: Any, end: int, last_cseq: int, patience: _Patience) -> int:
    """How many messages are still to come to ``sub`` (on the server or in the client's
    queue, past consumer seq ``last_cseq``); 0 once its server has looked at the stream
    up to seq ``end``. A server that does not get there within the read's timeout counts
    as a timeout of ``patience``."""
    waited_from = time.monotonic()
    while True:
        info = await patience.call(sub.consumer_info, progress=False)
        left = int(info.num_pending or 0) + max(0, (info.delivered.consumer_seq or 0)
                                                - last_cseq)
        if left or (info.delivered.stream_seq or 0) >= end:
            return left
        if time.monotonic() - waited_from > patience.timeout:
            patience.timed_out(f"the server holding the consumer to reach seq {end}")
            waited_from = time.monotonic()
        await asyncio.sleep(0.05)


class _Patience:
    """Counts a read's timeouts in a row: each is said on stderr and tried again, up to
    :data:`READ_ATTEMPTS`; then :class:`Unreachable`. Anything received resets it."""

    def __init__(self, what: str, timeout: float) -> None:
        self.what, self.timeout = what, timeout
        self.failed = 0

    def answered(self) -> None:
        self.failed = 0

    def timed_out(self, why: str) -> None:
        """One more timeout (``why``: what was awaited); raises once they are too many."""
        self.failed += 1
        if self.failed >= READ_ATTEMPTS:
            raise Unreachable(f"{self.what}: NATS did not answer ({why}) within "
                              f"{self.timeout:g} s, {READ_ATTEMPTS} times in a row")
        out.echo(f"gracectl: {self.what}: NATS did not answer ({why}) within "
                 f"{self.timeout:g} s; trying again ({self.failed + 1} of {READ_ATTEMPTS})",
                 err=True)

    async def call(self, make: Callable[[], Coroutine[Any, Any, T]],
                   progress: bool = True) -> T:
        """A JetStream API request, tried again while it times out or JetStream says it
        is unavailable for now (no leader yet); its answer resets the count unless it
        is not ``progress`` (a question asked while waiting for something else)."""
        from nats.errors import NoRespondersError
        from nats.js.errors import ServiceUnavailableError

        while True:
            try:
                result = await make()
            except TimeoutError:
                self.timed_out("a JetStream request")
                continue
            except (ServiceUnavailableError, NoRespondersError) as exc:
                self.timed_out(f"JetStream unavailable: {exc}")
                await asyncio.sleep(min(self.timeout, 1.0))
                continue
            if progress:
                self.answered()
            return result


def _redact(url: str) -> str:
    from urllib.parse import urlsplit

    parts = [urlsplit(u.strip()) for u in url.split(",")]
    return ",".join(f"{p.scheme}://{p.hostname}:{p.port}" if p.password or p.username
                    else p.geturl() for p in parts)


def _keys_for(daemon_ids: list[str]) -> dict[str, bytes | None]:
    try:
        return {d: trust.pinned(f"fleet:{d}") or trust.pinned_for_daemon(d) for d in daemon_ids}
    except trust.BadPin:
        raise
    except ValueError as exc:
        raise CtlError(str(exc)) from None


class _Keys(dict[str, bytes | None]):
    """The pinned key of each daemon id, looked up when first asked."""

    def __missing__(self, daemon_id: str) -> bytes | None:
        value = _keys_for([daemon_id])[daemon_id]
        self[daemon_id] = value
        return value

    def get(self, daemon_id: str, default: Any = None) -> Any:  # type: ignore[override]
        return self[daemon_id]


def _load(ctx: click.Context, subject: str) -> tuple[FleetView, Nats]:
    return _load_from(ctx.find_object(dict) or {}, subject)


def _load_from(obj: dict[str, Any], subject: str) -> tuple[FleetView, Nats]:
    """The fleet view of every message on ``subject``, settled, and the connection."""
    nats = Nats(obj["nats"], obj.get("creds"), obj["timeout"])
    nats.connect()
    view = FleetView(_Keys())
    try:
        nats.read(obj["stream"], subject, view.add, follow=False)
    except BaseException:
        nats.close()
        raise
    view.settle()
    view.finish()
    return view, nats


def _view(ctx: click.Context, subject: str = names.host_filter()) -> FleetView:
    view, nats = _load(ctx, subject)
    nats.close()
    return view


def _find_hosts(ctx: click.Context, given: tuple[str, ...]) -> list[HostView]:
    """The hosts named (daemon id, unique id prefix or host name), by their daemon.*
    events (daemon.started and every heartbeat carry the name; for a host whose key is
    pinned, only those that verify: an injected event must not lend a host another's
    name); NotFound (exit 5) for a name that is no host's or names several, listing
    them."""
    view, nats = _load(ctx, names.host_filter(topic="daemon.>"))
    nats.close()
    # A whole daemon id is that host, even with no daemon.* event held.
    exact = {h: HostView(h) for h in given
             if h not in view.hosts and names.daemon_of(names.host_filter(h, "x")) == h}
    try:
        return [exact.get(h) or resolve_host(view.hosts, h) for h in given]
    except LookupError as exc:
        raise NotFound(str(exc)) from None


@click.group("fleet")
@click.option("--nats", "nats_url", metavar="nats://HOST:PORT", envvar="GRACE_NATS",
              required=True, help="The NATS servers graced forwards to (env GRACE_NATS; "
                                  "several: commas).")
@click.option("--stream", default=names.DEFAULT_STREAM, show_default=True, metavar="NAME",
              envvar="GRACE_STREAM",
              help="The JetStream stream ([fleet] stream; env GRACE_STREAM).")
@click.option("--creds", metavar="FILE", type=click.Path(dir_okay=False),
              envvar="GRACE_NATS_CREDS", help="A NATS credentials file (env GRACE_NATS_CREDS).")
@click.option("--timeout", type=Finite(0.1), default=5.0, show_default=True,
              metavar="SECONDS",
              help="How long to wait for NATS and for a host's answer; a read of the "
                   "stream that times out is tried again, up to 3 timeouts in a row.")
@click.pass_context
def fleet(ctx: click.Context, nats_url: str, stream: str, creds: str | None,
          timeout: float) -> None:
    """Every host that forwards to NATS JetStream: hosts, missions, events, approvals.

    Each host's events are verified against the key pinned for it (gracectl keys trust
    on that host, or gracectl fleet trust HOST). Exit 3 when NATS cannot be reached.
    """
    if not nats_url.startswith(("nats://", "tls://")):
        raise click.UsageError(f"--nats must start nats:// or tls://, not {nats_url[:40]!r}")
    ctx.obj = {**(ctx.obj or {}), "nats": nats_url, "stream": stream, "creds": creds,
               "timeout": timeout}


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.0f}h ago"


@fleet.command("ls")
@wide_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout (for scripts).")
@click.pass_context
def fleet_ls(ctx: click.Context, as_json: bool) -> None:
    """The hosts: name, daemon id, last heartbeat, open missions by severity (and the
    escalated or expired ones that need a person, as the host's status counts them),
    forwarding lag, verification status. Exits 11 (or the violation's code) when the stream of a
    host whose key is pinned fails verification, 10 when a forged message on its
    subjects was rejected (a host with no key pinned is shown as unverified, or failed,
    but sets no exit code: anyone on NATS can make one up)."""
    view = _view(ctx)
    now = time.time()
    hosts = sorted(view.hosts.values(), key=lambda h: (h.host, h.daemon_id))
    if as_json:
        click.echo(dumps({"hosts": [h.public(now) for h in hosts], "foreign": view.foreign}))
    else:
        out.echo(hosts_table(hosts, now))
        if view.foreign:
            out.echo(f"{view.foreign} messages on subjects that name no daemon", err=True)
    _exit_for(hosts, pinned_only=True)


HOST_COLUMNS = [
    out.Column("host", 2, 8), out.Column("daemon id", 1, 9), out.Column("state"),
    out.Column("heartbeat"), out.Column("open missions", 1, 13), out.Column("lag", right=True),
    out.Column("seq", right=True), out.Column("verified", 1, 24, spill=True)]


def hosts_table(hosts: list[HostView], now: float, width: int | None = -1) -> str:
    """``fleet ls`` as text, fitted to the terminal as the local tables are (cut with …,
    the daemon id down to a prefix, the verification on its own line; --wide: whole)."""
    rows = []
    for h in hosts:
        # Most severe first, as status counts them ("2 high, 1 medium").
        counts = h.open_missions()
        missions = ", ".join(f"{counts[sev]} {sev}" for sev in sorted(
            counts, key=lambda sev: (SEVERITY_RANK.get(sev, 9), sev)))
        for state in PERSON_STATES:  # as status: "; 1 escalated", "; 1 expired"
            if h.waiting(state):
                missions += f"{'; ' if missions else ''}{len(h.waiting(state))} {state}"
        verified = h.verified + (f"; {h.rejected_note}" if h.rejection else "")
        rows.append([h.host, h.daemon_id, h.state(now), _age(h.silent_for(now)),
                     missions or "-", "-" if h.fleet_lag is None else h.fleet_lag,
                     h.last_seq, verified])
    return out.table(rows, HOST_COLUMNS, width)


MISSION_COLUMNS = [
    out.Column("host", 2, 8), out.Column("daemon", 0, 8), out.Column("id", right=True),
    out.Column("severity"), out.Column("state", 1, 9), out.Column("detector", 2, 6),
    out.Column("subject", 3, 6, keep_end=True), out.Column("opened"),
    out.Column("reason", 1, 24, spill=True)]


def missions_table(rows: list[dict[str, Any]], now: float, width: int | None = -1) -> str:
    """``fleet missions ls`` as text: as ``missions ls``, with the host and the first 8
    digits of its daemon id (hosts may share a name)."""
    return out.table([[r["host"] if r["verified"] else f"{r['host']} UNVERIFIED",
                       str(r["daemon_id"])[:8], r["id"], r.get("severity"), r.get("state"),
                       r.get("detector"), r.get("subject"),
                       _age(now - (epoch(r.get("opened_at")) or now)),
                       out.reason(str(r.get("summary") or ""), str(r.get("detector") or ""),
                                  str(r.get("subject") or ""))] for r in rows],
                     MISSION_COLUMNS, width)


def _exit_for(hosts: list[HostView], pinned_only: bool = False) -> None:
    for h in hosts:
        if pinned_only and h.key is None:
            continue
        if h.violation is not None:
            raise CtlError(f"host {h.host} ({h.daemon_id}): verification failed at seq "
                           f"{h.violation.seq}: {h.violation}", h.violation.code)
    for h in hosts:
        if (not pinned_only or h.key is not None) and h.rejection is not None:
            raise CtlError(f"host {h.host} ({h.daemon_id}): {h.rejected_note}",
                           h.rejection.code)


@fleet.group("missions")
def fleet_missions() -> None:
    """Missions across the fleet."""


@fleet_missions.command("ls")
@click.option("--host", "hosts", multiple=True, metavar="HOST",
              help="Only this host (name, daemon id or its prefix); repeatable.")
@click.option("--state", "states", multiple=True, metavar="STATE",
              help="Only missions in this state; repeatable (default: as the host's missions "
                   "ls, the active ones and the escalated or expired ones that need a "
                   "person).")
@click.option("--all", "show_all", is_flag=True, help="Closed missions too.")
@click.option("--unverified", "show_unverified", is_flag=True,
              help="Also the missions of hosts with no key pinned (marked UNVERIFIED: "
                   "anyone on NATS can publish them).")
@wide_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout (for scripts).")
@click.pass_context
def fleet_missions_ls(ctx: click.Context, hosts: tuple[str, ...], states: tuple[str, ...],
                      show_all: bool, show_unverified: bool, as_json: bool) -> None:
    """Each host's missions as its verified mission.* events last showed them, host by
    host, newest first (as missions ls there); by default those the host's missions ls
    lists (active, or escalated or expired and needing a person: its symptom not seen
    normal since, "needs_person" in JSON). Hosts with no key pinned are left out unless
    --unverified (then marked); in JSON each mission has "verified" (true: from events
    verified against the host's pinned key). Exits 11 (or the violation's code) when the
    stream of a host whose key is pinned fails verification."""
    view = _view(ctx)
    chosen = list(view.hosts.values())
    if hosts:
        try:
            chosen = [resolve_host(view.hosts, h) for h in hosts]
        except LookupError as exc:
            raise NotFound(str(exc)) from None
    rows: list[dict[str, Any]] = []
    for h in chosen:
        if h.key is None and not show_unverified:
            continue
        for m in h.missions.values():
            if states and m.get("state") not in states:
                continue
            if not states and not show_all and not in_view(m):
                continue
            rows.append({**m, "host": h.host, "daemon_id": h.daemon_id,
                         "verified": h.key is not None})
    # Host by host, each newest first, as missions ls lists them there.
    rows.sort(key=lambda r: (r["host"], r["daemon_id"], -r["id"]))
    if as_json:
        click.echo(dumps(rows))
    else:
        out.echo(missions_table(rows, time.time()))
        hidden = sum(1 for h in chosen if h.key is None and h.missions)
        if hidden and not show_unverified:
            out.echo(f"{hidden} hosts with no key pinned left out (--unverified shows them)",
                     err=True)
    _exit_for(chosen, pinned_only=True)


@fleet_missions.command("show")
@click.argument("host_name", metavar="HOST")
@click.argument("mission_id", metavar="ID", type=int)
@utc_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout (for scripts).")
@click.pass_context
def fleet_missions_show(ctx: click.Context, host_name: str, mission_id: int,
                        as_json: bool) -> None:
    """Mission ID on HOST as missions show shows it there (the plan it waits with, each
    step's argv whole): asked of that host's graced by NATS, a request signed with your
    key, its answer signed by the key pinned for HOST."""
    from .missions import mission_text

    host, result = _on_host(ctx, host_name, lambda conn: conn.request(
        "missions.get", {"id": mission_id}))
    if as_json:
        click.echo(dumps({"host": host.host, "daemon_id": host.daemon_id,
                          **result["mission"]}))
        return
    out.echo(f"host {out.safe(host.host)} ({host.daemon_id})")
    # Approved from here as fleet approve HOST ID (HOST as it was named: it found one host).
    out.echo(mission_text(result, f"gracectl fleet approve {shlex.quote(host_name)}"))


@fleet.command("tail")
@click.argument("patterns", nargs=-1, metavar="[PATTERN]...")
@click.option("--host", "hosts", multiple=True, metavar="HOST",
              help="Only this host (name, daemon id or its prefix); repeatable.")
@click.option("--verify", is_flag=True,
              help="Verify each host's chain against its pinned key; report a violation "
                   "per host (a host without a pinned key fails).")
@click.option("--no-follow", is_flag=True, help="Stop at the end of the stream.")
@utc_option
@click.option("--json", "as_json", is_flag=True,
              help="Print each event in its exact signed form (JSONL).")
@click.pass_context
def fleet_tail(ctx: click.Context, patterns: tuple[str, ...], hosts: tuple[str, ...],
               verify: bool, no_follow: bool, as_json: bool) -> None:
    """Every host's events, oldest first (each line starts with the host); with
    --verify, a violation is reported on stderr for its host and that host's events
    stop there while the others go on. Exits with the code of the first host that
    failed (10 to 13), else 0."""
    obj = ctx.find_object(dict) or {}
    match = compile_patterns(patterns)
    keys = _Keys()
    view = FleetView(keys if verify else _NoKeys(), require_keys=verify)
    reported: set[str] = set()
    rejected: set[str] = set()
    wanted = {h.daemon_id for h in _find_hosts(ctx, hosts)} if hosts else set()

    def take(subject: str, data: bytes) -> None:
        if wanted and names.daemon_of(subject) not in wanted:
            return
        view.add(subject, data)
        if len(view.hosts) and sum(len(h.pending) for h in view.hosts.values()) > 4096:
            show()

    def show() -> None:
        # The hosts merged, oldest first (each host's events come in seq order; a stable
        # sort by time keeps that order where two share a time).
        settled = sorted(view.settle(hold=0.0 if no_follow else 2.0),
                         key=lambda item: event_time(item[1]))
        for host, event in settled:
            if not match(event["topic"]):
                continue
            if as_json:
                click.echo(json.dumps(event, separators=(",", ":")))  # ASCII: no raw controls
            else:
                out.echo(f"{host.host[:20]:<20} {format_event(event)}")
        sys.stdout.flush()
        report()

    def report() -> None:
        for h in view.hosts.values():
            if h.rejection is not None and h.daemon_id not in rejected:
                rejected.add(h.daemon_id)  # once: a flood of them says no more
                out.echo(f"gracectl: host {h.host} ({h.daemon_id}): injected message "
                         f"rejected: {h.rejection}", err=True)
            if h.daemon_id in reported:
                continue
            if h.violation is not None:
                reported.add(h.daemon_id)
                out.echo(f"gracectl: host {h.host} ({h.daemon_id}): verification failed at "
                         f"seq {h.violation.seq}: {h.violation}", err=True)

    nats = Nats(obj["nats"], obj.get("creds"), obj["timeout"])
    nats.connect()
    try:
        nats.read(obj["stream"], names.host_filter(), take, follow=not no_follow,
                  on_idle=show)
    except KeyboardInterrupt:
        pass
    finally:
        nats.close()
    show()
    view.finish()
    report()
    _exit_for(sorted(view.hosts.values(), key=lambda h: (h.host, h.daemon_id)))


class _NoKeys(dict[str, bytes | None]):
    def get(self, daemon_id: str, default: Any = None) -> Any:  # type: ignore[override]
        return None


@fleet.command("approve")
@click.argument("host_name", metavar="HOST")
@click.argument("mission_id", metavar="ID", type=int)
@click.option("--comment", default="", metavar="TEXT", help="Recorded with the approval.")
@click.option("--plan", "plan", metavar="SHA256",
              help="The hash of the plan you reviewed, or a prefix of at least 12 hex digits.")
@click.option("--yes", "-y", "yes", is_flag=True,
              help="Approve the plan the mission waits with now, without naming its hash.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout (for scripts).")
@click.pass_context
def fleet_approve(ctx: click.Context, host_name: str, mission_id: int, comment: str,
                  plan: str | None, yes: bool, as_json: bool) -> None:
    """Approve mission ID on HOST: a request signed with your key (gracectl keys
    generate; its line in that host's [remediation] control_keys), bound to that host's
    daemon id and to the mission, delivered by NATS request/reply and checked there as
    any signed request. The answer must be signed by the key pinned for HOST."""
    from .missions import check_plan_option, review_plan

    plan = check_plan_option(plan)
    if plan is None and not yes:
        if not (sys.stdin.isatty() and sys.stderr.isatty()):
            raise click.UsageError("without a terminal to review the plan on, name it: "
                                   "--plan SHA256 (gracectl fleet missions show HOST ID) "
                                   "or --yes")
        _, shown = _on_host(ctx, host_name, lambda conn: conn.request(
            "missions.get", {"id": mission_id}))
        plan = review_plan(shown["mission"])
    host, result = _on_host(ctx, host_name,
                            lambda conn: decide(conn, mission_id, True, comment, plan))
    m = result["mission"]
    if as_json:
        click.echo(dumps({"host": host.host, "daemon_id": host.daemon_id, **result}))
        return
    out.echo(f"gracectl: host {host.host}: mission {m['id']}: {m['state']} ({m['reason']})",
             err=True)


def _on_host(ctx: click.Context, host_name: str,
             call: Callable[[Connection], Coroutine[Any, Any, T]]) -> tuple[HostView, T]:
    """``call`` on HOST's graced by NATS request/reply, its requests signed with your
    key, its answers checked against the key pinned for HOST."""
    obj = ctx.find_object(dict) or {}
    host = _find_hosts(ctx, (host_name,))[0]
    key = _keys_for([host.daemon_id])[host.daemon_id]
    if key is None:
        raise CtlError(f"no key pinned for host {host.host} ({host.daemon_id}): gracectl "
                       "fleet trust HOST", ExitCode.BAD_SIGNATURE)
    try:
        client_key = trust.load_client_key()
    except ValueError as exc:
        raise CtlError(str(exc)) from None
    if client_key is None:
        raise CtlError("asking a host by NATS needs your signing key: gracectl keys "
                       "generate, then add its line to the host's [remediation] "
                       "control_keys")
    nats = Nats(obj["nats"], obj.get("creds"), obj["timeout"])
    nats.connect()
    try:
        async def go() -> T:
            link = _NatsLink(nats, names.rpc_subject(host.daemon_id), obj["timeout"], key)
            conn = Connection(link, key, client_key)  # type: ignore[arg-type]
            # Every request signed, bound to the id the view knows: no unsigned hello,
            # which waits behind whatever else cannot be signed (docs/fleet.md).
            conn.daemon_id = host.daemon_id
            async with trio.open_nursery() as nursery:
                nursery.start_soon(conn.reader)
                nursery.start_soon(conn.checker)
                try:
                    return await call(conn)
                finally:
                    nursery.cancel_scope.cancel()

        try:
            return host, trio.run(go)
        except BaseExceptionGroup as group:
            raise sole_exception(group) from None
    finally:
        nats.close()


RESEND_EVERY = 0.5  # seconds a request by NATS waits for its answer before it is sent again


class _NatsLink:
    """Stands in for the WebSocket under :class:`Connection`: each message sent is a
    NATS request to the host, its reply the next message received. Anyone subscribed to
    the host's subject sees the request and may answer it: the reply taken is the first
    one to the request's own inbox that is a response to it signed by the host's pinned
    key; any other is ignored until the timeout. A request not answered within
    :data:`RESEND_EVERY` is sent again, the same bytes (graced drops it under a flood
    it cannot keep up with; it serves a request it has taken once)."""

    def __init__(self, nats: Nats, subject: str, timeout: float, key: bytes) -> None:
        self.nats, self.subject, self.timeout, self.key = nats, subject, timeout, key
        self.ignored = 0
        self._send, self._recv = trio.open_memory_channel[str](4)

    def _ours(self, data: bytes, req_id: Any) -> bool:
        from graced.protocol import check_signature

        try:
            frame = json.loads(data)
        except (ValueError, RecursionError):
            return False
        return (isinstance(frame, dict) and frame.get("type") == "response"
                and frame.get("id") == req_id and frame.get("kid") == key_id(self.key)
                and check_signature(frame, self.key))

    async def _request(self, data: bytes) -> bytes:
        """On the NATS loop: publish to the host with an inbox of this request's own."""
        from nats.errors import NoRespondersError

        try:
            req_id = json.loads(data).get("id")
        except (ValueError, AttributeError):
            req_id = None
        nc = self.nats.nc
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox, pending_msgs_limit=64)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        try:
            await nc.publish(self.subject, data, reply=inbox)
            resend = loop.time() + RESEND_EVERY
            while True:
                left = deadline - loop.time()
                if left <= 0:
                    raise TimeoutError
                try:
                    msg = await sub.next_msg(timeout=min(left, max(resend - loop.time(),
                                                                   0.01)))
                except TimeoutError:
                    if loop.time() >= resend:
                        # Dropped under a flood (graced's queue full)? The very same
                        # request again: graced serves it once (docs/fleet.md).
                        await nc.publish(self.subject, data, reply=inbox)
                        resend = loop.time() + RESEND_EVERY
                    continue
                if msg.headers and msg.headers.get("Status") == "503" and not msg.data:
                    raise NoRespondersError
                if self._ours(bytes(msg.data), req_id):
                    return bytes(msg.data)
                self.ignored += 1  # someone else's answer: not the host's
        finally:
            await sub.unsubscribe()

    async def send_message(self, text: str) -> None:
        from nats.errors import NoRespondersError

        def ask() -> bytes:
            return self.nats.run(self._request(text.encode()))

        try:
            reply = await trio.to_thread.run_sync(ask)
        except NoRespondersError:
            raise Unreachable(f"no graced answers on {self.subject} (not connected to "
                              "this NATS?)") from None
        except TimeoutError:
            ignored = f" ({self.ignored} answers not signed by the host ignored)" \
                if self.ignored else ""
            raise Unreachable(f"no answer on {self.subject} within {self.timeout:g} s"
                              f"{ignored}") from None
        await self._send.send(reply.decode("utf-8", "replace"))

    async def get_message(self) -> str:
        try:
            return await self._recv.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise ConnectionClosed(CloseReason(1000, "done")) from None

    async def aclose(self) -> None:
        self._send.close()


@fleet.command("trust")
@click.argument("host_name", metavar="HOST")
@click.option("--key", "key_file", metavar="KEYFILE", type=click.Path(dir_okay=False),
              help="The host's key.pub (else: the key its first event names, on first use, "
                   "if its whole chain verifies with it).")
@click.option("--replace", is_flag=True, help="Replace a key already pinned for HOST.")
@click.pass_context
def fleet_trust(ctx: click.Context, host_name: str, key_file: str | None,
                replace: bool) -> None:
    """Pin HOST's key for the fleet view: from --key (the safe way: its key.pub, taken
    off the host), else the public key its first event (seq 1, crypto.key_created) names,
    only if that event and the host's whole chain in the stream verify with it and the
    stream offers no other key for the host (trust on first use). A different key
    already pinned is refused without --replace. A fleet pin is for the fleet view and
    approvals only: knowledge import never takes it."""

    host = _find_hosts(ctx, (host_name,))[0]
    if key_file:
        key = read_key_file(key_file)
    else:
        key = _offered_key(ctx, host)
    endpoint = f"fleet:{host.daemon_id}"
    try:
        old = _keys_for([host.daemon_id])[host.daemon_id]  # for the fleet, or over its socket
    except trust.BadPin:
        if not replace:
            raise
        old = None  # --replace mends a pin that cannot be read
    if old is not None and old != key and not replace:
        raise CtlError(f"host {host.host} has key {key_id(old)} pinned, not {key_id(key)}: "
                       "refused (--replace if the host's key really changed)",
                       ExitCode.BAD_SIGNATURE)
    trust.pin(endpoint, key, host.daemon_id)
    out.echo(f"gracectl: pinned key {key_id(key)} for host {host.host} ({host.daemon_id})",
             err=True)


def _offered_key(ctx: click.Context, host: HostView) -> bytes:
    """The key HOST's genesis event names, if its chain verifies with it from seq 1 and
    the stream offers no other key for it; else CtlError (exit 10)."""
    obj = ctx.find_object(dict) or {}
    offered: set[bytes] = set()
    genesis: list[tuple[dict[str, Any], bytes]] = []

    def take(subject: str, data: bytes) -> None:
        try:
            event, _ = parse_event_line(data)
            raw = base64.b64decode(str(event["payload"]["public_key"]), validate=True)
        except (Violation, KeyError, TypeError, ValueError):
            return
        offered.add(raw)
        if event["seq"] == 1 and event["topic"] == "crypto.key_created":
            genesis.append((event, raw))

    def refuse(why: str) -> CtlError:
        return CtlError(f"host {host.host} ({host.daemon_id}): {why}; not trusted on first "
                        "use: pass --key with the host's key.pub", ExitCode.BAD_SIGNATURE)

    nats = Nats(obj["nats"], obj.get("creds"), obj["timeout"])
    nats.connect()
    try:
        nats.read(obj["stream"], names.host_filter(host.daemon_id, "crypto.>"), take, False)
        if len(offered) > 1:
            raise refuse(f"its stream offers {len(offered)} different keys")
        if len({raw for _, raw in genesis}) != 1:
            raise refuse("its stream holds no first event (seq 1, crypto.key_created)")
        event, key = genesis[0]
        if len(key) != 32 or key_id(key) != event["kid"]:
            raise refuse("its first event names a key it is not signed with")
        view = FleetView({host.daemon_id: key}, first_seq=1)
        nats.read(obj["stream"], names.host_filter(host.daemon_id), view.add, False)
    finally:
        nats.close()
    view.settle()
    view.finish()
    checked = view.hosts.get(host.daemon_id)
    # Any message on its subjects that is not its event refuses the pin too: trust on
    # first use needs every message there to be the chain the genesis key signs.
    if checked is None or checked.violation is not None or checked.rejection is not None \
            or checked.first_seq != 1:
        why = ("no events" if checked is None else checked.violation or checked.rejected_note)
        raise refuse(f"its chain does not verify with the key its first event names ({why})")
    print(f"trusting key {key_id(key)} of host {host.host} on first use: its {checked.events} "
          "events verify with it from seq 1", file=sys.stderr)
    return key
