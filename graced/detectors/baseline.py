"""A streaming, robust baseline: how unusual is each value against the metric's history.

Theory of operation
-------------------
Pure code: values and timestamps in, a score in [0, 1] out; O(1) work per value and a
small state (a few numbers and two profiles of 288 slots) that graced saves and restores.

**What is expected.** Three models predict each value and the one with the smallest
recent error is used: a *level* (an exponentially weighted average, updated with the
residual clipped to a few scale units, so spikes it learns from barely move it), a
*daily profile* and a *weekly profile* (``SEASON_BINS`` slots over ``season`` seconds,
and over seven times that, each around its own slow level). A profile is used only
once it has seen its period and has then predicted clearly better than the level (the
weekly one catches what a day cannot: weekends, a weekday's batch job). A profile
tolerates a pattern a slot early or late (the nearest of three slots), so a square
wave or a cron job at a slightly different minute is not an anomaly.

**How unusual.** The residual is looked at on three time scales: the point itself
against the last few residuals (a spike), and two exponential averages of the
residual (a level shift, a slow drift away from the norm). Each is divided by its own
robust scale (a clipped average of its own absolute size), so autocorrelated noise
and quantised series are measured against what they really do. A fast/slow ratio of
the point scale catches variance changes. Scales are floored at 0.1 % of the level, so
a flat or quantised series (a percentage that sits still, then moves by its last
digit) is not alarming, and learn at ``1/n`` at first (short warm-up, no collapse on a
flat start). After warm-up a residual enters the views clipped to ``VIEW_CLIP`` x the
learning clip, so a value however far off (1e200) scores 1 and leaves every number finite.

**Its own history.** For each view, a high quantile (99.8 %) of its own scale-free
deviations is tracked; a deviation counts as unusual against the larger of
``Z_ALARM / sensitivity`` and 1.5 x that view's quantile (at most three times the alarm
level), so a metric whose normal life is spiky needs a bigger spike to alarm, without
blunting its level-shift view (and the other way round).

**Score the onset.** ``u`` (1 at the alarm level) maps to ``u^4 / (1 + u^4)``, so 0.5
is the alarm threshold. One event alarms once: after a report, the same kind of
deviation (rise, drop, or variance change) is reported again within ``hold`` values
only if it is clearly larger; other values get 1 % of their score. Each report also
raises the bar for its kind: by 5 %, or to 40 % of the deviation it reported if that
is more, relaxing with a half-life of about 3,500 values. (The kind of a value is that
of its largest deviation before the bars, so the spread that grows while the level
adapts to a shift is not reported as a second event.) The bar rises to at most
``PEAK_GAIN`` x 40 % of the largest deviation of its kind reported before (at first the
alarm level): a single outlier a million deviations high raises it to 12, not 400,000,
and the first large event of a calm metric to 12 at most. Alarms are rare by nature:
soon after a large event, the smaller ones in its wake (aftershocks, the bursts of a
busy spell) do not alarm, a repeat of the same size alarms with a slightly lower score,
a metric that keeps alarming needs ever larger deviations, and a rare large event still
shows. The level, scales and profile keep
learning, so after a level shift the new level becomes normal.

**While an event lasts.** The score is news: it falls as the model adapts to a sustained
fault. Whether a value is an anomaly for the daemon (``alarm``, what keeps a mission open)
also remembers the rise or drop reported last: where the model's level stood before it,
and its usual error then. A value more than ``BACK_Z`` of those errors (over sensitivity)
away in the same direction continues the event; one back within them is no news, even
while the model, which learnt the fault, relearns the old level; the event ends once the
model agrees, when the value crosses to the other side, or after ``hold`` values (a
level that holds that long is the new normal). This is part of the saved state.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

SEASON_BINS = 288  # slots of each profile (5 minutes each for a day)
PERIODS = (1, 7)  # the profiles: a day and a week (multiples of ``season``)
Z_ALARM = 5.6  # robust deviations that are an anomaly at sensitivity 1
LEVEL_ALPHA = 0.05  # level EWMA weight
FAST_ALPHA = 0.3  # recent residual level, for spikes
SCALES = (1.0, 0.2, 0.04)  # EWMA weights of the residual views (1 = the point)
A0, A1, A2 = SCALES
SEASON_BETA = 0.25  # profile slot weight per visit
CLIP = 4.0  # residual clip for learning, in scale units
SEASON_GAIN = 0.9  # a profile is used if its error is below this x the level's
QUANTILE = 0.998  # tail of the metric's own deviations
QUANTILE_STEP = 0.05  # log-quantile step per value
QUANTILE_GAIN = 1.5  # alarm above this x the tail quantile
QUANTILE_CAP = 3.0  # ... but at most this x the alarm level
VAR_ALPHA = 0.1  # fast scale for variance changes
VAR_RATIO = 2.5  # fast/slow scale ratio that is an anomaly
REPORT = 0.33  # scores from here on start a hold (one report per event)
STEP = 0.6  # a report during a hold must close this share of the gap to 1
QUIET = 0.01  # share of the score reported during a hold
BAR_UP = 1.05  # each report raises the bar for its kind of deviation by 5 %, ...
BAR_GAIN = 0.4  # ... or to 40 % of the deviation it reported if that is more,
BAR_DECAY = 0.9998  # ... relaxing back to 1 with a half-life of about 3,500 values
BACK_Z = 3.0  # an event is over once the value is within this many usual errors of before
REL_FLOOR = 1e-3  # scales are at least this share of the level: 0.1 % is never news
PEAK_GAIN = 30.0
"""A report raises the bar to at most BAR_GAIN x this x the largest deviation of its kind
reported before: one outlier (1e6) does not blind a metric for months, a metric whose
life holds large events still learns to need larger ones. Measured on NAB's dev split:
reward_low_FP 60.1 -> 58.6, standard 68.6 -> 67.8, reward_low_FN 74.4 -> 74.0 (the
series whose first report is astronomically large, a scale collapsed on a flat start,
lose the blindness that suppressed their later false alarms); half A unchanged."""
VIEW_CLIP = 1e6  # after warm-up, a residual enters the views clipped to this x ``CLIP`` scales


@dataclass
class BaselineParams:
    """The knobs an operator may set (``[[detector]]`` keys and ``backtest --set``)."""

    sensitivity: float = 1.0  # higher: alarms on smaller deviations
    memory: int = 200  # values the scales remember (about)
    hold: int = 350  # values after a report before the same event reports again
    season: float = 86400.0  # seconds of the seasonal profile; 0: none
    warmup: int = 30  # values before any score
    min_change: float = 0.0  # a deviation smaller than this (in the metric's unit) is no news


@dataclass
class BaselineState:
    n: int = 0
    first_ts: float | None = None
    last_ts: float | None = None
    level: float = 0.0
    err_level: float = 0.0
    season_levels: list[float] = field(default_factory=lambda: [0.0] * len(PERIODS))
    season_errs: list[float] = field(default_factory=lambda: [0.0] * len(PERIODS))
    profiles: list[list[float | None]] = field(
        default_factory=lambda: [[None] * SEASON_BINS for _ in PERIODS])
    fast: float = 0.0
    views: list[float] = field(default_factory=lambda: [0.0] * len(SCALES))
    scales: list[float] = field(default_factory=lambda: [0.0] * len(SCALES))
    var_fast: float = 0.0
    tails: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    marks: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    holds: list[int] = field(default_factory=lambda: [0, 0, 0])
    bars: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])
    peaks: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])  # largest reported
    # The event reported last, while it lasts: its direction (+1 a rise, -1 a drop, 0
    # none; +-2 once the value is back, while the model relearns the old level), the
    # level of the model that predicted the value before it (-1 the level, m profile m)
    # and that model's usual error then, and the values left before a level that stays
    # is taken as the new normal.
    ev_sign: int = 0
    ev_ref: float = 0.0
    ev_model: int = -1
    ev_scale: float = 0.0
    ev_left: int = 0


def _squash(u: float) -> float:
    if u >= 1e3:  # 1 to double precision; u**4 would overflow further on
        return 1.0
    u4 = u * u * u * u
    return u4 / (1.0 + u4)


def _clip(x: float, lim: float) -> float:
    return lim if x > lim else -lim if x < -lim else x


KINDS = ("drop", "rise", "variance change")
BIG = 1e100  # no learned number of a sane state comes near this


def _number(x: object, lo: float = -BIG, hi: float = BIG) -> bool:
    return (isinstance(x, (int, float)) and not isinstance(x, bool)
            and math.isfinite(x) and lo <= x <= hi)


def _check_state(s: BaselineState) -> None:
    """A saved state is data from disk: every field of the right type, finite and within
    the range the code itself keeps it in, else ``ValueError`` (the caller relearns)."""
    bad = []
    if not (isinstance(s.n, int) and not isinstance(s.n, bool) and 0 <= s.n < 2**62):
        bad.append("n")
    for name in ("first_ts", "last_ts"):
        v = getattr(s, name)
        if v is not None and not _number(v):
            bad.append(name)
    for name in ("level", "err_level", "fast", "var_fast", "ev_ref"):
        if not _number(getattr(s, name)):
            bad.append(name)
    checks: tuple[tuple[str, float, float], ...] = (
        ("season_levels", -BIG, BIG), ("season_errs", 0.0, BIG), ("views", -BIG, BIG),
        ("scales", 0.0, BIG), ("tails", -100.0, 100.0), ("marks", 0.0, 1.0),
        ("bars", 1.0, BIG), ("peaks", 0.0, BIG))
    for name, lo, hi in checks:
        if not all(_number(v, lo, hi) for v in getattr(s, name)):
            bad.append(name)
    if not all(isinstance(h, int) and not isinstance(h, bool) and 0 <= h < 2**31
               for h in s.holds):
        bad.append("holds")
    if not _number(s.ev_scale, 0.0, BIG):
        bad.append("ev_scale")
    for name, lo, hi in (("ev_sign", -2, 2), ("ev_model", -1, len(PERIODS) - 1),
                         ("ev_left", 0, 2**31 - 1)):
        v = getattr(s, name)
        if not (isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi):
            bad.append(name)
    if not all(v is None or _number(v) for prof in s.profiles for v in prof):
        bad.append("profiles")
    if bad:
        raise ValueError(f"baseline: saved state out of range ({', '.join(bad)})")


class Baseline:
    """Scores one metric's values, one at a time, in time order."""

    def __init__(self, params: BaselineParams | None = None,
                 state: BaselineState | None = None) -> None:
        self.p = params or BaselineParams()
        if (self.p.sensitivity <= 0 or self.p.memory < 1 or self.p.hold < 0
                or self.p.warmup < 1 or not 0 <= self.p.min_change < BIG):
            raise ValueError("baseline: sensitivity > 0, memory >= 1, hold >= 0, warmup >= 1, "
                             "min_change >= 0")
        self.z_alarm = Z_ALARM / self.p.sensitivity
        # Scales at least this: a deviation under min_change stays under the alarm level
        # (and a spread under it is no variance change).
        self.abs_floor = self.p.min_change / self.z_alarm
        self.var_floor = self.p.min_change / VAR_RATIO
        lt = math.log(self.z_alarm / QUANTILE_GAIN)
        self.s = state or BaselineState(tails=[lt, lt, lt])
        s = self.s
        if (len(s.profiles) != len(PERIODS) or any(len(pr) != SEASON_BINS for pr in s.profiles)
                or len(s.season_levels) != len(PERIODS) or len(s.season_errs) != len(PERIODS)
                or len(s.views) != len(SCALES)
                or len(s.scales) != len(SCALES)
                or not len(s.marks) == len(s.holds) == len(s.bars) == len(s.tails) == len(s.peaks)
                == 3):
            raise ValueError("baseline: state does not fit these parameters")
        _check_state(s)
        self.last_reason = ""
        self.raw = 0.0  # the score before the one-report-per-event hold
        self.alarm = False  # the value is anomalous: news, or an event still going on
        self.expected: float | None = None  # while an event goes on: the value before it

    def score(self, ts: float, x: float) -> float:
        """Score ``x`` observed at ``ts`` (seconds), then learn from it."""
        p, s = self.p, self.s
        if s.first_ts is None or s.last_ts is None:
            s.first_ts = s.last_ts = ts
        dt = max(ts - s.last_ts, 0.0)
        s.last_ts = ts
        s.n += 1
        if s.n == 1:
            s.level = x
            s.season_levels = [x] * len(PERIODS)
            self.last_reason = "learning"
            self.raw = 0.0
            self.alarm, self.expected = False, None
            return 0.0
        warm = s.n <= p.warmup
        floor = 1e-9 + REL_FLOOR * abs(s.level)
        if floor < self.abs_floor:
            floor = self.abs_floor
        lim = CLIP * max(s.scales[0], floor)
        r_level = x - s.level
        r = r_level
        # A profile (daily, weekly), if it has seen its period and predicts clearly better.
        slots = [-1] * len(PERIODS)
        r_seasons = [r_level] * len(PERIODS)
        seasonal = p.season > 0
        chosen = -1  # the model that predicts x: -1 the level, m profile m
        if seasonal:
            best = SEASON_GAIN * s.err_level
            for m, mult in enumerate(PERIODS):
                period = p.season * mult
                slot = slots[m] = int((ts % period) / period * SEASON_BINS) % SEASON_BINS
                prof, lvl = s.profiles[m], s.season_levels[m]
                b = prof[slot]
                if b is not None:
                    rs = x - lvl - b
                    for j in (slot - 1, (slot + 1) % SEASON_BINS):
                        bj = prof[j]
                        if bj is not None and abs(x - lvl - bj) < abs(rs):
                            rs = x - lvl - bj
                    r_seasons[m] = rs
                if ts - s.first_ts >= period and s.season_errs[m] < best:
                    best, r, chosen = s.season_errs[m], r_seasons[m], m
        # Before learning from x: where an event would have started from, and how far x
        # is from where the event it may continue started (over 1: still away).
        if chosen < 0:
            base, err = s.level, s.err_level
        else:
            base, err = s.season_levels[chosen], s.season_errs[chosen]
        gone = 0.0
        if s.ev_sign:
            m = s.ev_model
            e = (r_level + s.level if m < 0 or not seasonal
                 else r_seasons[m] + s.season_levels[m]) - s.ev_ref
            sign = 1 if s.ev_sign > 0 else -1
            gone = e * sign / (BACK_Z / p.sensitivity * max(s.ev_scale, 1e-300))
            self.expected = x - e
        r_point = r - s.fast
        s.fast += FAST_ALPHA * ((r if warm else _clip(r, lim)) - s.fast)
        if not warm:  # a huge finite value (1e200) is as unusual as any beyond this
            r_point, r = _clip(r_point, VIEW_CLIP * lim), _clip(r, VIEW_CLIP * lim)
        # Three views of the residual, each against its own robust scale (unrolled: this
        # runs for every value of every metric, and 100,000 values backtest in ~1 s).
        views, scales = s.views, s.scales
        v0 = views[0] + A0 * (r_point - views[0])
        v1 = views[1] + A1 * (r - views[1])
        v2 = views[2] + A2 * (r - views[2])
        views[0], views[1], views[2] = v0, v1, v2
        sc0, sc1, sc2 = scales
        sc0 = sc0 if sc0 > floor else floor
        sc1 = sc1 if sc1 > floor else floor
        sc2 = sc2 if sc2 > floor else floor
        a0, a1, a2 = abs(v0), abs(v1), abs(v2)
        z0, z1, z2 = a0 / sc0, a1 / sc1, a2 / sc2
        kind = 0
        if warm:
            n = s.n
            scales[0] += (a0 - scales[0]) / n
            scales[1] += (a1 - scales[1]) / n
            scales[2] += (a2 - scales[2]) / n
        else:
            rate = max(1.0 / p.memory, 1.0 / s.n)
            scales[0] += rate * (min(a0, CLIP * sc0) - scales[0])
            scales[1] += rate * (min(a1, CLIP * sc1) - scales[1])
            scales[2] += rate * (min(a2, CLIP * sc2) - scales[2])
        sc0 = max(s.scales[0], floor)
        if warm:
            s.var_fast += (abs(r_point) - s.var_fast) / s.n
            u = 0.0
        else:
            s.var_fast += VAR_ALPHA * (min(abs(r_point), 8.0 * sc0) - s.var_fast)
            bars = s.bars
            for j in (0, 1, 2):
                bars[j] = 1.0 + (bars[j] - 1.0) * BAR_DECAY
            tails = s.tails
            cap = math.log(self.z_alarm * QUANTILE_CAP)
            us = [0.0, 0.0, s.var_fast / max(sc0, self.var_floor) / VAR_RATIO]
            for k, (z, v) in enumerate(((z0, v0), (z1, v1), (z2, v2))):
                tail = math.exp(tails[k])
                kk = 1 if v > 0 else 0
                uk = z / max(self.z_alarm, QUANTILE_GAIN * tail)
                if uk > us[kk]:
                    us[kk] = uk
                lt = min(tails[k], cap)
                tails[k] = lt + QUANTILE_STEP * (QUANTILE if z > tail else QUANTILE - 1.0)
            # The largest deviation names the event; the bar of its kind then scales it.
            kind = 0 if us[0] >= us[1] and us[0] >= us[2] else 1 if us[1] >= us[2] else 2
            u = us[kind] / bars[kind]
        # Learn: clipped, so the spikes it learns from barely move it.
        a_err = 2.0 / p.memory
        s.level += (r_level / s.n) if warm else LEVEL_ALPHA * _clip(r_level, lim)
        s.err_level += a_err * (min(abs(r_level), lim) - s.err_level)
        if seasonal:
            for m, mult in enumerate(PERIODS):
                period = p.season * mult
                srate = 1.0 / s.n if warm else max(dt / period, 1.0 / (SEASON_BINS * 50))
                d = x - s.season_levels[m]
                s.season_levels[m] += srate * (d if warm else _clip(d, lim))
                off = x - s.season_levels[m]
                prof, slot = s.profiles[m], slots[m]
                b = prof[slot]
                prof[slot] = off if b is None else b + SEASON_BETA * (
                    off - b if warm else _clip(off - b, lim))
                if ts - s.first_ts < period:
                    # Its first period only compares slots with a neighbour set moments
                    # ago: no evidence yet; it must then predict better to be used.
                    s.season_errs[m] = s.err_level
                else:
                    s.season_errs[m] += a_err * (min(abs(r_seasons[m]), lim) - s.season_errs[m])
        out = _squash(u)
        self.raw = out
        self.last_reason = KINDS[kind] if u > 0 else "learning" if warm else ""
        # One report per event.
        holds, marks = s.holds, s.marks
        if holds[0] or holds[1] or holds[2] or marks[0] or marks[1] or marks[2]:
            for j in (0, 1, 2):
                if holds[j] > 0:
                    holds[j] -= 1
                else:
                    marks[j] = 0.0
        if out > marks[kind] and out > REPORT:
            s.marks[kind] = out + STEP * (1.0 - out)
            s.holds[kind] = p.hold
            raw_u = u * s.bars[kind]
            s.bars[kind] = max(s.bars[kind] * BAR_UP,
                               BAR_GAIN * min(raw_u, PEAK_GAIN * s.peaks[kind]))
            s.peaks[kind] = max(s.peaks[kind], raw_u)
        else:
            out *= QUIET
        self._event(out, kind, warm, gone, (base, chosen, max(err, floor)))
        return out

    def _event(self, out: float, kind: int, warm: bool, gone: float,
               start: tuple[float, int, float]) -> None:
        """Whether the value is an anomaly for the daemon (``self.alarm``): news (``out``
        at 0.5 or more), or still far from where the event reported last started, for
        ``hold`` values at most (then a level that stays is the new normal); a value back
        where the event started is no news while the model relearns it. ``start``: where
        an event starting now starts (the model's level, which model, its usual error)."""
        s = self.s
        self.alarm = out >= 0.5
        if s.ev_sign:
            s.ev_left -= 1
            away = abs(s.ev_sign) == 1  # not yet back where it started
            if away and gone > 1.0 and s.ev_left > 0:  # still far: the same event goes on
                self.alarm = True
                self.last_reason = f"still a {KINDS[1 if s.ev_sign > 0 else 0]}"
                return
            if -1.0 <= gone <= 1.0 and s.ev_left > 0:  # back where it started
                self.alarm = False
                if self.raw >= 0.5:  # the model has not yet relearned it: no news
                    s.ev_sign = 2 if s.ev_sign > 0 else -2
                    return
            # Over: back and relearned, away again after it was back or past it the other
            # way (news decides), or it lasted hold values.
            s.ev_sign = 0
        self.expected = None
        if self.alarm and kind < 2 and self.p.hold > 0 and not warm:
            s.ev_sign = 1 if kind else -1
            s.ev_ref, s.ev_model, s.ev_scale = start
            s.ev_left = self.p.hold

    def finite(self) -> bool:
        """Whether every learned number is still finite (the profiles apart: O(1) here)."""
        s = self.s
        return all(map(math.isfinite, (s.level, s.err_level, s.fast, s.var_fast, *s.views,
                                       *s.scales, *s.tails, *s.bars, *s.marks,
                                       *s.season_levels, *s.season_errs)))

    def to_dict(self) -> dict[str, Any]:
        return {"params": asdict(self.p), "state": asdict(self.s)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Baseline:
        params = BaselineParams(**data.get("params", {}))
        state = BaselineState(**data.get("state", {}))
        return cls(params, state)
