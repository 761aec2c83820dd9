"""``graced backtest``: replay a CSV of ``timestamp,value`` through the daemon's own path:
the detector's scoring and the mission engine (hysteresis, dedup), row by row."""

from __future__ import annotations

import csv
import dataclasses
import math
import shutil
import sys
import tempfile
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import IO, Any

import click

from .config import KIND_DEFAULT_THRESHOLD, DetectorConfig, MissionsConfig
from .detectors.base import Observation
from .detectors.runner import judge_and_observe
from .detectors.scoring import BaselineError, Scorer, Verdict
from .missions.engine import MissionEngine

_UNIT_NAMES = {"s": "seconds", "ms": "milliseconds", "us": "microseconds",
               "ns": "nanoseconds"}


class BacktestError(Exception):
    """Bad input: the message names the file, the line and the field."""


TIME_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}
"""--time-unit: what a numeric timestamp counts, to seconds."""
SECONDS_BEFORE = 1e11
"""Epoch seconds at or past this (the year 5138) are surely not seconds: milliseconds
(1.7e12 today), microseconds or nanoseconds read as seconds. Refused with a hint."""


def parse_timestamp(text: str, unit: str = "s") -> float:
    """Epoch seconds (or ``unit``: ms, us, ns), or ISO 8601 (``2026-11-24T00:00:00Z``);
    ValueError for anything else, nan and infinities included, and for seconds so large
    they must be another unit."""
    try:
        number = float(text)
    except ValueError:
        pass
    else:
        if number != number or number in (float("inf"), float("-inf")):
            raise ValueError(f"not a finite number: {text!r}")
        seconds = number * TIME_UNITS[unit]
        if abs(seconds) >= SECONDS_BEFORE:
            guess = next((u for u, f in (("ms", 1e-3), ("us", 1e-6), ("ns", 1e-9))
                          if abs(number * f) < SECONDS_BEFORE), "ns")
            raise ValueError(f"{text[:40]!r} is not epoch {_UNIT_NAMES[unit]} (the year "
                             f"would be past 5000): give --time-unit {guess}?")
        return seconds
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except (OverflowError, OSError) as exc:
        raise ValueError(str(exc)) from None


def detector_for_kind(kind: str) -> DetectorConfig:
    if kind == "baseline":
        return DetectorConfig(name="baseline", kind="value", file="-", baseline=True)
    if kind not in KIND_DEFAULT_THRESHOLD:
        raise click.BadParameter(f"unknown kind {kind!r}", param_hint="--kind")
    return DetectorConfig(name=kind, kind=kind, file="-")


SETTABLE = ("threshold", "below", "baseline", "sensitivity", "memory", "hold", "season",
            "min_change")


def apply_settings(cfg: DetectorConfig, threshold: float | None, below: bool,
                   settings: tuple[str, ...]) -> DetectorConfig:
    """The detector with ``--threshold``, ``--below`` and ``--set KEY=VALUE`` applied;
    raises :class:`click.BadParameter` naming the bad key or value."""
    changes: dict[str, Any] = {}
    if threshold is not None:
        if not math.isfinite(threshold):
            raise click.BadParameter(f"not a finite number: {threshold!r}",
                                     param_hint="--threshold")
        changes["threshold"] = threshold
    if below:
        changes["below"] = True
    for item in settings:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or key not in SETTABLE:
            raise click.BadParameter(f"{item!r}: expected KEY=VALUE with KEY one of "
                                     f"{', '.join(SETTABLE)}", param_hint="--set")
        try:
            changes[key] = _parse_setting(key, text.strip())
        except ValueError as exc:
            raise click.BadParameter(f"{key}: {exc}", param_hint="--set") from None
    cfg = dataclasses.replace(cfg, **changes)
    bad = _check_detector(cfg)
    if bad:
        raise click.BadParameter(bad, param_hint="--threshold")
    return cfg


