"""The baseline detector on a labelled synthetic corpus, its state, and backtesting."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from graced.detectors.baseline import Baseline
from tests.conftest import ROOT, bin_path

sys.path.insert(0, str(ROOT / "bench"))
from corpus import corpus, evaluate, make_series  # noqa: E402


def _flags(ts: list[float], values: list[float]) -> list[bool]:
    b = Baseline()
    return [b.score(t, v) >= 0.5 for t, v in zip(ts, values, strict=True)]


def test_corpus_recall_and_false_alarms() -> None:
    series = corpus(50, 4000)
    assert len(series) >= 50
    kinds = {k for s in series for _, _, k in s.windows}
    assert kinds == {"spike", "level shift", "variance change"}
    result = evaluate(series, _flags)
    assert result["recall"] >= 0.90, result
    assert result["false_per_10k"] <= 1.0, result


def test_scores_are_in_unit_interval_and_spikes_do_not_poison_the_level() -> None:
    b = Baseline()
    scores = []
    for i in range(500):
        v = 100.0 + (i % 7) * 0.5
        if i in (200, 201, 202, 300):
            v = 10_000.0  # a burst of spikes the baseline is learning from
        scores.append(b.score(i * 60.0, v))
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert scores[200] > 0.99 and scores[300] > 0.99
    assert max(scores[310:]) < 0.5
    assert 99 < b.s.level < 104


def test_level_shift_alarms_then_becomes_normal() -> None:
    b = Baseline()
    flags = [b.score(i * 60.0, (100.0 if i < 400 else 160.0) + (i % 5) * 0.3) >= 0.5
             for i in range(800)]
    assert any(flags[400:410]) and not any(flags[:400]) and not any(flags[500:])


def test_state_survives_a_round_trip() -> None:
    s = make_series(3, 3000)
    a = Baseline()
    for t, v in zip(s.ts[:2000], s.values[:2000], strict=True):
        a.score(t, v)
    b = Baseline.from_dict(json.loads(json.dumps(a.to_dict())))
    rest = list(zip(s.ts[2000:], s.values[2000:], strict=True))
    assert [a.score(t, v) for t, v in rest] == [b.score(t, v) for t, v in rest]


def _csv(path: Path, n: int, seed: int = 11) -> None:
    s = make_series(seed, n)
    with path.open("w") as fh:
        fh.write("timestamp,value\n")
        for t, v in zip(s.ts, s.values, strict=True):
            fh.write(f"{t:.0f},{v:.4f}\n")


def test_backtest_of_100000_points_is_fast_and_complete(tmp_path: Path) -> None:
    src, out = tmp_path / "in.csv", tmp_path / "out.csv"
    _csv(src, 100_000)
    t0 = time.monotonic()
    res = subprocess.run([bin_path("graced"), "backtest", str(src), "--kind", "baseline",
                          "-o", str(out)], capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - t0
    assert res.returncode == 0, res.stderr
    assert elapsed < 5.0, elapsed
    with src.open() as a, out.open() as b:
        rin, rout = list(csv.reader(a)), list(csv.reader(b))
    assert rout[0] == ["timestamp", "value", "anomaly_score", "is_anomaly"]
    assert len(rout) == len(rin) == 100_001
    assert [r[:2] for r in rout[1:]] == [r[:2] for r in rin[1:]]
    assert all(0 <= float(r[2]) <= 1 and r[3] in ("0", "1") for r in rout[1:])


def test_backtest_with_a_configured_detector_and_bad_input(tmp_path: Path) -> None:
    cfg = tmp_path / "g.toml"
    cfg.write_text('[[detector]]\nname = "cpu"\nkind = "cpu"\nthreshold = 50.0\n')
    src = tmp_path / "in.csv"
    src.write_text("timestamp,value\n2026-11-24T00:00:00Z,10\n2026-11-24T00:00:01Z,80\n")
    res = subprocess.run([bin_path("graced"), "backtest", str(src), "--detector", "cpu",
                          "--config", str(cfg)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert [r.split(",")[3] for r in res.stdout.splitlines()[1:]] == ["0", "1"]
    src.write_text("timestamp,value\n1,10\n2,oops\n")
    res = subprocess.run([bin_path("graced"), "backtest", str(src), "--kind", "baseline"],
                         capture_output=True, text=True)
    assert res.returncode == 1 and res.stdout == ""
    assert res.stderr.strip() == f"graced: {src}:3: value: not a number: 'oops'"
    res = subprocess.run([bin_path("graced"), "backtest", str(src), "--kind", "nope"],
                         capture_output=True, text=True)
    assert res.returncode == 2


@pytest.mark.parametrize("args", [[], ["--kind", "cpu", "--detector", "cpu"]])
def test_backtest_needs_exactly_one_of_kind_or_detector(tmp_path: Path, args: list[str]) -> None:
    src = tmp_path / "in.csv"
    src.write_text("timestamp,value\n1,1\n")
    res = subprocess.run([bin_path("graced"), "backtest", str(src), *args],
                         capture_output=True, text=True)
    assert res.returncode == 2 and "exactly one of --kind or --detector" in res.stderr
