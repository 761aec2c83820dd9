"""For the benchmarks: wait until a graced started with ``stderr=PIPE`` says it serves,
then keep its stderr drained, so a long run's log lines never fill the pipe and block the
daemon (a graced blocked writing to stderr stops journaling and does not exit on SIGTERM:
bench/learning.py stalled for 30 minutes that way)."""

from __future__ import annotations

import subprocess
import threading


def wait_serving(daemon: subprocess.Popen[str]) -> None:
    """Read graced's stderr until it says it serves (its first lines may be warnings or
    learning's), then drain the rest in the background."""
    assert daemon.stderr is not None
    seen = []
    for line in daemon.stderr:
        if "serving on" in line:
            threading.Thread(target=_drain, args=(daemon,), daemon=True).start()
            return
        seen.append(line)
    raise SystemExit("graced did not start:\n" + "".join(seen[-20:]))


def _drain(daemon: subprocess.Popen[str]) -> None:
    assert daemon.stderr is not None
    for _ in daemon.stderr:
        pass
