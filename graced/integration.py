"""The health of graced's own components, as signed ``integration.*`` events.

Theory of operation: :func:`snapshot` reads what the components already keep (the
detector runner's status, the executor's notifier tallies and budgets, the journal's
commit figures, the wire's clients) into one plain dict, ``{component: health}``; each
health has a ``kind`` and a ``state`` (``up``, ``starting``, ``failing``, ``error``,
``paused``, ``observe``) plus figures. :func:`changes` compares two snapshots by state
alone (a latency that moves is not a change; it travels in the summary).
:class:`IntegrationMonitor` takes a snapshot every ``poll`` seconds, publishes one
``integration.changed`` per component whose state moved (or that appeared or left), and
an ``integration.summary`` of all of them at start and every ``integration_interval``.
"""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from .config.detectors import PROBES

log = logging.getLogger("graced.integration")

MAX_ERROR = 300  # characters of a last error carried in an event


def _short(text: Any) -> str | None:
    if text is None:
        return None
    text = str(text)
    return text if len(text) <= MAX_ERROR else text[:MAX_ERROR - 1] + "…"


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return round(value, 3) if math.isfinite(value) else None


def detector_health(name: str, st: dict[str, Any]) -> dict[str, Any]:
    """One detector or probe: ``error`` (it raised), ``failing`` (a probe's last sample
    failed: its target fails), ``up`` or ``starting``; its latency when it measures one
    (ms). A detector that is not a probe and sees its anomaly (no process running) is up:
    the mission says it, failure is reserved for what graced cannot see."""
    subjects = st.get("subjects") or {}
    failed = {s: v.get("failed") for s, v in subjects.items() if v.get("failed")}
    state = st.get("state", "starting")
    if state == "up" and failed and st.get("kind") in PROBES:
        state = "failing"
    latency = None
    for v in subjects.values():
        if v.get("unit") == "ms" and _finite(v.get("value")) is not None:
            latency = _finite(v.get("value"))
    last_error = st.get("last_error") if state == "error" else None
    if state == "failing":
        subject, reason = next(iter(sorted(failed.items())))
        last_error = reason if len(subjects) == 1 else f"{subject}: {reason}"
    return {"kind": "detector", "detector_kind": st.get("kind"), "state": state,
            "last_error": _short(last_error), "errors": int(st.get("errors", 0)),
            "latency_ms": latency, "subjects": len(subjects)}


def snapshot(*, detectors: dict[str, dict[str, Any]], notifiers: dict[str, dict[str, Any]],
             journal: dict[str, Any], executor: dict[str, Any],
             wire: dict[str, Any], fleet: dict[str, Any] | None = None
             ) -> dict[str, dict[str, Any]]:
    """Every component's health from the figures each keeps (pure)."""
    out: dict[str, dict[str, Any]] = {}
    for name, st in detectors.items():
        out[f"detector:{name}"] = detector_health(name, st)
    for name, nt in notifiers.items():
        failing = nt.get("last_ok") is False
        out[f"notifier:{name}"] = {
            "kind": "notifier", "state": "failing" if failing else "up",
            "deliveries": int(nt.get("deliveries", 0)), "failures": int(nt.get("failures", 0)),
            "last_error": _short(nt.get("last_error")) if failing else None}
    out["journal"] = {
        "kind": "journal", "state": "failing" if journal.get("failing_since") else "up",
        "commit_latency_ms": _finite(journal.get("commit_latency_ms")),
        "size_bytes": journal.get("size_bytes"), "free_bytes": journal.get("free_bytes"),
        "last_error": _short(journal.get("last_error")) if journal.get("failing_since")
        else None}
    paused = bool(executor.get("paused"))
    out["executor"] = {
        "kind": "executor",
        "state": "paused" if paused else ("observe" if executor.get("mode") == "observe"
                                           else "up"),
        "budget_left": executor.get("budget_left"), "paused": paused,
        "running_steps": executor.get("running_steps", 0), "mode": executor.get("mode")}
    out["wire"] = {"kind": "wire", "state": "up", "clients": wire.get("clients", 0),
                   "unix_clients": wire.get("unix_clients", 0),
                   "tcp_clients": wire.get("tcp_clients", 0),
                   "dropped_total": wire.get("dropped_total", 0),
                   "refused_requests": wire.get("refused_requests", 0)}
    if fleet is not None:  # [fleet]: forwarding to NATS JetStream (graced/fleet/)
        up = bool(fleet.get("connected"))
        alert = fleet.get("alert")  # an event dropped as a copy of a message not sent
        state = "disconnected" if not up else "failing" if alert else "up"
        out["fleet"] = {"kind": "fleet", "state": state,
                        "lag_events": fleet.get("lag_events", 0),
                        "acked_seq": fleet.get("acked_seq"),
                        "refused_duplicates": fleet.get("refused_duplicates", 0),
                        "last_error": None if state == "up"
                        else _short(alert or fleet.get("last_error"))}
    return out


def changes(old: dict[str, dict[str, Any]],
            new: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The ``integration.changed`` payloads from one snapshot to the next (pure): a
    component whose state moved, or which appeared (``was`` null) or left (``state``
    ``removed``)."""
    out = []
    for name in sorted(new):
        was = old.get(name, {}).get("state")
        if was != new[name]["state"]:
            out.append({"component": name, "was": was, **new[name]})
    for name in sorted(set(old) - set(new)):
        out.append({"component": name, "was": old[name]["state"],
                    "kind": old[name]["kind"], "state": "removed"})
    return out


class IntegrationMonitor:
    """Publishes ``integration.*``; :meth:`run` never returns unless cancelled.

    ``read`` gives the components' figures as :func:`snapshot`'s keyword arguments;
    ``interval`` (read on every round, a reload may change it) is the summary's period.
    """

    def __init__(self, read: Callable[[], dict[str, Any]], publish: Callable[[str, Any], None],
                 interval: Callable[[], float], poll: float = 1.0) -> None:
        self.read = read
        self.publish = publish
        self.interval = interval
        self.poll = poll
        self.current: dict[str, dict[str, Any]] = {}

    def take(self) -> dict[str, dict[str, Any]]:
        return snapshot(**self.read())

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        last_summary = -math.inf
        task_status.started()
        while True:
            try:
                new = self.take()
                if self.current:  # the first round is summarised, not a change
                    for change in changes(self.current, new):
                        self.publish("integration.changed", change)
                self.current.clear()
                self.current.update(new)
                now = trio.current_time()
                if now >= last_summary + self.interval():
                    self.publish("integration.summary", {
                        "components": new, "interval": self.interval()})
                    last_summary = now
            except Exception:  # noqa: BLE001 - health reporting never stops graced
                log.exception("integration health not published")
            await trio.sleep(self.poll)


def free_bytes(path: Path) -> int | None:
    """Free bytes on the file system holding ``path`` (for the journal), or None."""
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def budget_left(executor_status: dict[str, Any]) -> int:
    """Actions graced may still start this hour (the global budget)."""
    return max(0, int(executor_status.get("max_actions_per_hour", 0))
               - int(executor_status.get("actions_last_hour", 0)))
