"""``gracectl verify``: prove a saved JSONL stream whole, on every core the machine gives.

A stream is proved from where it must start (genesis, or an anchor the user gives) to
``daemon.stopping`` (or, with ``partial``, to wherever it ends). Each line is checked
strictly (:func:`graced.protocol.parse_event_line`).

Theory of operation: Ed25519 verification dominates, and one signature does not
depend on another, so a large file is cut into chunks at line boundaries and each
chunk is verified by a worker process (every usable core, small chunks so that none
idles at the end; a worker reads its own bytes) with the checks of
:class:`ChainVerifier` (strict lines, key, seq continuity, signatures, chain links and
gaps in time inside the chunk). A worker takes a block of lines at a time and checks
it a column at a time, so the common block runs no Python code per event:
:func:`graced.protocol.verify.parse_event_block` parses and proves the lines canonical,
:func:`graced.protocol.signing.verify_all` calls libsodium from a C loop; a block they
cannot decide is parsed line by line. The parent then checks the seams: each chunk's
first event follows the previous chunk's last one (seq, prev, time). A parallel pass
only ever says "all proved"; if any chunk or seam fails, the whole file is verified
again in one pass, so the violation reported (its seq, reason and exit code) is
exactly the one a sequential reader meets first. So that a hostile file costs no more
than that one pass, the first chunk that fails stops the parallel pass (its workers
skip the chunks they still hold, the parent terminates them), and so does a cut that
finds no line end within MAX_LINE_BYTES (that line is too long: nothing more to read).
"""

from __future__ import annotations

import errno
import gc
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from hashlib import sha256
from operator import methodcaller, sub
from typing import IO, Any, NoReturn

from graced.protocol import ChainVerifier, ExitCode, Violation, parse_ts
from graced.protocol.signing import key_id, verify_all
from graced.protocol.verify import (
    ANNOUNCING_TOPICS,
    MAX_LINE_BYTES,
    RESTART_TOPICS,
    EventBlock,
    announced_interval,
    parse_event_block,
    parse_event_line,
    stale_limit,
)

PARALLEL_MIN_BYTES = 4 << 20
CHUNKS_PER_WORKER = 6
CHUNK_BYTES = 2 << 20


@dataclass
class Result:
    """What a verification proved."""

    count: int
    first: int | None
    last: int | None
    last_hash: str | None
    complete: bool


@dataclass
class _Gaps:
    """Time gaps between events: an event later than ``limit`` after the previous one
    (3 heartbeat intervals + 1 s, or the user's --stale-after) means a stale stream."""

    stale_after: float | None
    interval: float | None = None
    prev_ts: float | None = None
    prev_topic: str | None = None
    early_gap: float = 0.0  # the largest gap seen while no limit was known yet

    def __post_init__(self) -> None:
        self._limit = self.limit()

    def limit(self) -> float | None:
        if self.stale_after is not None:
            return self.stale_after
        return stale_limit(self.interval) if self.interval else None

    def feed(self, event: dict, seq: int) -> None:
        try:
            ts = parse_ts(event["ts"])
        except ValueError:
            raise Violation(ExitCode.CHAIN_BROKEN, seq, "malformed timestamp") from None
        self._step(ts, event["topic"], event, seq)

    def feed_many(self, stamps: list[float], topics: Sequence[str],
                  events: Sequence[dict[str, Any]], seqs: Sequence[int]) -> None:
        """:meth:`feed` for many events (their times already parsed), with the same
        verdicts: between the events that announce an interval or may open or close a
        silence (a restart, ``daemon.stopping``), the limit is one, and only the largest
        gap is compared with it."""
        special = ([] if _SPECIAL_TOPICS.isdisjoint(topics) else
                   [i for i, topic in enumerate(topics) if topic in _SPECIAL_TOPICS])
        start = 0
        for stop in [*special, len(stamps)]:
            if stop > start:
                self._plain(stamps, start, stop, seqs)
                self.prev_topic = topics[stop - 1]
            if stop < len(stamps):
                self._step(stamps[stop], topics[stop], events[stop], seqs[stop])
            start = stop + 1

    def _plain(self, stamps: list[float], start: int, stop: int, seqs: Sequence[int]) -> None:
        """Events start..stop-1, none of them special."""
        times = stamps[start:stop]
        if self.prev_ts is not None and self.prev_topic != "daemon.stopping":
            times.insert(0, self.prev_ts)
            start -= 1
        self.prev_ts = stamps[stop - 1]
        if len(times) < 2:
            return
        gaps = list(map(sub, times[1:], times[:-1]))
        worst, limit = max(gaps), self._limit
        if worst > (self.early_gap if limit is None else limit):
            if limit is None:
                self.early_gap = worst
            else:
                at = next(i for i, gap in enumerate(gaps) if gap > limit)
                self._stale(seqs[start + at + 1], gaps[at], limit)

    def _stale(self, seq: int, gap: float, limit: float) -> NoReturn:
        raise Violation(ExitCode.STALE, seq,
                        f"stream stale: {gap:.1f} s with no event or heartbeat "
                        f"before this one (limit {limit:g} s; --stale-after SECONDS "
                        "accepts a longer silence)")

    def _step(self, ts: float, topic: str, event: dict, seq: int) -> None:
        if topic in ANNOUNCING_TOPICS:  # judged by what it announces, as the gap before it
            self.interval = announced_interval(event) or self.interval
            self._limit = self.limit()
        prev, prev_topic = self.prev_ts, self.prev_topic
        self.prev_ts, self.prev_topic = ts, topic
        if prev is not None:
            gap, limit = ts - prev, self._limit
            # Checked once per event, so the cheap test first.
            if (gap > (self.early_gap if limit is None else limit)
                    and prev_topic != "daemon.stopping" and topic not in RESTART_TOPICS):
                if limit is None:
                    self.early_gap = gap
                else:
                    self._stale(seq, gap, limit)


