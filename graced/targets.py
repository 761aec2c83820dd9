"""Which processes a ``signal`` step may hit, and hitting only those (blocking: psutil).

A signal step names its target by exact process name (``process``; the command line
only with ``match_cmdline = true``), by ``pid``, or by ``pid_file``. Never pid 1, a pid
<= 0 or graced itself. However found (by name, command line, pid or pid file), a
process is hit only if its real user is the step's ``user``, or without ``user`` one a
login account cannot be (graced.owners, the process detectors' rule): a login user's
process of the service's name, or one that got the pid a stale pid file names, is a
decoy, left alone. A pid file is trusted only if it is a regular file (not a symlink),
owned by root or by the user the named process runs as, and writable by nobody else (no
group or other write bit); it must hold one decimal pid, of a process that started no
later than the file was written (STALE_SLACK_S). The way to it is trusted as sshd's
StrictModes trusts the way to authorized_keys: every directory from / down to it and
every symlink on the way owned by root or that user, no directory writable by group or
others unless sticky; resolved one entry at a time, each checked before it is followed,
and the file opened relative to its directory's fd (no path resolved twice). What a
step record keeps of process data is bounded: names cut at MAX_NAME characters,
MAX_SKIPPED skipped processes, MAX_PIDS signalled pids. Each target
is remembered with its start time, and re-checked just before the signal: through a
pidfd (opened first, then checked, then signalled through), so a pid recycled by
another process in between is never hit.
"""

from __future__ import annotations

import os
import re
import signal
import stat
from dataclasses import dataclass, field
from typing import Any

import psutil

from .owners import foreign, in_cmdline, login_uids, named, uid_of, user_label
from .protocol.canonical import json_safe
from .trustpath import open_way

MAX_SKIPPED = 20
"""A step's record lists at most this many skipped processes (and counts them all):
anyone may start thousands of decoys."""
MAX_NAME = 128
"""A process name as a step record holds it, at most (cut, and marked so): psutil extends
a 15-character comm with argv[0]'s basename, which anyone can make 128 KiB long."""
MAX_PIDS = 100
"""A step's record lists at most this many signalled pids (``pids_count`` counts them all)."""
CUT = "...[cut]"


def clip(text: str, limit: int = MAX_NAME) -> str:
    """``text`` as a step record holds it: at most ``limit`` characters, marked when cut,
    and with a UTF-8 form: a process name that is not UTF-8 (any user can set one with
    prctl) comes from psutil with lone surrogates, which have none (graced died
    publishing one: review s9b); they become U+FFFD."""
    text = json_safe(text)
    return text if len(text) <= limit else text[:limit] + CUT


@dataclass(frozen=True)
class Target:
    pid: int
    started: float  # psutil create_time: with the pid, names one process for ever
    name: str


@dataclass
class Selection:
    """The processes a step hits now, and those it found but leaves alone (bounded)."""

    targets: list[Target] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    skipped_count: int = 0

    def skip(self, pid: int, name: str, uid: int | None, reason: str) -> None:
        self.skipped_count += 1
        if len(self.skipped) < MAX_SKIPPED:
            self.skipped.append({"pid": pid, "name": clip(name), "uid": uid,
                                 "reason": clip(reason, 4 * MAX_NAME)})

    def summary(self) -> str:
        """The skipped processes' reasons, counted: "2 of a login user, not signalled
        without the step's user key"."""
        counts: dict[str, int] = {}
        for s in self.skipped:
            counts[s["reason"]] = counts.get(s["reason"], 0) + 1
        text = "; ".join(f"{n} {why}" for why, n in counts.items())
        unlisted = self.skipped_count - len(self.skipped)
        return text + (f"; {unlisted} more" if unlisted else "")


def _allowed(pid: int) -> bool:
    return pid > 1 and pid != os.getpid()




def _reason(why: str, user: str) -> str:
    """What a step record says of a process :func:`graced.owners.foreign` refused."""
    return {"user unknown": "its user could not be read",
            "another user": f"not of user {user_label(user)}",
            "login user": "of a login user, not signalled without the step's user key",
            }[why]


