"""What a detector returns (:class:`Observation`) and what it is (:class:`Detector`).

Which class each config ``kind`` builds is in :mod:`graced.detectors.kinds`.

A detector's :meth:`Detector.sample` is blocking (psutil, sockets, subprocesses) and
runs in a worker thread. It returns one :class:`Observation` per subject: the metric's
value, or ``failed`` with a reason when the probe itself failed (refused, timed out).
Whether a value is anomalous is decided by pure code (:mod:`graced.detectors.scoring`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from ..config import DetectorConfig


@dataclass
class Observation:
    """One sample for one subject."""

    subject: str
    value: float | None
    unit: str = ""
    failed: str | None = None  # why the probe failed: itself an anomaly
    alarm: str | None = None  # a kind-specific anomaly decided by the detector (log rates)
    event: str | None = None  # a one-off anomaly, e.g. "restarted (pid 10 -> 12)"
    # No sample this time, and why (a file caught while it is rewritten): neither normal
    # nor anomalous, the subject keeps its last sample; counted in the detector's status.
    skipped: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)


class SimpleDetector:
    """A detector with one subject and nothing to release: the common base."""

    def __init__(self, config: DetectorConfig) -> None:
        self.config = config
        self.subject = config.effective_subject

    def close(self) -> None:
        pass


class Detector(Protocol):
    config: DetectorConfig

    def sample(self) -> list[Observation]:
        """Take one sample; blocking; may raise (reported as detector.error)."""
        ...

    def close(self) -> None: ...