_SPECIAL_TOPICS = ANNOUNCING_TOPICS | RESTART_TOPICS | {"daemon.stopping"}


def _lines(f: IO[bytes], end: int | None = None) -> Iterator[tuple[int, bytes]]:
    """(line number, line without its newline) up to byte ``end``; bounded length."""
    n = 0
    left = None if end is None else end - f.tell()
    while left is None or left > 0:
        raw = f.readline(MAX_LINE_BYTES + 1)
        if not raw:
            return
        n += 1
        if left is not None:
            left -= len(raw)
        if not raw.endswith(b"\n"):
            if len(raw) > MAX_LINE_BYTES:
                raise Violation(ExitCode.CHAIN_BROKEN, None,
                                f"line {n}: longer than {MAX_LINE_BYTES} bytes")
            raise Violation(ExitCode.CHAIN_BROKEN, None,
                            f"line {n}: no newline at its end (the file was cut mid-line)")
        yield n, raw[:-1]


def _run(f: IO[bytes], verifier: ChainVerifier, gaps: _Gaps, end: int | None = None) -> None:
    for n, line in _lines(f, end):
        if not line:
            raise Violation(ExitCode.CHAIN_BROKEN, None, f"line {n}: empty line")
        try:
            event = verifier.feed_line(line, 0.0)
        except Violation as exc:
            if exc.seq is not None:
                raise
            # A line with no seq of its own (junk, not JSON): say where it is.
            after = "" if verifier.last_seq is None else f" (after seq {verifier.last_seq})"
            raise Violation(exc.code, None, f"line {n}{after}: {exc.reason}") from None
        gaps.feed(event, event["seq"])
    verifier.flush()


def verify_stream(f: IO[bytes], public_key: bytes, *, anchor: tuple[int, str] | None = None,
                  partial: bool = False, stale_after: float | None = None) -> Result:
    """Verify a stream in one pass; raises :class:`Violation` at the first problem."""
    verifier = ChainVerifier(public_key, anchor=anchor, first_seq=None if anchor else 1)
    _run(f, verifier, _Gaps(stale_after))
    verifier.finish(partial=partial)
    return Result(verifier.count, verifier.first, verifier.last_seq, verifier.last_hash,
                  verifier.last_topic == "daemon.stopping")


@dataclass
class _Chunk:
    count: int
    first_seq: int
    first_prev: str
    first_hash: str
    first_ts: float
    first_topic: str
    first_interval: float | None  # what the first event announces, if anything
    last_seq: int
    last_hash: str
    last_ts: float
    last_topic: str
    interval: float | None
    early_gap: float


