#!/usr/bin/env python3
"""Idle cost of ``gracectl top``: CPU (% of one core) and RSS of the dashboard process.

    python bench/top.py [--seconds 120]

Starts graced with the embedded default detectors (memory, swap, CPU, load, disk,
inodes), opens ``gracectl top`` in a real terminal (a tmux session, 200x60), lets it
settle, then measures the dashboard's CPU time over --seconds. Target: under 2 % of one
core. graced's own CPU over the same window is printed for comparison.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import psutil
import tomli_w

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
BIN = Path(sys.executable).parent

from bench.served import wait_serving  # noqa: E402
from tests.helpers.procs import poll_until  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=120.0)
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="gt", dir="/tmp"))
    cfg = base / "graced.toml"
    # The embedded default config, with this run's own state dir and socket.
    default = tomllib.loads(subprocess.run([str(BIN / "graced"), "config", "default"],
                                           check=True, capture_output=True, text=True).stdout)
    default.setdefault("daemon", {}).update(state_dir=f"{base}/state", socket=f"{base}/g.sock")
    cfg.write_text(tomli_w.dumps(default))
    daemon = subprocess.Popen([str(BIN / "graced"), "run", "--config", str(cfg)],
                              stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    wait_serving(daemon)
    server = f"grace-bench-{os.getpid()}"
    env = (f"GRACE_SOCKET={base}/g.sock HOME={base} LANG=C.UTF-8 LC_ALL=C.UTF-8 "
           "TERM=screen-256color")
    cmd = f"env {env} {shlex.quote(str(BIN / 'gracectl'))} top"
    subprocess.run(["tmux", "-L", server, "new-session", "-d", "-s", "t", "-x", "200", "-y",
                    "60", cmd], check=True)
    try:
        # The pane's process is gracectl top itself (env execs it).
        pane = subprocess.run(["tmux", "-L", server, "display", "-p", "-t", "t",
                               "#{pane_pid}"], capture_output=True, text=True, check=True)
        top = psutil.Process(int(pane.stdout))

        def screen() -> str:
            return subprocess.run(["tmux", "-L", server, "capture-pane", "-p", "-t", "t"],
                                  capture_output=True, text=True, check=True).stdout

        # Settled once it shows a verified stream (a screen has no event: read it).
        poll_until(lambda: "verified" in screen(), 30, "gracectl top showing a verified stream")
        gd = psutil.Process(daemon.pid)
        t0, c0, g0 = time.monotonic(), top.cpu_times(), gd.cpu_times()
        time.sleep(args.seconds)  # the measurement window
        t1, c1, g1 = time.monotonic(), top.cpu_times(), gd.cpu_times()
        wall = t1 - t0
        top_cpu = 100 * ((c1.user + c1.system) - (c0.user + c0.system)) / wall
        gd_cpu = 100 * ((g1.user + g1.system) - (g0.user + g0.system)) / wall
        rss = top.memory_info().rss / 2**20
        print(f"bench/top.py  (gracectl top in tmux 200x60 against graced with the default "
              f"detectors; {wall:.0f} s idle)")
        print(f"  gracectl top: CPU {top_cpu:.2f} % of one core, RSS {rss:.1f} MB "
              f"(target < 2 %): {'PASS' if top_cpu < 2 else 'FAIL'}")
        print(f"  graced meanwhile: CPU {gd_cpu:.2f} % (serving the dashboard's polls and "
              "stream)")
    finally:
        subprocess.run(["tmux", "-L", server, "kill-server"], check=False)
        daemon.terminate()
        daemon.wait(20)
        subprocess.run(["rm", "-rf", str(base)], check=False)


if __name__ == "__main__":
    main()
