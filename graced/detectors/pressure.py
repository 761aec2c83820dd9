"""Pressure stall information (PSI): how much of the time tasks stalled on memory, CPU or I/O.

Kinds ``psi_memory``, ``psi_cpu`` and ``psi_io`` read ``/proc/pressure/RESOURCE`` (or a
cgroup v2 directory's ``RESOURCE.pressure`` with ``cgroup``). Value: the share of wall
time, in percent, that some (or, with ``stall = "full"``, all) tasks stalled since the
previous sample, from the file's ``total`` counter (microseconds stalled).

Listening: a PSI trigger ``"<some|full> <stall µs> <window µs>"`` is written to the file
opened read-write; the kernel then raises POLLPRI on it as soon as the stall within any
window reaches the threshold (at most once a window). That fd sits in the detector's
:class:`~.events.Wakeup` with EPOLLPRI, so the mission opens within the PSI window, not
at the next sample. The kernel keeps the last byte of the write for its terminator, so
the trigger is written NUL-terminated; without CAP_SYS_RESOURCE (in the initial user
namespace) it accepts only windows that are a multiple of 2 s. Where it refuses the
trigger, the detector says why in its ``mode_note`` and samples the counter twice a window.
"""

from __future__ import annotations

import os
import select
import time

from ..cgroupfs import CgroupFileMissing
from ..config import DetectorConfig
from ..trustpath import open_monitored
from .base import Observation
from .events import POLL, Wakeup

RESOURCES = {"psi_memory": "memory", "psi_cpu": "cpu", "psi_io": "io"}


def pressure_file(cfg: DetectorConfig) -> str:
    resource = RESOURCES[cfg.kind]
    if cfg.cgroup:
        return os.path.join(cfg.cgroup, f"{resource}.pressure")
    return f"/proc/pressure/{resource}"


def parse_total(text: str, line: str) -> int:
    """The ``total=`` (µs) of the ``some`` or ``full`` line of a pressure file."""
    for row in text.splitlines():
        fields = row.split()
        if fields and fields[0] == line:
            for f in fields[1:]:
                if f.startswith("total="):
                    return int(f[6:])
    raise ValueError(f"no {line!r} line with a total in the pressure file")


def trigger(cfg: DetectorConfig) -> bytes:
    """The trigger written to the pressure file: the threshold (a percentage of the window)
    as stall microseconds, the window in microseconds, NUL-terminated."""
    window_us = round(cfg.stall_window * 1e6)
    stall_us = max(1, round((cfg.effective_threshold or 0.0) / 100 * window_us))
    return f"{cfg.stall} {stall_us} {window_us}\0".encode()


class Pressure:
    def __init__(self, config: DetectorConfig) -> None:
        self.config = config
        self.subject = config.effective_subject
        self.path = pressure_file(config)
        self.resource = RESOURCES[config.kind]
        self._last = (time.monotonic(), self._total())  # a missing file: a detector error
        self._fired = False
        self._fd = -1
        self.wakeup: Wakeup | None = None
        self.mode, self.mode_note = POLL, ""
        try:
            # Written to: never through a way a user who could not write it controls.
            self._fd = open_monitored(self.path, write=True)
            os.write(self._fd, trigger(config))
        except OSError as exc:
            self._close_fd()
            why = exc.strerror or str(exc)
            if exc.errno == 22 and config.stall_window % 2:
                why += "; without CAP_SYS_RESOURCE the window must be a multiple of 2 s"
            self.mode_note = f"PSI trigger refused: {why}"
        else:
            self.wakeup = Wakeup()
            self.wakeup.add(self._fd, select.EPOLLPRI)
            self.mode = "psi-trigger"

    def _total(self) -> int:
        try:
            fh = os.fdopen(open_monitored(self.path))  # graced.trustpath: the way to it
        except FileNotFoundError:
            if not self.config.cgroup:
                raise
            raise CgroupFileMissing(self.config.cgroup, os.path.basename(self.path)) from None
        with fh:
            return parse_total(fh.read(4096), self.config.stall)

    def _close_fd(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def cadence(self) -> float | None:
        """Without a trigger, the counter is read twice a window."""
        return None if self.wakeup is not None else self.config.stall_window / 2

    def drain(self) -> bool:
        """The trigger fired. (Whoever polled the fd first consumed the kernel's flag, so
        the wake itself is the news: this epoll set holds nothing else.)"""
        if self.wakeup is None:
            return False
        self.wakeup.ready()
        self._fired = True
        return True

    def sample(self) -> list[Observation]:
        now, total = time.monotonic(), self._total()
        then, before = self._last
        self._last = (now, total)
        span = now - then
        pct = min(100.0, 100 * (total - before) / 1e6 / span) if span > 0 else 0.0
        obs = Observation(self.subject, round(max(pct, 0.0), 3), "% stalled", detail={
            "stall": self.config.stall, "over_s": round(span, 3), "total_us": total})
        if self._fired:
            self._fired = False
            cfg = self.config
            # The amount first, as a timed sample says it (review of #19, newcomer 6).
            obs.alarm = (f"{obs.value:.0f} % stalled: {cfg.stall} tasks on {self.resource} "
                         f"over the last {span:.1f} s (PSI trigger: "
                         f"{cfg.effective_threshold:g} % or more of {cfg.stall_window:g} s)")
        return [obs]

    def close(self) -> None:
        self._close_fd()
        if self.wakeup is not None:
            self.wakeup.close()
