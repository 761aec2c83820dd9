"""Which processes a ``signal`` step may hit, and hitting only those (blocking: psutil).

A signal step names its target by exact process name (``process``; the command line
only with ``match_cmdline = true``), by ``pid``, or by ``pid_file``. Never pid 1, a pid
<= 0 or graced itself. Found by name, a process is hit only if its real user is the
step's ``user``, or without ``user`` one a login account cannot be (graced.owners, the
process detectors' rule): a login user's process of the service's name is a decoy, left
alone. With ``user``, a ``pid`` or ``pid_file`` target must be that user's too. A pid
file is trusted only if it is a regular file (not a symlink), owned by root or by the
user the named process runs as, and writable by nobody else (no group or other write
bit); it must hold one decimal pid. Each target
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

from .owners import foreign, login_uids, uid_of, user_label

MAX_SKIPPED = 20
"""A step's record lists at most this many skipped processes (and counts them all):
anyone may start thousands of decoys."""


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
            self.skipped.append({"pid": pid, "name": name, "uid": uid, "reason": reason})

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


def _target(pid: int) -> Target:
    proc = psutil.Process(pid)
    return Target(pid, proc.create_time(), proc.name())


def _reason(why: str, user: str) -> str:
    """What a step record says of a process :func:`graced.owners.foreign` refused."""
    return {"user unknown": "its user could not be read",
            "another user": f"not of user {user_label(user)}",
            "login user": "of a login user, not signalled without the step's user key",
            }[why]


def pid_from_file(path: str) -> int:
    """The pid a trusted pid file names; raises PermissionError or ValueError."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        raise PermissionError(f"pid file {path}: {exc.strerror} (a symlink is not "
                              "followed)") from None
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
    if info.st_uid not in (0, owner):
        raise PermissionError(f"pid file {path}: owned by uid {info.st_uid}, neither root "
                              f"nor the user of process {pid} (uid {owner}); not trusted")
    return pid


def find(*, pid: int = 0, pid_file: str = "", process: str = "",
         match_cmdline: bool = False, user: str = "") -> Selection:
    """The processes a step names, now, and those it leaves alone. ``user`` (a name or a
    uid) is whose processes it may hit; "" means the service's (see the module)."""
    try:
        wanted = uid_of(user) if user else None
    except LookupError as exc:
        raise ValueError(str(exc)) from None
    sel = Selection()
    try:
        if pid or pid_file:
            if pid and not _allowed(pid):
                raise PermissionError(f"pid {pid}: graced never signals it")
            target = _target(pid or pid_from_file(pid_file))
            owner = psutil.Process(target.pid).uids().real
            if wanted is not None and owner != wanted:
                sel.skip(target.pid, target.name, owner, _reason("another user", user))
            else:
                sel.targets.append(target)
            return sel
    except psutil.NoSuchProcess:
        return sel
    login_min = login_uids().start
    me, my_uid = os.getpid(), os.getuid()
    for proc in psutil.process_iter(["name", "cmdline", "create_time", "uids"]):
        name = proc.info["name"] or ""
        hit = name == process or (
            match_cmdline and process in " ".join(proc.info["cmdline"] or []))
        if not hit:
            continue
        owner = proc.info["uids"].real if proc.info["uids"] is not None else None
        if proc.pid == me:
            sel.skip(proc.pid, name, owner, "graced itself")
        elif not _allowed(proc.pid):
            sel.skip(proc.pid, name, owner, f"pid {proc.pid}, never signalled")
        elif why := foreign(owner, wanted, login_min, my_uid):
            sel.skip(proc.pid, name, owner, _reason(why, user))
        else:
            sel.targets.append(Target(proc.pid, proc.info["create_time"], name))
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