_TS_COLUMN = re.compile(r"(?:[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}"
                        r"\.[0-9]{6}Z\n)*")
_HEX = methodcaller("hexdigest")
_TIMESTAMP = datetime.timestamp
_FROM_ISO = datetime.fromisoformat
# A block's parsed events (about 3 kB of Python objects per 350-byte line) stay within
# a core's cache and within the allocator's reused memory: 1 MB blocks cost a page fault
# every few events (about 1 us of kernel time per event) and missed the cache.
BLOCK_BYTES = 64 << 10


class _ChunkProver:
    """Proves a chunk block by block: each block's events are checked as
    :class:`ChainVerifier` checks them (key, seq, chain link, signature, time gap), a
    whole column at a time (``list == list`` compares in C), so the common block runs
    no Python code per event."""

    def __init__(self, public_key: bytes, stale_after: float | None) -> None:
        self.public_key = public_key
        self.kid = key_id(public_key)
        self.gaps = _Gaps(stale_after)
        self.count = 0
        self.first: tuple[int, str, str, float, str, float | None] | None = None
        self.last_seq = -1
        self.last_hash = self.last_topic = ""

    def feed(self, block: EventBlock) -> bool:
        """False at the first doubt."""
        n = len(block.events)
        seqs, prevs, hashes = block.seqs, block.prevs, list(map(_HEX, map(sha256,
                                                                             block.signing)))
        if self.first is not None and (seqs[0] != self.last_seq + 1
                                       or prevs[0] != self.last_hash):
            return False
        if (list(seqs) != list(range(seqs[0], seqs[0] + n)) or list(prevs[1:]) != hashes[:-1]
                or block.kids.count(self.kid) != n
                or not verify_all(block.sigs, block.signing, self.public_key)
                or not _TS_COLUMN.fullmatch("\n".join(block.stamps) + "\n")):
            return False
        try:
            stamps = list(map(_TIMESTAMP, map(_FROM_ISO, block.stamps)))
            self.gaps.feed_many(stamps, block.topics, block.events, seqs)
        except (ValueError, Violation):
            return False
        if self.first is None:
            topic = block.topics[0]
            self.first = (seqs[0], prevs[0], hashes[0], stamps[0], topic,
                          announced_interval(block.events[0])
                          if topic in ANNOUNCING_TOPICS else None)
        self.last_seq, self.last_hash, self.last_topic = seqs[-1], hashes[-1], block.topics[-1]
        self.count += n
        return True

    def result(self) -> _Chunk | None:
        gaps = self.gaps
        if self.first is None or gaps.prev_ts is None:
            return None
        return _Chunk(self.count, *self.first, self.last_seq, self.last_hash,
                      gaps.prev_ts, self.last_topic, gaps.interval, gaps.early_gap)


def _one_by_one(block: bytes) -> EventBlock | None:
    """The block's events parsed line by line (the exact check where the fast one
    cannot decide), or None if a line is not an event."""
    events, signing = [], []
    lines = block.split(b"\n")
    lines.pop()
    for line in lines:
        if not line or len(line) > MAX_LINE_BYTES:
            return None
        try:
            event, data = parse_event_line(line)
        except Violation:
            return None
        events.append(event)
        signing.append(data)
    return EventBlock.of(events, signing)


def _prove(data: bytes, public_key: bytes, stale_after: float | None) -> _Chunk | None:
    """What whole lines ``data`` prove, or None at the first doubt (the sequential pass
    that follows names the violation exactly: a forged signature and an altered
    event, a replay and a reorder, look alike here)."""
    prover = _ChunkProver(public_key, stale_after)
    at = 0
    while at < len(data):
        cut = data.rfind(b"\n", at, at + BLOCK_BYTES) + 1 or data.find(b"\n",
                                                                       at + BLOCK_BYTES) + 1
        if cut <= at:  # cut mid-line: the sequential pass says where
            return None
        block = data[at:cut]
        at = cut
        events = parse_event_block(block) or _one_by_one(block)
        if events is None or not prover.feed(events):
            return None
    return prover.result()


