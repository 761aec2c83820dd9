"""The mesh: publish/subscribe in the daemon, with every event signed and journaled.

Theory of operation: :meth:`Mesh.publish` queues ``(time, topic, payload)``. The
writer task (:meth:`Mesh.run`) takes everything queued, and in a worker thread
assigns seq and prev, signs, hashes and commits the group to the journal in one
transaction. Only after the commit does it fan the events out, in seq order, to the
subscribers whose topic globs match. Fan-out never blocks: each subscriber supplies
a ``deliver`` callback that must not block (the wire puts frames on a bounded
channel and drops the client when it is full), so a slow subscriber never slows the
publisher. A small ring of recent events serves replays without touching the disk.

Channels owned: none; the writer is woken by a :class:`trio.Event`.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import trio

from .journal import Journal, Write
from .protocol import SignedEvent, Signer, canonical_bytes
from .protocol.text import safe
from .protocol.topics import compile_patterns

log = logging.getLogger("graced.mesh")

Deliver = Callable[[SignedEvent], None]


@dataclass(eq=False)
class Subscription:
    """A live subscriber; created by :meth:`Mesh.subscribe`."""

    match: Callable[[str], bool]
    deliver: Deliver
    mesh: Mesh | None = field(default=None, repr=False)

    def close(self) -> None:
        if self.mesh is not None:
            self.mesh._subs.discard(self)
            self.mesh = None


class Recent(NamedTuple):
    """What the replay ring keeps of an event: enough to replay it, no more (the
    fields dict of a signed event costs several times its wire text)."""

    seq: int
    topic: str
    text: str


@dataclass(eq=False)
class _Pending:
    ts: float
    topic: str | None  # None: state writes only, no event
    payload: Any
    done: trio.Event | None = None
    result: SignedEvent | None = None
    writes: Sequence[Write] = ()
    # Why it could not be signed (it was dropped, with its writes); publish raises it.
    error: Exception | None = None


class Mesh:
    """Signs, journals and fans out events. Run :meth:`run` before publishing."""

    def __init__(
        self,
        journal: Journal,
        signer: Signer,
        *,
        batch_max: int = 4096,
        ring_size: int = 65536,
        ring_max_bytes: int = 64 << 20,
        max_pending: int = 65536,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.journal = journal
        self.signer = signer
        self.batch_max = batch_max
        # Commit small groups in the event loop only when commits do not fsync.
        self.inline_max = 32 if journal.synchronous == "normal" else 0
        self.max_pending = max_pending
        self.clock = clock
        self._pending: list[_Pending] = []
        self._first: list[_Pending] = []  # publish_first's, each a group ahead of the rest
        self._wake = trio.Event()
        self._room = trio.Event()
        self._subs: set[Subscription] = set()
        self.ring: collections.deque[Recent] = collections.deque(maxlen=ring_size)
        # Bounded in bytes too: big events (a 60 KB payload each) must not make the ring
        # hold gigabytes; the oldest go first, replays then read the journal.
        self.ring_bytes = 0
        self.ring_max_bytes = ring_max_bytes
        # Seq and hash of the last event fanned out (everything <= it is durable).
        self.delivered_seq = journal.head_seq
        self.delivered_hash = journal.head_hash
        # The latest daemon.checkpoint fanned out (gracectl checkpoint asks for it).
        self.last_checkpoint: SignedEvent | None = None
        self.commit_seconds_last = 0.0
        self.committed_bytes = 0  # of event text, since start (retention's pace)
        self.commit_count = 0
        self.commit_errors = 0
        self.dropped = 0  # events that could not be signed (see _sign_and_commit)
        self.last_error: str | None = None
        # When commits started failing (disk full, I/O error), None while they succeed.
        self.failing_since: float | None = None
        self._last_checkpoint = 0.0
        self._closed = False
        # Retention (graced/retention.py) looks at the journal's size after every
        # ``look_every`` bytes of events committed (0: never); a group holds at most that
        # many bytes, and the writer holds further groups once twice that went by without
        # a look, so no burst outruns it. Its own checkpoint (``publish_first``) passes.
        self.look_every = 0
        self.looked_bytes = 0
        self._look_due = trio.Event()
        self._resume = trio.Event()

    # -- publishing ------------------------------------------------------------

    def publish_nowait(self, topic: str, payload: Any, *, checked: bool = False,
                       writes: Sequence[Write] = ()) -> None:
        """Queue an event without waiting; it is durable before anyone sees it.

        ``checked`` skips the JSON check for a payload already known to be canonical-safe;
        ``writes`` are committed in the same transaction as the event.
        """
        self._queue(topic, payload, None, checked, writes)

    async def publish(
        self, topic: str, payload: Any, *, durable: bool = True, writes: Sequence[Write] = ()
    ) -> SignedEvent | None:
        """Queue an event; with ``durable``, wait until it is committed and return it.

        ``writes`` are SQL statements committed in the same transaction as the event, so
        state (a mission row) and the event that announces it never disagree.
        Waits for room when too much is queued (back-pressure on fast producers).
        """
        await self.wait_room()
        if not durable:
            self._queue(topic, payload, None, False, writes)
            await trio.lowlevel.checkpoint()
            return None
        item = self._queue(topic, payload, trio.Event(), False, writes)
        assert item.done is not None
        await item.done.wait()
        if item.error is not None:
            raise item.error
        return item.result

    async def publish_first(self, topic: str, payload: Any,
                            writes: Sequence[Write] = ()) -> SignedEvent | None:
        """Publish an event (and its writes) in a group of its own, ahead of whatever is
        queued, even while the writer holds for retention; returns it once committed."""
        canonical_bytes([topic, payload])
        if self._closed:
            raise trio.ClosedResourceError("mesh is closed")
        item = _Pending(self.clock(), topic, payload, trio.Event(), None, writes)
        self._first.append(item)
        self._wake.set()
        self._resume.set()
        assert item.done is not None
        await item.done.wait()
        return item.result

    async def wait_look_due(self) -> None:
        """Until ``look_every`` bytes were committed since retention's last look."""
        await self._look_due.wait()

    def look_now(self) -> None:
        """Wake retention now (a reload changed its limits)."""
        self._look_due.set()

    def looked(self, at: int) -> None:
        """Retention looked (and pruned what it had to) at ``committed_bytes`` = ``at``."""
        self.looked_bytes = at
        self._look_due = trio.Event()
        if self.look_every and self.committed_bytes - at >= self.look_every:
            self._look_due.set()
        self._resume.set()

    def _held(self) -> bool:
        return bool(self.look_every and not self._first
                    and self.committed_bytes - self.looked_bytes >= 2 * self.look_every)

    def store(self, writes: Sequence[Write]) -> None:
        """Queue state writes with no event (committed with the next group)."""
        self._queue(None, None, None, True, writes)

    def _queue(self, topic: str | None, payload: Any, done: trio.Event | None,
               checked: bool, writes: Sequence[Write] = ()) -> _Pending:
        if self._closed:
            raise trio.ClosedResourceError("mesh is closed")
        if not checked:
            # Fail here, in the publisher, on a payload that cannot be canonical JSON.
            canonical_bytes(payload)
        if topic is not None and not (type(topic) is str and topic.isascii()):
            # The topic too: one with no UTF-8 form would fail in the writer.
            canonical_bytes(topic)
        item = _Pending(self.clock(), topic, payload, done, None, writes)
        self._pending.append(item)
        self._wake.set()
        return item

    # -- subscribing -----------------------------------------------------------

    def subscribe(self, patterns: Iterable[str], deliver: Deliver) -> Subscription:
        """Register a live subscriber: it gets every event after :attr:`delivered_seq`."""
        sub = Subscription(compile_patterns(patterns), deliver, self)
        self._subs.add(sub)
        return sub

    async def wait_room(self) -> None:
        """Block while too much is queued (back-pressure for bulk producers)."""
        while len(self._pending) >= self.max_pending:
            if self._room.is_set():
                self._room = trio.Event()
            await self._room.wait()

    @property
    def subscriber_count(self) -> int:
        return len(self._subs)

    def recent(self, first: int) -> list[Recent] | None:
        """Events from ``first`` to :attr:`delivered_seq` if the ring still holds them."""
        if first > self.delivered_seq:
            return []
        if not self.ring or self.ring[0].seq > first:
            return None
        start = first - self.ring[0].seq
        return [self.ring[i] for i in range(start, len(self.ring))]

    # -- the writer --------------------------------------------------------------

    def _sign_and_commit(self, batch: list[_Pending]) -> list[SignedEvent | None]:
        """Sign the group in order and commit it, with its writes, in one transaction.
        With retention on, the group ends once it holds ``look_every`` bytes of events:
        the events returned are those of the items committed, a prefix of ``batch``."""
        seq, prev = self.journal.head_seq, self.journal.head_hash
        events: list[SignedEvent | None] = []
        signed: list[SignedEvent] = []
        writes: list[Write] = []
        cap, size = self.look_every or -1, 0
        for item in batch:
            if size >= cap > 0:
                break
            if item.error is not None:
                events.append(None)
                continue
            if item.topic is None:
                writes.extend(item.writes)
                events.append(None)
                continue
            try:
                ev = self.signer.make_event(
                    seq=seq + 1, ts=item.ts, topic=item.topic, payload=item.payload,
                    prev=prev)
            except (ValueError, TypeError, OverflowError, RecursionError) as exc:
                # It can never be signed: retrying would hold everything queued behind
                # it for ever. Dropped, with its writes, once; its publisher is told.
                item.error = exc if isinstance(exc, ValueError) else ValueError(str(exc))
                self.dropped += 1
                log.error("event %s dropped, it cannot be signed: %s",
                          safe(ascii(item.topic), 80), exc)
                events.append(None)
                continue
            writes.extend(item.writes)
            seq += 1
            prev = ev.hash
            events.append(ev)
            signed.append(ev)
            size += len(ev.text)
        started = time.perf_counter()
        self.journal.append(signed, writes)
        self.commit_seconds_last = time.perf_counter() - started
        self.committed_bytes += sum(len(ev.text) for ev in signed)
        return events

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The writer loop; never returns unless cancelled. Flushes what is queued on exit."""
        task_status.started()
        backoff = 0.05
        try:
            while True:
                await self._wake.wait()
                self._wake = trio.Event()
                while self._pending or self._first:
                    if self._held():
                        # Retention is due and has not looked: wait for it (or for its
                        # checkpoint, which is committed ahead of the rest).
                        self._resume = trio.Event()
                        await self._resume.wait()
                        continue
                    try:
                        await self._flush_once()
                        await self._maybe_checkpoint()
                        backoff = 0.05
                        if self.failing_since is not None:
                            log.warning("journal commits resumed after %.1f s; nothing queued "
                                        "was lost", time.time() - self.failing_since)
                            self.failing_since = None
                    except Exception as exc:  # noqa: BLE001 - disk full, I/O error
                        # Nothing is lost: the group stays queued (durable publishers keep
                        # waiting, nobody sees an uncommitted event) and is retried.
                        self.commit_errors += 1
                        self.last_error = f"journal commit failed: {exc}"
                        if self.failing_since is None:
                            self.failing_since = time.time()
                        log.error("%s; %d events queued; retrying in %.2f s", self.last_error,
                                  len(self._pending), backoff)
                        await trio.sleep(backoff)
                        backoff = min(backoff * 2, 5.0)
        finally:
            with trio.CancelScope(shield=True):
                await self.flush()

    async def _maybe_checkpoint(self) -> None:
        """Checkpoint the WAL past the journal's ``wal_limit``, at most once a second; the
        writer waits for it (publishers queue meanwhile)."""
        now = time.monotonic()
        # Under retention the WAL counts against max_size: checkpoint as soon as it is over.
        pace = 0.0 if self.look_every else 1.0
        wal = self.journal.wal_bytes()
        if now - self._last_checkpoint < pace or wal <= self.journal.wal_limit:
            return
        self._last_checkpoint = now
        # Readers holding old frames kept it from being reset: wait for them, then empty it.
        truncate = bool(self.look_every) and wal > 2 * self.journal.wal_limit
        try:
            await trio.to_thread.run_sync(self.journal.checkpoint, truncate)
        except Exception as exc:  # noqa: BLE001 - retried next time
            log.warning("WAL checkpoint failed: %s", exc)

    async def _flush_once(self) -> None:
        queue = self._first or self._pending
        batch = queue[:1] if queue is self._first else queue[: self.batch_max]
        if len(batch) <= self.inline_max:
            # A small group with no fsync takes less time than the hand-off to a thread
            # and back (two wake-ups, each a scheduling delay on a busy host).
            events = self._sign_and_commit(batch)
        else:
            # In a thread: signing a large group, or an fsync, must not stall the loop.
            events = await trio.to_thread.run_sync(self._sign_and_commit, batch)
        batch = batch[: len(events)]
        del queue[: len(batch)]
        self.commit_count += 1
        if self.look_every and self.committed_bytes - self.looked_bytes >= self.look_every:
            self._look_due.set()
        if len(self._pending) < self.max_pending:
            self._room.set()
        self._fan_out([e for e in events if e is not None])
        for item, ev in zip(batch, events, strict=True):
            if item.done is not None:
                item.result = ev
                item.done.set()
        await trio.lowlevel.checkpoint()

    def _fan_out(self, events: list[SignedEvent]) -> None:
        subs = list(self._subs)
        for ev in events:
            ring = self.ring
            if len(ring) == ring.maxlen:
                self.ring_bytes -= len(ring[0].text)
            ring.append(Recent(ev.seq, ev.topic, ev.text))
            self.ring_bytes += len(ev.text)
            while self.ring_bytes > self.ring_max_bytes and len(ring) > 1:
                self.ring_bytes -= len(ring.popleft().text)
            self.delivered_seq = ev.seq
            self.delivered_hash = ev.hash
            topic = ev.topic
            if topic == "daemon.checkpoint":
                self.last_checkpoint = ev
            for sub in subs:
                if sub.mesh is not None and sub.match(topic):
                    try:
                        sub.deliver(ev)
                    except Exception:  # a subscriber's bug must not stop the mesh
                        log.exception("subscriber failed; dropping it")
                        sub.close()

    async def flush(self) -> None:
        """Commit and deliver everything queued now (used at shutdown)."""
        tries = 0
        while (self._pending or self._first) and tries < 3:
            try:
                await self._flush_once()
            except Exception as exc:  # noqa: BLE001
                tries += 1
                self.last_error = f"journal commit failed: {exc}"
                log.error("%s", self.last_error)
        lost = len(self._pending) + len(self._first)
        if lost:
            # Said, not silent: these never reach the journal.
            log.critical("%d queued events were not journaled (the journal kept failing "
                         "at shutdown): %s", lost, self.last_error)

    def close(self) -> None:
        self._closed = True
