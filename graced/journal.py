"""The journal: every signed event, in order, in SQLite (WAL).

Blocking code, meant to run in a worker thread. One writer connection (owned by
:class:`Journal`, used by one thread at a time); readers open their own connection.
Schema changes are numbered migrations tracked in ``PRAGMA user_version``.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from pathlib import Path

from .errors import StateError
from .protocol import GENESIS_PREV, SignedEvent

MIGRATIONS: list[str] = [
    # 1: events and a small key/value table
    """
    CREATE TABLE events (
        seq   INTEGER PRIMARY KEY,
        ts    TEXT NOT NULL,
        topic TEXT NOT NULL,
        hash  TEXT NOT NULL,
        body  TEXT NOT NULL
    );
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    """,
    # 2: missions (the source of truth for mission state) and detector state
    """
    CREATE TABLE missions (
        id          INTEGER PRIMARY KEY,
        detector    TEXT NOT NULL,
        kind        TEXT NOT NULL,
        subject     TEXT NOT NULL,
        severity    TEXT NOT NULL,
        state       TEXT NOT NULL,
        summary     TEXT NOT NULL,
        opened_at   REAL NOT NULL,
        updated_at  REAL NOT NULL,
        closed_at   REAL,
        occurrences INTEGER NOT NULL,
        flapping    INTEGER NOT NULL,
        data        TEXT NOT NULL
    );
    CREATE INDEX missions_state ON missions (state);
    CREATE INDEX missions_key ON missions (detector, subject);
    CREATE TABLE detector_state (name TEXT PRIMARY KEY, data TEXT NOT NULL);
    """,
    # 3: nonces of signed requests already used (replay protection across restarts)
    """
    CREATE TABLE used_nonces (nonce TEXT PRIMARY KEY, kid TEXT NOT NULL, ts REAL NOT NULL);
    """,
    # 4: outcome memory (with its full-text index) and learned patterns
    """
    CREATE TABLE outcomes (
        mission_id    INTEGER PRIMARY KEY,
        signature     TEXT NOT NULL,
        detector      TEXT NOT NULL,
        kind          TEXT NOT NULL,
        subject       TEXT NOT NULL,
        severity      TEXT NOT NULL,
        summary       TEXT NOT NULL,
        sample_values TEXT NOT NULL,
        playbook      TEXT,
        steps         TEXT NOT NULL,
        outcome       TEXT NOT NULL,
        ran           INTEGER NOT NULL,
        success       INTEGER,
        ttr           REAL,
        approved_by   TEXT,
        opened_at     REAL NOT NULL,
        closed_at     REAL NOT NULL,
        consulted     INTEGER NOT NULL,
        interrupted   INTEGER NOT NULL
    );
    CREATE INDEX outcomes_key ON outcomes (detector, subject, mission_id);
    CREATE INDEX outcomes_closed ON outcomes (closed_at);
    CREATE VIRTUAL TABLE outcomes_fts USING fts5(symptoms);
    CREATE TABLE outcome_terms (term TEXT PRIMARY KEY, docs INTEGER NOT NULL) WITHOUT ROWID;
    CREATE TABLE patterns (
        signature  TEXT NOT NULL,
        playbook   TEXT NOT NULL,
        source     TEXT NOT NULL,
        detector   TEXT NOT NULL,
        subject    TEXT NOT NULL,
        successes  REAL NOT NULL,
        failures   REAL NOT NULL,
        ttr_total  REAL NOT NULL,
        ttr_count  REAL NOT NULL,
        first_seen REAL NOT NULL,
        last_seen  REAL NOT NULL,
        PRIMARY KEY (signature, playbook, source)
    );
""",
    # 5: learning that cannot be poisoned: evidence details and provenance of a pattern
    # row (JSON), what held learning back on an outcome, and rows quarantined at start
    """
    ALTER TABLE patterns ADD COLUMN data TEXT NOT NULL DEFAULT '{}';
    ALTER TABLE outcomes ADD COLUMN held_back TEXT;
    CREATE TABLE patterns_quarantine (
        signature TEXT, playbook TEXT, source TEXT, reason TEXT NOT NULL,
        row TEXT NOT NULL, at REAL NOT NULL
    );
""",
    # 6: mission rows whose data SQLite cannot parse, moved aside at start
    """
    CREATE TABLE missions_quarantine (
        id INTEGER, reason TEXT NOT NULL, row TEXT NOT NULL, at REAL NOT NULL
    );
