"""A cgroup's memory events: a unit that hit its memory limit or had a task OOM-killed.

Kind ``cgroup_memory`` reads ``memory.events`` of a cgroup v2 directory (``cgroup``, or
the one systemd gives ``unit``): counters of ``low``, ``high``, ``max``, ``oom``,
``oom_kill`` and ``oom_group_kill`` events since the cgroup was made. A sample whose
counters in ``memory_events`` (default max, oom, oom_kill) went up is an anomaly (one
mission per cgroup; it resolves once samples see no new event); its value is how many
such events happened since the previous sample.

Listening: the kernel signals a change of ``memory.events`` as a modification of the file,
so an inotify watch on it (in the detector's :class:`~.events.Wakeup`) makes the detector
sample the moment the OOM killer acts, not at the next tick.

A cgroup made again (a unit restarted after an OOM) is a new one: its counters count
from zero, not from what the detector last saw. It is told by the identity (device and
inode) of its directory and memory.events, or by a counter that went down; the counters
and identity are kept across a detector's restart (review of #19, attacker 5).
"""

from __future__ import annotations

import os
import subprocess
from typing import Any

from inotify_simple import flags as inf

from ..cgroupfs import CgroupFileMissing, cgroup2_root
from ..config import DetectorConfig
from ..trustpath import open_monitored
from .base import Observation
from .events import POLL, Watches


def parse_events(text: str) -> dict[str, int]:
    """``memory.events`` as a mapping; lines that are not "NAME COUNT" are skipped."""
    out: dict[str, int] = {}
    for line in text.splitlines()[:64]:
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            out[parts[0][:40]] = int(parts[1])
    return out


def unit_cgroup(unit: str, timeout: float) -> str:
    """The cgroup directory systemd runs ``unit`` in."""
    res = subprocess.run(["systemctl", "show", "--value", "-p", "ControlGroup", "--", unit],
                         capture_output=True, text=True, timeout=timeout,
                         stdin=subprocess.DEVNULL, check=False)
    path = res.stdout.strip()
    if res.returncode != 0 or not path.startswith("/"):
        raise RuntimeError(f"no cgroup for unit {unit!r}: "
                           f"{(res.stderr.strip() or 'not running')[:200]}")
    return cgroup2_root() + path  # /sys/fs/cgroup/unified on a hybrid host


class CgroupMemory:
    def __init__(self, config: DetectorConfig) -> None:
        self.config = config
        self.subject = config.effective_subject
        directory = config.cgroup or unit_cgroup(config.unit, config.timeout)
        self.path = os.path.join(directory, "memory.events")
        self._ident: list[int] = []
        self._last = self._read()  # missing: a detector error, said with the path
        self._watches, _, self.mode_note = Watches.listen(self.path, inf.MODIFY)
        self.wakeup = self._watches.wakeup if self._watches else None
        self.mode = "inotify" if self._watches else POLL

    def _read(self) -> dict[str, int]:
        """The counters; ``_ident`` becomes the cgroup's identity, and a new cgroup's
        baseline is zero."""
        try:
            fh = os.fdopen(open_monitored(self.path))  # graced.trustpath: the way to it
        except FileNotFoundError:
            raise CgroupFileMissing(os.path.dirname(self.path), "memory.events") from None
        with fh:
            st, dst = os.fstat(fh.fileno()), os.stat(os.path.dirname(self.path))
            now = parse_events(fh.read(4096))
        ident = [st.st_dev, st.st_ino, dst.st_dev, dst.st_ino]
        if self._ident and ident != self._ident:
            self._last = {}  # made again: every event it counted is new
        self._ident = ident
        return now

    def saved(self) -> dict[str, Any]:
        return {"ident": list(self._ident), "counters": dict(self._last)}

    def restore(self, data: object) -> None:
        """What the predecessor saw: the events since then count, and all of them when the
        cgroup is not the same one (or a counter went down). Data from disk: anything but
        what :meth:`saved` writes is ``ValueError``."""
        if not isinstance(data, dict):
            raise ValueError("cgroup_memory: saved state is not a table")
        ident, counters = data.get("ident"), data.get("counters")
        if not (isinstance(ident, list) and len(ident) == 4
                and all(isinstance(x, int) and not isinstance(x, bool) for x in ident)):
            raise ValueError("cgroup_memory: ident is not four integers")
        if not (isinstance(counters, dict) and len(counters) <= 64
                and all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
                        and v >= 0 for k, v in counters.items())):
            raise ValueError("cgroup_memory: counters is not a table of counts")
        if ident != self._ident or any(self._last.get(k, 0) < v for k, v in counters.items()):
            self._last = {}
        else:
            self._last = dict(counters)

    def drain(self) -> bool:
        return bool(self._watches.events()) if self._watches else False

    def sample(self) -> list[Observation]:
        before = self._ident
        now = self._read()
        if before != self._ident and self._watches is not None:
            try:  # the new memory.events: the watch was on the old one's inode
                self._watches.inotify.add_watch(self.path, inf.MODIFY)
            except OSError:
                pass  # gone again: the next sample says so
        if any(now.get(k, 0) < v for k, v in self._last.items()):
            self._last = {}  # a counter went down: a new cgroup under the same identity
        grew = {k: now[k] - self._last.get(k, 0) for k in self.config.memory_events
                if now.get(k, 0) > self._last.get(k, 0)}
        self._last = now
        obs = Observation(self.subject, float(sum(grew.values())), "events", detail={
            k: now.get(k, 0) for k in ("high", "max", "oom", "oom_kill")})
        if grew:
            obs.event = "memory events: " + ", ".join(f"{k} +{n}" for k, n in grew.items())
        return [obs]

    def close(self) -> None:
        if self._watches is not None:
            self._watches.close()