class _Way:
    """The way to a pid file, as :func:`_open_pid_file` walks it, and who owns it: only
    root and the named process's user may (StrictModes). Known before the pid is read:
    the step's ``user``, if it names one, and that at most one user besides root owns an
    entry; so an entry that cannot be trusted whatever the file names is refused before
    anything is opened through it."""

    def __init__(self, path: str, wanted: int | None) -> None:
        self.path, self.wanted = path, wanted
        self.owner: tuple[int, str] | None = None  # the one non-root owner: (uid, entry)

    def refuse(self, why: str) -> PermissionError:
        return PermissionError(f"pid file {self.path}: {why}; not trusted")

    def entry(self, what: str, info: os.stat_result, fd: int = -1) -> None:
        """Check a directory or symlink on the way (``what``: "directory /run")."""
        mode = stat.S_IMODE(info.st_mode)
        if stat.S_ISDIR(info.st_mode) and mode & 0o022 and not mode & stat.S_ISVTX:
            raise self.refuse(f"{what} is writable by group or others (mode {mode:04o}) "
                              "and not sticky")
        uid = info.st_uid
        if uid == 0:
            return
        if self.wanted is not None and uid != self.wanted:
            raise self.refuse(f"{what} is owned by uid {uid}, neither root nor the step's "
                              f"user (uid {self.wanted})")
        if self.owner is not None and self.owner[0] != uid:
            raise self.refuse(f"{what} is owned by uid {uid} and {self.owner[1]} by uid "
                              f"{self.owner[0]}: only root and the named process's user "
                              "may own the way to it")
        self.owner = self.owner or (uid, what)

    def check_owner(self, pid: int, owner: int) -> None:
        """Once the process is known: the way's one non-root owner must be its user."""
        if self.owner is not None and self.owner[0] != owner:
            raise self.refuse(f"{self.owner[1]} is owned by uid {self.owner[0]}, neither "
                              f"root nor the user of process {pid} (uid {owner})")


def _open_pid_file(path: str, way: _Way) -> int:
    """The pid file at ``path``, opened for reading (never a symlink itself) relative to
    its directory's fd, after every entry on the way was checked by ``way``
    (:func:`graced.trustpath.open_way`)."""
    return open_way(path, way, prefix=f"pid file {path}")


def pid_from_file(path: str, wanted: int | None = None) -> tuple[int, float]:
    """The pid a trusted pid file names, and when the file was last written (its mtime);
    raises PermissionError or ValueError. ``wanted``: the uid the step's ``user`` names.
    Trusted: every directory from / down to the file and every symlink on the way owned
    by root or the named process's user, no directory writable by group or others unless
    sticky (/tmp), and the file itself a regular file (not a symlink), owned so too and
    writable by nobody else (see :class:`_Way`)."""
    if not path.startswith("/"):
        path = os.path.join(os.getcwd(), path)
    way = _Way(path, wanted)
    fd = _open_pid_file(path, way)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise PermissionError(f"pid file {path}: not a regular file")
        if info.st_mode & 0o022:
            raise PermissionError(f"pid file {path}: writable by group or others "
                                  f"(mode {stat.S_IMODE(info.st_mode):04o}); not trusted")
        text = os.read(fd, 64)
    finally:
        os.close(fd)
    m = re.fullmatch(rb"\s*(\d{1,10})\s*", text)
    if not m:
        raise ValueError(f"pid file {path}: does not hold one decimal pid")
    pid = int(m.group(1))
    if not _allowed(pid):
        raise PermissionError(f"pid file {path}: names pid {pid}, which graced never "
                              "signals")
    try:
        owner = psutil.Process(pid).uids().real
    except psutil.NoSuchProcess:
        raise ProcessLookupError(f"pid file {path}: no process {pid}") from None
    way.check_owner(pid, owner)
    if info.st_uid not in (0, owner):
        raise PermissionError(f"pid file {path}: owned by uid {info.st_uid}, neither root "
                              f"nor the user of process {pid} (uid {owner}); not trusted")
    return pid, info.st_mtime


