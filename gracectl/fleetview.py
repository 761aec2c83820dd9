"""The fleet as read from JetStream, host by host (sans-IO: messages in, reports out).

Every message on ``grace.<daemon-id>.>`` should be one signed event of that daemon, filed
under the subject its topic maps to. :class:`FleetView` sorts each host's events by seq
(JetStream's arrival order is not the chain: a reconnect may store a batch late), drops
byte-identical copies of one event (counted: a copy proves nothing new, and the message
id keeps them out in the common case), and feeds them to a
:class:`~graced.protocol.ChainVerifier` with the key pinned for that host. The first
violation of a host stops verifying that host and is reported for it; the other hosts go
on. A host with no pinned key is shown, but reported as unverified.

A message that cannot be that host's event where it was found (unparsable, filed under
another topic's subject, or, with a key pinned, not signed by that key) is rejected:
anyone on NATS can publish one, so it is counted and the first is reported for the host,
but it never stops the host's verified events from being read (one injected message must
not blind the view to a host).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from graced.protocol import ChainVerifier, ExitCode, Violation, parse_event_line
from graced.protocol import fleet as names
from graced.protocol.signing import verify_detached
from graced.protocol.verify import announced_interval, stale_limit

MAX_HOST_MESSAGES = 2_000_000  # held per host, at most, before verification
MAX_HOST_BYTES = 256 << 20  # their bytes, at most ([fleet] max_bytes_per_host's default)
MAX_HOSTS = 10_000  # hosts, at most: messages of any further daemon id count as foreign
# Held by all the hosts with no key pinned together (anyone on NATS can make those up): a
# host with no key pinned that would go over it fails.
MAX_UNPINNED_BYTES = 512 << 20


@dataclass
class HostView:
    """What the fleet knows of one host."""

    daemon_id: str
    key: bytes | None = None
    host: str = "?"
    kid: str | None = None
    version: str | None = None
    first_seq: int | None = None
    last_seq: int | None = None
    events: int = 0
    copies: int = 0
    last_ts: float | None = None
    last_heartbeat: float | None = None
    heartbeat_interval: float | None = None
    fleet_lag: int | None = None
    open_reported: int | None = None  # open missions, as its last heartbeat said
    held_bytes: int = 0  # the bytes of the messages held in pending
    held: int = 0  # and their number
    stopped: bool = False
    missions: dict[int, dict[str, Any]] = field(default_factory=dict)
    violation: Violation | None = None
    rejected: int = 0  # messages on its subjects that are not its events (injected)
    rejection: Violation | None = None  # the first of them
    verifier: ChainVerifier | None = None
    # seq -> (bytes, event, when it arrived), until settle() orders it
    pending: dict[int, list[tuple[bytes, dict[str, Any], float]]] = field(default_factory=dict)

    @property
    def verified(self) -> str:
        if self.violation is not None:
            return f"FAILED at seq {self.violation.seq}: {self.violation}"
        if self.key is None:
            return "unverified: no key pinned for this host (gracectl fleet trust HOST)"
        if self.first_seq is not None and self.first_seq > 1:
            return (f"partial: verified from seq {self.first_seq}; the stream no longer holds "
                    "the events before it (purged or expired)")
        return "ok" if self.events else "no events"

    @property
    def rejected_note(self) -> str:
        if self.rejection is None:
            return ""
        return (f"{self.rejected} injected message{'s' if self.rejected != 1 else ''} "
                f"rejected (first: {self.rejection})")

    def state(self, now: float) -> str:
        """failed (its chain did not verify), unknown (no verified heartbeat: its
        liveness is not known), stopped, STALE or up."""
        if self.violation is not None:
            return "FAILED"
        if self.stopped:
            return "stopped"
        if self.last_heartbeat is None:
            return "unknown"
        return "STALE" if self.stale(now) else "up"

    def silent_for(self, now: float) -> float | None:
        return None if self.last_heartbeat is None else max(0.0, now - self.last_heartbeat)

    def stale(self, now: float) -> bool:
        silent = self.silent_for(now)
        limit = stale_limit(self.heartbeat_interval or 5.0)
        return not self.stopped and silent is not None and silent > limit

    def open_missions(self) -> dict[str, int]:
        """The active missions by severity, as the host's status counts them (and its
        heartbeat's open_missions): an escalated one is not among them."""
        out: dict[str, int] = {}
        for m in self.missions.values():
            if m.get("state") in ACTIVE:
                sev = str(m.get("severity"))
                out[sev] = out.get(sev, 0) + 1
        return out

    def escalated(self) -> list[int]:
        """The escalated missions that need a person (the host's status "escalated")."""
        return self.waiting("escalated")

    def waiting(self, state: str) -> list[int]:
        """The missions closed as ``state`` (escalated, expired) that need a person."""
        return sorted(i for i, m in self.missions.items()
                      if needs_person(m) and m.get("state") == state)

    def public(self, now: float) -> dict[str, Any]:
        return {
            "daemon_id": self.daemon_id, "host": self.host, "kid": self.kid,
            "version": self.version, "first_seq": self.first_seq, "last_seq": self.last_seq,
            "events": self.events, "copies": self.copies, "last_heartbeat": self.last_heartbeat,
            "silent_for": self.silent_for(now), "stale": self.stale(now),
            "stopped": self.stopped, "forwarding_lag": self.fleet_lag,
            "open_missions": self.open_missions(), "open_missions_reported": self.open_reported,
            "escalated": self.escalated(), "expired": self.waiting("expired"),
            "verified": self.verified, "state": self.state(now),
            "rejected": self.rejected,
            "rejection": None if self.rejection is None else {
                "code": int(self.rejection.code), "kind": self.rejection.kind,
                "seq": self.rejection.seq, "reason": self.rejection.reason},
            "violation": None if self.violation is None else {
                "code": int(self.violation.code), "kind": self.violation.kind,
                "seq": self.violation.seq, "reason": str(self.violation)},
        }