def _parse_setting(key: str, text: str) -> Any:
    if key in ("below", "baseline"):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"expected true or false, got {text!r}")
        return text.lower() in ("true", "1")
    if key in ("memory", "hold"):
        value = int(text)
        if value < (1 if key == "memory" else 0):
            raise ValueError(f"must be at least {1 if key == 'memory' else 0}")
        return value
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"not a finite number: {text!r}")
    if key in ("sensitivity",) and number <= 0:
        raise ValueError("must be greater than 0")
    if key in ("season", "min_change") and number < 0:
        raise ValueError("must not be negative")
    return number


def _check_detector(cfg: DetectorConfig) -> str | None:
    if cfg.effective_threshold is None and not cfg.baseline:
        return (f"kind {cfg.kind!r} has no default threshold: give --threshold, or "
                "--set baseline=true (or --kind baseline)")
    return None


@dataclass
class Backwards:
    """Rows whose time went back (a DST hour written twice, a merged file): replayed in
    file order and counted; the first is named in the summary."""

    steps: int = 0
    first: str = ""


def rows(fh: IO[str], name: str, unit: str = "s",
         back: Backwards | None = None) -> Iterator[tuple[str, str, float, float]]:
    """The rows of a ``timestamp,value`` CSV. Time going back is counted in ``back`` and
    the row replayed as given (real data has it: NAB's machine_temperature writes one hour
    twice)."""
    reader = csv.reader(fh)
    try:
        yield from _rows(reader, name, unit, back or Backwards())
    except csv.Error as exc:  # a field over csv's limit (128 KiB), a NUL, ...
        raise BacktestError(f"{name}:{reader.line_num}: not CSV: {exc}") from None
    except UnicodeDecodeError as exc:
        raise BacktestError(f"{name}: not UTF-8 text (byte {exc.start} of a chunk: "
                            f"{exc.object[exc.start:exc.start + 1]!r})") from None


def _rows(reader: Any, name: str, unit: str,
          back: Backwards) -> Iterator[tuple[str, str, float, float]]:
    header = next(reader, None)
    if header is None or [h.strip().lower() for h in header] != ["timestamp", "value"]:
        raise BacktestError(f"{name}:1: header must be 'timestamp,value', got "
                            f"{str(header)[:80]}")
    last: tuple[float, int] | None = None
    for row in reader:
        line = reader.line_num
        if not row or not "".join(row).strip():
            continue
        if len(row) != 2:  # a third field is a mistake to say, not data to drop
            raise BacktestError(f"{name}:{line}: expected 2 fields, got {len(row)}")
        try:
            ts = parse_timestamp(row[0].strip(), unit)
        except ValueError as exc:
            why = str(exc) if "--time-unit" in str(exc) else (
                f"not a finite number or ISO 8601 time: {row[0][:80]!r}")
            raise BacktestError(f"{name}:{line}: timestamp: {why}") from None
        if last is not None and ts < last[0]:
            # The rows stand for the clock: time going back replays windows and hysteresis
            # as the file has it. Equal times are fine (two samples in one tick).
            back.steps += 1
            if not back.first:
                back.first = (f"{name}:{line}: {row[0][:40]!r} is {last[0] - ts:g} s before "
                              f"line {last[1]}'s")
        last = (ts, line)
        try:
            value = float(row[1])
        except ValueError:
            raise BacktestError(f"{name}:{line}: value: not a number: {row[1][:80]!r}"
                                ) from None
        if value != value or value in (float("inf"), float("-inf")):
            raise BacktestError(f"{name}:{line}: value: not a finite number: "
                                f"{row[1][:80]!r}")
        yield row[0].strip(), row[1].strip(), ts, value