STALE_SLACK_S = 2.0
"""How much later than its pid file's last write a process may have started and still be
the one the file names (a service writes the file just after it starts; clocks of
process start times are coarse). Started later, the pid was reused: the service died and
another process got its number."""


def _by_pid(sel: Selection, pid: int, pid_file: str, wanted: int | None, user: str) -> None:
    """A ``pid`` or ``pid_file`` target: the process, unless graced.owners' rule refuses
    its user (without ``user``, a login user's process is a decoy whatever names it) or
    it started after the pid file was written (a stale file, its pid reused)."""
    if pid and not _allowed(pid):
        raise PermissionError(f"pid {pid}: graced never signals it")
    written = None
    if not pid:
        pid, written = pid_from_file(pid_file, wanted)
    proc = psutil.Process(pid)
    target = Target(pid, proc.create_time(), clip(proc.name()))
    owner = proc.uids().real
    if why := foreign(owner, wanted, login_uids().start, os.getuid()):
        sel.skip(target.pid, target.name, owner, _reason(why, user))
    elif written is not None and target.started > written + STALE_SLACK_S:
        sel.skip(target.pid, target.name, owner,
                 f"started {target.started - written:.0f} s after pid file {pid_file} was "
                 "written: a stale file, its pid reused")
    else:
        sel.targets.append(target)


def find(*, pid: int = 0, pid_file: str = "", process: str = "",
         match_cmdline: bool = False, user: str = "") -> Selection:
    """The processes a step names, now, and those it leaves alone. ``user`` (a name or a
    uid) is whose processes it may hit; "" means the service's (see the module). A
    command line is read only with ``match_cmdline`` and only of a process whose name is
    not already a match: anyone may give thousands of processes megabytes of it."""
    try:
        wanted = uid_of(user) if user else None
    except LookupError as exc:
        raise ValueError(str(exc)) from None
    sel = Selection()
    if pid or pid_file:
        try:
            _by_pid(sel, pid, pid_file, wanted, user)
        except psutil.NoSuchProcess:
            pass
        return sel
    login_min = login_uids().start
    me, my_uid = os.getpid(), os.getuid()
    for proc in psutil.process_iter():
        if not (named(proc, process) or match_cmdline and in_cmdline(proc.pid, process)):
            continue
        try:
            name, started = proc.name(), proc.create_time()
            owner: int | None = proc.uids().real
        except psutil.NoSuchProcess:
            continue
        except psutil.AccessDenied:
            owner = None
        if proc.pid == me:
            sel.skip(proc.pid, name, owner, "graced itself")
        elif not _allowed(proc.pid):
            sel.skip(proc.pid, name, owner, f"pid {proc.pid}, never signalled")
        elif why := foreign(owner, wanted, login_min, my_uid):
            sel.skip(proc.pid, name, owner, _reason(why, user))
        else:
            sel.targets.append(Target(proc.pid, started, clip(name)))
    return sel


def send(sel: Selection, sig: int) -> list[int]:
    """Signal each target that is still the process it was; returns the pids hit (one
    that exited or was replaced meanwhile is added to the skipped)."""
    hit = []
    for t in sel.targets:
        fd = None
        try:
            try:
                fd = os.pidfd_open(t.pid)
            except (AttributeError, OSError):
                fd = None  # no pidfd on this kernel: re-check, then kill by pid
            if psutil.Process(t.pid).create_time() != t.started:
                # the pid now belongs to another process
                sel.skip(t.pid, t.name, None, "its pid was reused before the signal")
                continue
            if fd is not None:
                signal.pidfd_send_signal(fd, sig)
            else:
                os.kill(t.pid, sig)
            hit.append(t.pid)
        except (psutil.NoSuchProcess, ProcessLookupError):
            sel.skip(t.pid, t.name, None, "exited before the signal")
            continue
        finally:
            if fd is not None:
                os.close(fd)
    return hit
