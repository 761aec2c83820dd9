"""Real faults for tests: a memory hog, a slow TCP server, a sleeper process."""

from __future__ import annotations

import socket
import sys
import threading
import time
from pathlib import Path


def memory_hog(megabytes: int) -> None:
    """Allocate and touch ``megabytes`` MB, say 'ready', hold it until stdin closes."""
    block = b"\x01" * (megabytes * 2**20)  # one memset: every page touched at once
    print("ready", flush=True)
    sys.stdin.read()
    del block


def slow_server(port_file: str, delay_file: str) -> None:
    """Answer 'ping' with 'pong' after the delay (seconds) written in ``delay_file``."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    Path(port_file).write_text(str(srv.getsockname()[1]))
    print("ready", flush=True)

    def serve(conn: socket.socket) -> None:
        with conn:
            try:
                conn.recv(64)
                delay = float(Path(delay_file).read_text() or 0)
                time.sleep(delay)
                conn.sendall(b"pong\n")
            except OSError:
                pass

    while True:
        conn, _ = srv.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    if sys.argv[1] == "hog":
        memory_hog(int(sys.argv[2]))
    elif sys.argv[1] == "slow":
        slow_server(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "sleep":
        print("ready", flush=True)
        time.sleep(3600)
