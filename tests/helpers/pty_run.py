"""Run a command on a real pseudo-terminal of a given size, as a user's terminal is."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import struct
import subprocess
import termios
import time


def run_on_tty(argv: list[str], env: dict[str, str], columns: int = 80, lines: int = 24,
               timeout: float = 30.0) -> tuple[int, str]:
    """(exit status, what the terminal received) for ``argv`` with stdout and stderr on a
    pty of ``columns`` x ``lines`` (stdin is /dev/null). Output keeps its escape sequences;
    the terminal's CRLF is turned back into LF."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", lines, columns, 0, 0))
    env = {k: v for k, v in env.items() if k not in ("COLUMNS", "LINES")}
    env.setdefault("TERM", "xterm-256color")
    proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=slave,
                            stderr=slave, close_fds=True)
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{argv} still running after {timeout} s")
            ready, _, _ = select.select([master], [], [], left)
            if not ready:
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every writer closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        rc = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return rc, b"".join(chunks).decode("utf-8", "replace").replace("\r\n", "\n")
