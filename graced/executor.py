"""The executor: policy, playbook steps, verification, approvals, notifications.

Policy for a mission the engine opened (or one interrupted by a crash that is still
anomalous): the learning loop looks up similar past missions and ranks the matching
playbooks by their record (see :mod:`graced.learning.ranking`); the choice is recorded
on the mission. If every candidate is demoted for this symptom, the mission escalates.
In observe mode, or while paused, nothing runs and ``executor.would_run`` records what
would have. A flapping mission, or one whose playbook budget (per subject) or the
global hourly cap is spent, escalates to a human. Low and medium risk run at once; high
and critical wait in ``awaiting_approval`` (the notifiers are told) until approved,
rejected or expired.

Running: the ``executing`` transition is committed before the first step starts. Steps
run in order with their timeouts; a failed or timed-out step stops the playbook and
fails the mission, with the reason and output, and notifies. After the last step the
mission is ``verifying``: the engine resolves it once the detector is normal again,
and it fails if no normal sample came within ``verify_timeout``. A first normal sample
within it starts the confirmation (``resolve_after`` consecutive normal samples), which
may end after ``verify_timeout``: the engine fails the mission at the first anomalous
sample past it (the symptom came back), and if the detector stops reporting, it fails
once ``resolve_after`` intervals (twice over, plus a margin) have passed without the
confirmation.

Mission values reach steps as literal argv elements (``{subject}``, ``{value}``,
``{detector}``, ``{mission}``) or, with ``shell = true``, only as environment
variables (GRACE_SUBJECT, ...): never through a shell's parser.
"""

from __future__ import annotations

import errno
import grp
import hashlib
import json
import logging
import math
import os
import pwd
import signal as signals
import subprocess
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import psutil
import trio

from . import httpc, logs, targets
from .auth import LogBudget
from .config import NotifierConfig, PlaybookConfig, RemediationConfig, StepConfig
from .journal import Write
from .learning import Learning
from .mesh import Mesh
from .missions import store
from .missions.engine import Mission, MissionEngine, Transition, value_text
from .plan import (
    JOURNALCTL,
    PLAN_PREFIX,
    command,
    describe,
    matches,
    mission_values,
    names_plan,
    plan_values,
    redact_output,
    secrets,
    substitute,
)
from .plan import build as build_plan
from .protocol.canonical import canonical_bytes, json_safe
from .protocol.text import count
from .protocol.times import same_instant, shown
from .redact import redact_text
from .silences import Silences

__all__ = ["AUTO_RISKS", "Budgets", "Executor", "matches", "substitute"]

log = logging.getLogger("graced.executor")

AUTO_RISKS = ("low", "medium")
# After a step's process exits, how long its output pipes are still read: a process it
# started in the background (``nohup worker &``) keeps them open, and the step is over.
STEP_DRAIN_S = 0.5
MAX_STEP_ERROR = 2048
"""A step's error, at most, in characters (cut, and marked so)."""
MAX_STEP_RECORD = 64 * 1024
"""A step's record without its output (bounded apart, by the step's max_output), at most,
in bytes of JSON: one record once reached 15.7 MB of escaped process names and every
client's missions ls failed (attacker, session 9)."""


@dataclass
class Budgets:
    """Executions per (playbook, subject) within the playbook's window, and a global cap."""

    per_key: dict[str, list[float]] = field(default_factory=dict)
    global_runs: list[float] = field(default_factory=list)

    def spent(self, pb: PlaybookConfig, subject: str, cap: int, now: float,
              automatic: bool = True) -> str | None:
        """Why ``pb`` may not run for ``subject`` now (its budget, or for an automatic
        run the global cap), or None."""
        key = f"{pb.name}\0{subject}"
        runs = [t for t in self.per_key.get(key, []) if now - t < pb.budget_window]
        self.per_key[key] = runs
        self.global_runs = [t for t in self.global_runs if now - t < 3600]
        if len(runs) >= pb.budget:
            return (f"budget spent: playbook {pb.name} ran {count(len(runs), 'time')} for "
                    f"{subject} in "
                    f"{pb.budget_window:g} s (budget {pb.budget})")
        if automatic and len(self.global_runs) >= cap:
            return f"global cap spent: {len(self.global_runs)} automatic actions in the last hour"
        return None

    def left(self, pb: PlaybookConfig, subject: str, now: float) -> int:
        """Runs ``pb`` may still make for ``subject`` within its window."""
        key = f"{pb.name}\0{subject}"
        return max(0, pb.budget - len([t for t in self.per_key.get(key, [])
                                       if now - t < pb.budget_window]))

    def used(self, pb: PlaybookConfig, now: float) -> dict[str, int]:
        """Runs per subject of this playbook within its window."""
        prefix = f"{pb.name}\0"
        return {key[len(prefix):]: n for key, times in self.per_key.items()
                if key.startswith(prefix)
                and (n := len([t for t in times if now - t < pb.budget_window]))}

    def spend(self, pb: PlaybookConfig, subject: str, now: float,
              automatic: bool = True) -> None:
        """A run of ``pb`` for ``subject``: an automatic one spends the playbook's budget
        and the global cap; one a person approved or started spends neither (budgets
        ration what graced does on its own: a person deciding each run is the ration)."""
        if automatic:
            self.per_key.setdefault(f"{pb.name}\0{subject}", []).append(now)
            self.global_runs.append(now)

    def dump(self) -> str:
        return json.dumps({"per_key": self.per_key, "global": self.global_runs})

    @classmethod
    def load(cls, text: str | None) -> Budgets:
        if not text:
            return cls()
        try:
            data = json.loads(text)
            return cls(dict(data.get("per_key", {})), list(data.get("global", [])))
        except (ValueError, AttributeError):
            return cls()


