"""The trio shell around detectors: sample on an interval, judge, feed the mission engine.

One task per detector. Sampling runs in a worker thread (psutil, sockets and
subprocesses block). A detector that raises is reported (``detector.error``) and
restarted with exponential backoff; it never takes the daemon down. Edges of a
(detector, subject) between normal and anomalous are ``detector.anomaly`` and
``detector.recovered`` events; mission transitions are ``mission.*`` events committed
with the mission's row in the same transaction.
"""

from __future__ import annotations

import errno
import json
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import trio

from .. import logs
from ..config import DetectorConfig
from ..journal import Write
from ..mesh import Mesh
from ..missions import store
from ..missions.engine import FINAL, Mission, MissionEngine, Transition
from ..protocol import CanonicalError, canonical_bytes
from ..protocol.canonical import json_safe
from .base import Detector, Observation
from .events import POLL
from .kinds import build_detector
from .scoring import Scorer, Verdict, next_interval

log = logging.getLogger("graced.detectors")
EXHAUSTION = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})


def plain_error(exc: BaseException) -> str:
    """Why a detector failed, in words an operator reads ('cannot read /data/queue: no
    such file or directory'), not Python's ('FileNotFoundError: [Errno 2] ...'); the
    exception's class goes to the log and the event's ``exception``."""
    if isinstance(exc, OSError) and exc.strerror:
        why = exc.strerror[:1].lower() + exc.strerror[1:]
        name = exc.filename if exc.filename is not None else exc.filename2
        return f"cannot read {name}: {why}" if name is not None else why
    text = str(exc).strip()
    return text or type(exc).__name__

# Writes and events that go with a final mission (the learning loop's outcome memory).
Outcome = Callable[[Mission, float], tuple[list[Write], list[tuple[str, dict[str, Any]]]]]

HISTORY = 300  # recent values kept per subject (sparklines, status)
OVERRUN_S = 3.0  # past a probe's timeout, a sample still running is abandoned
EVENT_GAP = 0.02
"""After a kernel event, wait this long before sampling: the rest of a burst (a thousand
log lines written in a loop) is read by the same sample, and a writer that never stops
gets at most 1/EVENT_GAP samples a second, not one per line."""
# Kinds whose value the kernel does not announce, sampled faster near their threshold.
ADAPTIVE = frozenset({"memory", "swap", "disk", "inodes", "value", "process_rss", "tcp",
                      "sqlite", "postgres", "command", "http"})


def judge_and_observe(scorer: Scorer, engine: MissionEngine, cfg: DetectorConfig,
                      obs: Observation, now: float) -> tuple[Verdict, list[Transition]]:
    """One observation through scoring and the mission engine: the daemon's path, which
    ``graced backtest`` runs too."""
    verdict = scorer.judge(obs, now)
    transitions = engine.observe(
        detector=cfg.name, kind=cfg.kind, subject=obs.subject, severity=cfg.severity,
        anomalous=verdict.anomalous, score=verdict.score, summary=verdict.summary,
        value=obs.value, now=now, detail=obs.detail or None)
    return verdict, transitions


