#!/usr/bin/env python3
"""A fault that fills memory or a file system and says when it crossed a line.

    python bench/fill.py memory MEGABYTES PERCENT [MB_PER_S [BEYOND]]
    python bench/fill.py disk MOUNTPOINT PERCENT

memory: a runaway process. It maps MEGABYTES of anonymous memory, prints ``armed`` and
waits for a line on stdin; then it prints ``start TIMESTAMP`` and has the kernel fill the
mapping as fast as it hands out pages (MADV_POPULATE_WRITE, Linux 5.14; else one byte
written per page), 4 MB at a time, or at MB_PER_S (a leak that grows steadily), until
the host's figure is BEYOND (1.5) points past PERCENT (others' work moves it too) or the
mapping is full. disk:
writes 128 KB at a time to MOUNTPOINT/fill. After each step it reads the host's figure
the way graced and Monit read it (memory: total minus MemAvailable, from /proc/meminfo;
disk: used / (used + available), as df). Prints ``crossed TIMESTAMP`` (wall clock) once
the figure first exceeds PERCENT, then ``ready`` when the whole fault is in place, and
holds it until stdin closes. The crossing is when a monitor could first see the fault:
the time from it to an alarm is the monitor's own detection delay.
"""

from __future__ import annotations

import mmap
import os
import sys
import time

MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)
CHUNK = 4 << 20
"""The figure is read after each chunk: the crossing is stamped at most one chunk late
(2-7 ms at this VM's 0.6-1.8 GB/s; 16 MB stamped it up to 27 ms late, which both tools'
delay from the crossing gained), for a read of /proc/meminfo that costs 0.05 ms."""
BEYOND = 1.5


def memory_percent() -> float:
    """Total minus MemAvailable, as a share of the total (psutil's and Monit's figure)."""
    with open("/proc/meminfo", "rb") as fh:
        fields = {k: int(v.split()[0]) for k, _, v in
                  (line.partition(b":") for line in fh) if v.strip()}
    return 100.0 * (fields[b"MemTotal"] - fields[b"MemAvailable"]) / fields[b"MemTotal"]


def _populate(buf: mmap.mmap, off: int, n: int) -> None:
    try:
        buf.madvise(MADV_POPULATE_WRITE, off, n)
    except OSError:  # an older kernel: fault every page in by writing to it
        pages = range(off, off + n, mmap.PAGESIZE)
        buf[off:off + n:mmap.PAGESIZE] = b"\x01" * len(pages)


def _memory(megabytes: int, percent: float, rate: float, beyond: float = BEYOND
            ) -> mmap.mmap:
    size = megabytes << 20
    buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    print("armed", flush=True)
    sys.stdin.readline()
    print(f"start {time.time():.6f}", flush=True)  # the fault's start: its first page next
    start = time.monotonic()
    crossed = False
    for off in range(0, size, CHUNK):
        n = min(CHUNK, size - off)
        _populate(buf, off, n)
        used = memory_percent()
        if not crossed and used > percent:
            print(f"crossed {time.time():.6f}", flush=True)
            crossed = True
        if used > percent + beyond:
            break
        if rate:  # a steady leak: the pace is the fault's design, not a wait for an event
            time.sleep(max(0.0, start + (off + n) / (rate * 2**20) - time.monotonic()))
    if not crossed:
        print("crossed never", flush=True)
    return buf


def _disk_pct(path: str) -> float:
    st = os.statvfs(path)
    used = (st.f_blocks - st.f_bfree) * st.f_frsize
    avail = st.f_bavail * st.f_frsize
    return 100.0 * used / (used + avail) if used + avail else 0.0


def _disk(mount: str, percent: float) -> None:
    chunk = b"x" * (128 << 10)
    crossed = False
    with open(os.path.join(mount, "fill"), "wb") as fh:
        while True:
            try:
                fh.write(chunk)
                fh.flush()
            except OSError:  # full
                break
            if _disk_pct(mount) > percent:
                if not crossed:
                    print(f"crossed {time.time():.6f}", flush=True)
                    crossed = True
                if _disk_pct(mount) > percent + 25:
                    break


if __name__ == "__main__":
    what, arg, pct = sys.argv[1], sys.argv[2], float(sys.argv[3])
    rate = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
    beyond = float(sys.argv[5]) if len(sys.argv) > 5 else BEYOND
    held = _memory(int(arg), pct, rate, beyond) if what == "memory" else _disk(arg, pct)
    print("ready", flush=True)
    sys.stdin.read()
