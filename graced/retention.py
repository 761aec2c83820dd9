"""Retention: the journal stays under ``[journal] max_size`` and ``max_age``.

Theory of operation: SQLite reuses the pages that deleted rows free and never shrinks
its file by itself, so the file's size is a high-water mark: to keep the journal (the
database file plus its WAL) under ``max_size``, the pages *in use* must never reach the
room left beside the WAL. :class:`Retention` looks each time the mesh has committed a
twentieth of that room (and every :data:`PERIOD` seconds anyway, for ``max_age``), with
the handlers' read connection in a worker thread; the writer commits groups of at most
that much and holds further groups while a look is two twentieths overdue, so no burst
outruns it. When the pages in use pass
:data:`HIGH` of the room, or the oldest events are older than ``max_age``, it chooses
the first event to keep, K: the first one young enough, and far enough along that the
rows before it free the pages down to :data:`LOW` of the room. K never passes the head
nor an event a replay in progress has still to send (``pinned``). Then, in order:

1. the journal's ``first_seq`` becomes K at once, so from then on a subscription from
   before K is refused (``pruned``) rather than served with a gap;
2. a signed ``daemon.checkpoint`` naming K and its hash (``first_seq``, ``first_hash``)
   is committed: the anchor from which what is kept verifies
   (``gracectl verify --from K:HASH``, ``gracectl tail --verify --since K``);
   in the same transaction as the delete of the events before K (at most
   :data:`MAX_PRUNE` a transaction), committed by the mesh's writer ahead of any other
   group.

Every ``daemon.checkpoint`` (the periodic ones too) names the oldest event kept. Used
nonces older than twice the request window are pruned here too: a request carrying one
is refused as stale anyway.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import trio

from .mesh import Mesh
from .protocol import format_ts
from .readers import SharedReader

log = logging.getLogger("graced.retention")

HIGH = 0.75  # of the room: pages in use past this start a prune...
LOW = 0.55  # ...down to this
PERIOD = 10.0  # seconds between looks at most (max_age, nonces), when little is written
CHUNK = 5000  # events read per query
MAX_PRUNE = 100_000  # events deleted per transaction
ROW_OVERHEAD = 16  # bytes a row takes beyond its fields (record header, cell pointer)


def used_bytes(reader: Any) -> int:
    """Bytes of the database's pages that are in use (not on the free list)."""
    (size,) = reader.query("PRAGMA page_size")[0]
    (count,) = reader.query("PRAGMA page_count")[0]
    (free,) = reader.query("PRAGMA freelist_count")[0]
    return int(str(size)) * (int(str(count)) - int(str(free)))


def first_younger(reader: Any, first: int, head: int, cutoff: str, due: str) -> int:
    """The first seq from ``first`` whose time is at or after ``cutoff`` (else ``head``),
    once the oldest event is older than ``due``; else ``first``."""
    oldest = reader.query("SELECT ts FROM events WHERE seq = ?", (first,))
    if not oldest or str(oldest[0][0]) >= due:
        return first
    rows = reader.query("SELECT seq FROM events WHERE seq BETWEEN ? AND ? AND ts >= ? "
                        "ORDER BY seq LIMIT 1", (first, head, cutoff))
    return int(str(rows[0][0])) if rows else head


def cut_for(reader: Any, first: int, head: int, need: int) -> int:
    """The first seq to keep so that the rows before it (from ``first``) take at least
    ``need`` bytes; ``head`` at most."""
    total, nxt = 0, first
    while nxt <= head:
        rows = reader.query(
            "SELECT seq, length(CAST(body AS BLOB)) + length(hash) + length(ts) "
            "+ length(topic) FROM events WHERE seq BETWEEN ? AND ? ORDER BY seq LIMIT ?",
            (nxt, head, CHUNK))
        if not rows:
            break
        for seq, n in rows:
            total += int(str(n)) + ROW_OVERHEAD
            if total >= need:
                return min(int(str(seq)) + 1, head)
        nxt = int(str(rows[-1][0])) + 1
    return head


def hash_of(reader: Any, seq: int) -> str | None:
    rows = reader.query("SELECT hash FROM events WHERE seq = ?", (seq,))
    return str(rows[0][0]) if rows else None


def checkpoint_payload(mesh: Mesh, interval: float) -> dict[str, Any]:
    """A ``daemon.checkpoint``'s payload: the head (the last event published before it)
    and the oldest event the journal keeps."""
    journal = mesh.journal
    return {"head_seq": mesh.delivered_seq, "head_hash": mesh.delivered_hash,
            "first_seq": journal.first_seq, "first_hash": journal.first_hash,
            "interval": interval}