def publish_learning(mesh: Mesh, events: list[tuple[str, dict[str, Any]]]) -> None:
    """Publish ``learning.*`` events; one that cannot be encoded is logged, never fatal."""
    for topic, payload in events:
        try:
            mesh.publish_nowait(topic, payload)
        except (ValueError, TypeError, OverflowError) as exc:
            log.error("learning: %s not published: %s", topic, exc)


async def _action_readback(unit: str, since: float) -> bytes:
    """What an installed action left in the journal since ``since``: its output and
    systemd's lines about it (how it exited).

    The exit status is systemctl's (``start --wait`` fails when the action failed); a
    finished oneshot is unloaded at once, so the journal is what remains. Reading it needs
    access to the system journal (group systemd-journal or adm); without it the step's
    output says so.
    """
    for _ in range(3):  # journald stores lines a moment after systemctl returns
        journal = await trio.run_process(
            [JOURNALCTL, "--no-pager", "-o", "cat", "-n", "200", "-u", unit,
             f"--since=@{int(since)}"], stdin=b"", capture_stdout=True, capture_stderr=True,
            check=False)
        if journal.stdout.strip() and b"-- No entries --" not in journal.stdout:
            break
        await trio.sleep(0.2)
    if not journal.stdout.strip() or b"-- No entries --" in journal.stdout:
        return (f"[no journal lines of {unit} readable by graced: add its user to group "
                "systemd-journal to read them back]\n").encode()
    return b"[" + unit.encode() + b", from the journal]\n" + journal.stdout


class PlanChanged(ValueError):
    """An approval named a plan that is no longer the one that would run."""


class NotWaiting(ValueError):
    """A decision or a run by hand for a mission that exists but does not wait for one
    (already approved, executing, resolved...): not the same as no such mission."""


NOTIFIER_THREADS = 4
# errno values that mean graced itself is out of a resource, not that a step failed.
OWN_EXHAUSTION = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOSPC,
                            errno.EAGAIN})


