"""Process detectors: presence and count (and restarts), and resident memory.

Presence listens for deaths: each matching process is held by a pidfd (readable the
moment it exits, Linux >= 5.3) in the detector's :class:`~.events.Wakeup`, so a killed
process is sampled at once rather than at the next tick. Which processes match is
re-resolved at every sample, so a new one started after a death is watched too.
"""

from __future__ import annotations

import os
import pwd
import resource
import threading

import psutil

from ..config import DetectorConfig
from .base import Observation, SimpleDetector
from .events import POLL, Wakeup

MAX_PIDFDS = 256
"""At most this many matching processes are held by a pidfd per detector; the rest are polled."""

NOFILE_SHARE = 4
"""All process detectors together hold at most 1/NOFILE_SHARE of graced's file descriptor
limit (RLIMIT_NOFILE, soft) as pidfds: anyone can start processes with a watched name, and
graced must keep descriptors for its sockets, journal and logs (review of #19, attacker 2)."""


class _PidfdBudget:
    """The daemon-wide count of pidfds held, against a budget read from RLIMIT_NOFILE."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.held = 0

    @staticmethod
    def limit() -> int:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            soft = 1 << 20
        return max(0, soft // NOFILE_SHARE)

    def take(self, wanted: int) -> int:
        """Reserve up to ``wanted`` descriptors; returns how many were granted."""
        with self._lock:
            granted = max(0, min(wanted, self.limit() - self.held))
            self.held += granted
            return granted

    def give_back(self, count: int) -> None:
        with self._lock:
            self.held = max(0, self.held - count)


PIDFD_BUDGET = _PidfdBudget()


def _uid(user: str) -> int:
    """``user`` (a name or a uid) as a uid; one this host does not know is a detector error."""
    if user.isdigit():
        return int(user)
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        raise LookupError(f"no user {user!r} on this host") from None


def _matching(cfg: DetectorConfig, gone: set[int] | None = None) -> list[psutil.Process]:
    """The processes that match (of ``user`` only, if set), zombies and ``gone`` (exited,
    known by pidfd) left out."""
    found = []
    me = psutil.Process().pid
    uid = _uid(cfg.user) if cfg.user else None
    for proc in psutil.process_iter(["name", "cmdline", "uids"]):
        if proc.pid == me or (gone and proc.pid in gone):
            continue
        if uid is not None and (proc.info["uids"] is None or proc.info["uids"].real != uid):
            continue
        try:
            if cfg.match_cmdline:
                hit = cfg.process in " ".join(proc.info["cmdline"] or [])
            else:
                hit = proc.info["name"] == cfg.process
            if hit and proc.status() == psutil.STATUS_ZOMBIE:
                continue  # dead, not yet reaped: its name is still there
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if hit:
            found.append(proc)
    return found


class ProcessPresence(SimpleDetector):
    """Value: how many processes match. Fewer than min_count, or a pid change, is an anomaly."""

    def __init__(self, config: DetectorConfig) -> None:
        super().__init__(config)
        self._pids: set[int] | None = None
        self._fds: dict[int, int] = {}  # pidfd -> pid
        self._gone: set[int] = set()
        self.wakeup: Wakeup | None = None
        self.mode, self.mode_note = POLL, ""
        try:
            os.close(os.pidfd_open(os.getpid()))
        except (AttributeError, OSError) as exc:
            self.mode_note = f"no pidfd: {getattr(exc, 'strerror', None) or exc}"
        else:
            self.wakeup = Wakeup()
            self.mode = "pidfd"

    def sample(self) -> list[Observation]:
        procs = _matching(self.config, self._gone)
        pids = {p.pid for p in procs}
        obs = Observation(self.subject, float(len(pids)), "processes",
                          detail={"pids": sorted(pids)[:20]})
        if len(pids) < self.config.min_count:
            obs.failed = (f"{len(pids)} process(es) named {self.config.process!r} running, "
                          f"expected at least {self.config.min_count}")
        elif self._pids is not None and self._pids and pids and not (pids & self._pids):
            obs.event = (f"{self.config.process} restarted (pid {min(self._pids)} -> "
                         f"{min(pids)})")
        self._pids = pids
        self._watch(pids)
        return [obs]

    def _watch(self, pids: set[int]) -> None:
        """Hold a pidfd for each matching process (and only for those)."""
        if self.wakeup is None:
            return
        # A pid known dead stays left out until /proc forgets it (then it may be reused).
        self._gone = {pid for pid in self._gone if psutil.pid_exists(pid)}
        for fd, pid in list(self._fds.items()):
            if pid not in pids:
                self._release(fd)
        held = set(self._fds.values())
        wanted = sorted(pids - held)[:max(0, MAX_PIDFDS - len(held))]
        granted = PIDFD_BUDGET.take(len(wanted))
        for pid in wanted[:granted]:
            try:
                fd = os.pidfd_open(pid)
            except OSError:  # exited meanwhile (or no descriptor left): the next sample sees it
                PIDFD_BUDGET.give_back(1)
                continue
            self._fds[fd] = pid
            self.wakeup.add(fd)
        unheld = len(pids) - len(self._fds)
        self.mode_note = (f"{unheld} of {len(pids)} processes polled, not held by a pidfd "
                          f"(graced's pidfd budget: a quarter of its file descriptor limit)"
                          if unheld > 0 else "")

    def _release(self, fd: int) -> None:
        assert self.wakeup is not None
        self.wakeup.discard(fd)
        del self._fds[fd]
        os.close(fd)
        PIDFD_BUDGET.give_back(1)

    def drain(self) -> bool:
        """A watched process exited: note it (its pidfd says so even before it is reaped)."""
        if self.wakeup is None:
            return False
        fired = False
        for fd, _ in self.wakeup.ready():
            pid = self._fds.get(fd)
            if pid is None:  # not ours (cannot happen): never let it wake us again
                self.wakeup.discard(fd)
                continue
            self._gone.add(pid)
            self._release(fd)
            fired = True
        return fired

    def close(self) -> None:
        for fd in list(self._fds):
            self._release(fd)
        if self.wakeup is not None:
            self.wakeup.close()


class ProcessRss(SimpleDetector):
    """Value: total resident memory of the matching processes, in MB."""

    def sample(self) -> list[Observation]:
        total = 0
        count = 0
        for proc in _matching(self.config):
            try:
                total += proc.memory_info().rss
                count += 1
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        if not count:
            return [Observation(self.subject, None,
                                failed=f"no process named {self.config.process!r} running")]
        return [Observation(self.subject, round(total / 2**20, 1), "MB",
                            detail={"processes": count})]
