#!/usr/bin/env python3
"""A fault that fills memory or a file system step by step and says when it crossed a line.

    python bench/fill.py memory MEGABYTES PERCENT
    python bench/fill.py disk MOUNTPOINT PERCENT

Fills in small steps (8 MB of touched memory; 128 KB written to MOUNTPOINT/fill) and,
after each step, reads the host's figure the way graced and Monit read it (memory: total
minus MemAvailable; disk: used / (used + available), as df). Prints ``crossed TIMESTAMP``
(wall clock) once the figure first exceeds PERCENT, then ``ready`` when the whole fault is
in place, and holds it until stdin closes. The crossing is when a monitor could first see
the fault: the time from it to an alarm is the monitor's own detection delay.
"""

from __future__ import annotations

import os
import sys
import time

import psutil


def _memory(megabytes: int, percent: float) -> list[bytes]:
    held = []
    crossed = False
    for _ in range(0, megabytes, 8):
        held.append(b"\x01" * (8 << 20))  # written, so every page is touched
        if not crossed and psutil.virtual_memory().percent > percent:
            print(f"crossed {time.time():.6f}", flush=True)
            crossed = True
    if not crossed:
        print("crossed never", flush=True)
    return held


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
    held = _memory(int(arg), pct) if what == "memory" else _disk(arg, pct)
    print("ready", flush=True)
    sys.stdin.read()