SEVERITY_RANK = {"critical": 0, "high": 1, "medium": 2, "low": 3}  # most severe first
# The host's active states (graced.missions.engine.ACTIVE): interrupted is one (graced
# restarted while its playbook ran: it is watched until it resolves or fails).
ACTIVE = ("detected", "open", "awaiting_approval", "approved", "executing", "verifying",
          "interrupted")


# Closed as these, a mission needs a person while the host holds its symptom (not seen
# normal since): escalated, or expired with nobody deciding (the host's status lists both).
PERSON_STATES = ("escalated", "expired")


def needs_person(m: dict[str, Any]) -> bool:
    """An escalated or expired mission whose symptom the host has not seen normal since."""
    return m.get("state") in PERSON_STATES and bool(m.get("needs_person"))


def in_view(m: dict[str, Any]) -> bool:
    """In the host's default missions ls: active, or escalated or expired and needing a
    person."""
    return m.get("state") in ACTIVE or needs_person(m)


class FleetView:
    """Hosts built from forwarded messages; :meth:`add` them, then :meth:`settle`."""

    def __init__(self, keys: dict[str, bytes | None], clock: Any = time.time,
                 require_keys: bool = False, first_seq: int | None = None) -> None:
        self.first_seq = first_seq  # the seq each host's chain must start at (1: genesis)
        self.keys = keys  # daemon id -> pinned key (None: unverified)
        self.require_keys = require_keys  # a host with no pinned key fails at once
        self.hosts: dict[str, HostView] = {}
        self.foreign = 0  # messages on subjects that name no daemon
        self.unpinned_bytes = 0  # held for hosts with no key pinned, all together
        self.clock = clock

    def host(self, daemon_id: str) -> HostView:
        view = self.hosts.get(daemon_id)
        if view is None:
            if len(self.hosts) >= MAX_HOSTS:
                raise LookupError(daemon_id)
            view = self.hosts[daemon_id] = HostView(daemon_id, key=self.keys.get(daemon_id))
            if view.key is not None:
                view.verifier = ChainVerifier(view.key, first_seq=self.first_seq)
            elif self.require_keys:
                view.violation = Violation(ExitCode.BAD_SIGNATURE, None,
                                           "no key pinned for this host (gracectl fleet "
                                           "trust HOST)")
        return view

    def add(self, subject: str, data: bytes) -> None:
        """Take one message; held until :meth:`settle` orders it among its host's."""
        daemon_id = names.daemon_of(subject)
        try:
            view = self.host(daemon_id) if daemon_id is not None else None
        except LookupError:
            view = None
        if view is None:
            self.foreign += 1
            return
        if view.violation is not None:
            return
        unpinned = view.key is None
        if view.held_bytes + len(data) > MAX_HOST_BYTES or view.held >= MAX_HOST_MESSAGES \
                or (unpinned and self.unpinned_bytes + len(data) > MAX_UNPINNED_BYTES):
            # Unbounded memory for one host's flood: that host fails, the view goes on.
            view.violation = Violation(ExitCode.CHAIN_BROKEN, None, (
                f"more than {MAX_HOST_MESSAGES} messages or {MAX_HOST_BYTES >> 20} MiB held "
                "for this host before verification (or, with no key pinned, more than "
                f"{MAX_UNPINNED_BYTES >> 20} MiB for all such hosts): not read further"))
            self._release(view)
            return
        try:
            event, signing = parse_event_line(data)
        except Violation as exc:
            self._reject(view, Violation(exc.code, exc.seq, f"unparsable message on "
                                         f"{subject}: {exc}"))
            return
        if names.subject_for(view.daemon_id, event["topic"]) != subject:
            self._reject(view, Violation(ExitCode.CHAIN_BROKEN, event["seq"], (
                f"event of topic {event['topic']!r} filed under subject {subject!r}")))
            return
        if view.verifier is not None:
            if event["kid"] != view.verifier.kid:
                self._reject(view, Violation(ExitCode.BAD_SIGNATURE, event["seq"], (
                    f"forged (unknown key {event['kid']}; the pinned key is "
                    f"{view.verifier.kid})")))
                return
            if not verify_detached(event["sig"], signing, view.verifier.public_key):
                self._reject(view, Violation(ExitCode.BAD_SIGNATURE, event["seq"],
                                             "forged (bad signature)"))
                return
        bucket = view.pending.setdefault(event["seq"], [])
        if any(raw == data for raw, _, _ in bucket):
            view.copies += 1
            return
        bucket.append((data, event, self.clock()))
        view.held_bytes += len(data)
        view.held += 1
        if unpinned:
            self.unpinned_bytes += len(data)

    def settle(self, *, hold: float = 0.0) -> list[tuple[HostView, dict[str, Any]]]:
        """Verify and apply the held events, in seq order per host; returns the events
        that passed, in that order. With ``hold`` > 0 (a live view), an event after a gap
        waits up to that many seconds for the missing ones (a batch stored late)."""
        out: list[tuple[HostView, dict[str, Any]]] = []
        now = self.clock()
        for view in self.hosts.values():
            for seq in sorted(view.pending):
                if view.violation is not None:
                    break
                items = view.pending[seq]
                gap = view.last_seq is not None and seq > view.last_seq + 1
                if hold and gap and now - items[0][2] < hold:
                    break
                del view.pending[seq]
                size = sum(len(data) for data, _, _ in items)
                view.held_bytes -= size
                view.held -= len(items)
                if view.key is None:
                    self.unpinned_bytes -= size
                for data, event, _ in items:
                    if not self._check(view, data, now):
                        break
                    self._apply(view, event)
                    out.append((view, event))
            if view.violation is not None:
                self._release(view)
        return out

    @staticmethod
    def _reject(view: HostView, why: Violation) -> None:
        """A message on the host's subjects that is not its event: counted, the first
        kept to report; the host's verified events go on."""
        view.rejected += 1
        if view.rejection is None:
            view.rejection = why

    def _release(self, view: HostView) -> None:
        """Drop what is held for a host that failed."""
        if view.key is None:
            self.unpinned_bytes -= view.held_bytes
        view.pending.clear()
        view.held_bytes = view.held = 0

    def _check(self, view: HostView, data: bytes, now: float) -> bool:
        if view.verifier is None:
            return True
        try:
            view.verifier.feed_line(data, now)
        except Violation as exc:
            view.violation = exc
            return False
        return True

    def finish(self) -> None:
        """No more messages: a bad signature held for the next event is reported."""
        for view in self.hosts.values():
            if view.verifier is not None and view.violation is None:
                try:
                    view.verifier.flush()
                except Violation as exc:
                    view.violation = exc

    @staticmethod
    def _apply(view: HostView, event: dict[str, Any]) -> None:
        seq, topic, payload = event["seq"], event["topic"], event["payload"]
        view.events += 1
        view.first_seq = seq if view.first_seq is None else min(view.first_seq, seq)
        view.last_seq = seq if view.last_seq is None else max(view.last_seq, seq)
        view.last_ts = event_time(event)
        view.kid = event["kid"]
        view.stopped = topic == "daemon.stopping"
        if not isinstance(payload, dict):
            return
        if topic == "daemon.started":
            view.host = str(payload.get("host", "?"))[:200]
            view.version = str(payload.get("version", ""))[:40]
        elif topic == "daemon.heartbeat":
            # Its host name and open missions, signed in every heartbeat (graced with
            # [fleet]): known even where the stream lost daemon.started and mission.*.
            if isinstance(payload.get("host"), str):
                view.host = payload["host"][:200]
            n = payload.get("open_missions")
            view.open_reported = n if isinstance(n, int) and not isinstance(n, bool) \
                else view.open_reported
            view.last_heartbeat = event_time(event)
            for state in PERSON_STATES:
                held = payload.get(state)
                if isinstance(held, list):
                    # The host's word on which still need a person: the others' symptom
                    # was seen normal (or their detector left the config) whatever events
                    # the stream lost.
                    for mid, m in view.missions.items():
                        if needs_person(m) and m.get("state") == state and mid not in held:
                            m["needs_person"] = False
            view.heartbeat_interval = announced_interval(event) or view.heartbeat_interval
            lag = payload.get("fleet_lag")
            view.fleet_lag = lag if isinstance(lag, int) else None
        elif topic == "detector.recovered":
            # Its first normal sample releases an escalated (expired) mission of that
            # detector and
            # subject on the host: it no longer needs a person (missions ls, status).
            for m in view.missions.values():
                if needs_person(m) and m.get("detector") == payload.get("detector") \
                        and m.get("subject") == payload.get("subject"):
                    m["needs_person"] = False
        elif topic.startswith("mission.") and isinstance(payload.get("id"), int) \
                and "state" in payload:
            view.missions[payload["id"]] = {**payload, "updated_at": event_time(event),
                                            "needs_person": payload["state"] in PERSON_STATES}


def event_time(event: dict[str, Any]) -> float:
    """An event's time (0 when it has none)."""
    from graced.protocol import parse_ts

    try:
        return parse_ts(str(event["ts"]))
    except (KeyError, ValueError):
        return 0.0


def resolve_host(hosts: dict[str, HostView], name: str) -> HostView:
    """A host by daemon id, unique id prefix, or host name; raises LookupError."""
    if name in hosts:
        return hosts[name]
    found = [h for h in hosts.values() if h.host == name or h.daemon_id.startswith(name)]
    if len(found) == 1:
        return found[0]
    if not found:
        raise LookupError(f"no host {name!r} in the fleet")
    raise LookupError(f"{name!r} names {len(found)} hosts: "
                      + ", ".join(f"{h.host} ({h.daemon_id})" for h in found[:5]))


def dumps(data: Any) -> str:
    """``fleet ... --json`` output: times as ISO 8601 UTC, as every --json output."""
    from graced.protocol.times import iso_times

    # ASCII: no raw C1 or bidi controls
    return json.dumps(iso_times(data), indent=2, sort_keys=True)
