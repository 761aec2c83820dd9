"""Which detector each config ``kind`` builds: the one place that knows every kind."""

from __future__ import annotations

from typing import Any

from ..config import DetectorConfig
from . import cgroup, host, logs, pressure, probes, process, systemd
from .base import Detector

BUILDERS: dict[str, Any] = {
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
"""kind -> the detector class built from a ``[[detector]]`` table of that kind."""


def build_detector(cfg: DetectorConfig) -> Detector:
    detector: Detector = BUILDERS[cfg.kind](cfg)
    return detector
