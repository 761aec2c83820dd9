"""Real faults for tests: a memory hog, a slow TCP server, a sleeper process."""

from __future__ import annotations

import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any


def memory_hog(megabytes: int) -> None:
    """Allocate and touch ``megabytes`` MB, say 'ready', hold it until stdin closes."""
    block = b"\x01" * (megabytes * 2**20)  # one memset: every page touched at once
    print("ready", flush=True)
    sys.stdin.read()
    del block


def growing_hog(name: str, megabytes: int) -> None:
    """Call itself ``name`` (what psutil and the process detectors see), say 'ready', then
    grow by 4 MB steps (touched) to ``megabytes`` MB: a runaway; hold it until stdin
    closes or it is killed."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    print("ready", flush=True)
    blocks = []
    for _ in range(megabytes // 4):
        blocks.append(b"\x01" * (4 * 2**20))
        time.sleep(0.02)
    sys.stdin.read()


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


def _listen(port_file: str) -> socket.socket:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    Path(port_file).write_text(str(srv.getsockname()[1]))
    print("ready", flush=True)
    return srv


def _serve_forever(srv: socket.socket, serve: Any) -> None:
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


def drip_server(port_file: str, hits_file: str) -> None:
    """An HTTP endpoint that answers one byte a second, forever (a stalled webhook)."""
    srv = _listen(port_file)

    def serve(conn: socket.socket) -> None:
        with conn:
            try:
                conn.recv(65536)
                with open(hits_file, "a") as fh:
                    fh.write("hit\n")
                for byte in b"HTTP/1.1 200 OK\r\n" * 1000:
                    conn.sendall(bytes([byte]))
                    time.sleep(1)
            except OSError:
                pass

    _serve_forever(srv, serve)


def silent_server(port_file: str) -> None:
    """Accepts connections and never answers (a probe target that hangs)."""
    srv = _listen(port_file)
    held = []
    while True:
        conn, _ = srv.accept()
        held.append(conn)


def trickle_server(port_file: str) -> None:
    """A TCP service that answers each connection one byte every 0.5 s, forever, never the
    expected reply (a peer that would reset a per-recv timeout at every byte)."""
    srv = _listen(port_file)

    def serve(conn: socket.socket) -> None:
        with conn:
            try:
                while True:
                    conn.sendall(b".")
                    time.sleep(0.5)
            except OSError:
                pass

    _serve_forever(srv, serve)


def mute_postgres(port_file: str) -> None:
    """A PostgreSQL server (protocol 3) that lets every client log in, then never answers
    a query: the server-side statement_timeout of the probe cannot help."""
    import struct

    srv = _listen(port_file)

    def read(conn: socket.socket, n: int) -> bytes:
        got = b""
        while len(got) < n:
            chunk = conn.recv(n - len(got))
            if not chunk:
                raise EOFError
            got += chunk
        return got

    def serve(conn: socket.socket) -> None:
        with conn:
            try:
                while True:  # SSL/GSS requests refused, then the startup message
                    (length,) = struct.unpack("!I", read(conn, 4))
                    body = read(conn, length - 4)
                    if struct.unpack("!I", body[:4])[0] not in (80877103, 80877104):
                        break
                    conn.sendall(b"N")
                reply = b"R" + struct.pack("!II", 8, 0)  # AuthenticationOk
                for key, value in ((b"server_version", b"16.0"), (b"client_encoding", b"UTF8"),
                                   (b"standard_conforming_strings", b"on"),
                                   (b"integer_datetimes", b"on"), (b"DateStyle", b"ISO, MDY")):
                    param = key + b"\0" + value + b"\0"
                    reply += b"S" + struct.pack("!I", 4 + len(param)) + param
                reply += b"K" + struct.pack("!III", 12, 1, 2) + b"Z" + struct.pack("!I", 5) + b"I"
                conn.sendall(reply)
                while conn.recv(4096):  # the query, read and never answered
                    pass
            except (OSError, EOFError):
                pass

    _serve_forever(srv, serve)


def http_server(port_file: str, hits_file: str, status: int, location: str) -> None:
    """Answers every request with ``status`` (and ``Location`` if given); each request's
    method and path (and ``auth=`` its Authorization header, if any) are appended to
    ``hits_file``."""
    import http.server

    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(length)
            with open(hits_file, "a") as fh:
                auth = self.headers.get("Authorization")
                fh.write(f"{self.command} {self.path}"
                         + (f" auth={auth}" if auth else "") + "\n")
            self.send_response(status)
            if location:
                self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_POST = _answer  # noqa: N815

        def log_message(self, *args: object) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    Path(port_file).write_text(str(srv.server_address[1]))
    print("ready", flush=True)
    srv.serve_forever()


if __name__ == "__main__":
    if sys.argv[1] == "hog":
        memory_hog(int(sys.argv[2]))
    elif sys.argv[1] == "grow":
        growing_hog(sys.argv[2], int(sys.argv[3]))
    elif sys.argv[1] == "slow":
        slow_server(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "drip":
        drip_server(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "silent":
        silent_server(sys.argv[2])
    elif sys.argv[1] == "trickle":
        trickle_server(sys.argv[2])
    elif sys.argv[1] == "mute_postgres":
        mute_postgres(sys.argv[2])
    elif sys.argv[1] == "http":
        http_server(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
    elif sys.argv[1] == "sleep":
        print("ready", flush=True)
        time.sleep(3600)
