#!/usr/bin/env python3
"""How fast gracectl starts: median wall time of one-shot commands against a running graced,
next to Python's own start, measured in the same run.

    python bench/cli.py [--runs 30]

Compiles graced's and gracectl's bytecode first (into the tree's __pycache__), as an
install does, since a source tree run with PYTHONDONTWRITEBYTECODE compiles every module on
every start. Starts graced (no detectors) on a temporary state dir and socket, pins its key
with a first
``gracectl status``, then runs, interleaved so that load on the machine hits them alike:
``python -c pass``, ``gracectl status``, ``gracectl missions ls --json`` and ``gracectl emit
user.bench`` (each to its exit). Prints each one's median wall time (and CPU time: on a
loaded machine the wall time is mostly waiting for a core) and its ratio to Python's start.
Target: each gracectl command <= 80 ms and <= 3.5x Python's start (aim: 50 ms).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent
COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "gracectl status": [str(BIN / "gracectl"), "status"],
    "gracectl missions ls --json": [str(BIN / "gracectl"), "missions", "ls", "--json"],
    "gracectl emit user.bench": [str(BIN / "gracectl"), "emit", "user.bench"],
}
TARGET_MS, TARGET_RATIO = 80.0, 3.5


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=30)
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="gc", dir="/tmp"))
    (base / "home").mkdir()
    cfg = base / "graced.toml"
    cfg.write_text(f'version = 1\ndetector = []\n[daemon]\nstate_dir = "{base}/state"\n'
                   f'socket = "{base}/g.sock"\n')
    env = {**os.environ, "GRACE_SOCKET": str(base / "g.sock"), "HOME": str(base / "home"),
           "XDG_CONFIG_HOME": str(base / "home" / ".config")}
    env.pop("GRACE_URL", None)
    # An installed gracectl runs from bytecode (pip compiles it); a source tree run with
    # PYTHONDONTWRITEBYTECODE would compile every module on every start. Compile once,
    # into the tree's __pycache__ (ignored by git), as an install would.
    root = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(root / "graced"),
                    str(root / "gracectl")], check=True, stdout=subprocess.DEVNULL)
    daemon = subprocess.Popen([str(BIN / "graced"), "run", "--config", str(cfg)], env=env,
                              stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        assert daemon.stderr is not None and "serving on" in daemon.stderr.readline()
        subprocess.run(COMMANDS["gracectl status"], env=env, check=True,
                       capture_output=True)  # pins the key: every later run is the same
        times: dict[str, list[float]] = {name: [] for name in COMMANDS}
        cpu: dict[str, list[float]] = {name: [] for name in COMMANDS}
        for _ in range(args.runs):
            for name, argv in COMMANDS.items():
                r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
                t0 = time.perf_counter()
                subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL,
                               stdin=subprocess.DEVNULL)
                times[name].append((time.perf_counter() - t0) * 1000)
                r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
                cpu[name].append((r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime)
                                 * 1000)
        base_ms = statistics.median(times["python -c pass"])
        print(f"bench/cli.py  (median wall time of {args.runs} runs each, interleaved, "
              f"against a running graced over its Unix socket, from bytecode; load "
              f"average {os.getloadavg()[0]:.1f})")
        for name, values in times.items():
            med = statistics.median(values)
            used = statistics.median(cpu[name])
            if name.startswith("python"):
                print(f"  {name:<30} {med:6.1f} ms  (CPU {used:5.1f} ms)")
                continue
            ratio = med / base_ms
            ok = med <= TARGET_MS and ratio <= TARGET_RATIO
            print(f"  {name:<30} {med:6.1f} ms  (CPU {used:5.1f} ms)  {ratio:4.1f}x Python's "
                  f"start  (target <= {TARGET_MS:g} ms, <= {TARGET_RATIO:g}x): "
                  f"{'PASS' if ok else 'FAIL'}")
    finally:
        daemon.terminate()
        daemon.wait(20)
        subprocess.run(["rm", "-rf", str(base)], check=False)


if __name__ == "__main__":
    main()
