"""What a probe's failure says: the peer's answer as text, escaped as graced escapes the
monitored world (review of #16: the tcp probe showed Python's bytes repr)."""

from __future__ import annotations

import socket
import threading

from graced.config import DetectorConfig
from graced.detectors.probes import TcpProbe


def _server(answer: bytes) -> tuple[socket.socket, int]:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                conn.recv(100)
                conn.sendall(answer)

    threading.Thread(target=serve, daemon=True).start()
    return srv, srv.getsockname()[1]


def test_an_unexpected_tcp_answer_is_shown_as_escaped_text() -> None:
    srv, port = _server("-ERR loading été \x1b[31mred\r\n".encode())
    try:
        probe = TcpProbe(DetectorConfig(name="redis", kind="tcp", host="127.0.0.1",
                                        port=port, send="PING\\r\\n", expect="+PONG",
                                        timeout=5.0))
        (obs,) = probe.sample()
    finally:
        srv.close()
    assert obs.value is None
    assert obs.failed == (f'127.0.0.1:{port} answered "-ERR loading été \\e[31mred\\r\\n", '
                          'expected "+PONG"'), obs.failed


def test_a_long_answer_is_cut_and_says_so() -> None:
    srv, port = _server(b"x" * 500 + b"\n")
    try:
        probe = TcpProbe(DetectorConfig(name="t", kind="tcp", host="127.0.0.1", port=port,
                                        send="hi", expect="ok", timeout=5.0))
        (obs,) = probe.sample()
    finally:
        srv.close()
    assert obs.failed == f'127.0.0.1:{port} answered "{"x" * 60}"…, expected "ok"', obs.failed