def _verify_chunk(path: str, start: int, end: int, public_key: bytes,
                  stale_after: float | None) -> _Chunk | None:
    """Verify the lines in bytes [start, end) of ``path``; None if anything is wrong."""
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read(end - start)
    # The parsed events hold no cycles: reference counting frees them, and the cyclic
    # collector, woken by every few hundred new dicts, would only walk them for nothing.
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _prove(data, public_key, stale_after)
    finally:
        if collecting:
            gc.enable()


def _fan_worker(conn: Any, counter: Any, lock: Any, failed: Any, path: str,
                public_key: bytes, stale_after: float | None,
                ranges: list[tuple[int, int]]) -> None:
    """A worker of the parallel pass: takes the next chunk (``counter``, under ``lock``)
    until none is left or one has failed (``failed``, shared by all), and sends (i, what
    chunk i proves) on ``conn``; (i, None) for a chunk that fails, or for anything that
    goes wrong here (the one pass that follows says what)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops the pass
    i = -1
    try:
        while not failed.value:
            with lock:
                i = counter.value
                if i >= len(ranges):
                    return
                counter.value = i + 1
            start, end = ranges[i]
            chunk = _verify_chunk(path, start, end, public_key, stale_after)
            if chunk is None:
                failed.value = 1
            conn.send((i, chunk))
            if chunk is None:
                return
    except Exception:  # noqa: BLE001 - said by the one pass that follows
        failed.value = 1
        try:
            conn.send((max(i, 0), None))
        except OSError:
            pass
    finally:
        conn.close()


def _fan_out(path: str, public_key: bytes, stale_after: float | None,
             ranges: list[tuple[int, int]], workers: int,
             progress: Callable[[int, int], None] | None) -> list[_Chunk] | None:
    """What each chunk proves, verified by ``workers`` forked processes as they finish;
    None at the first chunk that fails, whatever its place (the workers are killed at
    once: none goes on reading a file already known to fail), or if a worker died.

    Processes of its own, not multiprocessing.Pool: a Pool's terminate() after a pass cut
    short can hang for good (CPython issues 73945 and 96995; CI, session 10: a --jobs 2
    verify of a stream failing in two chunks hung 300 s). Killing a worker here can leave
    nothing waiting: the counter's lock is never taken again once the pass stops."""
    import multiprocessing
    from multiprocessing.connection import wait

    context = multiprocessing.get_context("fork")
    counter = context.RawValue("q", 0)
    lock = context.Lock()
    failed = context.RawValue("b", 0)
    procs: list[Any] = []
    readers: list[Any] = []
    chunks: list[_Chunk | None] = [None] * len(ranges)
    try:
        for _ in range(min(workers, len(ranges))):
            reader, writer = context.Pipe(duplex=False)
            readers.append(reader)
            proc = context.Process(target=_fan_worker, daemon=True, args=(
                writer, counter, lock, failed, path, public_key, stale_after, ranges))
            proc.start()
            procs.append(proc)
            writer.close()
        finished = 0
        open_readers = list(readers)
        while open_readers:
            for reader in wait(open_readers):  # type: ignore[assignment]
                try:
                    i, chunk = reader.recv()
                except EOFError:  # the worker is done (or died)
                    open_readers.remove(reader)
                    continue
                if chunk is None:
                    return None
                chunks[i] = chunk
                finished += 1
                if progress is not None:
                    progress(finished, len(ranges))
        if any(c is None for c in chunks):
            return None  # a worker died before it sent its chunk
        return [c for c in chunks if c is not None]
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
        for proc in procs:
            proc.join()
        for reader in readers:
            reader.close()


