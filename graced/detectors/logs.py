"""Log error rate: follow a file (surviving rotation and truncation) or a journald unit.

Value: the share of new lines matching ``pattern`` over the last ``window`` seconds, in
percent (when ``max_ratio`` is set; it needs at least ``min_lines`` lines), or the
matching lines per second (``max_rate``). With ``request_pattern``, only the lines it
matches count (the requests) and an error is a request that also matches ``pattern``:
the error rate is failed requests / requests, whatever other lines (stack traces,
banners, debug output) the log holds.

A log file is listened to with inotify (one inotify fd per detector, in its
:class:`~.events.Wakeup`): a watch on the file (writes, truncation) and one on its
directory (the file created, renamed or removed: rotation), so new lines are read the
moment they are written; the interval still ticks, to slide the window.
"""

from __future__ import annotations

import collections
import errno
import json
import math
import os
import re
import subprocess
import time
from typing import IO, Any

from inotify_simple import flags as inf

from ..config import DetectorConfig
from ..trustpath import open_monitored
from .base import Observation
from .events import POLL, Watches

MAX_LINE = 64 << 10
"""A log line longer than this is cut: its first MAX_LINE bytes are kept, the rest is
only searched for ``pattern`` and ``request_pattern`` as it streams past (what matched
is kept, a few hundred bytes around it), so a marker at the end of a huge line counts."""
OVERLAP = 4 << 10
"""Bytes of a long line's previous piece searched again with the next one (a match
across the boundary of two reads)."""
SNIPPET = 256
FINGERPRINT = 64
"""Bytes of a followed log kept to tell a truncated-and-rewritten file from a grown one."""
"""Bytes kept on each side of a match found past MAX_LINE."""
READ_CHUNK = 1 << 20
READ_MAX = 4 << 20
"""At most this much of a log is read per sample; the rest waits for the next one, which
comes after CATCH_UP rather than the interval (a burst is read at up to ~80 MiB/s, with
bounded CPU, and detection is not minutes late)."""
CATCH_UP = 0.05
GONE_GRACE = 10.0
"""A followed log may be missing this long (seconds) after it was renamed or removed:
rotation (a rename, then a new file). Still gone past it, the file is missing: the
detector fails, naming it, until the file is back."""
FILE_EVENTS = inf.MODIFY | inf.ATTRIB | inf.MOVE_SELF | inf.DELETE_SELF
# Names coming and going only: writes to the directory's other files (a busy /var/log)
# never wake this detector; its own file's writes reach it through the file's watch.
DIR_EVENTS = inf.CREATE | inf.MOVED_TO | inf.MOVED_FROM | inf.DELETE
SAVED_BUCKETS = 120
"""The window's counts are saved (across a restart) in at most this many time buckets."""


