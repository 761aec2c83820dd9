"""Probes: TCP connect (and optional request/response), SQLite and PostgreSQL queries,
command, HTTP GET.

Each measures latency in milliseconds; a probe that fails (refused, timed out, bad
status or exit code) reports ``failed`` with the reason, which is itself an anomaly.
"""

from __future__ import annotations

import math
import os
import socket
import sqlite3
import subprocess
import threading
import time
from typing import Any

from .. import httpc
from ..config import DetectorConfig
from ..errors import install_extra
from ..protocol.text import safe
from ..redact import redact_text, redact_url
from .base import Observation, SimpleDetector


def _elapsed_ms(started: float) -> float:
    """Milliseconds since ``started`` (a perf_counter reading), to the microsecond."""
    return round((time.perf_counter() - started) * 1000, 3)


ANSWER_SHOWN = 60
"""Bytes of a tcp probe's unexpected answer shown in its failure."""


class TcpProbe(SimpleDetector):
    def sample(self) -> list[Observation]:
        cfg = self.config
        started = time.perf_counter()
        try:
            with socket.create_connection((cfg.host, cfg.port), timeout=cfg.timeout) as sock:
                if cfg.send:
                    sock.sendall(cfg.send.encode().decode("unicode_escape").encode())
                if cfg.expect or cfg.send:
                    got = b""
                    want = cfg.expect.encode()
                    while not got or (want and want not in got):
                        # One deadline for the whole answer: a peer dripping a byte at a
                        # time gets no fresh timeout per recv.
                        left = cfg.timeout - (time.perf_counter() - started)
                        if left <= 0:
                            raise TimeoutError
                        sock.settimeout(left)
                        chunk = sock.recv(4096)
                        if not chunk:
                            break
                        got += chunk
                        if len(got) > 65536:
                            break
                    if want and want not in got:
                        # The answer is the peer's: text, escaped as graced escapes what
                        # the monitored world says (not Python's bytes repr).
                        answer = safe(got[:ANSWER_SHOWN].decode("utf-8", "replace"))
                        more = "…" if len(got) > ANSWER_SHOWN else ""
                        return [Observation(self.subject, None, failed=(
                            f'{cfg.host}:{cfg.port} answered "{answer}"{more}, expected '
                            f'"{safe(cfg.expect)}"'))]
        except TimeoutError:
            return [Observation(self.subject, None,
                                failed=f"{cfg.host}:{cfg.port} timed out after {cfg.timeout:g} s")]
        except OSError as exc:
            return [Observation(self.subject, None,
                                failed=f"{cfg.host}:{cfg.port}: {exc.strerror or exc}")]
        return [Observation(self.subject, _elapsed_ms(started), "ms")]