@dataclass
class Summary:
    rows: int = 0
    flagged: int = 0
    missions: int = 0
    first_ts: float | None = None
    last_ts: float | None = None
    scores: array[float] = field(default_factory=lambda: array("d"))  # 8 bytes a row
    back: Backwards = field(default_factory=Backwards)

    def lines(self, name: str) -> list[str]:
        out = [f"graced: backtest: {self.rows} rows, {self.flagged} anomalies, "
               f"{self.missions} missions opened ({name})"]
        if self.back.steps:
            out.append(f"  warning: time went back {self.back.steps} time(s), first at "
                       f"{self.back.first}; rows replayed in file order (sort the file by "
                       "time if that is not what it means)")
        if self.rows and self.first_ts is not None and self.last_ts is not None:
            days = max(self.last_ts - self.first_ts, 0.0) / 86400
            if days >= 1:
                out.append(f"  over {days:.2f} days: {self.missions / days * 7:.1f} missions "
                           "a week")
            ordered = sorted(self.scores)
            last = len(ordered) - 1
            qs = "  ".join(f"p{q:g} {ordered[min(last, int(q / 100 * len(ordered)))]:.4g}"
                           for q in (50, 90, 99, 99.9))
            out.append(f"  anomaly_score: {qs}  max {ordered[-1]:.4g}")
            ladder = "  ".join(f">={t:g}: {sum(1 for x in ordered if x >= t)}"
                               for t in (0.3, 0.5, 0.7, 0.9, 0.99))
            out.append(f"  rows with anomaly_score {ladder}")
            out.append("  (anomaly_score is graced's 0-1 score; a row is an anomaly at the "
                       "detector's settings: --threshold is a VALUE, --set sensitivity=S "
                       "moves the baseline's cut-off)")
        return out


def run_backtest(infile: IO[str], name: str, cfg: DetectorConfig, out: IO[str],
                 progress: bool, missions: MissionsConfig | None = None,
                 unit: str = "s") -> Summary:
    """Score every row through the daemon's scoring and mission engine.

    Writes nothing if the input is bad (raises :class:`BacktestError`). Rows whose time
    goes back are replayed in file order and counted in the summary.
    """
    mc = missions or MissionsConfig()
    scorer = Scorer(cfg)
    engine = MissionEngine(resolve_after=mc.resolve_after, flap_window=mc.flap_window,
                           update_interval=mc.update_interval)
    subject = cfg.effective_subject if cfg.effective_subject != "-" else "backtest"
    # Spooled to a temporary file past 4 MiB: nothing is written if the input is bad, and
    # memory does not grow with the rows.
    buf = tempfile.SpooledTemporaryFile(max_size=4 << 20, mode="w+", newline="")
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["timestamp", "value", "anomaly_score", "is_anomaly", "mission_opened"])
    summary = Summary()
    total = None
    if progress and infile.seekable():
        total = sum(1 for _ in infile) - 1
        infile.seek(0)
    bar = click.progressbar(length=total, label="backtest", file=sys.stderr) if (
        progress and total and total > 20000) else None
    try:
        for ts_text, value_text, ts, value in rows(infile, name, unit, summary.back):
            obs = Observation(subject=subject, value=value)
            try:
                verdict, transitions = judge_and_observe(scorer, engine, cfg, obs, ts)
            except BaselineError as exc:  # graced: a detector error, no verdict; then relearn
                click.echo(f"graced backtest: data row {summary.rows + 1}: {exc}", err=True)
                verdict, transitions = Verdict(False, 0.0, str(exc)), []
            opened = any(tr.topic == "mission.opened" for tr in transitions)
            writer.writerow([ts_text, value_text, repr(verdict.score), int(verdict.anomalous),
                             int(opened)])
            summary.rows += 1
            summary.flagged += verdict.anomalous
            summary.missions += opened
            summary.scores.append(verdict.score)
            if summary.first_ts is None:
                summary.first_ts = ts
            summary.last_ts = ts
            if bar is not None and summary.rows % 5000 == 0:
                bar.update(5000)
        if bar is not None:
            bar.render_finish()
            bar = None
        buf.seek(0)
        shutil.copyfileobj(buf, out)
    finally:
        if bar is not None:
            bar.render_finish()
        buf.close()
    return summary
