"""A streaming, robust baseline: how unusual is each value against the metric's history.

Theory of operation
-------------------
Pure code: values and timestamps in, a score in [0, 1] out; the state is a small dict
that can be saved and restored (graced keeps it across restarts).

The model is ``value = level + season[time of day] + noise``:

* **level** is an exponentially weighted average of the de-seasonalised value, updated
  with the residual *clipped* to a few scale units, so the spikes it is learning from
  barely move it (robust); slow drifts are followed.
* **scale** is a clipped EWMA of the absolute residual (a robust mean absolute
  deviation); a fast EWMA of the same is compared with it to notice variance changes.
* **season** is a daily profile in ``bins`` slots learned from the residual of the
  level, used once a full period has been seen (daily patterns).
* A two-sided **CUSUM** of the standardised residual catches level shifts too small to
  be a spike; when it fires, the level is re-anchored to the recent values, so the
  new level becomes normal instead of alarming for ever.

The score combines three ratios, each 1 at its alarm threshold: ``|z| / point_z``,
``cusum / cusum_h`` and ``fast_scale / scale / var_ratio``; ``u -> u^4 / (1 + u^4)``
maps their maximum to [0, 1], so 0.5 is the alarm threshold.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class BaselineParams:
    alpha: float = 0.05  # level EWMA weight
    scale_alpha: float = 0.02  # scale EWMA weight
    fast_alpha: float = 0.1  # fast scale (variance change)
    season_beta: float = 0.05  # season slot weight per visit
    bins: int = 48  # slots per period
    period: float = 86400.0  # seconds (daily)
    warmup: int = 30  # values before any score
    point_z: float = 10.0  # |residual| in scale units that is an anomaly
    clip: float = 3.0  # residual clip for updates, in scale units
    cusum_k: float = 2.0  # CUSUM slack, in scale units
    cusum_h: float = 25.0  # CUSUM alarm level
    cusum_clip: float = 8.0  # largest CUSUM step, in scale units
    fast_clip: float = 8.0  # largest fast-scale step, in scale units
    var_ratio: float = 2.75  # fast/slow scale ratio that is an anomaly
    recent: int = 8  # values used to re-anchor the level after a shift


@dataclass
class BaselineState:
    n: int = 0
    level: float = 0.0
    scale: float = 0.0
    fast: float = 0.0
    cp: float = 0.0
    cn: float = 0.0
    first_ts: float | None = None
    season: list[float] = field(default_factory=list)
    recent: list[float] = field(default_factory=list)
    var_run: int = 0


def _squash(u: float) -> float:
    u4 = u * u * u * u
    return u4 / (1.0 + u4)


class Baseline:
    """Scores one metric's values, one at a time, in time order."""

    def __init__(self, params: BaselineParams | None = None,
                 state: BaselineState | None = None) -> None:
        self.p = params or BaselineParams()
        self.s = state or BaselineState()
        if len(self.s.season) != self.p.bins:
            self.s.season = [0.0] * self.p.bins
        self.last_reason = ""

    def score(self, ts: float, x: float) -> float:
        """Score ``x`` observed at ``ts`` (seconds), then learn from it."""
        p, s = self.p, self.s
        if s.first_ts is None:
            s.first_ts = ts
        slot = int((ts % p.period) / p.period * p.bins) % p.bins
        seasonal = ts - s.first_ts >= p.period
        season = s.season[slot] if seasonal else 0.0
        s.n += 1
        if s.n <= p.warmup:
            # Warm-up: running mean and mean absolute deviation.
            delta = x - s.level
            s.level += delta / s.n
            s.scale += (abs(x - s.level) - s.scale) / s.n
            s.fast = s.scale
            self._remember(x - season)
            self.last_reason = "learning"
            return 0.0
        floor = 1e-9 + 1e-6 * abs(s.level)
        scale = max(s.scale, floor)
        r = x - s.level - season
        z = r / scale
        point = abs(z) / p.point_z
        # Clipped, so one spike cannot push the CUSUM most of the way to an alarm.
        zc = z if -p.cusum_clip <= z <= p.cusum_clip else math.copysign(p.cusum_clip, z)
        s.cp = max(0.0, s.cp + zc - p.cusum_k)
        s.cn = max(0.0, s.cn - zc - p.cusum_k)
        shift = max(s.cp, s.cn) / p.cusum_h
        lim = p.clip * scale
        rc = r if -lim <= r <= lim else (lim if r > 0 else -lim)
        # Clipped, so one spike does not look like a variance change.
        s.fast += p.fast_alpha * (min(abs(r), p.fast_clip * scale) - s.fast)
        var = s.fast / scale / p.var_ratio
        u = max(point, shift, var)
        self.last_reason = ("spike" if u == point else "level shift" if u == shift
                            else "variance change")
        self._remember(x - season)
        s.var_run = s.var_run + 1 if var >= 1.0 else 0
        if s.var_run >= p.recent:
            # A sustained variance change is the new regime: adopt its scale.
            s.scale = s.fast
            s.var_run = 0
        if shift >= 1.0:
            # Re-anchor: the new level is the recent values' mean.
            s.level = sum(s.recent) / len(s.recent)
            s.cp = s.cn = 0.0
        else:
            s.level += p.alpha * rc
        s.scale += p.scale_alpha * (min(abs(r), lim) - s.scale)
        s.season[slot] += p.season_beta * (max(-lim, min(lim, x - s.level)) - s.season[slot])
        return _squash(u)

    def _remember(self, value: float) -> None:
        rec = self.s.recent
        rec.append(value)
        if len(rec) > self.p.recent:
            del rec[0]

    def to_dict(self) -> dict[str, Any]:
        return {"params": asdict(self.p), "state": asdict(self.s)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Baseline:
        params = BaselineParams(**data.get("params", {}))
        state = BaselineState(**data.get("state", {}))
        return cls(params, state)

