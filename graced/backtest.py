"""``graced backtest``: replay a CSV of ``timestamp,value`` through a detector's scoring."""

from __future__ import annotations

import csv
import io
import sys
from collections.abc import Iterator
from datetime import datetime
from typing import IO

import click

from .config import KIND_DEFAULT_THRESHOLD, DetectorConfig
from .detectors.scoring import Scorer


class BacktestError(Exception):
    """Bad input: the message names the file, the line and the field."""


def parse_timestamp(text: str) -> float:
    """Epoch seconds, or ISO 8601 (``2026-11-24T00:00:00Z``)."""
    try:
        return float(text)
    except ValueError:
        pass
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def detector_for_kind(kind: str) -> DetectorConfig:
    if kind == "baseline":
        return DetectorConfig(name="baseline", kind="value", file="-", baseline=True)
    if kind not in KIND_DEFAULT_THRESHOLD:
        raise click.BadParameter(f"unknown kind {kind!r}", param_hint="--kind")
    return DetectorConfig(name=kind, kind=kind)


def rows(fh: IO[str], name: str) -> Iterator[tuple[str, str, float, float]]:
    reader = csv.reader(fh)
    header = next(reader, None)
    if header is None or [h.strip().lower() for h in header[:2]] != ["timestamp", "value"]:
        raise BacktestError(f"{name}:1: header must be 'timestamp,value', got {header!r}")
    for row in reader:
        line = reader.line_num
        if not row or not "".join(row).strip():
            continue
        if len(row) < 2:
            raise BacktestError(f"{name}:{line}: expected 2 fields, got {len(row)}")
        try:
            ts = parse_timestamp(row[0].strip())
        except ValueError:
            raise BacktestError(f"{name}:{line}: timestamp: not a number or ISO 8601 time: "
                                f"{row[0]!r}") from None
        try:
            value = float(row[1])
        except ValueError:
            raise BacktestError(f"{name}:{line}: value: not a number: {row[1]!r}") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise BacktestError(f"{name}:{line}: value: not a finite number: {row[1]!r}")
        yield row[0].strip(), row[1].strip(), ts, value


def run_backtest(infile: IO[str], name: str, cfg: DetectorConfig, out: IO[str],
                 progress: bool) -> tuple[int, int]:
    """Score every row; returns (rows, anomalies). Writes nothing if the input is bad."""
    scorer = Scorer(cfg)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["timestamp", "value", "anomaly_score", "is_anomaly"])
    count = anomalies = 0
    total = None
    if progress and infile.seekable():
        total = sum(1 for _ in infile) - 1
        infile.seek(0)
    bar = click.progressbar(length=total, label="backtest", file=sys.stderr) if (
        progress and total and total > 20000) else None
    try:
        for ts_text, value_text, ts, value in rows(infile, name):
            score, anomalous, _ = scorer.score_value("backtest", value, ts)
            writer.writerow([ts_text, value_text, f"{score:.4f}", int(anomalous)])
            count += 1
            anomalies += anomalous
            if bar is not None and count % 5000 == 0:
                bar.update(5000)
    finally:
        if bar is not None:
            bar.render_finish()
    out.write(buf.getvalue())
    return count, anomalies
