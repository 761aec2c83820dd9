"""Process detectors: presence and count (and restarts), and resident memory."""

from __future__ import annotations

import psutil

from ..config import DetectorConfig
from .base import Observation, SimpleDetector


def _matching(cfg: DetectorConfig) -> list[psutil.Process]:
    found = []
    me = psutil.Process().pid
    for proc in psutil.process_iter(["name", "cmdline"]):
        if proc.pid == me:
            continue
        try:
            if cfg.match_cmdline:
                hit = cfg.process in " ".join(proc.info["cmdline"] or [])
            else:
                hit = proc.info["name"] == cfg.process
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if hit:
            found.append(proc)
    return found


class ProcessPresence(SimpleDetector):
    """Value: how many processes match. Fewer than min_count, or a pid change, is an anomaly."""

    def __init__(self, config: DetectorConfig) -> None:
        super().__init__(config)
        self._pids: set[int] | None = None

    def sample(self) -> list[Observation]:
        procs = _matching(self.config)
        pids = {p.pid for p in procs}
        obs = Observation(self.subject, float(len(pids)), "processes",
                          detail={"pids": sorted(pids)[:20]})
        if len(pids) < self.config.min_count:
            obs.failed = (f"{len(pids)} process(es) named {self.config.process!r} running, "
                          f"expected at least {self.config.min_count}")
        elif self._pids is not None and self._pids and pids and not (pids & self._pids):
            obs.event = (f"{self.config.process} restarted (pid {min(self._pids)} -> "
                         f"{min(pids)})")
        self._pids = pids
        return [obs]


class ProcessRss(SimpleDetector):
    """Value: total resident memory of the matching processes, in MB."""

    def sample(self) -> list[Observation]:
        total = 0
        count = 0
        for proc in _matching(self.config):
            try:
                total += proc.memory_info().rss
                count += 1
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        if not count:
            return [Observation(self.subject, None,
                                failed=f"no process named {self.config.process!r} running")]
        return [Observation(self.subject, round(total / 2**20, 1), "MB",
                            detail={"processes": count})]
