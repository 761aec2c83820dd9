#!/usr/bin/env python3
"""How long a signal step takes to find its targets among decoys with huge command lines.

    python bench/signal_find.py [--decoys 200] [--mib 1] [--runs 5]

Starts ``--decoys`` processes (shells, under another name, so none is a target) each
with ``--mib`` MiB of command line, and one process of the name the step
looks for, then times graced.targets.find as a step by exact name (``process = NAME``)
and with ``match_cmdline = true`` runs it: median wall time of ``--runs`` runs each,
with no decoys first and then with them. An exact name reads no command line (session 9,
attacker: 0.1 s became 1.2 s with 200 decoys of 1 MB when it read them all);
match_cmdline reads the first 4096 bytes of each (graced.owners.CMDLINE_PREFIX; review
s10: 150 decoys of 1.8 MB cost a third of a core when it read them whole), and its
time is printed for comparison. The process detectors' match_cmdline reads the same
prefix through the same function.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from graced.targets import find  # noqa: E402

ARG = 128 * 1024 - 1  # one argument, at most (MAX_ARG_STRLEN, with its NUL)


def median_s(fn: Callable[[], object], runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--decoys", type=int, default=200)
    ap.add_argument("--mib", type=float, default=1.0)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    where = Path(tempfile.mkdtemp(prefix="grace-bench-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        sleep = shutil.which("sleep") or "/bin/sleep"
        name = "bs" + uuid.uuid4().hex[:8]
        shutil.copy(sleep, where / name)
        shutil.copy(shutil.which("sh") or "/bin/sh", where / "decoy")
        procs.append(subprocess.Popen([str(where / name), "600"]))

        def by_name() -> object:
            return find(process=name)

        def by_cmdline() -> object:
            return find(process=name, match_cmdline=True)

        assert [t.pid for t in find(process=name).targets] == [procs[0].pid]
        quiet = (median_s(by_name, args.runs), median_s(by_cmdline, args.runs))
        per = max(1, int(args.mib * 2**20) // ARG)
        for _ in range(args.decoys):
            # a shell that keeps its arguments (and waits on its sleep, never exec'ing it)
            procs.append(subprocess.Popen(
                [str(where / "decoy"), "-c", "sleep 600; :", "decoy", *(["x" * ARG] * per)],
                stdin=subprocess.DEVNULL, start_new_session=True))
        big = [p for p in procs[1:] if len(Path(f"/proc/{p.pid}/cmdline").read_bytes())
               >= per * ARG]
        assert len(big) == args.decoys, f"only {len(big)} decoys hold their command line"
        loaded = (median_s(by_name, args.runs), median_s(by_cmdline, args.runs))
        print(f"{args.decoys} decoys of {per * ARG / 2**20:.2f} MiB command line, "
              f"median of {args.runs} runs:")
        print(f"  exact name:     {quiet[0]:.3f} s without decoys, {loaded[0]:.3f} s with")
        print(f"  match_cmdline:  {quiet[1]:.3f} s without decoys, {loaded[1]:.3f} s with")
    finally:
        for p in procs:
            if p is procs[0]:
                p.kill()
            else:
                os.killpg(p.pid, signal.SIGKILL)  # the shell and its sleep
            p.wait()
        shutil.rmtree(where, ignore_errors=True)


if __name__ == "__main__":
    main()