class _Window:
    """Counts of lines and matches per sample, over a sliding time window."""

    def __init__(self, config: DetectorConfig) -> None:
        self.config = config
        self.regex = re.compile(config.pattern)
        self.requests = re.compile(config.request_pattern) if config.request_pattern else None
        self.samples: collections.deque[tuple[float, int, int]] = collections.deque()

    def observe(self, subject: str, lines: list[str]) -> Observation:
        cfg = self.config
        now = time.monotonic()
        if self.requests is not None:
            lines = [ln for ln in lines if self.requests.search(ln)]
        matches = sum(1 for ln in lines if self.regex.search(ln))
        self.samples.append((now, len(lines), matches))
        while self.samples and self.samples[0][0] < now - cfg.window:
            self.samples.popleft()
        total = sum(s[1] for s in self.samples)
        hits = sum(s[2] for s in self.samples)
        ratio = hits / total if total else 0.0
        rate = hits / cfg.window
        what = "requests" if self.requests is not None else "lines"
        obs = Observation(subject, round(100 * ratio, 3) if cfg.max_ratio is not None
                          else round(rate, 4), "%" if cfg.max_ratio is not None else
                          f"{what}/s", detail={
                              what: total, "matches": hits, "window_s": cfg.window,
                              "rate_per_s": round(rate, 4), "ratio": round(ratio, 4)})
        reasons = []
        if cfg.max_ratio is not None and total >= cfg.min_lines and ratio > cfg.max_ratio:
            reasons.append(f"{hits} of {total} {what} match /{cfg.pattern}/ "
                           f"({100 * ratio:.1f} % > {100 * cfg.max_ratio:g} %)")
        if cfg.max_rate is not None and rate > cfg.max_rate:
            reasons.append(f"{rate:.2f} matching {what}/s > {cfg.max_rate:g}/s")
        if reasons:
            obs.alarm = "; ".join(reasons) + f" in the last {cfg.window:g} s"
        return obs

    def saved(self) -> dict[str, Any]:
        """The counts in the window, to keep across a restart: each bucket of samples by
        its age (a monotonic clock does not survive a reboot), the newest age of a bucket
        standing for it, at most ``SAVED_BUCKETS`` of them. Safe beside a sample running in
        another thread (the deque is copied in one step)."""
        cfg = self.config
        now = time.monotonic()
        width = cfg.window / SAVED_BUCKETS
        buckets: dict[int, list[float]] = {}
        for t, n, k in tuple(self.samples):
            age = max(now - t, 0.0)
            b = buckets.setdefault(min(int(age / width), SAVED_BUCKETS - 1), [age, 0, 0])
            b[0], b[1], b[2] = min(b[0], age), b[1] + n, b[2] + k
        return {"pattern": cfg.pattern, "request_pattern": cfg.request_pattern,
                "saved_at": time.time(),
                "counts": [[round(a, 3), int(n), int(k)] for a, n, k in buckets.values()]}

    def restore(self, data: object) -> None:
        """The counts :meth:`saved` wrote that are still inside the window, so a restart
        forgets neither the requests nor the errors of the last ``window`` seconds. Data
        from disk: anything but what :meth:`saved` writes is ``ValueError``; counts of
        other patterns (the config changed) are dropped."""
        cfg = self.config
        if not isinstance(data, dict):
            raise ValueError("log window: saved state is not a table")
        if (data.get("pattern"), data.get("request_pattern")) != (cfg.pattern,
                                                                  cfg.request_pattern):
            return  # counts of other patterns mean nothing now
        at, counts = data.get("saved_at"), data.get("counts")
        if not (isinstance(at, (int, float)) and not isinstance(at, bool)
                and math.isfinite(at)):
            raise ValueError("log window: saved_at is not a time")
        if not isinstance(counts, list) or len(counts) > SAVED_BUCKETS:
            raise ValueError(f"log window: counts is not a list of at most {SAVED_BUCKETS}")
        got = []
        for c in counts:
            if not (isinstance(c, list) and len(c) == 3
                    and isinstance(c[0], (int, float)) and math.isfinite(c[0]) and c[0] >= 0
                    and all(isinstance(x, int) and not isinstance(x, bool) for x in c[1:])
                    and 0 <= c[2] <= c[1] < 2**53):
                raise ValueError(f"log window: a count is not [age, lines, matches]: "
                                 f"{str(c)[:80]}")
            got.append((float(c[0]), c[1], c[2]))
        now = time.monotonic()
        since = max(time.time() - at, 0.0)  # graced was down this long
        kept = [(now - since - age, n, k) for age, n, k in sorted(got, reverse=True)
                if since + age <= cfg.window]
        self.samples.extendleft(reversed(kept))  # oldest first, before any new sample


def open_regular(path: str) -> IO[bytes]:
    """``path`` opened for reading, never blocking (a FIFO swapped in for the log would
    hold the sample thread in open() for good) and only if it is a regular file: a FIFO,
    a device (/dev/zero) or a socket is refused with an OSError naming it. And only if
    the way to it lets graced trust it (graced.trustpath): a log that a user who controls
    a directory or symlink on the way could not read is never read, so no line of it is
    ever counted or reported."""
    fd = open_monitored(path)
    try:
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