class Retention:
    """Prunes the oldest events behind a signed checkpoint; see the module's doc."""

    def __init__(self, *, mesh: Mesh, reads: SharedReader[Any], max_size: int,
                 max_age: float, checkpoint_interval: Callable[[], float],
                 request_window: Callable[[], float],
                 pinned: Callable[[], int | None], clock: Callable[[], float] = time.time
                 ) -> None:
        self.mesh = mesh
        self.reads = reads
        self.max_size = max_size
        self.max_age = max_age
        self.checkpoint_interval = checkpoint_interval
        self.request_window = request_window
        self.pinned = pinned
        self.clock = clock
        self.pruned_total = 0
        self.prunes = 0
        self.last_prune: dict[str, Any] | None = None
        self.last_error: str | None = None
        self._running = False

    @property
    def room(self) -> int:
        """Bytes the database file may take: ``max_size`` less six times the WAL's
        limit (the WAL grows past its limit by a group and a prune between two of the
        writer's checkpoints, and while readers hold old frames, until the writer
        truncates it at twice its limit)."""
        if self.max_size <= 0:
            return 0
        return max(self.max_size - 6 * self.mesh.journal.wal_limit, self.max_size // 2)

    def status(self) -> dict[str, Any]:
        return {"max_size": self.max_size, "max_age": self.max_age,
                "first_seq": self.mesh.journal.first_seq, "pruned": self.pruned_total,
                "prunes": self.prunes, "last_prune": self.last_prune,
                "last_error": self.last_error}

    def configure(self, max_size: int, max_age: float) -> None:
        """Apply reloaded limits: the next look (at once) prunes to them."""
        if (max_size, max_age) == (self.max_size, self.max_age):
            return
        self.max_size, self.max_age = max_size, max_age
        if self._running:
            self.mesh.look_every = max(self.room // 20, 1) if max_size > 0 else 0
            self.mesh.look_now()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        mesh = self.mesh
        if self.max_size > 0:
            mesh.look_every = max(self.room // 20, 1)
        self._running = True
        task_status.started()
        try:
            while True:
                # A short max_age is looked at often enough to hold (a quarter of it, 1 s
                # at least); read each time, as a reload may change it.
                period = (min(PERIOD, max(1.0, self.max_age / 4)) if self.max_age > 0
                          else PERIOD)
                with trio.move_on_after(period):
                    await mesh.wait_look_due()
                at = mesh.committed_bytes
                try:
                    while await self.prune_once() >= MAX_PRUNE:
                        pass
                    self.last_error = None
                except trio.ClosedResourceError:
                    return  # the mesh is closing
                except Exception as exc:  # noqa: BLE001 - tried again next time
                    if self.last_error is None:
                        log.warning("%s (trying again)", exc)
                    self.last_error = str(exc)
                finally:
                    mesh.looked(at)
        finally:
            self._running = False
            mesh.look_every = 0  # never hold the writer for a retention that is gone
            mesh.looked(mesh.committed_bytes)

    async def prune_once(self) -> int:
        """Prune what is over the limits now; returns how many events went."""
        mesh, journal = self.mesh, self.mesh.journal
        horizon = self.clock() - 2 * self.request_window()
        mesh.store([("DELETE FROM used_nonces WHERE ts < ?", (horizon,))])
        first, head = journal.first_seq, mesh.delivered_seq
        if not first or head <= first:
            return 0
        cut, reason = first, ""
        if self.max_age > 0:
            # Pruned in steps of a tenth of max_age (an hour at most), not an event at a
            # time: each prune adds a checkpoint.
            now = self.clock()
            cutoff = format_ts(now - self.max_age)
            due = format_ts(now - self.max_age - min(self.max_age / 10, 3600.0))
            k = await self.reads.run(lambda r: first_younger(r, first, head, cutoff, due))
            if k > cut:
                cut, reason = k, "max_age"
        if self.max_size > 0:
            room = self.room
            used = await self.reads.run(used_bytes)
            if used > HIGH * room:
                need = int(used - LOW * room)
                k = await self.reads.run(lambda r: cut_for(r, first, head, need))
                if k > cut:
                    cut, reason = k, "max_size"
        cut = min(cut, first + MAX_PRUNE)
        if cut <= first:
            return 0
        first_hash = await self.reads.run(lambda r: hash_of(r, cut))
        pin = self.pinned()
        if first_hash is None or journal.first_seq != first or (pin is not None and pin < cut):
            return 0  # a replay still reads what would go: next time
        # From here on, nothing before cut is served (no await since the pin was read).
        journal.first_seq, journal.first_hash = cut, first_hash
        pruned = cut - first
        # The checkpoint and the delete in one transaction: never one without the other.
        await mesh.publish_first("daemon.checkpoint", {
            **checkpoint_payload(mesh, self.checkpoint_interval()),
            "pruned": pruned, "reason": reason,
        }, writes=[("DELETE FROM events WHERE seq < ?", (cut,))])
        self.pruned_total += pruned
        self.prunes += 1
        self.last_prune = {"at": self.clock(), "first_seq": cut, "events": pruned,
                           "reason": reason}
        log.info("pruned events %d-%d (%s); the oldest kept is %d",
                 first, cut - 1, reason, cut)
        return pruned
