"""``gracectl tail`` and ``gracectl verify``: stream events, and prove the stream whole."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import IO, Any

import trio

from graced.protocol import ChainVerifier, ExitCode, Violation, key_id, parse_ts
from graced.protocol.topics import FAMILIES, compile_patterns, matches_no_family
from graced.protocol.verify import announced_interval, stale_limit
from graced.protocol.wire import CLOSE_REVOKED

from .client import Endpoint, closed_error, connect
from .errors import CtlError, RemoteError, Unreachable
from .out import TAIL_OUTPUTS, fit, kv, safe, stderr_note, terminal_width, when
from .timespec import Point

__all__ = ["OUTPUTS", "TailOptions", "format_event", "run_tail", "stderr_note"]

OUTPUTS = TAIL_OUTPUTS


def format_event(event: dict[str, Any], output: str = "short") -> str:
    """One human line: time (local, with its offset; --utc: UTC), seq, topic, payload
    as key=value (values as JSON writes them, strings quoted when they hold a space)."""
    text = kv(event.get("payload"))
    if output == "cat":
        return safe(text)
    return safe(f"{when(event.get('ts'), ms=True)}  {event.get('seq', '?'):>7}  "
                f"{event.get('topic', '?'):<22}  {text}".rstrip())


@dataclass
class TailOptions:
    patterns: list[str]
    since: int | None
    lines: int
    as_json: bool
    verify: bool
    follow: bool
    trusted_key: bytes | None
    stale_after: float | None
    reconnect_timeout: float
    output: str = "short"
    since_at: Point | None = None  # --since as given (a seq or a time)
    until: Point | None = None
    # -n given on the command line: with --since it counts back from the window's end
    # (journalctl's -n with --since); without -n, --since shows the whole window.
    lines_given: bool = False
    reverse: bool = False  # -r: newest first (never following), as journalctl -r

    @property
    def count_back(self) -> bool:
        """Whether -n picks the start: the last N matching events (in the --since window
        when there is one)."""
        return self.lines > 0 and (self.lines_given or (self.since is None
                                                        and self.since_at is None))

    def before_since(self, event: dict[str, Any]) -> bool:
        """Whether ``event`` is older than a --since time (an event published while the
        start was being looked up, when the time lies past the head), or below a --since
        seq (one past the head: the stream starts at the head)."""
        seq = event.get("seq")
        floor = self.since if self.since is not None else (
            self.since_at.seq if self.since_at is not None else None)
        if floor is not None and isinstance(seq, int) and seq < floor:
            return True
        if self.since_at is None or self.since_at.ts is None:
            return False
        try:
            return parse_ts(str(event.get("ts"))) < float(self.since_at.ts)
        except (ValueError, TypeError, OverflowError):
            return False

    @property
    def last_n(self) -> bool:
        """-n N alone and not following: the last N matches when asked, no more (the head
        may move between counting back and subscribing)."""
        return not self.follow and self.count_back

    def past_until(self, event: dict[str, Any]) -> bool:
        """Whether ``event`` comes after --until (the stream ends before it)."""
        if self.until is None:
            return False
        seq = event.get("seq")
        if self.until.seq is not None:
            return isinstance(seq, int) and seq > self.until.seq
        try:
            return parse_ts(str(event.get("ts"))) > float(self.until.ts or 0)
        except (ValueError, TypeError, OverflowError):
            return False


class Printer:
    """Writes events to stdout; a held event waits until the verifier clears it."""

    def __init__(self, opts: TailOptions, out: IO[str]) -> None:
        self.opts = opts
        self.out = out
        self.match = compile_patterns(opts.patterns)
        self.held: tuple[str, dict[str, Any]] | None = None
        self.printed = 0
        self.kept: list[str] = []
        # short lines are cut to a terminal's width (whole when piped, or with --wide).
        self.width = terminal_width(out)

    def emit(self, line: str, event: dict[str, Any]) -> None:
        if not self.match(str(event.get("topic", ""))):
            return
        if not self.opts.as_json:
            line = format_event(event, self.opts.output)
            if self.width is not None and self.opts.output == "short":
                line = fit(line, self.width)  # one event a line, as journalctl's pager
        if self.opts.reverse:
            self.kept.append(line)  # printed newest first once the range is read
        else:
            self.out.write(line + "\n")
        self.printed += 1

    def write_reversed(self) -> None:
        self.out.writelines(line + "\n" for line in reversed(self.kept))
        self.kept.clear()
        self.out.flush()

    def release(self) -> None:
        if self.held is not None:
            self.emit(*self.held)
            self.held = None
        self.out.flush()

    def accept(self, line: str, event: dict[str, Any], pending: bool) -> None:
        self.release()
        if pending:
            self.held = (line, event)
        else:
            self.emit(line, event)
        self.out.flush()


async def run_tail(endpoint: Endpoint, opts: TailOptions, out: IO[str],
                   note: Callable[[str], None]) -> int:
    """Follow the stream; returns the exit code, raises Violation on a verification failure.
    A pattern that can match no topic is named on stderr at the start; a --no-follow that
    printed nothing says so there (journalctl's "-- No entries --")."""
    for pattern in opts.patterns:
        if matches_no_family(pattern):
            note(f"no topic can match {pattern!r}: patterns match topics FAMILY.NAME, e.g. "
                 f"'detector.*', 'mission.*' (families: {', '.join(FAMILIES)})")
    printer = Printer(opts, out)
    code = await _run_tail(endpoint, opts, printer, note)
    printer.write_reversed()
    if code == 0 and not opts.follow and printer.printed == 0:
        note("-- No entries --")
    return code


async def _run_tail(endpoint: Endpoint, opts: TailOptions, printer: Printer,
                    note: Callable[[str], None]) -> int:
    verifier: ChainVerifier | None = None
    next_seq = await _start(endpoint, opts)
    last_topic: str | None = None
    retry_until: float | None = None
    started = False
    while True:
        graceful = False
        if retry_until is not None:
            await _wait_for_daemon(endpoint, retry_until)
        try:
            # With --verify the chain verifier checks each event itself (it tells a
            # forged signature from altered content); without, the connection does.
            conn_cm = connect(endpoint, opts.trusted_key, verify_events=not opts.verify)
            conn = await conn_cm.__aenter__()
        except Unreachable:
            if retry_until is None or trio.current_time() >= retry_until:
                raise
            continue
        async with _entered(conn_cm):
            hello = await conn.request("hello")
            if opts.verify:
                assert opts.trusted_key is not None
                if hello.get("kid") != key_id(opts.trusted_key):
                    raise Violation(ExitCode.BAD_SIGNATURE, None,
                                    f"daemon key {hello.get('kid')} is not the trusted key "
                                    f"{key_id(opts.trusted_key)}")
            head = int(hello.get("head_seq", 0))
            if next_seq is None:
                # Never before the oldest event kept (retention prunes the ones before).
                first = hello.get("first_seq")
                first = first if isinstance(first, int) and first > 1 else 1
                next_seq = max(first, head - opts.lines + 1) if opts.lines > 0 else head + 1
            # Verifying needs the whole chain; --no-follow needs to see the head go by even
            # when it does not match: both receive everything and filter here.
            everything = opts.verify or not opts.follow
            # A start the user did not name (-n, the head) moves on to the oldest event
            # kept when retention prunes under it; a --since seq pruned is exit 8.
            asked = opts.since is not None or opts.since_at is not None
            next_seq, sub = await _subscribe(conn, ["*"] if everything else opts.patterns,
                                             next_seq, move_on=not asked and not started)
            started = True
            if opts.verify and verifier is None:
                assert opts.trusted_key is not None
                interval = float(hello.get("heartbeat_interval", 5.0))
                stale = opts.stale_after or stale_limit(interval)
                # The first event must be the one asked for: nobody may drop the head.
                verifier = ChainVerifier(opts.trusted_key, stale_after=stale,
                                         first_seq=next_seq)
                # Fresh from the connection on, not from a first event (-n 0 may wait
                # for one that a frozen graced never sends).
                verifier.connected(trio.current_time())
            stop_at = None if opts.follow else int(sub["head_seq"])
            if stop_at is not None and next_seq > stop_at:
                return 0
            while True:
                timeout = verifier.stale_after if verifier and verifier.stale_after else 3600.0
                with trio.move_on_after(timeout) as cs:
                    try:
                        line, event = await conn.next_event()
                    except trio.EndOfChannel:
                        break
                if cs.cancelled_caught:
                    if verifier is not None:
                        verifier.flush()
                        verifier.check_fresh(trio.current_time())
                    continue
                if "_unparsable" in event:
                    if verifier is not None:
                        raise Violation(ExitCode.CHAIN_BROKEN, None, "unparsable frame")
                    continue
                if verifier is not None:
                    verifier.feed_line(line.encode("utf-8", "surrogatepass"),
                                       trio.current_time())
                if opts.past_until(event):  # checked, and not shown: the end
                    if verifier is not None:
                        verifier.flush()
                    printer.release()
                    return 0
                shown = not opts.before_since(event)
                if verifier is not None:
                    # The signed stream says how often to expect a heartbeat (a reload
                    # may change it): the stale limit follows, unless the user set one.
                    announced = announced_interval(event)
                    if announced is not None and opts.stale_after is None:
                        verifier.stale_after = stale_limit(announced)
                    if shown:
                        printer.accept(line, event, verifier.pending)
                elif shown:
                    printer.accept(line, event, False)
                if opts.last_n and printer.printed >= opts.lines:
                    if verifier is not None:
                        verifier.flush()
                    printer.release()
                    return 0
                seq = event.get("seq")
                if isinstance(seq, int):
                    next_seq = seq + 1
                last_topic = event.get("topic")
                if stop_at is not None and isinstance(seq, int) and seq >= stop_at:
                    if verifier is not None:
                        verifier.flush()
                    printer.release()
                    return 0
            closed = conn.closed
            graceful = (closed is not None and closed.code == 1001) if verifier is None else (
                last_topic == "daemon.stopping"
            )
        revoked = closed is not None and closed.code == CLOSE_REVOKED
        if verifier is not None:
            if graceful or revoked:
                verifier.flush()  # a forged last event, daemon.stopping too, is reported
            else:
                verifier.end()  # cut short: what a tamperer dropping the tail would do
        printer.release()
        if not graceful:
            raise closed_error(closed, "connection to graced lost")
        if not opts.follow:
            return 0
        note(f"graced is stopping; waiting up to {opts.reconnect_timeout:g} s for it to come "
             f"back, to resume at seq {next_seq}")
        retry_until = trio.current_time() + opts.reconnect_timeout


async def _start(endpoint: Endpoint, opts: TailOptions) -> int | None:
    """The seq to start at: the first of the last -n events that match (counted back
    from the head, or from --until, never before --since), else --since's (a time: the
    first event at or after it), else None (the head, live)."""
    since = opts.since_at or (Point(seq=opts.since) if opts.since else None)
    floor: int | None = None
    if since is not None:
        floor = (since.seq if since.seq is not None
                 else await _seq_at(endpoint, opts.trusted_key, float(since.ts or 0)))
        if opts.until is not None:
            await _check_range(endpoint, opts.trusted_key, since, opts.until, floor)
    if not opts.count_back:
        return floor
    return await _last_matching(endpoint, opts, floor or 1)


async def _scan(conn: Any, since: int,
                visit: Callable[[int, dict[str, Any]], bool]) -> None:
    """Pass every event from ``since`` to the head at subscription to ``visit`` until it
    returns False; unverified (this only finds where to start: what is shown is checked
    when it is read again)."""
    since, sub = await _subscribe(conn, ["*"], since, move_on=True)
    head = int(sub["head_seq"])
    if since > head:
        return
    while True:
        try:
            _, event = await conn.next_event()
        except trio.EndOfChannel:
            raise Unreachable("connection to graced lost") from None
        seq = event.get("seq")
        if not isinstance(seq, int):
            continue
        if not visit(seq, event) or seq >= head:
            return


async def _subscribe(conn: Any, patterns: list[str], since: int, *, move_on: bool
                     ) -> tuple[int, dict[str, Any]]:
    """Subscribe from ``since``; returns the seq it starts at and the answer. When
    retention pruned ``since`` and ``move_on``, from the oldest event kept instead (a
    start gracectl chose); else the pruned error says where to start."""
    for _ in range(20):
        try:
            return since, await conn.request("subscribe", {"patterns": patterns,
                                                           "since": since})
        except RemoteError as exc:
            if exc.code_name != "pruned":
                raise
            if not move_on:
                raise RemoteError(exc.code_name, f"{exc}; start there (gracectl tail --since "
                                  "FIRST_SEQ; gracectl checkpoint shows the anchor to "
                                  "verify from)", exc.code) from None
        hello = await conn.request("hello")
        first = hello.get("first_seq")
        if isinstance(first, int) and first > since:
            since = first
    raise Unreachable("retention kept pruning the start of the stream; try again")


async def _head(endpoint: Endpoint, key: bytes | None) -> tuple[int, int]:
    """The head seq and the oldest seq kept (journal retention prunes those before)."""
    async with connect(endpoint, key, verify_events=False) as conn:
        hello = await conn.request("hello")
    first = hello.get("first_seq")
    return int(hello.get("head_seq", 0)), first if isinstance(first, int) and first > 1 else 1


async def _seq_at(endpoint: Endpoint, key: bytes | None, ts: float) -> int:
    """The seq of the first event at or after ``ts`` (a binary search over the journal;
    past the head: the next event)."""
    head, lo = await _head(endpoint, key)
    hi = head + 1
    got: list[tuple[int, dict[str, Any]]] = []

    def first(seq: int, event: dict[str, Any]) -> bool:
        got.append((seq, event))
        return False

    while lo < hi:
        mid = (lo + hi) // 2
        got.clear()
        async with connect(endpoint, key, verify_events=False) as conn:
            await _scan(conn, mid, first)
        if not got:
            return hi
        seq, event = got[0]
        try:
            at = parse_ts(str(event.get("ts")))
        except (ValueError, TypeError, OverflowError):
            at = ts
        if at >= ts:
            hi = mid
        else:
            lo = seq + 1
    return lo


async def _check_range(endpoint: Endpoint, key: bytes | None, since: Point, until: Point,
                       floor: int) -> None:
    """A --since and an --until of different kinds (a seq and a time; two of one kind are
    compared before graced is asked), compared once the journal says when the seq's event
    was published, or which event the time falls on: a --since after the --until is a
    usage error (exit 2), as journalctl refuses it. A seq not published yet, or pruned,
    has no time: not compared. ``floor``: the first seq at or after a --since time."""
    if since.seq is not None and until.ts is not None:
        got: list[dict[str, Any]] = []

        def first(seq: int, event: dict[str, Any]) -> bool:
            if seq == since.seq:
                got.append(event)
            return False

        async with connect(endpoint, key) as conn:  # its signature checked: it decides
            await _scan(conn, since.seq, first)
        try:
            at = parse_ts(str(got[0].get("ts"))) if got else None
        except (ValueError, TypeError, OverflowError):
            at = None
        if at is not None and at > until.ts:
            raise CtlError(f"--since {since.seq} is after --until "
                           f"{when(until.ts, ms=True)}: seq {since.seq} was published at "
                           f"{when(at, ms=True)}; no event can be in that range",
                           ExitCode.USAGE)
    elif since.ts is not None and until.seq is not None:
        _, oldest = await _head(endpoint, key)
        if oldest <= until.seq < floor:  # seq until.seq was published before the time
            raise CtlError(f"--since {when(since.ts, ms=True)} is after --until "
                           f"{until.seq}: seq {until.seq} was published before that time; no "
                           "event can be in that range", ExitCode.USAGE)


LOOKBACK = (1_000, 32_000, 1_000_000, 2**62)
"""How far back -n looks for matching events, one window after another."""


async def _last_matching(endpoint: Endpoint, opts: TailOptions, floor: int = 1) -> int:
    """The seq of the first of the last ``opts.lines`` events that match the patterns
    (journalctl's -n counts matching entries), up to the head or --until, from ``floor``
    (--since) at the earliest."""
    match = compile_patterns(opts.patterns)
    head, oldest = await _head(endpoint, opts.trusted_key)
    upper = min(head, opts.until.seq) if opts.until and opts.until.seq else head
    found: list[int] = []

    def visit(seq: int, event: dict[str, Any]) -> bool:
        if seq > upper or opts.past_until(event):
            return False
        if match(str(event.get("topic", ""))):
            found.append(seq)
            del found[:-opts.lines]
        return True

    for window in LOOKBACK:
        start = max(oldest, floor, upper - window + 1)
        found.clear()
        if start <= upper:
            async with connect(endpoint, opts.trusted_key, verify_events=False) as conn:
                await _scan(conn, start, visit)
        if len(found) >= opts.lines or start <= max(oldest, floor):
            break
    return found[0] if found else max(upper + 1, floor)


@asynccontextmanager
async def _entered(cm: Any) -> AsyncIterator[None]:
    """Exit an async context manager that was entered by hand."""
    try:
        yield
    except BaseException as exc:
        if not await cm.__aexit__(type(exc), exc, exc.__traceback__):
            raise
    else:
        await cm.__aexit__(None, None, None)


async def _wait_for_daemon(endpoint: Endpoint, until: float) -> None:
    """Poll until graced's socket accepts a connection again, or raise Unreachable."""
    while True:
        try:
            async with connect(endpoint, timeout=2) as conn:
                await conn.request("hello")
                return
        except Unreachable:
            if trio.current_time() >= until:
                raise
            await trio.sleep(0.1)