def _boundaries(path: str, size: int, pieces: int) -> list[tuple[int, int]] | None:
    """Byte ranges that start at line starts and cover the file; None if a search for a
    line's end finds no newline within MAX_LINE_BYTES (a line too long: the file fails,
    and the one pass says where at once, without reading the rest of it)."""
    cuts = [0]
    with open(path, "rb") as f:
        for i in range(1, pieces):
            f.seek(max(cuts[-1], size * i // pieces))
            if f.tell() > 0:
                f.seek(f.tell() - 1)
                if not f.readline(MAX_LINE_BYTES + 1).endswith(b"\n"):
                    # The end of the file, or a line longer than any line may be.
                    if f.tell() < size:
                        return None
                    break
            if cuts[-1] < f.tell() < size:
                cuts.append(f.tell())
    cuts.append(size)
    return list(zip(cuts, cuts[1:], strict=False))


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _parallel(path: str, public_key: bytes, *, anchor: tuple[int, str] | None,
              partial: bool, stale_after: float | None, workers: int,
              progress: Callable[[int, int], None] | None = None) -> Result | None:
    """The parallel pass: a Result if the file is proved, None to verify it again in one
    pass (something is wrong, or the file cannot be split)."""

    size = os.path.getsize(path)
    # Small chunks, many per worker: the last ones end close together, no core idles
    # long at the end. Each worker reads its own bytes; only offsets and a small
    # summary cross between processes.
    ranges = _boundaries(path, size, max(workers * CHUNKS_PER_WORKER, size // CHUNK_BYTES))
    if ranges is None:
        return None
    chunks: list[_Chunk | None] = [None] * len(ranges)
    if workers == 1:
        for i, (a, b) in enumerate(ranges):
            chunks[i] = _verify_chunk(path, a, b, public_key, stale_after)
            if chunks[i] is None:
                return None
            if progress is not None:
                progress(i + 1, len(ranges))
    else:
        done = _fan_out(path, public_key, stale_after, ranges, workers, progress)
        if done is None:
            return None
        chunks = list(done)
    if not chunks or any(c is None for c in chunks):
        return None
    verifier = ChainVerifier(public_key, anchor=anchor, first_seq=None if anchor else 1)
    head = chunks[0]
    assert head is not None
    try:
        verifier.check_start(head.first_seq, head.first_hash, head.first_prev)
    except Violation:
        return None
    interval: float | None = None
    prev: _Chunk | None = None
    for chunk in chunks:
        assert chunk is not None
        if prev is not None:
            if chunk.first_seq != prev.last_seq + 1 or chunk.first_prev != prev.last_hash:
                return None
            # The seam's gap and the chunk's early gaps judged as _Gaps judges them: the
            # first event's announcement counts for the gap before it.
            interval = chunk.first_interval or interval
            limit = stale_after if stale_after is not None else (
                stale_limit(interval) if interval else None)
            seam = (0.0 if prev.last_topic == "daemon.stopping"
                    or chunk.first_topic in RESTART_TOPICS
                    else chunk.first_ts - prev.last_ts)
            if limit is not None and max(seam, chunk.early_gap) > limit:
                return None
        interval = chunk.interval or interval
        prev = chunk
    assert prev is not None
    if not partial and prev.last_topic != "daemon.stopping":
        return None
    return Result(sum(c.count for c in chunks if c), head.first_seq, prev.last_seq,
                  prev.last_hash, prev.last_topic == "daemon.stopping")


_NO_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.EAGAIN, errno.ENOMEM})


def verify_file(path: str, public_key: bytes, *, anchor: tuple[int, str] | None = None,
                partial: bool = False, stale_after: float | None = None,
                workers: int | None = None,
                progress: Callable[[int, int], None] | None = None) -> Result:
    """Verify a saved stream (``-`` for stdin); raises :class:`Violation` at the first
    problem. Uses ``workers`` processes (default: the usable cores) for large files, and
    tells ``progress`` (parts done, parts) as they finish."""
    # --jobs 1 is the one-pass verifier (the reference verdict); more processes than
    # usable cores would only compete for them.
    one_pass = workers == 1
    workers = min(workers or usable_cores(), usable_cores())
    if not one_pass and path != "-" and os.path.getsize(path) >= PARALLEL_MIN_BYTES:
        try:
            result = _parallel(path, public_key, anchor=anchor, partial=partial,
                               stale_after=stale_after, workers=workers, progress=progress)
        except OSError as exc:  # no processes or pipes to be had: the one pass needs none
            if exc.errno not in _NO_RESOURCES:
                raise
            result = None
        if result is not None:
            return result
    if path == "-":
        import sys

        return verify_stream(sys.stdin.buffer, public_key, anchor=anchor, partial=partial,
                             stale_after=stale_after)
    with open(path, "rb") as f:
        return verify_stream(f, public_key, anchor=anchor, partial=partial,
                             stale_after=stale_after)
