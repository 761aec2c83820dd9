#!/usr/bin/env python3
"""Crash safety: ``bench/crash.py [--kills 200] [--min-up 0.5] [--max-up 3.0]``.

SIGKILLs graced at random moments under load (events streaming, missions executing,
approvals arriving; every 10th kill waits until an approved step is running) and then
checks: zero ``PRAGMA integrity_check`` failures, zero
lost events that any client received, zero lost acknowledged approvals, a valid chain
across every restart, and no action run twice. See tests/helpers/crash.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.helpers.crash import run  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kills", type=int, default=200)
    ap.add_argument("--min-up", type=float, default=0.5)
    ap.add_argument("--max-up", type=float, default=3.0)
    ap.add_argument("--arrange-every", type=int, default=10,
                    help="every Nth kill waits for an approved step to be running (0: none)")
    args = ap.parse_args()
    report = run(args.kills, args.min_up, args.max_up,
                 progress=lambda line: print("  " + line, flush=True),
                 arrange_every=args.arrange_every)
    print(f"bench/crash.py  ({report.kills} SIGKILLs under load: {report.arranged} once an "
          f"approved step had started, the others at random moments {report.min_up:g}-"
          f"{report.max_up:g} s after start; {report.elapsed:.0f} s)")
    for line in report.lines():
        print("  " + line)
    print(f"  {'PASS' if report.ok and report.approved and report.killed_mid_step else 'FAIL'}")


if __name__ == "__main__":
    main()
