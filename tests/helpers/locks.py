"""Locks shared by every process of one test run (the xdist workers, background children):
creating a Unix user and installing a Debian package are each done by one process at a
time, and checked again under the lock, so two workers never race on ``useradd`` or on
dpkg's own lock."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def run_lock(name: str, shared: bool = False) -> Iterator[None]:
    """An exclusive lock named ``name`` (or, ``shared``, one many may hold while nobody
    holds it exclusively), held until the block ends (a file in /tmp opened without
    following a symlink another user may have planted)."""
    fd = os.open(f"/tmp/grace-test-{name}.lock",
                 os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def apt_install(packages: list[str], present: Callable[[], bool]) -> None:
    """As root with apt-get: install Debian ``packages`` unless ``present()`` says they are
    there (asked again under the lock: another worker may have just installed them)."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return
    with run_lock("apt"):
        if present():
            return
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True,
                       stdin=subprocess.DEVNULL, timeout=600)
        subprocess.run(["apt-get", "-o", "DPkg::Lock::Timeout=600", "install", "-y", "-q",
                        *packages], env=env, capture_output=True, stdin=subprocess.DEVNULL,
                       timeout=900)
