"""Is an observation anomalous, and how much? Pure code: thresholds and the baseline."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..config import DetectorConfig
from .base import Observation
from .baseline import Baseline, BaselineParams


class BaselineError(ValueError):
    """A baseline went non-finite: it is dropped (the subject learns again) and the value
    is a detector error, not a verdict."""


@dataclass
class Verdict:
    anomalous: bool
    # in [0, 1]; 0.5 and above is news. A baseline's event stays anomalous while it lasts
    # (far from where it started), though its score falls as the model adapts to it.
    score: float
    summary: str


COUNTS = {"processes": "process", "events": "event"}
"""Units that count things (a whole number, 1 in the singular: "1 process")."""


def _fmt(value: float, unit: str) -> str:
    if unit in COUNTS and value == int(value):
        return f"{value:.0f} {COUNTS[unit] if value == 1 else unit}"
    text = f"{value:.1f}" if abs(value) < 1000 else f"{value:.0f}"
    return f"{text} {unit}".strip() if unit else text


class Scorer:
    """Judges one detector's observations; keeps one baseline per subject."""

    def __init__(self, cfg: DetectorConfig, state: dict[str, Any] | None = None) -> None:
        self.cfg = cfg
        self.baselines: dict[str, Baseline] = {}
        self.dropped: list[str] = []  # why a saved state was not restored, for the log
        if cfg.baseline and isinstance(state, dict):
            for subject, data in state.items():
                try:
                    restored = Baseline.from_dict(data)
                    # Knobs come from the config; learned state is kept if it fits them.
                    self.baselines[subject] = Baseline(self.params(), restored.s)
                except (TypeError, ValueError, AttributeError) as exc:
                    # An old or damaged state: start learning again.
                    self.dropped.append(f"{str(subject)[:80]!r}: {str(exc)[:200]}")

    def params(self) -> BaselineParams:
        cfg = self.cfg
        return BaselineParams(sensitivity=cfg.sensitivity, memory=cfg.memory, hold=cfg.hold,
                              season=cfg.season, min_change=cfg.effective_min_change)

    def state(self) -> dict[str, Any]:
        return {subject: b.to_dict() for subject, b in self.baselines.items()}

    def threshold_score(self, value: float) -> float:
        limit = self.cfg.effective_threshold
        if limit is None:
            return 0.0
        if self.cfg.below:
            if value >= limit:
                return 0.0 if value > 0 else 1.0
            return min(1.0, 0.5 + 0.5 * (limit - value) / (abs(limit) or 1.0))
        if value <= limit:  # "above" the threshold: equal is still normal
            return max(0.0, min(0.4999, 0.5 * value / limit)) if limit > 0 else 0.0
        return min(1.0, 0.5 + 0.5 * (value - limit) / (abs(limit) or 1.0))

    def score_value(self, subject: str, value: float, ts: float) -> tuple[float, bool, str]:
        """(score, anomalous, why) for a plain value: the threshold, then the baseline."""
        score = self.threshold_score(value)
        if score >= 0.5:
            return score, True, "threshold"
        if self.cfg.baseline:
            base = self.baselines.get(subject)
            if base is None:
                base = self.baselines[subject] = Baseline(self.params())
            b = base.score(ts, value)
            if not (math.isfinite(b) and base.finite()):
                del self.baselines[subject]
                raise BaselineError(f"the baseline of {str(subject)[:80]!r} went non-finite "
                                    f"at {value!r}; it learns again")
            if base.alarm:
                why = base.last_reason
                if base.expected is not None:  # an event still going on
                    why += f" from about {base.expected:.4g}"
                return b, True, why
            score = max(score, b)
        return score, False, ""

    def judge(self, obs: Observation, ts: float) -> Verdict:
        cfg = self.cfg
        name = f"{cfg.name} {obs.subject}" if obs.subject not in ("", "host") else cfg.name
        if obs.failed:
            return Verdict(True, 1.0, f"{name}: {obs.failed}")
        if obs.event:
            return Verdict(True, 1.0, f"{name}: {obs.event}")
        if obs.alarm:
            return Verdict(True, 1.0, f"{name}: {obs.alarm}")
        if obs.value is None:  # a detector may say why not yet (a window still filling)
            absent = obs.detail.get("absent") if obs.detail else None
            if absent:  # nothing to measure (no process): normal, the absence is not news
                return Verdict(False, 0.0, f"{name}: no value: {str(absent)[:200]}")
            pending = obs.detail.get("pending") if obs.detail else None
            return Verdict(False, 0.0, f"{name}: no value" + (
                f" yet: {str(pending)[:200]}" if pending else ""))
        value = obs.value
        score, anomalous, why = self.score_value(obs.subject, value, ts)
        limit = cfg.effective_threshold
        # What the detector adds to any summary of a value (processes it did not count).
        note = obs.detail.get("note") if obs.detail else None
        tail = f"; {str(note)[:200]}" if note else ""
        if anomalous and why == "threshold" and limit is not None:
            word = "below" if cfg.below else "above"
            return Verdict(True, score, f"{name} at {_fmt(value, obs.unit)}, {word} the "
                                        f"threshold {_fmt(limit, obs.unit)}{tail}")
        if anomalous:
            return Verdict(True, score, f"{name} at {_fmt(value, obs.unit)} is unusual for it "
                                        f"({why}, baseline score {score:.2f}){tail}")
        return Verdict(False, score, f"{name} at {_fmt(value, obs.unit)}{tail}")


NEAR = 0.25
"""Within this fraction of its threshold, a value is sampled faster..."""
NEAR_POINTS = 10.0
"""...or, for a percentage, within this many points of it (memory at 82 % of a 90 %
threshold is near; 25 % of the threshold would be 22 points, most of the free range)."""
FASTEST = 0.05
"""The shortest interval near a threshold, as a fraction of the configured interval."""


def next_interval(interval: float, value: float | None, threshold: float | None,
                  below: bool = False, percent: bool = False) -> float:
    """How long to wait before the next sample of a metric the kernel does not announce.

    Far from its threshold a value is sampled on its interval; nearer than ``NEAR`` of the
    threshold (``NEAR_POINTS`` points for a ``percent`` value), the wait shrinks with the
    square of the distance, down to ``FASTEST`` of the interval: memory at 89 % of a 90 %
    threshold is read twenty times as often as at 30 %, so crossing it is seen sooner
    without an idle host paying for it. At or past the threshold the interval is the
    configured one again: hysteresis counts samples, and a mission's timing must not
    change with this.
    """
    if value is None or threshold is None or threshold == 0:
        return interval
    gap = (value - threshold) if below else (threshold - value)
    near = NEAR_POINTS if percent else NEAR * abs(threshold)
    if gap < 0 or gap >= near:  # past it (equal is still normal, and nearest of all)
        return interval
    return interval * max(FASTEST, (gap / near) ** 2)