class Executor:
    """Runs playbooks for missions; :meth:`run` never returns unless cancelled."""

    def __init__(self, *, config: RemediationConfig, playbooks: list[PlaybookConfig],
                 notifiers: list[NotifierConfig], mesh: Mesh, engine: MissionEngine,
                 paused: bool, budgets: Budgets, learning: Learning,
                 silences: Silences | None = None) -> None:
        self.config = config
        self.silences = silences or Silences()
        self.silenced: set[int] = set()  # missions held back by a silence
        # A failing expiry round logs its traceback a few times a minute, not twice a second.
        self._expire_failures = LogBudget("failed expiry rounds (tracebacks)")
        # The plans a reload replaced, per waiting mission (since graced started).
        self.superseded: dict[int, list[str]] = {}
        self.learning = learning
        # Notifiers get worker threads of their own: a stalled endpoint costs this pool,
        # never the threads the journal, the handlers and the detectors use.
        self.notifier_threads = trio.CapacityLimiter(NOTIFIER_THREADS)
        self.playbooks = playbooks
        self.notifiers = notifiers
        self.mesh = mesh
        self.engine = engine
        self.paused = paused
        self.budgets = budgets
        self.running: dict[int, str] = {}
        # Per notifier: deliveries, failures, last_ok, last_error (integration health).
        self.notifier_stats: dict[str, dict[str, Any]] = {}
        self.deferred: set[int] = set()
        self.considered: set[int] = set()
        self.recent: deque[dict[str, Any]] = deque(maxlen=50)
        # The configured sampling interval of a detector, by name (the runner's, set by
        # the composition root): how long a confirmation may take.
        self.interval_of: Any = lambda name: None
        self._nursery: trio.Nursery | None = None
        self._send, self._recv = trio.open_memory_channel[int](1024)

    # -- recording ---------------------------------------------------------------

    async def record(self, tr: Transition, *, durable: bool = True) -> None:
        """Commit the mission row (and its outcome, when final) with its event; notify if
        the new state asks for it."""
        more, events = self.learning.outcome(tr.mission, time.time())
        await self.mesh.publish(tr.topic, tr.mission.brief(),
                                writes=[store.upsert(tr.mission), *more], durable=durable)
        publish_learning(self.mesh, events)
        logs.transition(tr.topic, tr.mission)
        self.notify(tr.mission)

    def save(self, m: Mission) -> None:
        self.mesh.store([store.upsert(m)])

    def notify(self, m: Mission) -> None:
        # Whatever silence covers the mission now (one added after it opened too):
        # recorded, no one is told.
        if self.silences.covering(m.detector, m.subject, time.time()):
            return
        for nt in self.notifiers:
            if m.state in nt.on and self._nursery is not None:
                self._nursery.start_soon(self._notify_one, nt, m.public())

    async def _notify_one(self, nt: NotifierConfig, mission: dict[str, Any]) -> None:
        body = json.dumps({"mission": mission, "host": os.uname().nodename}).encode()
        ok, error = True, None
        try:
            with trio.fail_after(nt.timeout):
                if nt.kind == "command":
                    res = await trio.run_process(nt.argv, stdin=body, capture_stdout=True,
                                                 capture_stderr=True, check=False)
                    if res.returncode != 0:
                        ok, error = False, f"exited {res.returncode}"
                else:
                    def post() -> int:
                        # The whole POST within the notifier's timeout; a redirect is a
                        # failure, never followed: only the configured host is reached.
                        return httpc.request("POST", nt.url, body=body, timeout=nt.timeout,
                                             headers={"Content-Type": "application/json"})

                    status = await trio.to_thread.run_sync(
                        post, abandon_on_cancel=True, limiter=self.notifier_threads)
                    ok = 200 <= status < 300
                    error = None if ok else f"status {status}" + (
                        " (redirects are not followed)" if 300 <= status < 400 else "")
        except trio.TooSlowError:
            ok, error = False, f"timed out after {nt.timeout:g} s"
        except OSError as exc:
            ok, error = False, redact_text(str(exc.strerror or exc))
        tally = self.notifier_stats.setdefault(
            nt.name, {"deliveries": 0, "failures": 0, "last_ok": None, "last_error": None})
        tally["deliveries" if ok else "failures"] += 1
        tally["last_ok"], tally["last_error"] = ok, error
        self.mesh.publish_nowait("executor.notified", {
            "notifier": nt.name, "mission": mission["id"], "state": mission["state"],
            "ok": ok, "error": error})

    # -- policy --------------------------------------------------------------------

    def consider(self, m: Mission) -> None:
        """Queue a mission for the policy (from the detector runner; never blocks)."""
        try:
            self._send.send_nowait(m.id)
        except trio.WouldBlock:
            log.warning("executor queue full; mission %d not considered now", m.id)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await self._recover()
            nursery.start_soon(self._expire_loop)
            task_status.started()
            async for mission_id in self._recv:
                m = self.engine.by_id(mission_id)
                if m is not None and mission_id not in self.running:
                    await self._policy(m)

    async def _recover(self) -> None:
        """After a restart: an executing mission is interrupted, not run again."""
        now = time.time()
        for m in list(self.engine.active.values()):
            if m.state == "executing":
                m.verify_started = now
                pb = self._playbook(m.playbook)
                timeout = pb.verify_timeout if pb else 60.0
                await self.record(self.engine.transition(
                    m, "interrupted", now, "graced restarted while the playbook was running; "
                    f"re-verifying for up to {timeout:g} s instead of running it again"))
                # Give the interrupted step time to have its effect before any new run.
                self.considered.add(m.id)
                assert self._nursery is not None
                self._nursery.start_soon(self._reverify, m.id, timeout)
            elif m.state == "interrupted":
                # Killed again while re-verifying: the wait goes on from where it began,
                # not from this start, and nothing runs before it ends.
                pb = self._playbook(m.playbook)
                timeout = pb.verify_timeout if pb else 60.0
                began = m.verify_started if m.verify_started is not None else now
                self.considered.add(m.id)
                assert self._nursery is not None
                self._nursery.start_soon(self._reverify, m.id, max(0.0, began + timeout - now))
            elif m.state == "approved":
                await self._run_approved(m, now)
            elif m.state == "verifying":
                # The deadline counts from when verification began, not from this start:
                # a crash loop must not keep a mission verifying for ever.
                pb = self._playbook(m.playbook)
                timeout = pb.verify_timeout if pb else 60.0
                began = m.verify_started if m.verify_started is not None else now
                if m.verify_until is None:
                    m.verify_until = began + timeout
                self._watch_verification(m, max(0.0, m.verify_until - now))

    def _playbook(self, name: str | None) -> PlaybookConfig | None:
        return next((p for p in self.playbooks if p.name == name), None)

    def would_run(self, m: Mission, pb: PlaybookConfig, why: str) -> None:
        plan = build_plan(pb, mission_values(m))
        m.plan = plan
        self.mesh.publish_nowait("executor.would_run", {
            "mission": m.id, "playbook": pb.name, "risk": pb.risk, "why": why,
            "steps": plan["steps"], "plan_sha256": plan["sha256"]})
        m.reason = f"{why}: would run playbook {pb.name}"
        setting = "remediation.mode" if why == "observe mode" else "paused"
        m.held_back = {"setting": setting, "reason": f"{why}: nothing ran, nothing learned"}
        self.save(m)

    async def _policy(self, m: Mission) -> None:
        if m.state not in ("open", "interrupted") or m.id in self.considered:
            return
        self.considered.add(m.id)
        now = time.time()
        silence = self.silences.covering(m.detector, m.subject, now)
        if silence is not None:
            self._hold(m, silence)
            return
        candidates = [p for p in self.playbooks if matches(p, m)]
        decision = await self.learning.consult(m, candidates)
        self._within_budget(m, now)
        topic, payload = self.learning.consulted_event(m)
        try:
            self.mesh.publish_nowait(topic, payload, writes=[store.upsert(m)])
        except (ValueError, TypeError, OverflowError) as exc:  # never fatal to the executor
            log.error("learning: %s not published: %s", topic, exc)
            self.save(m)
        now = time.time()
        if decision.escalate:
            await self.record(self.engine.transition(m, "escalated", now, decision.reason))
            return
        pb = self._playbook((m.decision or {}).get("chosen"))
        if pb is None:
            return
        if self.config.mode == "observe":
            self.would_run(m, pb, "observe mode")
            return
        if self.paused:
            self.deferred.add(m.id)
            self.would_run(m, pb, "paused")
            return
        if m.flapping:
            m.held_back = {"setting": "missions.flap_window", "reason": (
                f"flapping: it came back within {self.engine.flap_window:g} s of resolving by "
                f"itself; {pb.name} was not run, so nothing was learned")}
            await self.record(self.engine.transition(
                m, "escalated", now, f"flapping: {m.detector} came back within "
                f"{self.engine.flap_window:g} s of clearing by itself; {pb.name} not run; "
                "a human should look"))
            return
        # Only an automatic run is rationed: a mission that waits for a person is never
        # escalated for a budget its run would not spend.
        spent = self.budgets.spent(pb, m.subject, self.config.max_actions_per_hour,
                                   now) if pb.risk in AUTO_RISKS else None
        if spent:
            others = [c["playbook"] for c in (m.decision or {}).get("candidates", [])
                      if c["playbook"] != pb.name and not c.get("demoted")]
            if spent.startswith("budget") and others:
                spent += f"; no other matching playbook has budget left ({', '.join(others)})"
            m.held_back = {"setting": "playbook.budget" if spent.startswith("budget")
                           else "remediation.max_actions_per_hour",
                           "reason": f"{spent}; {pb.name} was not run, so nothing was learned"}
            self.mesh.publish_nowait("executor.budget_spent", {
                "mission": m.id, "playbook": pb.name, "subject": m.subject, "reason": spent})
            await self.record(self.engine.transition(m, "escalated", now, spent))
            return
        m.playbook, m.risk = pb.name, pb.risk
        m.plan = build_plan(pb, mission_values(m))
        if pb.risk in AUTO_RISKS:
            await self.record(self.engine.transition(
                m, "approved", now, f"risk {pb.risk}: approved automatically"))
            self._start(m, pb)
            return
        m.expires_at = now + self.config.approval_timeout
        await self.record(self.engine.transition(
            m, "awaiting_approval", now, f"risk {pb.risk}: playbook {pb.name} needs approval "
            f"(expires in {self.config.approval_timeout:g} s); plan sha256 "
            f"{m.plan['sha256'][:16]}"))

    def _within_budget(self, m: Mission, now: float) -> None:
        """Each candidate's budget on the ranking; if the chosen playbook's is spent for
        this subject, the next in the ranking that may run and has budget left is
        chosen instead (the ranking says why), else the choice stands and the policy
        escalates with the reason."""
        d = m.decision
        if not d:
            return
        rows = d.get("candidates") or []
        for c in rows:
            pb = self._playbook(c["playbook"])
            if pb is not None:
                c["budget"] = [pb.budget - self.budgets.left(pb, m.subject, now), pb.budget]
        chosen = next((c for c in rows if c.get("chosen")), None)
        if chosen is None or "budget" not in chosen or chosen["budget"][0] < chosen[
                "budget"][1]:
            return
        first = self._playbook(chosen["playbook"])
        if first is None or first.risk not in AUTO_RISKS:
            return  # it waits for a person: no budget holds it
        spare = [c for c in rows if c is not chosen and not c.get("demoted")
                 and "budget" in c and c["budget"][0] < c["budget"][1]]
        if not spare:
            return
        spare.sort(key=lambda c: (-(math.inf if c["score"] is None else c["score"]),
                                  c["mttr_s"] if c["mttr_s"] is not None else math.inf,
                                  c["order"]))
        pb = self._playbook(chosen["playbook"])
        assert pb is not None
        used, budget = chosen["budget"]
        chosen["chosen"] = False
        chosen["blocked"] = (f"budget spent: ran {count(used, 'time')} for {m.subject} in "
                             f"{pb.budget_window:g} s (budget {budget})")
        nxt = spare[0]
        nxt["chosen"] = True
        d["chosen"] = nxt["playbook"]
        d["reason"] = (f"{nxt['playbook']}: the next in the ranking with budget left; "
                       f"{chosen['playbook']} ranked first, but its {chosen['blocked']}")
        # Chosen for its budget, not explored: no "tried X although Y" on it.
        d["explored"], d["best_known"] = False, None

    async def _run_approved(self, m: Mission, now: float) -> None:
        """An approved mission that is not running: its plan runs now, unless a silence
        covers it (held until the silence ends) or its playbook changed since (approved
        was another plan: it waits for a new approval)."""
        silence = self.silences.covering(m.detector, m.subject, now)
        if silence is not None:
            self._hold(m, silence, "approved; the run waits until the silence ends")
            return
        pb = self._playbook(m.playbook)
        current = self.current_plan(m)
        if pb is not None and current is not None and m.plan is not None \
                and current["sha256"] != m.plan["sha256"]:
            m.plan = current
            m.expires_at = now + self.config.approval_timeout
            await self.record(self.engine.transition(
                m, "awaiting_approval", now, f"playbook {pb.name} changed since it "
                f"was approved; plan sha256 {current['sha256'][:16]} needs approval"))
        elif pb is not None:
            self._start(m, pb)

    def silence_added(self) -> None:
        """A new silence: the missions it covers that wait for approval are marked
        silenced (an approval is recorded, the run waits until the silence ends)."""
        now = time.time()
        for m in list(self.engine.active.values()):
            silence = self.silences.covering(m.detector, m.subject, now)
            if m.state == "awaiting_approval" and silence is not None \
                    and m.id not in self.silenced:
                self._hold(m, silence, "an approval is recorded, its run waits until the "
                           "silence ends; no one is told")

    def _hold(self, m: Mission, silence: Any,
              what: str = "nothing runs, no one is told") -> None:
        """A silenced mission: recorded, marked, deferred until the silence ends."""
        self.silenced.add(m.id)
        if m.id not in silence.missions:
            silence.missions.append(m.id)
        m.silenced = {"id": silence.id, "target": silence.target, "by": silence.by,
                      "comment": silence.comment, "until": silence.expires_at}
        until = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(silence.expires_at))
        m.reason = (f"silenced by {silence.by} until {until} (silence {silence.id}: "
                    f"{silence.comment}); {what}")
        self.mesh.publish_nowait("executor.silenced", {
            "mission": m.id, "detector": m.detector, "subject": m.subject,
            "silence": silence.id}, writes=[store.upsert(m), self.silences.write()])

    async def silence_ended(self) -> None:
        """Missions held by silences that ended go through the policy again."""
        held = sorted(self.silenced)
        self.silenced.clear()
        for mid in held:
            m = self.engine.by_id(mid)
            if m is None:
                continue
            now = time.time()
            if self.silences.covering(m.detector, m.subject, now):
                self.silenced.add(mid)
                continue
            if m.silenced and not m.silenced.get("ended_at"):
                # Kept as history ("was silenced"), no longer shown as held.
                m.silenced = {**m.silenced, "ended_at": now}
                self.save(m)
            if m.state == "approved" and mid not in self.running:
                await self._run_approved(m, now)
                continue
            self.considered.discard(mid)
            await self._policy(m)

    async def resume(self) -> None:
        self.considered -= self.deferred
        for mid in sorted(self.deferred):
            m = self.engine.by_id(mid)
            if m is not None:
                # Considered again: its "paused" mark no longer says what happens to it.
                if m.held_back and m.held_back.get("setting") == "paused":
                    m.held_back = None
                await self._policy(m)
        self.deferred.clear()

    # -- approvals -------------------------------------------------------------------

    def may_approve(self, uid: int | None, groups: frozenset[int]) -> bool:
        """Whether a peer may approve: ``groups`` are the ones fixed when it connected."""
        if uid is None:
            return False
        if uid in (0, os.geteuid()):
            return True
        try:
            name = pwd.getpwuid(uid).pw_name
        except KeyError:
            name = None
        if name is not None and name in self.config.approvers:
            return True
        wanted = set()
        for g in self.config.approver_groups:
            try:
                wanted.add(grp.getgrnam(g).gr_gid)
            except KeyError:
                continue
        return bool(wanted & groups)

    def current_plan(self, m: Mission) -> dict[str, Any] | None:
        """The plan the mission's playbook gives now, for the values frozen in its plan."""
        pb = self._playbook(m.playbook)
        if pb is None:
            return None
        return build_plan(pb, plan_values(m))

    async def _plan_changed(self, m: Mission, current: dict[str, Any]) -> None:
        shown = m.plan["sha256"] if m.plan else None
        if shown is not None:  # an approval of it is then "changed since", not "wrong"
            was = self.superseded.setdefault(m.id, [])
            was.append(shown)
            del was[:-16]
        m.plan = current
        # The reason names the plan it waits with now: the hash it named before is no
        # longer one an approval may name.
        left = max(0.0, (m.expires_at or time.time()) - time.time())
        m.reason = (f"risk {m.risk}: playbook {m.playbook} changed since its plan was shown; "
                    f"needs approval (expires in {left:.0f} s); plan sha256 "
                    f"{current['sha256'][:16]}" + (f" (was {shown[:16]})" if shown else ""))
        # Not waiting on the commit (a reload answers at once, even on a full disk).
        await self.mesh.publish("mission.plan_changed", {
            **m.brief(), "was": shown, "steps": current["steps"]}, writes=[store.upsert(m)],
            durable=False)

    async def replan_waiting(self) -> list[int]:
        """After a reload: missions awaiting approval get the plan they would run now;
        returns the ids of those whose plan changed."""
        changed = []
        for m in list(self.engine.active.values()):
            if m.state != "awaiting_approval" or m.plan is None:
                continue
            current = self.current_plan(m)
            if current is not None and current["sha256"] != m.plan["sha256"]:
                await self._plan_changed(m, current)
                changed.append(m.id)
        return changed

    async def decide(self, mission_id: int, approve: bool, who: dict[str, Any],
                     comment: str, opened: float | str | None = None,
                     plan_sha256: str | None = None) -> Mission:
        """Approve or reject a mission awaiting approval; raises LookupError (no active
        mission), NotWaiting (one in another state) or ValueError.

        ``opened``, when given, must be the mission's ``opened_at`` (the number, or its
        ISO form as ``--json`` prints it): the decision was made for that mission and no
        other (a signed request names it).

        An approval names the plan it approves (``plan_sha256``): if the playbook changed
        since the plan was shown (a reload), the mission keeps waiting with the new plan,
        and the approval is refused (:class:`PlanChanged`).
        """
        m = self.engine.by_id(mission_id)
        if m is None:
            raise LookupError(f"no active mission {mission_id}")
        if opened is not None and not same_instant(opened, m.opened_at):
            raise ValueError(f"the request names mission {mission_id} opened at "
                             f"{opened if isinstance(opened, str) else shown(opened)}, but "
                             f"mission {mission_id} opened at {shown(m.opened_at)}")
        if m.state != "awaiting_approval":
            raise NotWaiting(f"mission {mission_id} is {m.state}, not waiting for a decision")
        now = time.time()
        if approve:
            current = self.current_plan(m)
            if current is not None and plan_sha256 is None:
                raise PlanChanged(f"mission {mission_id}: an approval names the plan it "
                                  "approves (params.plan: mission.plan.sha256)")
            # The plan is named by its hash or a prefix of at least PLAN_PREFIX hex digits
            # (missions show prints 16); the approval records the full hash.
            named = str(plan_sha256 or "")
            if current is not None and not names_plan(named, current["sha256"]):
                if m.plan is None or m.plan["sha256"] != current["sha256"]:
                    await self._plan_changed(m, current)
                if len(named) >= PLAN_PREFIX and any(
                        old.startswith(named) for old in self.superseded.get(m.id, [])):
                    raise PlanChanged(
                        f"mission {mission_id}: the approval names plan {named[:16]}, but "
                        f"the plan it would run now is {current['sha256'][:16]} (the "
                        "playbook changed since); review the plan (gracectl missions show) "
                        "and approve again")
                raise PlanChanged(
                    f"mission {mission_id}: the approval names plan {named[:16]}, which does "
                    f"not match the plan it would run: {current['sha256'][:16]}; review the "
                    "plan (gracectl missions show) and approve again")
            if current is not None:
                plan_sha256 = current["sha256"]
        m.approvals.append({**who, "decision": "approved" if approve else "rejected",
                            "comment": comment, "at": now,
                            **({"plan_sha256": plan_sha256} if approve else {})})
        by = who.get("user") or who.get("key") or "?"
        if not approve:
            await self.record(self.engine.transition(
                m, "rejected", now, f"rejected by {by}" + (f": {comment}" if comment else "")))
            return m
        pb = self._playbook(m.playbook)
        if pb is None:
            await self.record(self.engine.transition(
                m, "failed", now, f"playbook {m.playbook} is no longer configured"))
            return m
        await self.record(self.engine.transition(
            m, "approved", now, f"approved by {by}" + (f": {comment}" if comment else "")))
        await self._run_approved(m, now)
        return m

    async def run_by_hand(self, mission_id: int, pb: PlaybookConfig, who: dict[str, Any],
                          writes: Sequence[Write] = (), named: str | None = None) -> Mission:
        """Run ``pb`` for an active mission now, at a person's request (``playbooks run``).

        Journaled as any run: an ``approved`` transition naming who asked, then the steps.
        Policy (observe mode, pause, silences, risk) is the person's call here; like an
        approved run, it spends no budget (budgets ration automatic runs). Raises
        ValueError.

        The plan that runs has the values frozen in the mission's plan (the one a dry run
        and missions show print); ``named``, a hash or a prefix of it, must name it, else
        :class:`PlanChanged` and nothing runs. A mission closed, or not open, interrupted
        or waiting: :class:`NotWaiting`.
        """
        m = self.engine.by_id(mission_id)
        if m is None:
            raise NotWaiting(f"mission {mission_id} is closed (closed missions cannot be run "
                             "again)")
        if m.id in self.running or m.state not in ("open", "interrupted", "awaiting_approval"):
            raise NotWaiting(f"mission {mission_id} is {m.state}, not waiting for a decision: "
                             "a playbook runs only for an open, interrupted or waiting mission")
        plan = build_plan(pb, plan_values(m))
        if named is not None and not names_plan(named, plan["sha256"]):
            raise PlanChanged(f"mission {m.id}: the request names plan {named[:16]}, but "
                              f"{pb.name} would run plan {plan['sha256'][:16]} now; review "
                              "it (--dry-run) and run again")
        now = time.time()
        self.considered.add(m.id)
        self.deferred.discard(m.id)
        m.playbook, m.risk = pb.name, pb.risk
        m.plan = plan
        m.approvals.append({**who, "decision": "run by hand", "comment": "", "at": now,
                            "plan_sha256": m.plan["sha256"]})
        by = who.get("user") or "?"
        self.mesh.publish_nowait("executor.manual_run", {
            "mission": m.id, "playbook": pb.name, "by": by, "uid": who.get("uid"),
            "plan_sha256": m.plan["sha256"]}, writes=writes)  # a signed request's nonce
        await self.record(self.engine.transition(
            m, "approved", now, f"run by hand by {by}: playbook {pb.name}"))
        self._start(m, pb)
        return m

    async def _expire_loop(self) -> None:
        """Ends silences and expires approvals that are due; never returns unless
        cancelled. A round that fails is logged and the next one runs: this loop must not
        take graced down (it did, publishing a silence whose comment had no UTF-8 form)."""
        while True:
            await trio.sleep(0.5)
            try:
                await self._expire_due(time.time())
            except trio.ClosedResourceError:
                return  # the mesh is closed: graced is stopping
            except Exception:  # noqa: BLE001 - a background loop never stops graced
                if self._expire_failures.allow():
                    log.exception("ending silences and expiring approvals failed; "
                                  "trying again")

    async def _expire_due(self, now: float) -> None:
        ended = self.silences.due(now, {m.id for m in self.engine.active.values()})
        for s, why in ended:
            payload = s.event(reason=why)
            try:
                canonical_bytes(payload)
            except ValueError as exc:
                # Stored before such strings were refused: journaled with U+FFFD in
                # their place rather than not at all.
                log.error("silence %d: %s; its silence.expired event shows U+FFFD "
                          "instead", s.id, exc)
                payload = json_safe(payload)
            await self.mesh.publish("silence.expired", payload,
                                    writes=[self.silences.write()])
        if ended:
            await self.silence_ended()
        for m in list(self.engine.active.values()):
            if m.state == "awaiting_approval" and m.expires_at and now >= m.expires_at:
                await self.record(self.engine.transition(
                    m, "expired", now, "no approval before it expired; nothing was run"))

    # -- running ---------------------------------------------------------------------

    def _start(self, m: Mission, pb: PlaybookConfig) -> None:
        assert self._nursery is not None
        self.running[m.id] = pb.name
        self._nursery.start_soon(self._execute, m, pb)

    async def _execute(self, m: Mission, pb: PlaybookConfig) -> None:
        try:
            now = time.time()
            # A person approved this run (or ran it by hand): not an automatic action.
            self.budgets.spend(pb, m.subject, now, automatic=not approved_by_person(m))
            self.mesh.store([("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                              ("budgets", self.budgets.dump()))])
            # Credited only if the symptom is still there as the playbook starts.
            m.symptom_at_start = m.normal_streak == 0
            # It runs: a mark from when it was deferred (paused, observe mode) no longer
            # holds; whether the run is learned from is decided at its outcome.
            m.held_back = None
            # The plan shown (and approved) is the plan that runs: its frozen values.
            values = plan_values(m)
            m.plan = build_plan(pb, values)
            # Committed before the first step starts (crash safety).
            await self.record(self.engine.transition(
                m, "executing", now, f"running playbook {pb.name} ({count(len(pb.step), 'step')}, "
                f"plan sha256 {m.plan['sha256'][:16]})"))
            for index, st in enumerate(pb.step, 1):
                desc = describe(st, values)
                self.mesh.publish_nowait("executor.step_started", {
                    "mission": m.id, "playbook": pb.name, "step": index, **desc})
                # What a step reports may quote the monitored world (a process's name,
                # an error naming it): stored and signed only in a form it has.
                result = json_safe(await self._run_step(st, values, desc))
                result["step"] = index
                m.steps.append(result)
                self.recent.append({"mission": m.id, **result})
                self.mesh.publish_nowait("executor.step_finished", {
                    "mission": m.id, "playbook": pb.name, "step": index,
                    "ok": result["ok"], "exit_code": result.get("exit_code"),
                    "duration_s": result["duration_s"], "output_sha256": result["output_sha256"],
                    "error": result.get("error"),
                    # Who a signal step signalled, and who it left alone (bounded, as the
                    # step record), in the signed stream too.
                    **({"pids": result.get("pids", []), "skipped": result.get("skipped", []),
                        "skipped_count": result.get("skipped_count", 0)}
                       if st.action == "signal" else {}),
                    # graced could not run it (out of processes, descriptors...): not the
                    # playbook's failure, and learning credits nothing for it.
                    **({"graced_failure": result["graced_failure"]}
                       if result.get("graced_failure") else {})})
                if not result["ok"]:
                    await self.record(self.engine.transition(
                        m, "failed", time.time(),
                        f"step {index} ({st.action}) failed: {result.get('error')}"))
                    return
            m.verify_started = time.time()
            m.verify_until = m.verify_started + pb.verify_timeout
            await self.record(self.engine.transition(
                m, "verifying", m.verify_started,
                f"playbook {pb.name} done; waiting for {m.detector} to clear "
                f"(up to {pb.verify_timeout:g} s)"))
            self._watch_verification(m, pb.verify_timeout)
        except Exception as exc:  # noqa: BLE001 - a run must never take graced down
            log.exception("mission %d: graced failed running playbook %s", m.id, pb.name)
            if m.state in ("approved", "executing"):
                try:
                    await self.record(self.engine.transition(
                        m, "failed", time.time(), f"graced failed running playbook "
                        f"{pb.name}: {type(exc).__name__}: {str(exc)[:200]}"))
                except Exception:  # noqa: BLE001
                    log.exception("mission %d: its failure could not be recorded", m.id)
        finally:
            self.running.pop(m.id, None)

    def _watch_verification(self, m: Mission, timeout: float) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(self._verify_deadline, m.id, timeout)

    async def _reverify(self, mission_id: int, timeout: float) -> None:
        """An interrupted mission still anomalous after ``timeout`` goes through the policy."""
        await trio.sleep(timeout)
        m = self.engine.by_id(mission_id)
        if m is not None and m.state == "interrupted":
            self.considered.discard(mission_id)
            await self._policy(m)

    async def _verify_deadline(self, mission_id: int, timeout: float) -> None:
        """Fail a verifying mission that saw no normal sample within ``timeout``; one
        that did is confirming: the engine resolves or fails it at its next samples,
        and this fails it only if they stop coming."""
        await trio.sleep(timeout)
        m = self.engine.by_id(mission_id)
        if m is None or m.state != "verifying":
            return
        now = time.time()
        began = m.verify_started if m.verify_started is not None else now - timeout
        waited = now - began
        if m.normal_streak == 0:
            detail = (f"{m.detector} still anomalous ({value_text(m.last_value)}) "
                      f"after {waited:.3g} s")
            m.verification = {"result": "failed", "at": now, "detail": detail}
            await self.record(self.engine.transition(m, "failed", now,
                                                     f"verification failed: {detail}"))
            return
        interval = self.interval_of(m.detector) or 60.0
        left = max(1, self.engine.resolve_after - m.normal_streak)
        bound = 2 * left * interval + 5.0
        m.timeline.append({
            "ts": now, "from": m.state, "to": m.state, "note": "confirming",
            "reason": f"{m.detector} normal {(m.normal_since or now) - began:.3g} s after "
                      f"the steps, within verify_timeout; confirming: {left} more "
                      "normal sample(s) resolve it (missions.resolve_after), an anomalous "
                      "one fails it"})
        self.save(m)
        await trio.sleep(bound)
        m = self.engine.by_id(mission_id)
        if m is not None and m.state == "verifying":
            now = time.time()
            detail = (f"{m.detector} was normal again but reported no confirming sample "
                      f"within {bound:g} s past verify_timeout")
            m.verification = {"result": "failed", "at": now, "detail": detail}
            await self.record(self.engine.transition(m, "failed", now,
                                                     f"verification failed: {detail}"))

    async def _run_step(self, st: StepConfig, values: dict[str, str],
                        desc: dict[str, Any]) -> dict[str, Any]:
        started = time.monotonic()
        result: dict[str, Any] = {"action": st.action, **desc, "started_at": time.time()}
        output = b""
        try:
            with trio.fail_after(st.timeout):
                if st.action == "signal":
                    found = await trio.to_thread.run_sync(self.pids, st, values)
                    sig = getattr(signals, "SIG" + st.signal.upper().removeprefix("SIG"))
                    pids = await trio.to_thread.run_sync(targets.send, found, sig)
                    # What was found but left alone, and why (bounded; counted in full).
                    result.update(skipped=found.skipped, skipped_count=found.skipped_count)
                    if not pids:
                        raise ProcessLookupError("no matching process" + (
                            f" ({found.summary()})" if found.skipped_count else ""))
                    # A signal has no exit code: ok, and the pids it reached.
                    result.update(ok=True, pids=pids[:targets.MAX_PIDS],
                                  pids_count=len(pids), exit_code=None)
                else:
                    argv, own_env = command(st, values)
                    env = dict(os.environ)
                    env.update(own_env)
                    code, output = await run_step_process(argv, env, st.cwd or None)
                    if st.action == "start_action":
                        output += await _action_readback(desc["unit"], result["started_at"])
                    result.update(ok=code == 0, exit_code=code)
                    if code != 0:
                        result["error"] = f"exit code {code}"
        except trio.TooSlowError:
            result.update(ok=False, exit_code=None, error=f"timed out after {st.timeout:g} s")
        except (OSError, ValueError, psutil.Error) as exc:
            result.update(ok=False, exit_code=None, error=str(exc))
            if isinstance(exc, OSError) and exc.errno in OWN_EXHAUSTION:
                # graced itself ran out (descriptors, memory, disk, processes): the
                # playbook never got its chance, and learning must not hold it against it.
                result["graced_failure"] = f"graced could not run it: {exc.strerror}"
                log.error("step %s not run: graced is out of resources: %s", st.action, exc)
        except Exception as exc:  # a step never takes graced down: a failed step, logged
            log.exception("step %s failed inside graced", st.action)
            result.update(ok=False, exit_code=None, graced_error=True,
                          error=f"graced internal error: {type(exc).__name__}: {exc}",
                          graced_failure="graced internal error")
        result["duration_s"] = round(time.monotonic() - started, 3)
        result["output_sha256"] = hashlib.sha256(output).hexdigest()
        # What is shown and journaled: the step's env values hidden, URLs redacted.
        hide = secrets(st, values)
        result["output"] = redact_output(output[: st.max_output].decode("utf-8", "replace"), hide)
        if result.get("error"):
            # psutil's errors name the process: a name anyone can make 128 KiB long
            result["error"] = targets.clip(redact_output(str(result["error"]), hide),
                                           MAX_STEP_ERROR)
        result["output_truncated"] = len(output) > st.max_output
        return bounded_step(result)

    @staticmethod
    def pids(st: StepConfig, values: dict[str, str]) -> targets.Selection:
        """The processes a signal step targets now, and those it leaves alone (blocking:
        psutil); see graced.targets."""
        return targets.find(pid=st.pid, pid_file=substitute(st.pid_file, values),
                            process=substitute(st.process, values),
                            match_cmdline=st.match_cmdline, user=st.user)

    def status(self) -> dict[str, Any]:
        now = time.time()
        return {"mode": self.config.mode, "paused": self.paused,
                "running": dict(self.running),
                "actions_last_hour": len([t for t in self.budgets.global_runs
                                          if now - t < 3600]),
                "max_actions_per_hour": self.config.max_actions_per_hour,
                "silences": len(self.silences.items),
                "playbooks": [p.name for p in self.playbooks]}


def bounded_step(result: dict[str, Any]) -> dict[str, Any]:
    """``result`` within MAX_STEP_RECORD bytes of JSON (its output apart): skipped
    processes dropped from the end (``skipped_count`` still counts them all) until it
    fits. Every field is bounded already; this holds the sum."""
    def size() -> int:
        body = {k: v for k, v in result.items() if k != "output"}
        return len(json.dumps(body, default=str))

    skipped = result.get("skipped")
    while isinstance(skipped, list) and skipped and size() > MAX_STEP_RECORD:
        skipped.pop()
    return result


async def run_step_process(argv: Sequence[str], env: dict[str, str],
                           cwd: str | None) -> tuple[int, bytes]:
    """Run a step's command: its exit code and its stdout then stderr.

    The step ends when its process exits: the pipes are read for at most STEP_DRAIN_S
    more, since a process it left in the background may hold them open for ever.
    Cancelled (the step's timeout), the process is killed.
    """
    proc = await trio.lowlevel.open_process(
        list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=env, cwd=cwd)
    out: list[bytes] = []
    err: list[bytes] = []
    closed = [trio.Event(), trio.Event()]

    async def read(stream: trio.abc.ReceiveStream | None, into: list[bytes],
                   done: trio.Event) -> None:
        assert stream is not None
        while chunk := await stream.receive_some(65536):
            into.append(bytes(chunk))
        done.set()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read, proc.stdout, out, closed[0])
            nursery.start_soon(read, proc.stderr, err, closed[1])
            await proc.wait()
            with trio.move_on_after(STEP_DRAIN_S):
                for event in closed:
                    await event.wait()
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            if proc.returncode is None:
                proc.kill()
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    await stream.aclose()
            code = await proc.wait()
    return code, b"".join(out) + b"".join(err)


def approved_by_person(m: Mission) -> bool:
    """Whether the run about to start was approved by a person (``missions approve``,
    ``playbooks run``) rather than by the policy: the mission's latest move to "approved"
    is the moment a person's approval was recorded. Not any approval in its history:
    after a restart the policy's own re-run of a mission a person once approved is
    automatic and spends the budget (review s9b: it spent none, and a crash loop never
    ended)."""
    last = next((t for t in reversed(m.timeline) if t.get("to") == "approved"), None)
    return last is not None and any(
        a.get("decision") in ("approved", "run by hand") and a.get("at") == last.get("ts")
        for a in m.approvals)
