"""The baseline through the daemon's own path (scoring and the mission engine): an event
stays one mission for as long as it lasts (review of #16)."""

from __future__ import annotations

import random
import re

from graced.config import DetectorConfig
from graced.detectors.base import Observation
from graced.detectors.runner import judge_and_observe
from graced.detectors.scoring import Scorer
from graced.missions.engine import MissionEngine


def _replay(values: list[float], scorer: Scorer | None = None, step: float = 5.0,
            **cfg_keys: object) -> tuple[list[bool], list[str], Scorer]:
    """(is_anomaly per value, mission topics in order, scorer) through the daemon's path."""
    cfg = DetectorConfig(name="lat", kind="value", file="-", baseline=True, **cfg_keys)
    scorer = scorer or Scorer(cfg)
    engine = MissionEngine()
    flags, topics = [], []
    for i, v in enumerate(values):
        verdict, transitions = judge_and_observe(scorer, engine, cfg,
                                                 Observation("s", v), 1.8e9 + i * step)
        flags.append(verdict.anomalous)
        topics += [tr.topic for tr in transitions if tr.topic in (
            "mission.opened", "mission.resolved")]
    return flags, topics, scorer


def _calm(n: int, seed: int = 3) -> list[float]:
    rng = random.Random(seed)
    return [10.0 + rng.gauss(0, 0.5) for _ in range(n)]


def test_a_sustained_fault_keeps_its_one_mission_open_until_the_value_returns() -> None:
    """100x the normal level for 200 samples: the model adapts to it (its score falls),
    but the mission stays open while the value is far from where it was before, resolves
    once it is back, and does not reopen (no flapping)."""
    values = _calm(600) + [1000.0 + x for x in _calm(200, seed=4)] + _calm(300, seed=5)
    flags, topics, _ = _replay(values)
    assert not any(flags[:600])
    assert all(flags[600:800]), [i for i in range(600, 800) if not flags[i]][:5]
    assert not any(flags[805:])
    assert topics == ["mission.opened", "mission.resolved"]


def test_a_spike_opens_a_mission_that_resolves_as_soon_as_the_value_is_back() -> None:
    values = _calm(700)
    values[600] = 1000.0
    flags, topics, _ = _replay(values)
    assert [i for i, f in enumerate(flags) if f] == [600]
    assert topics == ["mission.opened", "mission.resolved"]


def test_a_new_level_that_holds_becomes_normal_after_hold_samples() -> None:
    """A level that stays (a deploy doubled the traffic) is one mission for ``hold``
    samples, then normal: it does not alarm for ever, nor open a second mission."""
    values = _calm(600) + [20.0 + x - 10.0 for x in _calm(400, seed=6)]
    flags, topics, _ = _replay(values, hold=100)
    assert all(flags[600:700]) and not any(flags[705:])
    assert topics == ["mission.opened", "mission.resolved"]


def test_an_open_event_survives_a_restart() -> None:
    """The event is part of the saved state: a restart mid-fault keeps it anomalous."""
    values = _calm(600) + [1000.0 + x for x in _calm(50, seed=4)]
    flags, _, scorer = _replay(values)
    assert flags[-1]
    cfg = scorer.cfg
    again = Scorer(cfg, scorer.state())
    flags2, topics2, _ = _replay([1000.0 + x for x in _calm(20, seed=7)], scorer=again)
    assert all(flags2) and topics2 == ["mission.opened"]


def test_the_mission_says_the_event_goes_on_and_from_where() -> None:
    cfg = DetectorConfig(name="lat", kind="value", file="-", baseline=True)
    scorer = Scorer(cfg)
    for i, v in enumerate(_calm(600) + [1000.0] * 5):
        verdict = scorer.judge(Observation("s", v, unit="ms"), 1.8e9 + i * 5.0)
    assert verdict.anomalous
    assert re.fullmatch(r"lat s at 1000 ms is unusual for it \(still a rise from about "
                        r"(9\.\d+|10\.\d+), baseline score 0\.\d\d\)", verdict.summary), verdict


def test_a_damaged_saved_event_is_dropped_with_its_reason() -> None:
    _, _, scorer = _replay(_calm(600) + [1000.0] * 5)
    state = scorer.state()
    state["s"]["state"]["ev_sign"] = 7
    state["s"]["state"]["ev_scale"] = -1.0
    again = Scorer(scorer.cfg, state)
    assert not again.baselines and "ev_scale, ev_sign" in again.dropped[0], again.dropped


