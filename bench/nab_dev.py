#!/usr/bin/env python3
"""The default baseline on real, labelled data: NAB's development split.

    python bench/nab_dev.py [--data ../shared/datasets/nab-dev] [--keep DIR] [--no-corpus]

Replays every series of the split through ``graced backtest``'s own code (the daemon's
scoring and mission engine, default settings: ``--kind baseline``), writes one result
CSV per series, and scores them with the split's standalone NAB scorer (``score.py``:
one global threshold per profile, swept). Prints the three profile scores next to the
published detectors' figures from the split's README, the scores of two halves of the
split (every other file of each category), the synthetic corpus figures (recall, false
alarms per 10,000 normal points, on 60 series and on 60 held-out series) and the time to
backtest 100,000 points.
Targets: standard >= 66, reward_low_FP >= 58, reward_low_FN >= 70; corpus recall >= 90 %
with <= 1 false alarm per 10,000; 100,000 points in < 5 s.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from graced.backtest import detector_for_kind, run_backtest  # noqa: E402

# CI places shared/ beside the clone; GRACE_SHARED_DIR points elsewhere.
SHARED = Path(os.environ.get("GRACE_SHARED_DIR", ROOT.parent / "shared"))
DEFAULT_DATA = SHARED / "datasets" / "nab-dev"

PUBLISHED = [  # from the split's README: standard, reward_low_FP, reward_low_FN
    ("ARTime", 76.2, 66.4, 81.9),
    ("HTM (numenta)", 65.8, 58.2, 70.3),
    ("CAD OSE", 63.9, 60.8, 67.3),
    ("KNN CAD", 55.4, 34.6, 64.5),
    ("Random Cut Forest", 44.2, 34.5, 54.3),
    ("Windowed Gaussian", 33.9, 11.4, 43.0),
    ("naive rolling z-score", 28.4, 1.2, 40.7),
    ("graced baseline 0.1.0", 0.0, 0.0, 0.0),
]
PROFILES = ("standard", "reward_low_FP_rate", "reward_low_FN_rate")


def backtest_split(data: Path, out: Path) -> tuple[list[str], float, int]:
    """Backtest every series; returns (relative paths, seconds, rows)."""
    windows = json.loads((data / "windows.json").read_text())
    cfg = detector_for_kind("baseline")
    rels = sorted(windows)
    rows = 0
    t0 = time.monotonic()
    for rel in rels:
        dest = out / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        with (data / "data" / rel).open() as src, dest.open("w") as fh:
            # NAB's machine_temperature writes one hour twice (its line 10151 goes back
            # to 02:00): replayed as given (backtest's default), as the published
            # detectors were scored.
            rows += run_backtest(src, rel, cfg, fh, False).rows
    return rels, time.monotonic() - t0, rows


def nab_scores(data: Path, results: Path, rels: list[str]) -> dict[str, float]:
    """The split's scorer on ``rels`` (all of them, or a subset)."""
    windows = json.loads((data / "windows.json").read_text())
    sub = results / "windows-subset.json"
    sub.write_text(json.dumps({r: windows[r] for r in rels}))
    report = results / "report.json"
    subprocess.run([sys.executable, str(data / "score.py"), str(results),
                    "--data-dir", str(data / "data"), "--windows", str(sub),
                    "--profiles", str(data / "profiles.json"), "--json", str(report)],
                   check=True, capture_output=True, text=True)
    got = json.loads(report.read_text())["profiles"]
    return {p: got[p]["score"] for p in PROFILES} | {
        f"{p}:threshold": got[p]["threshold"] for p in PROFILES}


def halves(rels: list[str]) -> tuple[list[str], list[str]]:
    cats: dict[str, list[str]] = {}
    for rel in rels:
        cats.setdefault(rel.split("/")[0], []).append(rel)
    a = [r for lst in cats.values() for i, r in enumerate(lst) if i % 2 == 0]
    b = [r for lst in cats.values() for i, r in enumerate(lst) if i % 2 == 1]
    return a, b


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--keep", type=Path, default=None, help="write the result CSVs here")
    ap.add_argument("--no-corpus", action="store_true", help="skip the synthetic corpus")
    args = ap.parse_args()
    if not (args.data / "score.py").is_file():
        print(f"nab_dev: no NAB split at {args.data} (expected score.py, data/, "
              "windows.json)", file=sys.stderr)
        sys.exit(2)
    ctx = contextlib.nullcontext(str(args.keep)) if args.keep else tempfile.TemporaryDirectory(
        prefix="nab-dev-")
    with ctx as tmp:
        results = Path(tmp)
        results.mkdir(parents=True, exist_ok=True)
        rels, secs, rows = backtest_split(args.data, results)
        full = nab_scores(args.data, results, rels)
        first, second = halves(rels)
        part_a = nab_scores(args.data, results, first)
        part_b = nab_scores(args.data, results, second)
    print(f"NAB dev split: {len(rels)} series, {rows} rows, backtested in {secs:.1f} s "
          f"(graced backtest --kind baseline, default settings; load average "
          f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} cores)")
    print(f"{'detector':<28} {'standard':>9} {'low_FP':>8} {'low_FN':>8}")
    mine = tuple(full[p] for p in PROFILES)
    for name, *vals in [("graced baseline (this tree)", *mine), *PUBLISHED]:
        print(f"{name:<28} {vals[0]:>9.1f} {vals[1]:>8.1f} {vals[2]:>8.1f}")
    print("thresholds swept: " + ", ".join(f"{p} {full[p + ':threshold']:.3g}"
                                         for p in PROFILES))
    for label, part in (("half A (even files)", part_a), ("half B (odd files)", part_b)):
        print(f"{label:<28} {part[PROFILES[0]]:>9.1f} {part[PROFILES[1]]:>8.1f} "
              f"{part[PROFILES[2]]:>8.1f}")
    print("targets: standard >= 66, reward_low_FP >= 58, reward_low_FN >= 70")
    if args.no_corpus:
        return
    from detect import baseline_figures

    with contextlib.redirect_stdout(io.StringIO()):
        fig = baseline_figures()
    print(f"synthetic corpus: recall {100 * fig['recall']:.1f} % "
          f"({fig['found']}/{fig['windows']}), {fig['false_per_10k']:.2f} false alarms per "
          f"10,000 normal points; held-out series: recall "
          f"{100 * fig['held_out_recall']:.1f} %, {fig['held_out_false_per_10k']:.2f} per "
          f"10,000; backtest of 100,000 points {fig['backtest_100k_s']:.2f} s "
          f"({fig['backtest_100k_cpu_s']:.2f} s CPU; load average {os.getloadavg()[0]:.2f} "
          f"on {os.cpu_count()} cores)")
    print("targets: recall >= 90 %, <= 1 false alarm per 10,000, 100,000 points < 5 s")


if __name__ == "__main__":
    main()
