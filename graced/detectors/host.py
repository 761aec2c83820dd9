"""Host detectors: memory, swap, CPU, load per core, disk and inode usage."""

from __future__ import annotations

import collections
import os
import time

import psutil

from ..config import DetectorConfig
from ..trustpath import open_monitored
from .base import Observation, SimpleDetector


class Memory(SimpleDetector):
    def sample(self) -> list[Observation]:
        vm = psutil.virtual_memory()
        return [Observation(self.subject, vm.percent, "%",
                            detail={"available_mb": vm.available // 2**20,
                                    "total_mb": vm.total // 2**20})]


class Swap(SimpleDetector):
    def sample(self) -> list[Observation]:
        sw = psutil.swap_memory()
        return [Observation(self.subject, sw.percent if sw.total else 0.0, "%",
                            detail={"used_mb": sw.used // 2**20, "total_mb": sw.total // 2**20})]


class Cpu(SimpleDetector):
    """CPU busy %, averaged over ``window`` seconds: a saturated host, not a busy second.

    An average over the window needs the window: until the detector has watched that
    long, a sample has no value (the average so far is in its detail), so a busy minute
    just after graced starts is not ten minutes of saturation."""

    def __init__(self, config: DetectorConfig) -> None:
        super().__init__(config)
        psutil.cpu_percent(interval=None)  # the first reading is meaningless
        self._since = time.monotonic()
        self._recent: collections.deque[tuple[float, float]] = collections.deque()

    def sample(self) -> list[Observation]:
        now = time.monotonic()
        pct = psutil.cpu_percent(interval=None)
        self._recent.append((now, pct))
        while self._recent and self._recent[0][0] < now - self.config.window:
            self._recent.popleft()
        avg = round(sum(p for _, p in self._recent) / len(self._recent), 2)
        detail = {"now": pct, "window_s": self.config.window}
        watched = now - self._since
        if watched < self.config.window:
            return [Observation(self.subject, None, "%", detail={
                **detail, "so_far": avg, "watched_s": round(watched, 1),
                "pending": f"{avg:g} % so far, averaged over {self.config.window:g} s once "
                           f"watched that long ({watched:.0f} s)"})]
        return [Observation(self.subject, avg, "%", detail=detail)]


class Load(SimpleDetector):
    """Load per core sustained over ``window`` (60, 300 or 900 s): the lowest of the
    kernel's 1, 5 and 15-minute averages up to that window, so the value is high only if
    the load has been high all that time and still is (a busy hour that ended does not
    linger in the 15-minute average as an open mission)."""

    def sample(self) -> list[Observation]:
        one, five, fifteen = os.getloadavg()
        cores = os.cpu_count() or 1
        load = {300: min(one, five), 900: min(one, five, fifteen)}.get(
            int(self.config.window), one)
        return [Observation(self.subject, round(load / cores, 3), "per core",
                            detail={"load1": one, "load5": five, "load15": fifteen,
                                    "cores": cores})]


class Disk(SimpleDetector):
    def sample(self) -> list[Observation]:
        st = os.statvfs(self.config.path)
        total = st.f_blocks * st.f_frsize
        used = (st.f_blocks - st.f_bfree) * st.f_frsize
        # As df: used / (used + available to unprivileged users).
        avail = st.f_bavail * st.f_frsize
        pct = 100.0 * used / (used + avail) if used + avail else 0.0
        return [Observation(self.subject, round(pct, 3), "%",
                            detail={"used_mb": used // 2**20, "total_mb": total // 2**20,
                                    "free_mb": avail // 2**20})]


class Inodes(SimpleDetector):
    def sample(self) -> list[Observation]:
        st = os.statvfs(self.config.path)
        if not st.f_files:
            return [Observation(self.subject, 0.0, "%")]
        pct = 100.0 * (st.f_files - st.f_ffree) / st.f_files
        return [Observation(self.subject, round(pct, 3), "%",
                            detail={"inodes": st.f_files, "free": st.f_ffree})]


MAX_READ = 4096
"""Bytes of a value file read, at most: a number is short, whatever the file holds."""
REREAD_S = 0.005
"""A value file that reads empty or not as a number is read again this much later, once:
``echo 42 > f`` truncates the file, then writes, and a read in between sees nothing."""


SETTLED = 0.75
"""...and one that has read so since this share of an interval (the sample before, as
samples come an interval apart, give or take a thread's start) is reported."""


class FileValue(SimpleDetector):
    """A number read from a file (e.g. a metric another program writes).

    A read that finds no number (empty, or a number half written) is read again once,
    ``REREAD_S`` later; still none, the sample is skipped (counted in the detector's
    status) unless the file has stayed so since the sample before (an interval ago): the
    same text, and an empty file not written since. Only then is it reported, as a failed
    sample, as it always was. A file that its writer rewrites all the time is never caught
    at rest, so it is never reported."""

    def __init__(self, config: DetectorConfig) -> None:
        super().__init__(config)
        self._bad: tuple[float, tuple[object, ...]] | None = None  # since when, what

    def _read(self) -> tuple[int, float | None, tuple[object, ...]]:
        """(The file's size, its number or None, what it holds). A file that is missing
        or unreadable is a detector failure, as for every kind (graced.toml(5)): graced
        cannot see, which is not a symptom of what it watches. So is one that the way to
        it does not let graced trust (graced.trustpath: a user who controls a directory
        or symlink on the way and could not read the file), or one that is not a regular
        file (a FIFO would hold the sample in open() for good)."""
        fd = open_monitored(self.config.file)
        try:
            data = os.read(fd, MAX_READ)
            st = os.fstat(fd)
        finally:
            os.close(fd)
        text = data.decode("utf-8", "replace").strip()
        try:
            value: float | None = float(text)
        except ValueError:
            value = None
        # What the file holds, for "the same bad content as before": junk is itself; an
        # empty file is the same only if nobody wrote it since (a rewriter truncates).
        what = (text,) if text else ("", st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
        return st.st_size, value, what

    def sample(self) -> list[Observation]:
        size, value, what = self._read()
        if value is None:
            time.sleep(REREAD_S)
            size, value, what = self._read()
        if value is not None:
            self._bad = None
            return [Observation(self.subject, value)]
        now = time.monotonic()
        if self._bad is None or self._bad[1] != what:
            self._bad = (now, what)
        # Never what the file holds: a monitored file is another user's data, and what
        # this says reaches `gracectl detectors`, the journal and NATS (review s10).
        why = "not a number " + (f"({size} byte{'' if size == 1 else 's'})" if size
                                 else "(the file is empty)")
        # The next sample is due an interval later, give or take a thread's start.
        if now - self._bad[0] < SETTLED * self.config.interval:
            return [Observation(self.subject, None, skipped=f"{why} (read twice "
                                f"{REREAD_S * 1000:g} ms apart; being rewritten?)")]
        return [Observation(self.subject, None, failed=why)]
