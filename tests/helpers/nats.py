"""Real NATS servers for tests: JetStream on, loopback only, a private store dir each.

Uses Debian's ``nats-server`` package (installed with apt-get when running as root and it
is missing); skips with the reason when it cannot be had, or when nats-py (the extra
``grace[fleet]``) is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest


def ensure_nats() -> str:
    """The nats-server binary, installing Debian's package if root; else skip."""
    found = shutil.which("nats-server") or ("/usr/sbin/nats-server"
                                            if os.path.exists("/usr/sbin/nats-server") else None)
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True,
                       stdin=subprocess.DEVNULL, timeout=600)
        subprocess.run(["apt-get", "-o", "DPkg::Lock::Timeout=600", "install", "-y", "-q",
                        "nats-server"], env=env, capture_output=True,
                       stdin=subprocess.DEVNULL, timeout=900)
        found = shutil.which("nats-server") or (
            "/usr/sbin/nats-server" if os.path.exists("/usr/sbin/nats-server") else None)
    if found is None:
        pytest.skip("nats-server is not installed (Debian's nats-server package) and cannot "
                    "be installed here (needs root and apt-get)")
    try:
        import nats  # noqa: F401
    except ImportError:
        pytest.skip("nats-py is not installed (pip install 'grace[fleet]')")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class NatsServer:
    """One nats-server process; :meth:`stop` and :meth:`start` again keep its port and
    its store (a restart, as an operator's)."""

    def __init__(self, base: Path, name: str = "n1", cluster: list[int] | None = None,
                 cluster_port: int | None = None) -> None:
        self.binary = ensure_nats()
        self.base = base / name
        self.base.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.port = free_port()
        self.monitor = free_port()
        self.cluster_port = cluster_port
        self.routes = cluster or []
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0, wait: bool = True) -> None:
        argv = [self.binary, "-js", "-sd", str(self.base / "store"), "-a", "127.0.0.1",
                "-p", str(self.port), "-m", str(self.monitor), "-n", self.name]
        if self.cluster_port is not None:
            routes = ",".join(f"nats://127.0.0.1:{p}" for p in self.routes
                              if p != self.cluster_port)
            argv += ["--cluster_name", "grace", "--cluster",
                     f"nats://127.0.0.1:{self.cluster_port}", "--routes", routes]
        log = open(self.base / "server.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        log.close()
        if wait:
            self.wait_ready(timeout)

    def healthy(self) -> bool:
        """The server answers /healthz with JetStream up (2.9's monitoring endpoint)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.monitor}/healthz",
                                        timeout=1) as resp:
                return bool(json.loads(resp.read()).get("status") == "ok")
        except (OSError, ValueError):
            return False

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"nats-server {self.name} exited {self.proc.returncode}: "
                                   f"{self.log()[-2000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"nats-server {self.name} not healthy within {timeout} s:"
                                   f" {self.log()[-2000:]}")
            time.sleep(0.1)

    def log(self) -> str:
        try:
            return (self.base / "server.log").read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


def cluster(base: Path, size: int = 3) -> list[NatsServer]:
    """``size`` nats-server nodes routed to each other on loopback, JetStream clustered."""
    ports = [free_port() for _ in range(size)]
    nodes = [NatsServer(base, f"n{i + 1}", ports, ports[i]) for i in range(size)]
    for node in nodes:  # all at once: JetStream is up only once they elect a leader
        node.start(wait=False)
    for node in nodes:
        node.wait_ready(60)
    return nodes