class DetectorRunner:
    """Runs every configured detector; :meth:`run` never returns unless cancelled."""

    def __init__(self, detectors: list[DetectorConfig], mesh: Mesh, engine: MissionEngine,
                 states: dict[str, dict[str, Any]],
                 on_mission: Callable[[Mission], None] | None = None,
                 outcome: Outcome | None = None) -> None:
        self.on_mission = on_mission
        # Told of each mission this runner closes (the executor's notifiers).
        self.notify: Callable[[Mission], None] | None = None
        self.outcome = outcome
        self.detectors = [d for d in detectors if d.enabled]
        self.mesh = mesh
        self.engine = engine
        # A saved row: {"baselines": {subject: state}, "detector": the detector's own state
        # (a log's window)}; before 0.2, the baselines alone.
        self._kept: dict[str, Any] = {}
        baselines: dict[str, Any] = {}
        for name, data in states.items():
            if isinstance(data, dict) and data.get("version") == 2:
                baselines[name], self._kept[name] = data.get("baselines"), data.get("detector")
            else:
                baselines[name] = data
        self._live: dict[str, Detector] = {}  # the detectors built, by name
        self.scorers = {d.name: Scorer(d, baselines.get(d.name)) for d in self.detectors}
        for name, scorer in self.scorers.items():
            for why in scorer.dropped:
                log.warning("detector %s: saved baseline not restored, learning again: %s",
                            name, why)
        self.status: dict[str, dict[str, Any]] = {d.name: _fresh(d) for d in self.detectors}
        self.history: dict[tuple[str, str], deque[tuple[float, float]]] = {}
        self._anomalous: set[tuple[str, str]] = set()
        self._scopes: dict[str, trio.CancelScope] = {}
        self._nursery: trio.Nursery | None = None
        self._pools: dict[str, trio.CapacityLimiter] = {}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for det in self.detectors:
                self._start(det)
            nursery.start_soon(self._save_periodically)
            task_status.started()

    def _pool(self, cfg: DetectorConfig) -> trio.CapacityLimiter:
        """Each detector samples on a worker-thread budget of its own (one thread): a
        probe stuck on a silent target costs that detector, never the threads the
        journal, the handlers or the other detectors use."""
        pool = self._pools.get(cfg.name)
        if pool is None:
            pool = self._pools[cfg.name] = trio.CapacityLimiter(1)
        return pool

    def _start(self, det: DetectorConfig) -> None:
        assert self._nursery is not None
        scope = self._scopes[det.name] = trio.CancelScope()
        self._nursery.start_soon(self._loop, det, scope)

    def reconfigure(self, detectors: list[DetectorConfig]) -> dict[str, list[str]]:
        """Run these detectors from now on: stop removed and changed ones, start changed and
        new ones; unchanged ones keep running undisturbed. A changed detector keeps its
        baselines. Returns the names added, changed and removed."""
        new = {d.name: d for d in detectors if d.enabled}
        old = {d.name: d for d in self.detectors}
        diff = {"added": [n for n in new if n not in old],
                "changed": [n for n in new if n in old and new[n] != old[n]],
                "removed": [n for n in old if n not in new]}
        for name in diff["changed"] + diff["removed"]:
            self._scopes.pop(name).cancel()
            state = self.scorers.pop(name).state()
            del self.status[name]
            for key in [k for k in self.history if k[0] == name]:
                del self.history[key]
            self._anomalous = {k for k in self._anomalous if k[0] != name}
            if name in new:
                self.scorers[name] = Scorer(new[name], state)
        self.detectors = list(new.values())
        for name in diff["added"] + diff["changed"]:
            self.scorers.setdefault(name, Scorer(new[name]))
            self.status[name] = _fresh(new[name])
            self._start(new[name])
        return diff

    async def _save_periodically(self) -> None:
        while True:
            await trio.sleep(60)
            self.save_state()

    def stalled(self, now: float) -> list[str]:
        """Detectors whose last sample ended (or that started) longer ago than a sample
        may take: three intervals, or an interval plus the probe's timeout, plus 5 s."""
        return [name for name, st in self.status.items()
                if now - st["sampled_at"] > max(3 * st["interval"],
                                                st["interval"] + st["timeout"]) + 5.0]

    def _detector_state(self, name: str) -> Any:
        """A detector's own state to keep (a log's window), or what was kept of it."""
        det = self._live.get(name)
        saved = getattr(det, "saved", None)
        if saved is not None:
            self._kept[name] = saved()
        return self._kept.get(name)

    def save_state(self) -> None:
        """Queue the baselines' and the detectors' own state for the journal's next commit."""
        writes = []
        for name, scorer in self.scorers.items():
            own = self._detector_state(name)
            if scorer.baselines or own is not None:
                data = {"version": 2, "baselines": scorer.state(), "detector": own}
                writes.append(("INSERT OR REPLACE INTO detector_state (name, data) "
                               "VALUES (?, ?)", (name, json.dumps(data))))
        if writes:
            self.mesh.store(writes)

    async def _loop(self, cfg: DetectorConfig, scope: trio.CancelScope) -> None:
        with scope:
            await self._sample_forever(cfg)

    async def _sample_forever(self, cfg: DetectorConfig) -> None:
        backoff = 1.0
        said = ""  # the exhaustion error already logged and published, while it lasts
        st = self.status[cfg.name]
        while True:
            detector = None
            try:
                detector = await trio.to_thread.run_sync(build_detector, cfg)
                self._restore(cfg, detector)
                self._live[cfg.name] = detector
                st["state"] = "up"
                st["mode"] = getattr(detector, "mode", POLL)
                st["mode_note"] = getattr(detector, "mode_note", "")
                due = trio.current_time()
                woken = False
                while True:
                    try:
                        observations = await self._sample(detector, cfg, st["timeout"])
                    finally:
                        st["sampled_at"] = trio.current_time()  # the watchdog's proof
                    _check_values(observations)
                    self._judge(cfg, observations)
                    st["state"] = "up"
                    st["mode_note"] = getattr(detector, "mode_note", "")  # may change
                    backoff, said = 1.0, ""
                    step = self._step(cfg, detector, observations)
                    st["cadence"] = round(step, 3)
                    now = trio.current_time()
                    # A sample an event brought forward leaves the timer's schedule alone.
                    due = min(due, now + step) if woken else due + step
                    if due < now:  # fell behind (a slow probe): skip, do not burst
                        due = now + step
                    woken = await self._wait(detector, due)
            except Exception as exc:  # noqa: BLE001 - a detector must never take graced down
                error = plain_error(exc)
                # graced itself out of descriptors or memory: not the detector's fault,
                # and over as soon as they come back: retried every second (said once
                # while it lasts), not after a backoff that left it blind for a minute.
                exhausted = isinstance(exc, OSError) and exc.errno in EXHAUSTION
                repeat = exhausted and said == error
                said = error if exhausted else ""
                st["state"] = "error"
                st["errors"] += 1
                st["last_error"] = error
                wait = 1.0 if exhausted else backoff
                if not repeat:
                    # The log keeps Python's own words for whoever debugs it.
                    log.warning("detector %s failed: %s: %s; restarting in %.0f s", cfg.name,
                                type(exc).__name__, exc, wait)
                    # json_safe: an error may quote what was monitored (a file name
                    # that is not UTF-8), and this loop must go on whatever it says.
                    self.mesh.publish_nowait("detector.error", json_safe({
                        "detector": cfg.name, "kind": cfg.kind, "error": error,
                        "exception": type(exc).__name__, "restart_in": wait}))
                await trio.sleep(wait)
                if not exhausted:
                    backoff = min(backoff * 2, 60.0)
            finally:
                if detector is not None:
                    if self._live.get(cfg.name) is detector:
                        self._detector_state(cfg.name)  # kept for the detector built next
                        del self._live[cfg.name]
                    detector.close()

    def _restore(self, cfg: DetectorConfig, detector: Detector) -> None:
        """Give a detector built now what its predecessor kept (before a restart, a
        reload or a failure); a damaged state is logged and dropped."""
        kept = self._kept.pop(cfg.name, None)
        restore = getattr(detector, "restore", None)
        if kept is None or restore is None:
            return
        try:
            restore(kept)
        except ValueError as exc:
            log.warning("detector %s: saved state not restored: %s", cfg.name, str(exc)[:200])

    async def _sample(self, detector: Detector, cfg: DetectorConfig,
                      timeout: float) -> list[Any]:
        """One sample in the detector's own thread budget. A probe (it has a ``timeout``)
        that overruns it by ``OVERRUN_S`` is abandoned and reported as this detector
        failing, so one hung probe never stalls the watchdog for every other one."""
        if timeout <= 0:
            return await trio.to_thread.run_sync(
                detector.sample, abandon_on_cancel=True, limiter=self._pool(cfg))
        bound = timeout + OVERRUN_S
        with trio.move_on_after(bound):
            return await trio.to_thread.run_sync(
                detector.sample, abandon_on_cancel=True, limiter=self._pool(cfg))
        raise TimeoutError(f"a sample took over {bound:g} s (abandoned)")

    async def _wait(self, detector: Detector, due: float) -> bool:
        """Until ``due``, or until the kernel says something the detector cares about (then
        True, at most once per ``EVENT_GAP``, so a burst costs bounded CPU)."""
        wakeup = getattr(detector, "wakeup", None)
        if wakeup is None:
            await trio.sleep_until(due)
            return False
        with trio.move_on_at(due):
            while True:
                await trio.lowlevel.wait_readable(wakeup.fileno())
                if detector.drain():  # type: ignore[attr-defined]
                    break
            await trio.sleep(EVENT_GAP)  # what else the burst writes is read in one go
            return True
        return False

    def _step(self, cfg: DetectorConfig, detector: Detector,
              observations: list[Observation]) -> float:
        """The wait before the next timed sample: the interval, shorter where the detector
        asks (a PSI counter without a trigger) or a value nears its threshold."""
        step = cfg.interval
        cadence = getattr(detector, "cadence", None)
        hint = cadence() if cadence is not None else None
        if hint is not None:
            step = min(step, hint)
        if cfg.kind in ADAPTIVE and not cfg.baseline:
            for obs in observations:
                if obs.failed or obs.skipped \
                        or (cfg.name, obs.subject) in self.engine.active:
                    continue
                step = min(step, next_interval(cfg.interval, obs.value,
                                               cfg.effective_threshold, cfg.below,
                                               percent=obs.unit == "%"))
        return step

    def _judge(self, cfg: DetectorConfig, observations: list[Any]) -> None:
        scorer = self.scorers[cfg.name]
        subjects = self.status[cfg.name]["subjects"]
        now = time.time()
        for obs in observations:
            if obs.skipped:  # neither normal nor anomalous: the last sample stands
                self.status[cfg.name]["skipped"] += 1
                self.status[cfg.name]["last_skipped"] = obs.skipped
                continue
            key = (cfg.name, obs.subject)
            # A key handed to a person (escalated, ...) is released by its first normal
            # sample; that sample is its detector.recovered even where graced did not see
            # it anomalous since it started (a restart): the fleet view ends it there.
            held = key in self.engine.held
            verdict, transitions = judge_and_observe(scorer, self.engine, cfg, obs, now)
            subjects[obs.subject] = {"ts": now, "value": obs.value, "unit": obs.unit,
                                     "anomalous": verdict.anomalous,
                                     "score": round(verdict.score, 4),
                                     "summary": verdict.summary, "failed": obs.failed}
            if obs.value is not None:
                hist = self.history.setdefault(key, deque(maxlen=HISTORY))
                hist.append((now, obs.value))
            if verdict.anomalous and key not in self._anomalous:
                self._anomalous.add(key)
                self.mesh.publish_nowait("detector.anomaly", {
                    "detector": cfg.name, "kind": cfg.kind, "subject": obs.subject,
                    "value": obs.value, "score": round(verdict.score, 4),
                    "summary": verdict.summary})
            elif not verdict.anomalous and (key in self._anomalous or held):
                self._anomalous.discard(key)
                self.mesh.publish_nowait("detector.recovered", {
                    "detector": cfg.name, "subject": obs.subject, "value": obs.value,
                    "summary": verdict.summary})
            for tr in transitions:
                self._record(tr)
            if verdict.anomalous and self.on_mission is not None:
                m = self.engine.active.get(key)
                if m is not None and m.state in ("open", "interrupted"):
                    self.on_mission(m)

    def interval_of(self, name: str) -> float | None:
        """A detector's configured sampling interval (None: no such detector now)."""
        return next((d.interval for d in self.detectors if d.name == name), None)

    def _record(self, tr: Transition) -> None:
        if not tr.topic:
            self.mesh.store([store.upsert(tr.mission)])
            return
        # The outcome first: it may note on the mission why learning left it out.
        more, events = self.outcome(tr.mission, time.time()) if self.outcome else ([], [])
        self.mesh.publish_nowait(tr.topic, tr.mission.brief(),
                                 writes=[store.upsert(tr.mission), *more])
        logs.transition(tr.topic, tr.mission)
        if tr.mission.state in FINAL and self.notify is not None:
            self.notify(tr.mission)  # a verification failed at a sample, say
        for topic, payload in events:
            try:
                self.mesh.publish_nowait(topic, payload)
            except (ValueError, TypeError, OverflowError) as exc:
                log.error("learning: %s not published: %s", topic, exc)


def _fresh(d: DetectorConfig) -> dict[str, Any]:
    return {"kind": d.kind, "interval": d.interval, "threshold": d.effective_threshold,
            "state": "starting", "subjects": {},
            "errors": 0, "last_error": None, "skipped": 0, "last_skipped": None,
            "mode": POLL, "mode_note": "",
            "cadence": d.interval, "sampled_at": trio.current_time(),
            "timeout": float(getattr(d, "timeout", 0) or 0), "below": d.below}


def _check_values(observations: list[Any]) -> None:
    """Monitored data is hostile: a value that has no JSON form (NaN, an infinity, a huge
    integer, a lone surrogate) never enters graced; the detector reports an error."""
    for obs in observations:
        try:
            canonical_bytes([obs.subject, obs.value, obs.unit, obs.detail, obs.failed,
                             obs.alarm, obs.event, obs.skipped])
        except CanonicalError as exc:
            raise ValueError(f"subject {str(obs.subject)[:80]!r}: a value graced cannot "
                             f"record ({exc})") from None