class _LongLine:
    """A line longer than MAX_LINE, while it streams past: its head, plus a snippet
    around the first match of ``pattern`` and of ``request_pattern`` in the rest. Its
    memory is bounded (MAX_LINE + OVERLAP + two snippets) however long the line."""

    def __init__(self, head: bytes, window: _Window) -> None:
        self.window = window
        self.head = head[:MAX_LINE]
        self.snippets: list[bytes] = []
        self.found = [r is None for r in (window.regex, window.requests)]
        self.tail = head[-OVERLAP:]
        self._search(head[MAX_LINE - OVERLAP:])

    def feed(self, data: bytes) -> None:
        if not all(self.found) and data:
            self._search(self.tail + data)
        self.tail = (self.tail + data)[-OVERLAP:]

    def _search(self, piece: bytes) -> None:
        text = piece.decode("utf-8", "replace")
        for i, regex in enumerate((self.window.regex, self.window.requests)):
            if self.found[i] or regex is None:
                continue
            m = regex.search(text)
            if m is not None:
                self.found[i] = True
                got = text[max(0, m.start() - SNIPPET):m.end() + SNIPPET].encode()
                self.snippets.append(got[:2 * SNIPPET + MAX_LINE // 16])

    def text(self) -> bytes:
        """The line as counted: the head (cut to MAX_LINE) and the snippets found."""
        return b" \xe2\x80\xa6 ".join([self.head[:MAX_LINE - sum(len(x) + 5 for x in
                                                                   self.snippets)],
                                       *self.snippets])


class LogFile:
    def __init__(self, config: DetectorConfig) -> None:
        self.config = config
        self.subject = config.effective_subject
        self.window = _Window(config)
        self._fh: IO[bytes] | None = None
        self._ino: tuple[int, int] | None = None
        self._partial = b""
        self._long: _LongLine | None = None  # inside a line longer than MAX_LINE
        self._behind = False  # the last read stopped at READ_MAX, not at the end
        self._gone_since: float | None = None  # when the path was first seen missing
        # What an append-only file never changes: its first bytes and the bytes just before
        # the offset read to. Either changed means it was truncated and written again
        # (copytruncate), even when it has already grown past the offset (review of #19).
        self._head = b""
        self._mark = b""
        self._name = os.path.basename(config.file)
        self._watches, self._dir_wd, self.mode_note = Watches.listen(
            os.path.dirname(config.file) or "/", DIR_EVENTS)
        self._file_wd = -1
        self.wakeup = self._watches.wakeup if self._watches else None
        self.mode = "inotify" if self._watches else POLL

    def _watch_file(self) -> None:
        """Watch the file now open (its inode: writes reach it whatever its name)."""
        if self._watches is None:
            return
        if self._file_wd >= 0:
            try:
                self._watches.inotify.rm_watch(self._file_wd)
            except OSError:
                pass  # its inode is gone: the kernel dropped the watch
            self._file_wd = -1
        try:
            self._file_wd = self._watches.inotify.add_watch(self.config.file, FILE_EVENTS)
        except OSError:
            pass  # gone again already: the directory watch sees it come back

    def cadence(self) -> float | None:
        """Sample again soon while behind the file's end, and when a missing file's grace
        ends (the runner's step hint)."""
        if self._behind:
            return CATCH_UP
        if self._gone_since is not None:
            return max(CATCH_UP, self._gone_since + GONE_GRACE - time.monotonic())
        return None

    def _still_gone(self) -> None:
        """The path is missing: fine within GONE_GRACE (a rotation's new file is coming),
        a detector failure naming the file past it."""
        now = time.monotonic()
        if self._gone_since is None:
            self._gone_since = now
        elif now - self._gone_since >= GONE_GRACE:
            raise FileNotFoundError(
                errno.ENOENT, f"No such file or directory (gone for over {GONE_GRACE:g} s, "
                              "no new file came: not a rotation)", self.config.file)

    def drain(self) -> bool:
        """Consume queued inotify events; True when one concerns this log."""
        if self._watches is None:
            return False
        return any(ev.wd == self._file_wd or ev.mask & inf.Q_OVERFLOW
                   or (ev.wd == self._dir_wd and ev.name == self._name)
                   for ev in self._watches.events())

    def _open(self, at_end: bool) -> bool:
        try:
            fh = open_regular(self.config.file)
        except OSError:
            if at_end:  # the first open: a path graced cannot read is a detector failure
                raise
            return False
        st = os.fstat(fh.fileno())
        if at_end:
            fh.seek(0, os.SEEK_END)
        self._fh, self._ino, self._partial = fh, (st.st_dev, st.st_ino), b""
        self._long = None
        self._watch_file()
        self._remember()
        return True

    def _remember(self) -> None:
        """Note the file's first bytes and those before the offset (see ``_rewritten``)."""
        assert self._fh is not None
        fd, pos = self._fh.fileno(), self._fh.tell()
        self._head = os.pread(fd, FINGERPRINT, 0)
        self._mark = os.pread(fd, min(FINGERPRINT, pos), pos - min(FINGERPRINT, pos))

    def _rewritten(self, size: int) -> bool:
        """Truncated in place since the last read (copytruncate), written again or not."""
        assert self._fh is not None
        pos = self._fh.tell()
        if size < pos:
            return True
        fd = self._fh.fileno()
        try:
            return (os.pread(fd, len(self._head), 0) != self._head
                    or os.pread(fd, len(self._mark), pos - len(self._mark)) != self._mark)
        except OSError:
            return False

    def _read(self) -> list[str]:
        """The complete lines appended since the last read (at most READ_MAX bytes a
        sample). A line longer than MAX_LINE keeps its first MAX_LINE bytes and what
        the patterns match in the rest (:class:`_LongLine`): a writer that never ends
        its line cannot grow graced, nor hide a marker behind 64 KiB of padding. Bytes
        that are not UTF-8 become U+FFFD."""
        assert self._fh is not None
        lines: list[bytes] = []
        self._behind = True  # unless the end is reached within READ_MAX
        for _ in range(READ_MAX // READ_CHUNK):
            data = self._fh.read(READ_CHUNK)
            if not data:
                self._behind = False
                break
            if self._long is not None:
                nl = data.find(b"\n")
                self._long.feed(data if nl < 0 else data[:nl])
                if nl < 0:
                    continue
                lines.append(self._long.text())  # at most MAX_LINE bytes
                data, self._long = data[nl + 1:], None
            *done, partial = (self._partial + data).split(b"\n")
            lines += done
            if len(partial) > MAX_LINE:
                self._long = _LongLine(partial, self.window)
                partial = b""
            self._partial = partial
        return [(_LongLine(ln, self.window).text() if len(ln) > MAX_LINE else ln)
                .decode("utf-8", "replace") for ln in lines]

    def sample(self) -> list[Observation]:
        lines: list[str] = []
        if self._fh is None:
            self._open(at_end=True)
            return [self.window.observe(self.subject, [])]
        try:
            st = os.stat(self.config.file)
            current = (st.st_dev, st.st_ino)
        except OSError:
            current = None  # rotated away, not yet re-created: keep reading the old file
            self._still_gone()
        else:
            self._gone_since = None
        if current is not None and current != self._ino:
            lines += self._read()  # the rest of the rotated file
            self._fh.close()
            self._fh = None
            self._open(at_end=False)
        elif current is not None and self._rewritten(st.st_size):
            self._fh.seek(0)  # truncated in place (copytruncate): its new lines from the start
            self._partial, self._long = b"", None
        if self._fh is not None:
            lines += self._read()
            self._remember()
        return [self.window.observe(self.subject, lines)]

    def saved(self) -> dict[str, Any]:
        return self.window.saved()

    def restore(self, data: object) -> None:
        self.window.restore(data)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
        if self._watches is not None:
            self._watches.close()


class Journald:
    """Follows ``journalctl -u UNIT -o json`` with a cursor between samples."""

    def __init__(self, config: DetectorConfig) -> None:
        self.config = config
        self.subject = config.effective_subject
        self.window = _Window(config)
        self._cursor: str | None = None

    def _journal(self, *args: str) -> list[dict[str, object]]:
        res = subprocess.run(["journalctl", "--no-pager", "-o", "json", "-u", self.config.unit,
                              *args], capture_output=True, timeout=self.config.timeout,
                             stdin=subprocess.DEVNULL, check=False)
        if res.returncode != 0:
            raise RuntimeError(res.stderr.decode(errors="replace").strip()[:200])
        return parse_journal_json(res.stdout)

    def sample(self) -> list[Observation]:
        try:
            if self._cursor is None:
                entries = self._journal("-n", "1")
                self._cursor = str(entries[-1]["__CURSOR"]) if entries else ""
                return [self.window.observe(self.subject, [])]
            args = ["--after-cursor", self._cursor] if self._cursor else ["--since", "-1min"]
            entries = self._journal(*args)
        except (OSError, RuntimeError, subprocess.TimeoutExpired) as exc:
            return [Observation(self.subject, None, failed=f"journalctl: {exc}")]
        if entries:
            self._cursor = str(entries[-1].get("__CURSOR", self._cursor))
        return [self.window.observe(self.subject, [str(e.get("MESSAGE", "")) for e in entries])]

    def saved(self) -> dict[str, Any]:
        return self.window.saved()

    def restore(self, data: object) -> None:
        self.window.restore(data)

    def close(self) -> None:
        pass


def parse_journal_json(raw: bytes) -> list[dict[str, object]]:
    """Entries of ``journalctl -o json`` output; MESSAGE may be an array of bytes."""
    out = []
    for line in raw.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        msg = entry.get("MESSAGE")
        if isinstance(msg, list):
            entry["MESSAGE"] = bytes(x for x in msg if isinstance(x, int)).decode("utf-8",
                                                                                  "replace")
        out.append(entry)
    return out
