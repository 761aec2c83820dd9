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
from typing import Any


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


def write_fifo(path: str, data: bytes, timeout: float) -> None:
    """Write ``data`` to the FIFO at ``path`` once a reader opens it (the reader's open is
    the event, e.g. a detector's next sample), then put a fresh FIFO in its place for the
    next reader; AssertionError after ``timeout``."""
    opened: list[int] = []
    opener = threading.Thread(target=lambda: opened.append(os.open(path, os.O_WRONLY)),
                              daemon=True)
    opener.start()  # a blocking open returns when a reader opens the other end
    opener.join(timeout)
    if not opened:
        # Be the reader ourselves, so the blocked open returns and the thread ends.
        os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK))
        opener.join(5)
        for fd in opened:
            os.close(fd)
        raise AssertionError(f"no reader opened {path} within {timeout} s")
    try:
        os.write(opened[0], data)
        # A fresh FIFO takes the name before this reader sees EOF: the next write meets
        # the next open, never this reader (which would read both values as one).
        fresh = f"{path}.next"
        os.mkfifo(fresh)
        os.replace(fresh, path)
    finally:
        os.close(opened[0])


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
