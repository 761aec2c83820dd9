"""Real memory pressure, for the PSI detectors: a reader thrashing its page cache inside a
memory cgroup too small for its file.

A process in a memory cgroup limited to ``limit_mb`` reads a file several times that size
over and over (the file is written, synced and dropped from the page cache first, so every
page it reads is charged to that cgroup). Each pass makes the kernel reclaim and refault
the cgroup's pages: tasks stall on memory, which PSI counts (``/proc/pressure/memory``).
Needs root and a memory controller: cgroup v2 (``memory.max``) or v1 (``memory/``,
``memory.limit_in_bytes``); :func:`unavailable` says why not where it is missing.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")


def _controller() -> tuple[Path, str] | None:
    """(parent dir, limit file) of a memory controller this process may use."""
    v2 = CGROUP / "cgroup.subtree_control"
    if v2.exists() and "memory" in v2.read_text().split():
        return CGROUP, "memory.max"
    if (CGROUP / "memory" / "memory.limit_in_bytes").exists():
        return CGROUP / "memory", "memory.limit_in_bytes"
    return None


def v2_unavailable() -> str | None:
    """Why no cgroup v2 memory controller (memory.events) is usable here, or None."""
    if os.geteuid() != 0:
        return "making a memory cgroup needs root"
    found = _controller()
    if found is None or found[1] != "memory.max":
        return ("no memory controller in cgroup v2 here (cgroups v1, or v2 without "
                "memory in /sys/fs/cgroup/cgroup.subtree_control): no memory.events")
    return None


def unavailable() -> str | None:
    """Why no memory pressure can be made here, or None."""
    if not Path("/proc/pressure/memory").exists():
        return "no /proc/pressure/memory (a kernel without PSI, or booted with psi=0)"
    if os.geteuid() != 0:
        return "making memory pressure in a cgroup needs root"
    if _controller() is None:
        return "no memory cgroup controller (v2 memory.max or v1 memory/) on this machine"
    return None


@contextmanager
def memory_cgroup(name: str, limit_mb: int) -> Iterator[Path]:
    """A fresh memory cgroup limited to ``limit_mb`` MB; removed afterwards."""
    found = _controller()
    assert found is not None, unavailable()
    parent, limit_file = found
    path = parent / name
    path.mkdir()
    try:
        (path / limit_file).write_text(str(limit_mb << 20))
        yield path
    finally:
        for pid in (path / "cgroup.procs").read_text().split():
            try:
                os.kill(int(pid), 9)
            except ProcessLookupError:
                pass
        path.rmdir()


def make_file(path: Path, megabytes: int) -> None:
    """A file of ``megabytes`` MB on disk (not in the page cache of anyone's cgroup)."""
    with open(path, "wb") as fh:
        for _ in range(megabytes):
            fh.write(os.urandom(1 << 20))
        fh.flush()
        os.fsync(fh.fileno())


def thrash(cgroup: str, file: str) -> None:
    """Join ``cgroup``, say 'ready', read ``file`` over and over until stdin closes."""
    Path(cgroup, "cgroup.procs").write_text(str(os.getpid()))
    import threading
    done = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
    with open(file, "rb") as fh:
        os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        print("ready", flush=True)
        while not done.is_set():
            fh.seek(0)
            while fh.read(1 << 20):
                pass


def start_thrash(cgroup: Path, file: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-m", "tests.helpers.pressure", str(cgroup),
                             str(file)], cwd=Path(__file__).resolve().parent.parent.parent,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


if __name__ == "__main__":
    thrash(sys.argv[1], sys.argv[2])
