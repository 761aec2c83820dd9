"""The host's memory crossing a level, announced by the kernel: a cgroup v1 usage threshold.

Theory of operation: the ``memory`` detector's figure (total minus MemAvailable) is not
announced by the kernel, but the root memory cgroup's ``memory.usage_in_bytes`` (file
pages plus mapped anonymous pages, host-wide) is, on hosts that mount the v1 memory
controller: an eventfd registered through ``cgroup.event_control`` with a level is
signalled the moment usage crosses that level, either way (the kernel checks it every
128 pages charged or uncharged in any cgroup; pages of the root cgroup itself count only
as they are charged, so a hog living there is seen going away at the next allocation
anywhere, or by the timer). After each sample the detector arms one at the usage that
corresponds to its threshold (today's usage plus the distance from its figure to the
threshold), so a hog that crosses the threshold wakes it at once instead of at its next
tick. The wake is only a hint: the sample decides, through the same scorer, so page cache
that moves usage without moving the figure costs a sample, never a false alarm; and an
anonymous allocation that takes the place of page cache moves the figure without usage,
which the timer (sampled faster near the threshold) still sees. Usage also moves a
moment before the figure (an exiting hog's pages leave usage as they are unmapped and
MemAvailable as they are freed, which takes a second or more for gigabytes on a busy
host), so after a wake the detector samples every 50 ms until its figure shows the
crossing too (five seconds at most).

cgroup v2 has no such threshold for the whole host (``memory.events`` counts only limits
set on a cgroup), and ``cgroup.event_control`` is root's: elsewhere the detector polls
and says why in its ``mode_note``.
"""

from __future__ import annotations

import os

from ..cgroupfs import memcg_v1_root
from .events import Wakeup

MODE = "memcg-event"


class UsageThreshold:
    """One armed level of the root memory cgroup's usage, in a :class:`Wakeup` of its own.

    Raises OSError where the kernel or the permissions refuse it (the caller polls)."""

    def __init__(self, root: str | None = None) -> None:
        root = root or memcg_v1_root()
        if root is None:
            raise FileNotFoundError(
                0, "no cgroup v1 memory controller mounted (cgroup v2 has no usage "
                   "threshold event for the whole host)")
        self._control = os.path.join(root, "cgroup.event_control")
        self._usage_fd = os.open(os.path.join(root, "memory.usage_in_bytes"),
                                 os.O_RDONLY | os.O_CLOEXEC)
        self._efd = -1
        self.level: int | None = None
        self.wakeup = Wakeup()
        try:
            self.arm(self.usage() + (1 << 40))  # may this process register at all?
        except OSError:
            self.close()
            raise

    def usage(self) -> int:
        """The root cgroup's usage in bytes, now."""
        return int(os.pread(self._usage_fd, 32, 0))

    def arm(self, level: int) -> None:
        """Be woken when usage crosses ``level`` bytes (either way); replaces the old one.
        The kernel drops a registration when its eventfd is closed."""
        efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            fd = os.open(self._control, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, f"{efd} {self._usage_fd} {max(0, level)}".encode())
            finally:
                os.close(fd)
        except OSError:
            os.close(efd)
            raise
        self._drop()
        self.wakeup.add(efd)
        self._efd, self.level = efd, level

    def _drop(self) -> None:
        if self._efd >= 0:
            self.wakeup.discard(self._efd)
            os.close(self._efd)
            self._efd, self.level = -1, None

    def drain(self) -> bool:
        """The level was crossed (the eventfd's count consumed); never blocks."""
        fired = False
        for fd, _ in self.wakeup.ready():
            try:
                os.eventfd_read(fd)
                fired = True
            except BlockingIOError:
                pass
        return fired

    def close(self) -> None:
        self._drop()
        self.wakeup.close()
        if self._usage_fd >= 0:
            os.close(self._usage_fd)
            self._usage_fd = -1