def _blips(size: float, n: int = 3000) -> list[float]:
    """A metric that sits at 0 and blips by ``size`` every 97 values."""
    return [size if i % 97 == 50 else 0.0 for i in range(n)]


def test_a_series_at_zero_alarms_on_blips_smaller_than_min_change_never() -> None:
    """Review of #16: a series at 0 alarmed on every 1e-6 blip (its scales collapse to
    the 1e-9 floor). With min_change, a blip under it is no news; one over it still is."""
    flags, _, _ = _replay(_blips(1e-6), min_change=0.01)
    assert not any(flags)
    flags, topics, _ = _replay(_blips(1e-6)[:1000] + [5.0] + [0.0] * 10, min_change=0.01)
    assert [i for i, f in enumerate(flags) if f] == [1000] and topics[0] == "mission.opened"


def test_percent_and_millisecond_kinds_have_a_default_min_change() -> None:
    """Memory flat at 40.0 % stepping by 0.4 points, a 0.3 ms query stepping to 0.8 ms:
    under their kinds' min_change (1 point, 1 ms), no news; 10 points or 10 ms is."""
    for kind, base, small, big in (("memory", 40.0, 0.4, 10.0), ("sqlite", 0.3, 0.5, 10.0)):
        cfg = DetectorConfig(name="m", kind=kind, database="x", baseline=True)
        assert cfg.effective_min_change == 1.0
        scorer = Scorer(cfg)
        series = [base + (small if (i // 200) % 2 else 0.0) for i in range(2000)]
        series += [base + big] * 3
        got = [i for i, v in enumerate(series)
               if scorer.score_value("s", v, 1.8e9 + 60.0 * i)[1]]
        assert got[:1] == [2000] and len(got) <= 3, (kind, got)
    assert DetectorConfig(kind="value").effective_min_change == 0.0
    assert DetectorConfig(kind="value", min_change=2.5).effective_min_change == 2.5


def _fault_after(spikes: dict[int, float], fault_at: int, n: int = 2600) -> list[int]:
    """Indices scored 0.5 or more: level 10 (sd 1) at 5 minutes, ``spikes``, then from
    ``fault_at`` on 10 times the level (a fault that lasts)."""
    from graced.detectors.baseline import Baseline

    rng = random.Random(8)
    b = Baseline()
    out = []
    for i in range(n):
        v = spikes.get(i, 10.0 + rng.gauss(0, 1)) if i < fault_at else 100.0 + rng.gauss(0, 1)
        if b.score(i * 300.0, v) >= 0.5:
            out.append(i)
    return out


def test_one_huge_spike_does_not_blind_the_baseline_to_a_fault_days_later() -> None:
    """Review of #16: a 1e6 spike raised the bar to 400,000, which takes some 65,000 values
    to relax, so a fault at 10x the level two days later went unseen as a rise (only a
    variance change some 90 values on). The bar now rises to at most 12 (30 x 40 % of the
    largest event reported before): the fault alarms at once."""
    got = _fault_after({1000: 1e6}, 1000 + 576)
    assert got[:2] == [1000, 1576], got


def test_a_metric_whose_life_holds_huge_events_still_learns_to_need_larger_ones() -> None:
    """Huge spikes again and again: after the first, each raises the bar to 40 % of its
    size, so a middling spike (60 sd) in their wake does not alarm, a new huge one does."""
    spikes = {1000: 1e4, 1400: 1e4, 1800: 1e4, 2200: 70.0, 2590: 1e4}
    got = _fault_after(spikes, 10**9, n=2600)
    assert 2200 not in got and 2590 in got and 1000 in got, got


def test_once_back_a_modest_excursion_is_not_the_old_event_again() -> None:
    """After the fault is over and the value back, the model still relearns the old
    level; a value a little above it then (4 sd) is judged as news, not as 'still a rise'
    (it would have reopened the mission the moment it had resolved)."""
    values = _calm(600) + [1000.0] * 50 + _calm(200, seed=9)
    values[670] = 12.0
    flags, topics, _ = _replay(values)
    assert all(flags[600:650]) and not any(flags[652:]), [
        i for i, f in enumerate(flags) if f and i >= 650]
    assert topics == ["mission.opened", "mission.resolved"]
