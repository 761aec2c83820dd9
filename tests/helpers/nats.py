"""Real NATS servers for tests: JetStream on, loopback only, a private store dir each;
the operator's side of the fleet (:class:`Operator`: a home of its own and the real
gracectl), and :func:`one_host`: one nats-server and one real graced forwarding to it.

Uses Debian's ``nats-server`` package (installed with apt-get when running as root and it
is missing); skips with the reason when it cannot be had, or when nats-py (the
``fleet`` extra) is missing.
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Graced, bin_path
from tests.helpers.locks import apt_install
from tests.helpers.procs import poll_until


def ensure_nats() -> str:
    """The nats-server binary, installing Debian's package if root; else skip."""
    found = shutil.which("nats-server") or ("/usr/sbin/nats-server"
                                            if os.path.exists("/usr/sbin/nats-server") else None)
    if found is None:
        def where() -> str | None:
            return shutil.which("nats-server") or (
                "/usr/sbin/nats-server" if os.path.exists("/usr/sbin/nats-server") else None)

        apt_install(["nats-server"], lambda: where() is not None)
        found = where()
    if found is None:
        pytest.skip("nats-server is not installed (Debian's nats-server package) and cannot "
                    "be installed here (needs root and apt-get)")
    try:
        import nats  # noqa: F401
    except ImportError:
        pytest.skip("nats-py is not installed (pip install '.[fleet]' in this checkout)")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class NatsServer:
    """One nats-server process; :meth:`stop` and :meth:`start` again keep its port and
    its store (a restart, as an operator's). ``conf``: a configuration file's text (users
    and their permissions, say), which :meth:`reload` replaces as an operator does."""

    def __init__(self, base: Path, name: str = "n1", cluster: list[int] | None = None,
                 cluster_port: int | None = None, conf: str | None = None) -> None:
        self.binary = ensure_nats()
        self.base = base / name
        self.base.mkdir(parents=True, exist_ok=True)
        self.conf = None if conf is None else self.base / "server.conf"
        self.conf_text = conf or ""
        self.name = name
        self.port = free_port()
        self.monitor = free_port()
        self.cluster_port = cluster_port
        self.routes = cluster or []
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_once = False
        self.log_from = 0

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0, wait: bool = True) -> None:
        self._launch()
        if wait:
            self.wait_ready(timeout)

    def _launch(self) -> None:
        argv = [self.binary, "-js", "-sd", str(self.base / "store"), "-a", "127.0.0.1",
                "-p", str(self.port), "-m", str(self.monitor), "-n", self.name]
        if self.conf is not None:  # all in the file: a reload would undo the flags
            self._write_conf()
            argv = [self.binary, "-c", str(self.conf)]
        if self.cluster_port is not None:
            routes = ",".join(f"nats://127.0.0.1:{p}" for p in self.routes
                              if p != self.cluster_port)
            argv += ["--cluster_name", "grace", "--cluster",
                     f"nats://127.0.0.1:{self.cluster_port}", "--routes", routes]
        log = open(self.base / "server.log", "ab")  # noqa: SIM115
        self.log_from = log.tell()
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        log.close()

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
        moved = 0
        # Its own process alive and answering: another server's monitor may answer on a
        # port this one could not take.
        while not (self.proc is not None and self.proc.poll() is None and self.healthy()):
            if self.proc is not None and self.proc.poll() is not None:
                if (not self.started_once and moved < 5
                        and "address already in use" in self.log()[self.log_from:]):
                    # free_port() let go of the port before nats-server took it, and
                    # something else took it meanwhile (CI: the monitor port): others.
                    self.port, self.monitor = free_port(), free_port()
                    moved += 1
                    self._launch()
                    continue
                raise RuntimeError(f"nats-server {self.name} exited {self.proc.returncode}: "
                                   f"{self.log()[-2000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"nats-server {self.name} not healthy within {timeout} s:"
                                   f" {self.log()[-2000:]}")
            time.sleep(0.1)
        self.started_once = True  # a restart keeps its ports: they are the cluster's

    def _write_conf(self) -> None:
        assert self.conf is not None and self.cluster_port is None
        self.conf.write_text(
            f'server_name: {self.name}\nlisten: "127.0.0.1:{self.port}"\n'
            f'http: "127.0.0.1:{self.monitor}"\n'
            f'jetstream {{ store_dir: "{self.base / "store"}" }}\n{self.conf_text}')

    def reload(self, conf: str) -> None:
        """Replace the configuration file's ``conf`` and have the server reload it
        (SIGHUP); returns once its log says it did."""
        assert self.conf is not None and self.proc is not None
        before = self.log().count("Reloaded server configuration")
        self.conf_text = conf
        self._write_conf()
        self.proc.send_signal(signal.SIGHUP)
        poll_until(lambda: self.log().count("Reloaded server configuration") > before, 30,
                   "nats-server reloaded its configuration", pause=0.1)

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


def led_by(nodes: list[NatsServer], stream: str = "GRACE") -> bool:
    """Some node in ``nodes`` says the JetStream meta group and ``stream`` both have a
    leader among ``nodes`` (its monitoring /jsz): after a node is killed, the survivors
    answer JetStream requests only once they have elected them."""
    names = {n.name for n in nodes}
    for node in nodes:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{node.monitor}/jsz?accounts=true"
                                        "&streams=true", timeout=2) as resp:
                data = json.loads(resp.read())
        except (OSError, ValueError):
            continue
        if (data.get("meta_cluster") or {}).get("leader") not in names:
            continue
        for account in data.get("account_details") or []:
            for detail in account.get("stream_detail") or []:
                if (detail.get("name") == stream
                        and (detail.get("cluster") or {}).get("leader") in names):
                    return True
    return False


