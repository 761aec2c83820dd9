"""Reading a subprocess's output as it comes, waiting on what it prints (no sleeps)."""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest


class Waited:
    """A wait that did not see its condition: false, and its repr tells what was seen
    (the last lines, and how the process ended if it did)."""

    def __init__(self, collector: LineCollector, timeout: float) -> None:
        proc = collector.proc
        self.text = f"not seen within {timeout:g} s; {len(collector.lines)} line(s)"
        if collector.lines:
            self.text += ", the last: " + " | ".join(x[:300] for x in collector.lines[-5:])
        rc = proc.poll()
        if rc is not None:
            self.text += f"; the process ended with {rc}"
            if proc.stderr is not None and not proc.stderr.closed:
                try:
                    os.set_blocking(proc.stderr.fileno(), False)
                    err = proc.stderr.read(2000)
                except (OSError, ValueError, TypeError):
                    err = None
                if err:
                    self.text += f", stderr: {err.strip()}"
        else:
            self.text += "; the process is still running"

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return self.text


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

    def wait_for(self, pred: Callable[[list[str]], bool], timeout: float) -> bool | Waited:
        """True once ``pred(lines)`` holds; else (timed out, or the output ended) a false
        value whose repr says what was seen, so a failed ``assert`` shows it."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not pred(self.lines):
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.done and not pred(self.lines)):
                    return pred(self.lines) or Waited(self, timeout)
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


def read_fifo(path: str, timeout: float) -> bytes:
    """Wait for a writer to write to the FIFO at ``path`` and return what it wrote.

    The FIFO is the event: a playbook step or a detector's sample that opens it blocks
    until this side reads (or, if this side opened first, is read at once). Raises
    AssertionError when nothing was written within ``timeout``.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        chunks: list[bytes] = []
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not poller.poll(remaining * 1000):
                raise AssertionError(f"nothing written to {path} within {timeout} s")
            data = os.read(fd, 4096)
            if not data:  # the writer closed: all of it is here
                return b"".join(chunks)
            chunks.append(data)
    finally:
        os.close(fd)


class ValueFeed:
    """A value file fed one value per sample of a real graced's ``value`` detector: the
    detector's read is the event. Each value is put in place by a rename with its access
    time set to 0, so the read that takes it sets it (relatime updates the access time of
    a file read after it was written); once seen, it is set to 0 again, so a second read
    of the same value is seen too and fails the test (it would be a sample the test did
    not mean). A value file must be a regular file (graced refuses a FIFO)."""

    def __init__(self, path: Path, first: bytes) -> None:
        self.path = path
        probe = path.with_name(path.name + ".atime")
        probe.write_text("1\n")
        os.utime(probe, ns=(0, time.time_ns()))
        probe.read_text()
        recorded = os.stat(probe).st_atime_ns != 0
        probe.unlink()
        if not recorded:
            pytest.skip(f"the file system of {path} records no access times (noatime): a "
                        "test cannot see when graced read a value")
        self._put(first)

    def _put(self, data: bytes) -> None:
        fresh = self.path.with_name(self.path.name + ".next")
        fresh.write_bytes(data)
        os.utime(fresh, ns=(0, time.time_ns()))
        os.replace(fresh, self.path)
        self.pending = True

    def wait_read(self, timeout: float) -> None:
        """Until a sample read the value in place; AssertionError after ``timeout``."""
        deadline = time.monotonic() + timeout
        while (st := os.stat(self.path)).st_atime_ns == 0:
            if time.monotonic() > deadline:
                raise AssertionError(f"no sample read {self.path} within {timeout} s")
            time.sleep(0.001)
        os.utime(self.path, ns=(0, st.st_mtime_ns))
        self.pending = False

    def rearm(self) -> None:
        """The value in place is to be read once more (by a graced started again)."""
        os.utime(self.path, ns=(0, os.stat(self.path).st_mtime_ns))
        self.pending = True

    def feed(self, data: bytes, timeout: float = 10) -> None:
        """Once the value in place was read (once), put ``data`` in its place."""
        if self.pending:
            self.wait_read(timeout)
        if os.stat(self.path).st_atime_ns != 0:
            raise AssertionError(f"{self.path}: a value was sampled twice (the test was "
                                 "slower than the detector's interval)")
        self._put(data)


def poll_until(pred: Callable[[], bool], timeout: float, what: str,
               pause: float = 0.1) -> None:
    """For a state that no event announces (a descriptor count): read it until ``pred``
    holds, pausing between reads so the test never spins a core; AssertionError after
    ``timeout``, naming ``what``."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(pause)


class TcpService:
    """A real TCP service on loopback for a probe to reach: a thread accepts each
    connection and closes it, as a service answers, until :meth:`close` (then the port
    refuses); open another on the same port to bring it back.

    It must accept: a socket that only listens holds its backlog's worth of connections,
    and once that is full the kernel drops further SYNs, so a probe times out instead of
    connecting (CI, session 10: a page that took 6 s to load saw the probe time out)."""

    def __init__(self, port: int = 0) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(64)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # shut down by close()
                return
            conn.close()

    def getsockname(self) -> tuple[str, int]:
        return self.sock.getsockname()  # type: ignore[no-any-return]

    def close(self) -> None:
        """Stop listening: connections are refused from now on."""
        try:
            # Wakes the thread's accept() (closing alone would not: the blocked call
            # holds the socket open, still listening).
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._thread.join(5)
        self.sock.close()


def tcp_listener(port: int = 0) -> TcpService:
    """A :class:`TcpService` on ``port`` (0: any free port)."""
    return TcpService(port)
