"""What a detector returns, and how a config table becomes a detector.

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


def build_detector(cfg: DetectorConfig) -> Detector:
    from . import cgroup, host, logs, pressure, probes, process, systemd

    builders: dict[str, Any] = {
        "memory": host.Memory, "swap": host.Swap, "cpu": host.Cpu, "load": host.Load,
        "disk": host.Disk, "inodes": host.Inodes, "process": process.ProcessPresence,
        "process_rss": process.ProcessRss, "tcp": probes.TcpProbe,
        "sqlite": probes.SqliteProbe, "postgres": probes.PostgresProbe,
        "command": probes.CommandProbe,
        "http": probes.HttpProbe, "log": logs.LogFile, "journald": logs.Journald,
        "value": host.FileValue, "systemd": systemd.FailedUnits,
        "psi_memory": pressure.Pressure, "psi_cpu": pressure.Pressure,
        "psi_io": pressure.Pressure, "cgroup_memory": cgroup.CgroupMemory,
    }
    detector: Detector = builders[cfg.kind](cfg)
    return detector
