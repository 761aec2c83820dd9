"""The mission engine: anomalies in, mission transitions out. Pure code.

Theory of operation
-------------------
A mission is keyed by (detector, subject); at most one is open per key. An anomalous
observation opens one (``detected`` -> ``open``) or, if one is open, updates it (its
occurrence count, last value and summary). A normal observation counts towards
``resolve_after`` consecutive normal samples, after which the mission is resolved by
itself (hysteresis); a mission awaiting approval resolves the same way, as "cleared
before approval" (an approval then is refused: there is nothing left to fix). A mission
opened within ``flap_window`` seconds after the last one for the same key *resolved by
itself* is *flapping*: flagged, and its severity raised one level. A fault that comes
back after a playbook fixed it is not flapping: the playbook budgets bound how often
it is fixed again; nor is one that cleared before approval (it must be approvable
again when it comes back). But a symptom that keeps coming and going while graced waits
for approval would page a person each time: once a key has cleared before approval
``CLEARED_REPEATS`` times within ``flap_window``, its next mission awaiting approval is
kept open for a person (one request, until approved, rejected or expired) instead of
clearing and asking again at the next toggle.

An *incident* is one unbroken stretch of anomaly for a key: a mission that failed and
reopens while the detector never saw the key normal belongs to the same incident as the
one before it (``Mission.incident`` is the id of the incident's first mission). The
learning loop counts at most one failure of a playbook per incident.

A mission closed as escalated, rejected or expired hands the symptom to a human:
no new mission opens for that key until the detector has seen it normal again (no storm
of missions while a person looks). A failed one may reopen at once: another attempt,
bounded by the playbook budgets and by demotion. Each transition comes back as a
:class:`Transition` (topic and payload for the signed journal, and the mission to
store); callers commit both together.

States: detected, open, awaiting_approval, approved, executing, verifying, and the
final ones: resolved, failed, escalated, rejected, expired.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any

from ..protocol.times import iso_times

SEVERITIES = ("low", "medium", "high", "critical")
ACTIVE = ("detected", "open", "awaiting_approval", "approved", "executing", "verifying",
          "interrupted")
FINAL = ("resolved", "failed", "escalated", "rejected", "expired")
STATES = ACTIVE + FINAL
HANDED_OVER = ("escalated", "rejected", "expired")
# Active states in which a run of normal samples resolves the mission by itself.
WATCHING = ("open", "detected", "verifying", "interrupted", "awaiting_approval")
CLEARED = "cleared before approval"
CLEARED_REPEATS = 3  # clears before approval within flap_window before one is kept open
MAX_SAMPLES = 10
MAX_TIMELINE = 200


def raise_severity(severity: str) -> str:
    i = SEVERITIES.index(severity)
    return SEVERITIES[min(i + 1, len(SEVERITIES) - 1)]


@dataclass
class Mission:
    id: int
    detector: str
    kind: str
    subject: str
    severity: str
    state: str
    summary: str
    opened_at: float
    updated_at: float
    closed_at: float | None = None
    occurrences: int = 1
    last_value: float | None = None
    score: float = 0.0
    flapping: bool = False
    normal_streak: int = 0
    last_update_event: float = 0.0
    samples: list[dict[str, Any]] = field(default_factory=list)
    timeline: list[dict[str, Any]] = field(default_factory=list)
    # remediation
    playbook: str | None = None
    risk: str | None = None
    steps: list[dict[str, Any]] = field(default_factory=list)
    approvals: list[dict[str, Any]] = field(default_factory=list)
    verification: dict[str, Any] | None = None
    expires_at: float | None = None
    reason: str | None = None
    verify_started: float | None = None
    # the exact plan it runs or would run (graced/plan.py), and the silence holding it back
    plan: dict[str, Any] | None = None
    silenced: dict[str, Any] | None = None
    # learning: what memory held when the playbook was chosen, and the ranking
    similar: list[dict[str, Any]] = field(default_factory=list)
    decision: dict[str, Any] | None = None
    incident: int | None = None
    # was the symptom present when the playbook started (None: it never started)
    symptom_at_start: bool | None = None
    # what kept learning from using this mission, and the setting responsible
    held_back: dict[str, Any] | None = None
    # verification: until when the first normal sample counts (verify_started plus the
    # playbook's verify_timeout), and when the current run of normal samples began
    verify_until: float | None = None
    normal_since: float | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.detector, self.subject)

    def public(self) -> dict[str, Any]:
        """The mission as clients see it."""
        data = asdict(self)
        data.pop("last_update_event")
        return data

    def brief(self) -> dict[str, Any]:
        """The fields a mission.* event carries (its time, opened_at, in the ISO form of
        an event's ts, as every time in a new event)."""
        out = {k: getattr(self, k) for k in (
            "id", "detector", "kind", "subject", "severity", "state", "summary",
            "occurrences", "last_value", "flapping", "opened_at", "playbook", "risk",
            "reason")}
        out["plan_sha256"] = self.plan.get("sha256") if self.plan else None
        out["silenced"] = (self.silenced.get("id") if self.silenced
                           and not self.silenced.get("ended_at") else None)
        return dict(iso_times(out))


def ran(m: Mission) -> bool:
    """Did the mission's playbook start (a crash mid-step leaves no step result)?"""
    return bool(m.steps) or any(t.get("to") == "executing" for t in m.timeline)


def value_text(value: float | None) -> str:
    """A sample's value as a reason quotes it: "value 412.3", or "no value" (a detector
    that had nothing to measure), never Python's None."""
    return "no value" if value is None else f"value {value}"


@dataclass
class Transition:
    topic: str
    mission: Mission  # a snapshot, safe to store


class MissionEngine:
    """Holds the active missions; :meth:`observe` returns the transitions to record."""

    def __init__(self, *, resolve_after: int = 3, flap_window: float = 600.0,
                 update_interval: float = 60.0, next_id: int = 1,
                 active: list[Mission] | None = None,
                 last_resolved: dict[tuple[str, str], float] | None = None,
                 held: dict[tuple[str, str], tuple[str, int]] | None = None) -> None:
        self.resolve_after = resolve_after
        self.flap_window = flap_window
        self.update_interval = update_interval
        self.next_id = next_id
        self.active: dict[tuple[str, str], Mission] = {m.key: m for m in active or []}
        # Resolutions *by themselves* (no playbook ran): what flapping is measured from.
        self.last_resolved = dict(last_resolved or {})
        # The incident (first mission id) each key's current stretch of anomaly belongs to.
        self.incidents: dict[tuple[str, str], int] = {
            m.key: m.incident or m.id for m in active or []}
        # Keys handed to a human (escalated, rejected, expired) while still anomalous:
        # key -> (the final state, the mission's id), until the detector sees it normal.
        # Restored at start from each key's last mission: a graced that was stopped saw
        # nothing, so a hold lasts across a restart until the symptom is seen normal.
        self.held: dict[tuple[str, str], tuple[str, int]] = dict(held or {})
        # When each key last cleared before approval (within flap_window; newest last).
        self.cleared: dict[tuple[str, str], list[float]] = {}

    def by_id(self, mission_id: int) -> Mission | None:
        for m in self.active.values():
            if m.id == mission_id:
                return m
        return None

    def forget_detector(self, detector: str) -> None:
        """The detector left the config: nothing of it is held any more, so if it comes
        back (a later reload) a symptom still there opens a mission again."""
        self.held = {k: v for k, v in self.held.items() if k[0] != detector}

    def forget(self, key: tuple[str, str]) -> None:
        """Nothing held for this (detector, subject) any more: its detector no longer
        reports that subject."""
        self.held.pop(key, None)

    def needs_person(self) -> list[int]:
        """The escalated missions whose symptom was not seen normal since: a person has
        to look (they stay in the default mission list and in status)."""
        return sorted(mid for state, mid in self.held.values() if state == "escalated")

    def held_by_person(self) -> list[int]:
        """The rejected missions whose symptom was not seen normal since: a person said
        no, so no new mission opens while it lasts, but the symptom is still there
        (status says so, as Alertmanager lists a silenced alert: not degraded, not
        hidden)."""
        return sorted(mid for state, mid in self.held.values() if state == "rejected")

    def expired_unanswered(self) -> list[int]:
        """The expired missions whose symptom was not seen normal since: nobody decided
        before approval_timeout and no new mission opens while it lasts, so a person
        has to look (graced is degraded; they stay in the default mission list)."""
        return sorted(mid for state, mid in self.held.values() if state == "expired")

    def transition(self, m: Mission, to: str, now: float, reason: str) -> Transition:
        """Move an active mission to ``to`` (from the executor); final states close it."""
        self._move(m, to, now, reason)
        m.reason = reason
        if to in FINAL:
            m.closed_at = now
            self.active.pop(m.key, None)
            if to == "resolved":
                self.incidents.pop(m.key, None)
                if not ran(m):
                    self.last_resolved[m.key] = now
            elif to in HANDED_OVER:
                self.held[m.key] = (to, m.id)
        return Transition(f"mission.{to}", copy.deepcopy(m))

    def _move(self, m: Mission, to: str, now: float, reason: str) -> None:
        m.timeline.append({"ts": now, "from": m.state, "to": to, "reason": reason})
        if len(m.timeline) > MAX_TIMELINE:
            del m.timeline[1:2]  # keep the first (how it started) and the latest
        m.state = to
        m.updated_at = now

    def _recent_clears(self, key: tuple[str, str], now: float) -> list[float]:
        return [t for t in self.cleared.get(key, []) if now - t <= self.flap_window]

    def _keep_open(self, m: Mission, now: float) -> bool:
        """Is this mission awaiting approval kept open though its symptom cleared (the
        key cleared before approval CLEARED_REPEATS times within flap_window)? Notes it
        on the timeline the first time."""
        if len(self._recent_clears(m.key, now)) < CLEARED_REPEATS:
            return False
        if not any(t.get("note") == "kept open" for t in m.timeline[-20:]):
            m.timeline.append({
                "ts": now, "from": m.state, "to": m.state, "note": "kept open",
                "reason": f"{CLEARED} {CLEARED_REPEATS} times within {self.flap_window:g} s "
                          "(missions.flap_window): kept open for a person instead of "
                          "asking again at each return"})
        return True

    def _verification_failed(self, m: Mission, now: float, value: float | None,
                             confirming: int) -> Transition:
        """An anomalous sample after ``verify_until``: the playbook did not fix it.

        ``confirming`` is how many normal samples came since the first after the steps
        (0: none came within verify_timeout; the executor's deadline fails it then)."""
        began = m.verify_started if m.verify_started is not None else now
        if confirming:
            detail = (f"{m.detector} was normal again, then anomalous ({value_text(value)}) "
                      f"{now - began:.3g} s after the steps, after {confirming} of the "
                      f"{self.resolve_after} normal samples that confirm a fix "
                      "(missions.resolve_after)")
        else:
            detail = (f"{m.detector} still anomalous ({value_text(value)}) after "
                      f"{now - began:.3g} s")
        m.verification = {"result": "failed", "at": now, "detail": detail}
        return self.transition(m, "failed", now, f"verification failed: {detail}")

    def observe(self, *, detector: str, kind: str, subject: str, severity: str,
                anomalous: bool, score: float, summary: str, value: float | None,
                now: float, detail: dict[str, Any] | None = None) -> list[Transition]:
        """Feed one judged observation; returns the transitions it caused."""
        key = (detector, subject)
        m = self.active.get(key)
        out: list[Transition] = []
        if not anomalous:
            self.held.pop(key, None)
            if m is None:
                self.incidents.pop(key, None)
        elif m is None and key in self.held:
            return out
        if anomalous:
            sample = {"ts": now, "value": value, "score": round(score, 4), "summary": summary,
                      **({"detail": detail} if detail else {})}
            if m is None:
                flapping = now - self.last_resolved.get(key, float("-inf")) <= self.flap_window
                m = Mission(
                    id=self.next_id, detector=detector, kind=kind, subject=subject,
                    severity=raise_severity(severity) if flapping else severity,
                    state="detected", summary=summary, opened_at=now, updated_at=now,
                    last_value=value, score=score, flapping=flapping, last_update_event=now,
                    samples=[sample], incident=self.incidents.setdefault(key, self.next_id),
                )
                self.next_id += 1
                m.timeline.append({"ts": now, "from": None, "to": "detected", "reason": summary})
                reason = "anomaly"
                if flapping:
                    reason = (f"flapping: re-opened within {self.flap_window:g} s of the last "
                              f"resolution; severity raised to {m.severity}")
                self._move(m, "open", now, reason)
                self.active[key] = m
                out.append(Transition("mission.opened", copy.deepcopy(m)))
                return out
            m.occurrences += 1
            m.last_value = value
            m.score = score
            m.summary = summary
            confirming = m.normal_streak
            m.normal_streak = 0
            m.normal_since = None
            m.updated_at = now
            if len(m.samples) < MAX_SAMPLES:
                m.samples.append(sample)
            if m.state == "verifying" and m.verify_until is not None \
                    and now >= m.verify_until:
                out.append(self._verification_failed(m, now, value, confirming))
                return out
            if now - m.last_update_event >= self.update_interval:
                m.last_update_event = now
                out.append(Transition("mission.updated", copy.deepcopy(m)))
            else:
                out.append(Transition("", copy.deepcopy(m)))  # store only, no event
            return out
        if m is None:
            return out
        if m.normal_streak == 0:
            m.normal_since = now
        m.normal_streak += 1
        m.last_value = value
        m.updated_at = now
        if m.normal_streak >= self.resolve_after and m.state in WATCHING:
            normal = f"{detector} normal for {m.normal_streak} consecutive samples"
            if m.state == "awaiting_approval" and self._keep_open(m, now):
                out.append(Transition("", copy.deepcopy(m)))
                return out
            if m.state == "awaiting_approval":
                waiting = f"playbook {m.playbook} was not run" if m.playbook else "nothing ran"
                m.reason = f"{CLEARED}: {normal}; {waiting}"
                # Listings name a playbook only where it ran.
                m.playbook, m.risk = None, None
                m.held_back = {"setting": "missions.resolve_after",
                               "reason": f"{CLEARED}: no playbook ran, nothing to learn"}
            elif m.state in ("verifying", "interrupted"):
                began = m.verify_started if m.verify_started is not None else now
                first = m.normal_since if m.normal_since is not None else now
                passed = (f"{detector} normal {max(0.0, first - began):.3g} s after the "
                          f"steps, then for {m.normal_streak} consecutive samples")
                if m.verify_until is not None and now > m.verify_until:
                    passed += (f" (confirmed {now - m.verify_until:.3g} s past "
                               "verify_timeout: the first normal sample came within it)")
                m.verification = {
                    "result": "passed", "at": now, "after_s": round(now - began, 3),
                    "normal_after_s": round(max(0.0, first - began), 3), "detail": passed}
            if m.state != "awaiting_approval":
                m.reason = normal
            self._move(m, "resolved", now, m.reason or normal)
            m.closed_at = now
            del self.active[key]
            self.incidents.pop(key, None)
            # Flapping is measured from a mission that resolved by itself while graced
            # watched; one that cleared while it waited for a person is no flap: if it
            # comes back it must be approvable again, not escalated.
            if not ran(m) and not (m.reason or "").startswith(CLEARED):
                self.last_resolved[key] = now
            elif (m.reason or "").startswith(CLEARED):
                self.cleared[key] = [*self._recent_clears(key, now), now][-CLEARED_REPEATS:]
            out.append(Transition("mission.resolved", copy.deepcopy(m)))
        else:
            out.append(Transition("", copy.deepcopy(m)))
        return out
