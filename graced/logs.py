"""graced's own log: the level, and one line per mission transition that matters.

An operator reading ``journalctl -u graced`` (or the terminal) sees the remediation story:
a mission opened, awaiting approval, approved or rejected by whom, executing which
playbook, and how it ended (resolved, failed, escalated, rejected, expired; failed and
escalated at warning). Subjects, summaries and reasons are monitored or client data:
escaped and bounded. Libraries (trio-websocket logs every frame at debug) log warnings
and worse only, unless ``GRACED_LOG_LIBRARIES`` names a lower level.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from .protocol.text import safe

if TYPE_CHECKING:
    from .missions.engine import Mission

log = logging.getLogger("graced.missions")

FIELD = 200  # characters of one monitored string in a log line
# Transitions worth a line, and their level; the rest (updated, verifying) stay quiet.
LEVELS = {"opened": logging.INFO, "awaiting_approval": logging.INFO,
          "approved": logging.INFO, "rejected": logging.INFO, "executing": logging.INFO,
          "resolved": logging.INFO, "expired": logging.INFO, "interrupted": logging.WARNING,
          "failed": logging.WARNING, "escalated": logging.WARNING}


def set_level(level: str) -> None:
    """graced's loggers at ``level``; other libraries at warning unless asked."""
    logging.getLogger("graced").setLevel(level.upper())
    libraries = os.environ.get("GRACED_LOG_LIBRARIES", "").upper()
    root = logging.getLogger()
    root.setLevel(libraries if libraries in logging.getLevelNamesMapping() else "WARNING")


def transition(topic: str, m: Mission) -> None:
    """Log the mission transition ``topic`` (``mission.<state>``) if it matters."""
    state = topic.removeprefix("mission.")
    level = LEVELS.get(state)
    if level is None or not log.isEnabledFor(level):
        return
    if state == "opened":
        # A summary names its detector and subject already ("web nginx: 0 process(es)..."):
        # said once (review of #19, newcomer 5).
        named = f"{m.detector} {m.subject}"
        said = m.summary if m.summary.startswith(named) else f"{named}: {m.summary}"
        what = f"({m.severity}{', flapping' if m.flapping else ''}) {safe(said, 3 * FIELD)}"
    elif state == "awaiting_approval":
        what = f"playbook {safe(m.playbook, FIELD)} (risk {m.risk}) needs an approval"
    elif state == "executing":
        what = f"playbook {safe(m.playbook, FIELD)}"
    else:
        what = safe(m.reason or "-", FIELD)
    if state == "escalated":
        state += " (needs a person)"
    log.log(level, "mission %d %s: %s", m.id, state.replace("_", " "), what)
