"""Reading a subprocess's output as it comes, waiting on what it prints (no sleeps)."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any


class LineCollector:
    """Collects a process's stdout lines in a thread; wait for a condition on them."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self.done = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self.done = True
            self._cond.notify_all()

    def wait_for(self, pred: Callable[[list[str]], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not pred(self.lines):
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.done and not pred(self.lines)):
                    return pred(self.lines)
                self._cond.wait(remaining)
            return True

    def wait_exit(self, timeout: float) -> int:
        rc = self.proc.wait(timeout)
        self._thread.join(timeout)
        return rc

    def events(self) -> list[dict[str, Any]]:
        with self._cond:
            return [json.loads(x) for x in self.lines if x.startswith("{")]

    def max_seq(self) -> int:
        with self._cond:
            for line in reversed(self.lines):
                if line.startswith("{"):
                    return int(json.loads(line)["seq"])
        return 0


def seq_at_least(n: int) -> Callable[[list[str]], bool]:
    def pred(lines: list[str]) -> bool:
        for line in reversed(lines):
            if line.startswith("{"):
                return int(json.loads(line)["seq"]) >= n
        return False
    return pred