def fleet_section(url: str, extra: str = "") -> str:
    return f'\n[fleet]\nurl = "{url}"\n{extra}'


class Operator:
    """The operator's side: a home of its own (pinned keys, signing key) and gracectl."""

    def __init__(self, base: Path, nats_url: str) -> None:
        self.home = base / "operator"
        self.home.mkdir(exist_ok=True)
        self.env = {**os.environ, "HOME": str(self.home),
                    "XDG_CONFIG_HOME": str(self.home / ".config"), "GRACE_NATS": nats_url}
        for var in ("GRACE_SOCKET", "GRACE_URL", "GRACE_KNOWN_KEYS", "GRACE_CLIENT_KEY"):
            self.env.pop(var, None)

    def ctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([bin_path("gracectl"), *args], env=self.env, text=True,
                              capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)

    def fleet(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return self.ctl("fleet", *args, timeout=timeout)

    def ctl_argv0(self) -> str:  # for OnTerminal: gracectl as the operator runs it
        return str(bin_path("gracectl"))

    def fleet_json(self, *args: str, rc: int = 0) -> Any:
        res = self.fleet(*args, "--json")
        assert res.returncode == rc, res.stderr
        return json.loads(res.stdout)

    def pin(self, g: Graced) -> str:
        """Pin the host's key as any operator does, over its socket; returns its id."""
        res = self.ctl("--socket", str(g.socket), "keys", "trust")
        assert res.returncode == 0, res.stderr
        return str(json.loads(self.ctl("--socket", str(g.socket), "status", "--json").stdout)
                   ["daemon_id"])

    def signing_key(self) -> str:
        res = self.ctl("keys", "generate")
        assert res.returncode == 0, res.stderr
        return res.stdout.strip().splitlines()[-1]


def status(g: Graced) -> dict[str, Any]:
    """The host's status; exit 7 (degraded: an escalated mission, say) is an answer too."""
    res = g.ctl("status", "--json")
    assert res.returncode in (0, 7), f"gracectl status exited {res.returncode}: {res.stderr}"
    return dict(json.loads(res.stdout))


def wait_caught_up(g: Graced, timeout: float = 30) -> dict[str, Any]:
    """Until graced says forwarding has caught up (nothing announces it: status is read)."""
    seen: dict[str, Any] = {}

    def caught_up() -> bool:
        seen.update(status(g))
        fl = seen["fleet"]
        return bool(fl["connected"] and fl["lag_events"] == 0)

    poll_until(caught_up, timeout, "forwarding caught up", pause=0.2)
    return seen


@dataclass
class OneHost:
    """One nats-server, one graced forwarding to it, and an operator."""

    server: NatsServer
    op: Operator
    g: Graced
    operator_key: str | None  # the operator's key line, in graced's control_keys


@contextmanager
def one_host(base: Path, config: str = "", fleet: str = "", control: bool = False,
             detectors: str = "", server_conf: str | None = None) -> Iterator[OneHost]:
    """A nats-server and a graced (``config`` added to its graced.toml's ``[daemon]``,
    ``fleet`` to its ``[fleet]``, ``detectors`` (detectors, playbooks, other tables)
    last) started; with ``control``, the operator's signing key made first and put in
    graced's ``[remediation] control_keys``; ``server_conf``: the nats-server's
    configuration file. Both stopped at the end."""
    server = NatsServer(base, conf=server_conf)
    server.start()
    try:
        op = Operator(base, server.url)
        key = op.signing_key() if control else None
        if key is not None:
            config += f'\n[remediation]\ncontrol_keys = ["{key}"]\n'
        (base / "h").mkdir()
        g = Graced(base / "h", config + fleet_section(server.url, fleet), detectors=detectors)
        g.start()
        try:
            yield OneHost(server, op, g, key)
        finally:
            g.close()
    finally:
        server.stop()


class StallingRelay:
    """A TCP relay on loopback to ``port`` that stalls once: after ``after`` bytes have
    gone from the server to the client, nothing goes either way for ``stall`` seconds
    (the connection stays open), then everything flows again. A real stall on a real
    connection, at a point in a read that does not depend on the machine's speed."""

    def __init__(self, port: int, after: int, stall: float) -> None:
        self.upstream, self.after, self.stall = port, after, stall
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.stalled = threading.Event()  # set when the stall begins
        self._down = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.listener, selectors.EVENT_READ, None)
        while not self._stop.is_set():
            for key, _ in sel.select(0.2):
                if key.data is None:
                    client, _ = self.listener.accept()
                    server = socket.create_connection(("127.0.0.1", self.upstream))
                    sel.register(client, selectors.EVENT_READ, (server, False))
                    sel.register(server, selectors.EVENT_READ, (client, True))
                    continue
                src, (dst, downstream) = key.fileobj, key.data
                assert isinstance(src, socket.socket)
                try:
                    data = src.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    for s in (src, dst):
                        try:
                            sel.unregister(s)
                        except (KeyError, ValueError):
                            pass
                        s.close()
                    continue
                dst.sendall(data)
                if downstream:
                    self._down += len(data)
                    if self._down >= self.after and not self.stalled.is_set():
                        self.stalled.set()
                        self._stop.wait(self.stall)  # nothing is read or sent meanwhile
        sel.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.listener.close()


async def knowledge_bucket(js: Any) -> Any:
    """The key-value bucket grace-knowledge, once graced has made it (it does so when it
    connects: nothing announces it to another client)."""
    import asyncio

    for _ in range(100):
        try:
            return await js.key_value("grace-knowledge")
        except Exception:  # noqa: BLE001 - not made yet
            await asyncio.sleep(0.1)
    return await js.key_value("grace-knowledge")
