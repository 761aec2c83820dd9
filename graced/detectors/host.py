"""Host detectors: memory, swap, CPU, load per core, disk and inode usage."""

from __future__ import annotations

import collections
import errno
import os
import time

import psutil

from ..config import DetectorConfig
from .base import Observation, SimpleDetector
from .events import POLL, Wakeup
from .memcg import MODE as MEMCG_MODE
from .memcg import UsageThreshold


class Memory(SimpleDetector):
    """Value: the share of memory in use (total minus MemAvailable), as free(1) and Monit
    count it.

    Listening: where the kernel offers a usage threshold (cgroup v1's memory controller,
    see :mod:`.memcg`), each sample arms one at the usage its threshold corresponds to, so
    crossing it wakes the detector at once; elsewhere it polls, faster near the threshold.
    """

    event_gap = 0.0
    """A crossing wakes it once: the sample it brings arms the next level away from
    today's usage (below the threshold, at least NEAR_SHARE away; past it, where the
    figure is back at the threshold, so the first wake on the way down that is not yet
    back is followed by one that is), so usage hovering at a level cannot wake it over
    and over; no burst to gather, so the sample follows the wake at once."""

    def __init__(self, config: DetectorConfig) -> None:
        super().__init__(config)
        self._level: UsageThreshold | None = None
        self._woken = False  # the armed level was crossed: arm another, away from usage
        self._settle_until = 0.0
        self._up = True  # the armed level is above usage: a wake means the figure went up
        self.wakeup: Wakeup | None = None
        self.mode, self.mode_note = POLL, ""
        if config.effective_threshold is None or config.below:
            self.mode_note = "no threshold to be woken at: sampled on the interval"
            return
        try:
            self._level = UsageThreshold()
        except OSError as exc:  # cgroup v2 only, or not root (cgroup.event_control is root's)
            why = (exc.strerror or str(exc)).lower()
            where = f" ({exc.filename}; root's)" if exc.errno in (errno.EACCES, errno.EPERM,
                                                                  errno.EROFS) else ""
            self.mode_note = f"no memory threshold event: {why}{where}"
            return
        self.wakeup = self._level.wakeup
        self.mode = MEMCG_MODE

    def drain(self) -> bool:
        self._woken = self._level is not None and self._level.drain()
        if self._woken:
            self._settle_until = time.monotonic() + SETTLE_S
        return self._woken

    def cadence(self) -> float | None:
        """Just after a wake, sampled every SETTLE_STEP (for SETTLE_S at most) until the
        figure is on the side of the threshold the kernel announced: usage moves before
        the figure does (pages unmapped by an exiting hog are freed a moment later, and
        MemAvailable counts them only then), so the wake's own sample may not show it yet.
        Once it does, the interval again: the samples that resolve a mission
        (missions.resolve_after) keep their pace."""
        return SETTLE_STEP if time.monotonic() < self._settle_until else None

    def sample(self) -> list[Observation]:
        vm = psutil.virtual_memory()
        if self._level is not None:
            limit = self.config.effective_threshold
            if self._settle_until and (limit is not None and vm.percent > limit) == self._up:
                self._settle_until = 0.0  # the figure shows what the kernel announced
            self._rearm(vm.percent, vm.total)
        return [Observation(self.subject, vm.percent, "%",
                            detail={"available_mb": vm.available // 2**20,
                                    "total_mb": vm.total // 2**20})]

    def _rearm(self, percent: float, total: int) -> None:
        """Arm the level where usage will be once the figure has moved to the threshold
        (past it: back at it, which is normal), unless the armed one is close enough."""
        assert self._level is not None and self.config.effective_threshold is not None
        gap = (self.config.effective_threshold - percent) / 100 * total  # bytes to go
        near = NEAR_SHARE * total
        if 0 <= gap < near:  # closer than the noise: the timer samples fast there anyway
            gap = near
        try:
            level = self._level.usage() + int(gap)
            armed = self._level.level
            if self._woken or armed is None or abs(level - armed) > max(near, abs(gap) / 8):
                self._level.arm(level)
                self._woken, self._up = False, gap > 0
            self.mode_note = ""
        except (OSError, ValueError) as exc:  # the value is still good: keep it, say so
            self.mode_note = f"memory threshold event not armed: {exc}"[:200]

    def close(self) -> None:
        if self._level is not None:
            self._level.close()


SETTLE_S = 5.0
SETTLE_STEP = 0.05
"""After a wake, the memory detector samples every SETTLE_STEP seconds until its figure is
on the side of the threshold the kernel announced, for SETTLE_S at most."""

NEAR_SHARE = 0.0025
"""Below its threshold, the memory detector's armed level is at least this share of the
total memory (60 MB of 24 GB) above today's usage, so usage that hovers just under the
threshold does not wake it on every jitter (the timer samples fastest there anyway). Past
it, the level is exactly where the figure is back at the threshold: a wake there brings a
normal sample, which ends the mission and arms the next level NEAR_SHARE up."""


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


class FileValue(SimpleDetector):
    """A number read from a file (e.g. a metric another program writes)."""

    def sample(self) -> list[Observation]:
        # A file that is missing or unreadable is a detector failure, as for every kind
        # (graced.toml(5)): graced cannot see, which is not a symptom of what it watches.
        with open(self.config.file) as fh:
            text = fh.read(4096).strip()
        try:
            return [Observation(self.subject, float(text))]
        except ValueError:
            return [Observation(self.subject, None, failed=f"not a number: {text[:40]!r}")]