class _Deadline:
    """Shuts a socket down (both ways) once ``seconds`` pass, unless cancelled first: a
    client-side deadline for a library whose blocking calls have none. The socket is
    shut, not closed, so its descriptor stays the library's to close."""

    def __init__(self, fd: int, seconds: float) -> None:
        self.fired = False
        self._fd = fd
        self._lock = threading.Lock()
        self._done = False
        self._timer = threading.Timer(max(0.0, seconds), self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _fire(self) -> None:
        with self._lock:
            if self._done:
                return
            self.fired = True
            try:
                with socket.socket(fileno=os.dup(self._fd)) as sock:
                    sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cancel(self) -> None:
        with self._lock:
            self._done = True
        self._timer.cancel()


class PostgresProbe(SimpleDetector):
    """The latency of a real query on a PostgreSQL server (psycopg 3: the ``postgres`` extra).

    One connection is kept between samples and opened again after an error; the server
    cancels a query past ``timeout`` (statement_timeout), so a lock or a slow plan is a
    failed probe, not a stuck one. A server that does not answer at all (statement_timeout
    is its own) meets graced's deadline: ``timeout`` plus ``GRACE_S`` after the sample began,
    the connection's socket is shut down and the probe fails. The latency includes a
    reconnection when there was one.
    """

    GRACE_S = 1.0  # past timeout, for the server's own cancellation to arrive first
    MAX_ROWS = 1000  # rows of the answer read; the rest is cancelled

    def __init__(self, config: DetectorConfig) -> None:
        super().__init__(config)
        try:
            import psycopg
        except ImportError:
            raise RuntimeError("the postgres detector needs psycopg 3: "
                               + install_extra("postgres")) from None
        self.psycopg: Any = psycopg
        self.conn: Any = None

    def _connect(self) -> Any:
        cfg = self.config
        return self.psycopg.connect(
            cfg.dsn, autocommit=True, connect_timeout=max(1, math.ceil(cfg.timeout)),
            options=f"-c statement_timeout={max(1, int(cfg.timeout * 1000))}",
            application_name="graced")

    def sample(self) -> list[Observation]:
        cfg = self.config
        started = time.perf_counter()
        guard: _Deadline | None = None
        try:
            if self.conn is None or self.conn.closed:
                self.conn = self._connect()
            guard = _Deadline(self.conn.fileno(),
                              cfg.timeout + self.GRACE_S - (time.perf_counter() - started))
            with self.conn.cursor() as cur:
                # Row by row (libpq's single-row mode): a query returning millions of rows
                # costs one row of memory; past MAX_ROWS the rest is cancelled.
                for n, _ in enumerate(cur.stream(cfg.query), 1):
                    if n >= self.MAX_ROWS:
                        break
        except self.psycopg.errors.QueryCanceled:
            self.close()
            return [Observation(self.subject, None, failed=(
                f"query took over {cfg.timeout:g} s (cancelled)"))]
        except self.psycopg.Error as exc:
            self.close()
            if guard is not None and guard.fired:
                return [Observation(self.subject, None, failed=(
                    f"no answer within {cfg.timeout + self.GRACE_S:g} s (connection closed)"))]
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            return [Observation(self.subject, None, failed=reason[:300])]
        finally:
            if guard is not None:
                guard.cancel()
        return [Observation(self.subject, _elapsed_ms(started), "ms")]

    def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # noqa: BLE001 - closing a broken connection
                pass


class SqliteProbe(SimpleDetector):
    def sample(self) -> list[Observation]:
        cfg = self.config
        started = time.perf_counter()
        try:
            conn = sqlite3.connect(f"file:{cfg.database}?mode=ro", uri=True,
                                   timeout=cfg.timeout)
            try:
                conn.execute(cfg.query).fetchall()
            finally:
                conn.close()
        except sqlite3.Error as exc:
            return [Observation(self.subject, None, failed=f"query failed: {exc}")]
        return [Observation(self.subject, _elapsed_ms(started), "ms")]


class CommandProbe(SimpleDetector):
    def sample(self) -> list[Observation]:
        cfg = self.config
        started = time.perf_counter()
        try:
            # Only the end of stderr is kept (stdout is not read at all), cut to 200
            # characters: a probe's output is monitored data, not graced's to store.
            res = subprocess.run(cfg.argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                 timeout=cfg.timeout, stdin=subprocess.DEVNULL, check=False)
        except subprocess.TimeoutExpired:
            return [Observation(self.subject, None,
                                failed=f"{cfg.argv[0]} timed out after {cfg.timeout:g} s")]
        except OSError as exc:
            return [Observation(self.subject, None, failed=f"{cfg.argv[0]}: {exc.strerror}")]
        ms = _elapsed_ms(started)
        if res.returncode != 0:
            tail = res.stderr.decode(errors="replace").strip().splitlines()[-1:] or [""]
            said = tail[0].strip()[:200]  # nothing on stderr: no colon left dangling
            return [Observation(self.subject, ms, "ms",
                                failed=f"{cfg.argv[0]} exited {res.returncode}"
                                       + (f": {said}" if said else ""))]
        return [Observation(self.subject, ms, "ms")]


class HttpProbe(SimpleDetector):
    def sample(self) -> list[Observation]:
        cfg = self.config
        started = time.perf_counter()
        shown = redact_url(cfg.url, hide_path=cfg.secret_path)
        try:
            # The whole request within the probe's timeout (a dripping server included);
            # a redirect is a status like any other, never followed.
            status = httpc.request("GET", cfg.url, timeout=cfg.timeout,
                                   proxy=httpc.proxy_for(cfg.url, cfg.proxy))
        except OSError as exc:
            reason = redact_text(str(exc.strerror or exc))
            return [Observation(self.subject, None, failed=f"GET {shown}: {reason}")]
        ms = _elapsed_ms(started)
        if status != cfg.expect_status:
            return [Observation(self.subject, ms, "ms",
                                failed=f"GET {shown}: status {status}, expected "
                                       f"{cfg.expect_status}")]
        return [Observation(self.subject, ms, "ms", detail={"status": status})]
