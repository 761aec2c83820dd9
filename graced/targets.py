"""Which processes a ``signal`` step may hit, and hitting only those (blocking: psutil).

A signal step names its target by exact process name (``process``; the command line
only with ``match_cmdline = true``), by ``pid``, or by ``pid_file``. Never pid 1, a pid
<= 0 or graced itself. A pid file is trusted only if it is a regular file (not a
symlink), owned by root or by the user the named process runs as, and writable by
nobody else (no group or other write bit); it must hold one decimal pid. Each target
is remembered with its start time, and re-checked just before the signal: through a
pidfd (opened first, then checked, then signalled through), so a pid recycled by
another process in between is never hit.
"""

from __future__ import annotations

import os
import re
import signal
import stat
from dataclasses import dataclass

import psutil


@dataclass(frozen=True)
class Target:
    pid: int
    started: float  # psutil create_time: with the pid, names one process for ever
    name: str


def _allowed(pid: int) -> bool:
    return pid > 1 and pid != os.getpid()


def _target(pid: int) -> Target:
    proc = psutil.Process(pid)
    return Target(pid, proc.create_time(), proc.name())


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
         match_cmdline: bool = False) -> list[Target]:
    """The processes a step names, now."""
    try:
        if pid:
            if not _allowed(pid):
                raise PermissionError(f"pid {pid}: graced never signals it")
            return [_target(pid)]
        if pid_file:
            return [_target(pid_from_file(pid_file))]
    except psutil.NoSuchProcess:
        return []
    out = []
    for proc in psutil.process_iter(["name", "cmdline", "create_time"]):
        if not _allowed(proc.pid):
            continue
        hit = proc.info["name"] == process or (
            match_cmdline and process in " ".join(proc.info["cmdline"] or []))
        if hit:
            out.append(Target(proc.pid, proc.info["create_time"], proc.info["name"] or ""))
    return out


def send(targets: list[Target], sig: int) -> list[int]:
    """Signal each target that is still the process it was; returns the pids hit."""
    hit = []
    for t in targets:
        fd = None
        try:
            try:
                fd = os.pidfd_open(t.pid)
            except (AttributeError, OSError):
                fd = None  # no pidfd on this kernel: re-check, then kill by pid
            if psutil.Process(t.pid).create_time() != t.started:
                continue  # the pid now belongs to another process
            if fd is not None:
                signal.pidfd_send_signal(fd, sig)
            else:
                os.kill(t.pid, sig)
            hit.append(t.pid)
        except (psutil.NoSuchProcess, ProcessLookupError):
            continue
        finally:
            if fd is not None:
                os.close(fd)
    return hit
