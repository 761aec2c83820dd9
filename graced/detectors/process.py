"""Process detectors: presence and count (and restarts), and resident memory.

Presence listens for deaths: each matching process is held by a pidfd (readable the
moment it exits, Linux >= 5.3) in the detector's :class:`~.events.Wakeup`, so a killed
process is sampled at once rather than at the next tick. Which processes match is
re-resolved at every sample, so a new one started after a death is watched too.
"""

from __future__ import annotations

import os
import resource
import threading

import psutil

from ..config import DetectorConfig
from ..owners import foreign, in_cmdline, login_uids, named, uid_of
from .base import Observation, SimpleDetector
from .events import POLL, Wakeup

MAX_PIDFDS = 256
"""At most this many matching processes are held by a pidfd per detector; the rest are polled."""

NOFILE_SHARE = 4
"""All process detectors together hold at most 1/NOFILE_SHARE of graced's file descriptor
limit (RLIMIT_NOFILE, soft) as pidfds: anyone can start processes with a watched name, and
graced must keep descriptors for its sockets, journal and logs (review of #19, attacker 2).
Each detector's fair share is that budget divided by the number of process detectors
running, so one crowded name never leaves another detector without a pidfd."""


class _PidfdBudget:
    """The daemon-wide count of pidfds held, per holder (a detector), against a budget read
    from RLIMIT_NOFILE and shared fairly: each holder may hold ``limit() // holders``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[int, int] = {}  # id(holder) -> pidfds it holds

    @staticmethod
    def limit() -> int:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            soft = 1 << 20
        return max(0, soft // NOFILE_SHARE)

    def join(self, holder: object) -> None:
        with self._lock:
            self._held.setdefault(id(holder), 0)

    def leave(self, holder: object) -> None:
        with self._lock:
            self._held.pop(id(holder), None)

    def share(self) -> int:
        """What each holder may hold now: the budget divided among the holders."""
        with self._lock:
            return self.limit() // max(1, len(self._held))

    def excess(self, holder: object) -> int:
        """How many pidfds ``holder`` holds past its share (a detector joined since, or the
        limit was lowered): it gives them back."""
        with self._lock:
            share = self.limit() // max(1, len(self._held))
            return max(0, self._held.get(id(holder), 0) - share)

    def take(self, holder: object, wanted: int) -> int:
        """Reserve up to ``wanted`` descriptors for ``holder``, within its share and what
        the budget has left; returns how many were granted."""
        with self._lock:
            limit = self.limit()
            mine = self._held.get(id(holder), 0)
            share = limit // max(1, len(self._held))
            granted = max(0, min(wanted, share - mine, limit - sum(self._held.values())))
            self._held[id(holder)] = mine + granted
            return granted

    def give_back(self, holder: object, count: int) -> None:
        with self._lock:
            if id(holder) in self._held:
                self._held[id(holder)] = max(0, self._held[id(holder)] - count)


PIDFD_BUDGET = _PidfdBudget()


def _matching(cfg: DetectorConfig, login_min: int, gone: set[int] | None = None
              ) -> tuple[list[psutil.Process], int]:
    """(The processes that match, how many more matched but belong to a user who is not
    the service's), zombies and ``gone`` (exited, known by pidfd) left out. The service's
    user: ``user`` if set, else any :func:`~graced.owners.service_owner` (review of #19:
    without ``user``, a login user's decoy counted as the service and hid its death)."""
    found = []
    others = 0
    me = psutil.Process().pid
    uid = uid_of(cfg.user) if cfg.user else None
    my_uid = os.getuid()
    # A command line is read only with match_cmdline: anyone may give thousands of
    # processes megabytes of it.
    for proc in psutil.process_iter(["uids"]):
        if proc.pid == me or (gone and proc.pid in gone):
            continue
        try:
            if cfg.match_cmdline:
                hit = in_cmdline(proc.pid, cfg.process)  # its first CMDLINE_PREFIX bytes
            else:
                hit = named(proc, cfg.process)
            if hit and proc.status() == psutil.STATUS_ZOMBIE:
                continue  # dead, not yet reaped: its name is still there
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if not hit:
            continue
        owner = proc.info["uids"].real if proc.info["uids"] is not None else None
        if foreign(owner, uid, login_min, my_uid):
            others += 1
            continue
        found.append(proc)
    return found, others


def _not_counted(cfg: DetectorConfig, others: int) -> str:
    """What an observation says of the matching processes left out, if any."""
    if not others:
        return ""
    whose = (f"not of user {cfg.user}, not counted" if cfg.user
             else "of login users, not counted without the detector's user key")
    return f"; {others} more named so, {whose}"


def _absent(cfg: DetectorConfig, others: int) -> str:
    """Why a per-process metric has no value: no process of the service's users (and how
    many of other users were left out: they run, but are not the service)."""
    if not others:
        return f"no process named {cfg.process!r} running"
    whose = f"user {cfg.user}" if cfg.user else "the service's users"
    return f"no process named {cfg.process!r} of {whose}" + _not_counted(cfg, others)


def _noted(detail: dict[str, object], cfg: DetectorConfig, others: int) -> dict[str, object]:
    """``detail`` with the count of the matching processes left out and, when there are
    any, the note every summary of the sample ends with (scoring adds it)."""
    detail["not_counted"] = others
    if others:
        detail["note"] = _not_counted(cfg, others)[2:]
    return detail


class ProcessPresence(SimpleDetector):
    """Value: how many processes match. Fewer than min_count, or a pid change, is an anomaly."""

    def __init__(self, config: DetectorConfig) -> None:
        super().__init__(config)
        self._login_min = login_uids().start
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
            PIDFD_BUDGET.join(self)

    def sample(self) -> list[Observation]:
        procs, others = _matching(self.config, self._login_min, self._gone)
        pids = {p.pid for p in procs}
        obs = Observation(self.subject, float(len(pids)), "processes",
                          detail=_noted({"pids": sorted(pids)[:20]}, self.config, others))
        if len(pids) < self.config.min_count:
            obs.failed = (f"{len(pids)} process(es) named {self.config.process!r} running, "
                          f"expected at least {self.config.min_count}"
                          + _not_counted(self.config, others))
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
        # Past its fair share (another process detector started, or the limit was
        # lowered): the newest processes go back to being polled.
        for fd in sorted(self._fds, key=self._fds.__getitem__)[
                len(self._fds) - PIDFD_BUDGET.excess(self):]:
            self._release(fd)
        held = set(self._fds.values())
        wanted = sorted(pids - held)[:max(0, MAX_PIDFDS - len(held))]
        granted = PIDFD_BUDGET.take(self, len(wanted))
        for pid in wanted[:granted]:
            try:
                fd = os.pidfd_open(pid)
            except OSError:  # exited meanwhile (or no descriptor left): the next sample sees it
                PIDFD_BUDGET.give_back(self, 1)
                continue
            self._fds[fd] = pid
            self.wakeup.add(fd)
        unheld = len(pids) - len(self._fds)
        self.mode_note = (f"{unheld} of {len(pids)} processes polled, not held by a pidfd "
                          f"(this detector's share of graced's pidfd budget: "
                          f"{min(MAX_PIDFDS, PIDFD_BUDGET.share())})"
                          if unheld > 0 else "")

    def _release(self, fd: int) -> None:
        assert self.wakeup is not None
        self.wakeup.discard(fd)
        del self._fds[fd]
        os.close(fd)
        PIDFD_BUDGET.give_back(self, 1)

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
        PIDFD_BUDGET.leave(self)
        if self.wakeup is not None:
            self.wakeup.close()


class ProcessMetric(SimpleDetector):
    """A resource of the matching processes (their memory, say), summed: the base of every
    per-process metric kind.

    No matching process means nothing to measure, not a symptom (monit's ``check process
    ... if totalmem > X`` is silent too): the observation has no value and is normal, so a
    mission it had open resolves once the process is gone (a playbook's kill is a fix).
    Absence is what the ``process`` kind reports."""

    unit = ""

    def __init__(self, config: DetectorConfig) -> None:
        super().__init__(config)
        self._login_min = login_uids().start

    def measure(self, proc: psutil.Process) -> float:
        """One process's share of the value; blocking; may raise psutil's errors."""
        raise NotImplementedError

    def value(self, total: float) -> float:
        """The observed value of the processes' summed measures."""
        return total

    def sample(self) -> list[Observation]:
        total = 0.0
        count = 0
        procs, others = _matching(self.config, self._login_min)
        for proc in procs:
            try:
                total += self.measure(proc)
                count += 1
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        if not count:
            return [Observation(self.subject, None, self.unit, detail={
                "processes": 0, "not_counted": others,
                "absent": _absent(self.config, others)})]
        # Counted or not, a login user's process of the name is said (it may be the one
        # using the memory): "hog at 58.7 MB; 1 more named so, of login users, ...".
        return [Observation(self.subject, self.value(total), self.unit,
                            detail=_noted({"processes": count}, self.config, others))]


class ProcessRss(ProcessMetric):
    """Value: total resident memory of the matching processes, in MB."""

    unit = "MB"

    def measure(self, proc: psutil.Process) -> float:
        return float(proc.memory_info().rss)

    def value(self, total: float) -> float:
        return round(total / 2**20, 1)