""",
]

Write = tuple[str, tuple[object, ...]]

WAL_LIMIT = 4 << 20  # bytes of WAL past which the writer checkpoints it (at most)


def wal_limit(max_size: int) -> int:
    """The WAL's limit for a journal kept under ``max_size`` bytes (0: no limit): a
    thirty-second of it, at most :data:`WAL_LIMIT`."""
    return WAL_LIMIT if max_size <= 0 else max(32 << 10, min(WAL_LIMIT, max_size // 32))


def _connect(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        conn = sqlite3.connect(
            f"file:{path}?mode=ro", uri=True, check_same_thread=False, isolation_level=None
        )
    else:
        conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    conn.execute("PRAGMA busy_timeout = 5000")
    return conn


class Journal:
    """Append-only event store. Not thread-safe: one caller at a time."""

    def __init__(self, path: Path, *, synchronous: str = "full",
                 wal_limit: int = WAL_LIMIT) -> None:
        self.path = path
        self.synchronous = synchronous
        self.wal_limit = wal_limit
        existed = path.exists()
        try:
            self._conn = _connect(path)
            self._conn.execute("PRAGMA journal_mode = WAL")
            self._conn.execute(f"PRAGMA synchronous = {synchronous.upper()}")
            # Checkpoints run apart from commits (see checkpoint()), so a commit never
            # waits for one.
            self._conn.execute("PRAGMA wal_autocheckpoint = 0")
            # A reset WAL is reused from its start but keeps its size unless limited.
            self._conn.execute(f"PRAGMA journal_size_limit = {int(wal_limit)}")
            # Debian's SQLite zeroes every page a delete frees (secure_delete = 1): a prune
            # of N MB would write N MB more to the WAL. FAST zeroes only what costs no I/O.
            self._conn.execute("PRAGMA secure_delete = FAST")
            self._migrate()
            self.head_seq, self.head_hash = self._read_head()
            # The oldest event kept (retention prunes the ones before it); 0 when empty.
            row = self._conn.execute(
                "SELECT seq, hash FROM events ORDER BY seq LIMIT 1").fetchone()
            self.first_seq, self.first_hash = (int(row[0]), str(row[1])) if row else (0, "")
        except sqlite3.DatabaseError as exc:
            what = "an existing" if existed else "a new"
            raise StateError(f"journal {path}: cannot open {what} database: {exc}") from None

    def _migrate(self) -> None:
        (version,) = self._conn.execute("PRAGMA user_version").fetchone()
        if version > len(MIGRATIONS):
            raise StateError(
                f"journal {self.path}: schema version {version} is newer than this graced "
                f"understands ({len(MIGRATIONS)}); upgrade graced"
            )
        for number in range(version, len(MIGRATIONS)):
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                for stmt in MIGRATIONS[number].split(";"):
                    if stmt.strip():
                        self._conn.execute(stmt)
                self._conn.execute(f"PRAGMA user_version = {number + 1}")
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise

    def _read_head(self) -> tuple[int, str]:
        row = self._conn.execute(
            "SELECT seq, hash, body FROM events ORDER BY seq DESC LIMIT 1"
        ).fetchone()
        if row is None:
            return 0, GENESIS_PREV
        seq, h, body = row
        try:
            json.loads(body)
        except ValueError:
            raise StateError(f"journal {self.path}: head event {seq} is corrupt") from None
        return int(seq), str(h)

    def append(self, events: Sequence[SignedEvent], writes: Sequence[Write] = ()) -> None:
        """Commit a group of events, and the state writes that go with them, atomically."""
        if not events and not writes:
            return
        conn = self._conn
        conn.execute("BEGIN")
        try:
            conn.executemany(
                "INSERT INTO events (seq, ts, topic, hash, body) VALUES (?, ?, ?, ?, ?)",
                [(e.seq, e.fields["ts"], e.topic, e.hash, e.text) for e in events],
            )
            for sql, params in writes:
                conn.execute(sql, params)
            conn.execute("COMMIT")
        except BaseException:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # SQLite already rolled back (disk full): keep the original error
            raise
        if events:
            self.head_seq = events[-1].seq
            self.head_hash = events[-1].hash
            if not self.first_seq:
                self.first_seq, self.first_hash = events[0].seq, events[0].hash

    def query(self, sql: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        """Read with the writer's connection (call from the writer's side only)."""
        return list(self._conn.execute(sql, params).fetchall())

    def checkpoint(self, truncate: bool = False) -> None:
        """Copy the WAL into the database, on the writer's own connection, between
        commits: no frame is appended meanwhile, so (unless a reader still uses old
        frames) it completes and the next commit starts the WAL again from the top. A
        checkpoint on another connection never catches up with a writer that commits
        every few milliseconds, and the WAL grows without bound. ``truncate`` waits for
        readers of old frames (busy_timeout at most) and empties the WAL file: for a WAL
        that passive checkpoints let grow past twice its limit while readers held it."""
        self._conn.execute(f"PRAGMA wal_checkpoint({'TRUNCATE' if truncate else 'PASSIVE'})")

    def size_bytes(self) -> int:
        total = 0
        for suffix in ("", "-wal"):
            try:
                total += Path(str(self.path) + suffix).stat().st_size
            except OSError:
                pass
        return total

    def wal_bytes(self) -> int:
        try:
            return Path(str(self.path) + "-wal").stat().st_size
        except OSError:
            return 0

    def close(self) -> None:
        try:
            self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except sqlite3.Error:
            pass
        self._conn.close()


class JournalReader:
    """A read connection for replays; one per replaying client."""

    def __init__(self, path: Path) -> None:
        self._conn = _connect(path, readonly=True)

    def query(self, sql: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        return list(self._conn.execute(sql, params).fetchall())

    def read(self, first: int, last: int, limit: int, max_bytes: int = 0) -> list[str]:
        """Bodies of events ``first..last`` (inclusive), at most ``limit`` of them and,
        with ``max_bytes``, no more once they hold that many bytes (at least one)."""
        cursor = self._conn.execute(
            "SELECT body FROM events WHERE seq BETWEEN ? AND ? ORDER BY seq LIMIT ?",
            (first, last, limit),
        )
        out: list[str] = []
        size = 0
        for (body,) in cursor:
            out.append(body)
            size += len(body)
            if max_bytes and size >= max_bytes:
                break
        cursor.close()
        return out

    def close(self) -> None:
        self._conn.close()
