"""The fleet on real NATS JetStream: real nats-server processes (one, or a three-node
cluster on loopback), real graced processes forwarding to them, the real gracectl fleet.

Skipped with the reason where nats-server cannot be installed (tests/helpers/nats.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Graced, bin_path
from tests.helpers.nats import NatsServer
from tests.helpers.procs import poll_until
from tests.test_missions_e2e import MISSIONS, Watch
from tests.test_remediation_e2e import (
    kill_all,
    process_detector,
    restart_playbook,
    start_sleeper,
)


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
    return json.loads(g.ctl("status", "--json", check=True).stdout)


def wait_caught_up(g: Graced, timeout: float = 30) -> dict[str, Any]:
    """Until graced says forwarding has caught up (nothing announces it: status is read)."""
    seen: dict[str, Any] = {}

    def caught_up() -> bool:
        seen.update(status(g))
        fl = seen["fleet"]
        return bool(fl["connected"] and fl["lag_events"] == 0)

    poll_until(caught_up, timeout, "forwarding caught up", pause=0.2)
    return seen


@pytest.mark.slow
def test_three_hosts_one_view_fault_approval_and_forgery(shortdir: Path) -> None:
    """Three graced forward to one nats-server; fleet ls and missions ls show all three;
    a worker killed on one host opens a mission the fleet view shows within 1 s;
    fleet approve runs its high-risk playbook on that host and no other; an event forged
    into JetStream is reported by fleet tail --verify for that host alone."""
    server = NatsServer(shortdir)
    server.start()
    op = Operator(shortdir, server.url)
    operator_key = op.signing_key()
    markers = [f"grace-fleet-{os.getpid()}-{i}" for i in range(3)]
    hosts: list[Graced] = []
    try:
        for i, marker in enumerate(markers):
            start_sleeper(marker)
            (shortdir / f"h{i}").mkdir()
            g = Graced(shortdir / f"h{i}", detectors=(
                process_detector(marker) + restart_playbook(marker, "high")
                + MISSIONS.format(flap=0)
                + f'\n[remediation]\ncontrol_keys = ["{operator_key}"]\n'
                + fleet_section(server.url)))
            g.start()
            hosts.append(g)
        ids = [op.pin(g) for g in hosts]
        for g in hosts:
            wait_caught_up(g)

        listed = op.fleet_json("ls")["hosts"]
        assert sorted(h["daemon_id"] for h in listed) == sorted(ids)
        assert all(h["verified"] == "ok" and h["first_seq"] == 1 and h["copies"] == 0
                   for h in listed), listed
        assert op.fleet_json("missions", "ls") == []

        # A real fault on host 1: its worker dies. The live fleet view (fleet tail) must
        # show the mission within 1 s of the host opening it.
        tail = subprocess.Popen([bin_path("gracectl"), "fleet", "tail", "--json",
                                 "--verify"], env=op.env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL)
        seen: list[tuple[float, dict[str, Any]]] = []
        reading, got = threading.Event(), threading.Event()

        def read() -> None:
            assert tail.stdout is not None
            for line in tail.stdout:
                seen.append((time.time(), json.loads(line)))
                reading.set()
                if seen[-1][1]["topic"] == "mission.awaiting_approval":
                    got.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        # One consumer reads the stream from its start, then live: whatever comes after
        # its first line reaches it.
        assert reading.wait(30), "fleet tail printed nothing"
        killed = time.time()
        kill_all(markers[1])
        assert got.wait(30), tail.stderr.read() if tail.poll() is not None else "no mission"
        from graced.protocol import parse_ts

        missions_seen = [(arrived, e) for arrived, e in seen
                         if e["topic"].startswith("mission.")]
        assert missions_seen and all(parse_ts(e["ts"]) >= killed - 0.5
                                     for _, e in missions_seen)
        for arrived, event in missions_seen:  # host opened it -> the fleet view shows it
            assert arrived - parse_ts(event["ts"]) < 1.0, (event["topic"], arrived)
        opened = next(e for _, e in missions_seen if e["topic"] == "mission.awaiting_approval")
        tail.terminate()
        tail.wait(10)

        missions = op.fleet_json("missions", "ls")
        assert [(m["daemon_id"], m["state"]) for m in missions] == [
            (ids[1], "awaiting_approval")]
        mid = missions[0]["id"]
        assert mid == opened["payload"]["id"]
        assert op.fleet_json("missions", "ls", "--host", ids[0]) == []

        # Approve by NATS: signed with the operator's key, bound to host 1's id.
        w = Watch(hosts[1])
        res = op.fleet("approve", ids[1], str(mid), "--yes", "--comment", "from the fleet")
        assert res.returncode == 0, res.stderr
        w.wait("mission.resolved", "worker", 60)
        w.close()
        shown = json.loads(hosts[1].ctl("missions", "show", str(mid), "--json",
                                        check=True).stdout)
        assert shown["state"] == "resolved" and shown["steps"][0]["exit_code"] == 0
        assert shown["approvals"][0]["key"] == operator_key.split()[-1]
        for other in (hosts[0], hosts[2]):
            assert json.loads(other.ctl("missions", "ls", "--all", "--json",
                                        check=True).stdout) == []
        # The same approval again is not accepted (the mission is closed).
        again = op.fleet("approve", ids[1], str(mid), "--yes")
        assert again.returncode == 5, again.stderr

        # A forged event, injected into JetStream on host 2's subjects: a mission
        # "resolved" that host 2 never signed, in its key's name, at its next seq.
        for g in hosts:
            wait_caught_up(g)
        head = op.fleet_json("ls")["hosts"]
        target = next(h for h in head if h["daemon_id"] == ids[2])
        forged = _forge(target["kid"], target["last_seq"] + 1)
        _inject(server.url, f"grace.{ids[2]}.mission.resolved", forged)
        res = op.fleet("tail", "--verify", "--no-follow")
        assert res.returncode in (10, 11), res.stderr
        failed = [line for line in res.stderr.splitlines() if "verification failed" in line]
        assert failed and all(ids[2] in line for line in failed), res.stderr
        assert not any(ids[0] in line or ids[1] in line for line in failed)
        listed = {h["daemon_id"]: h
                  for h in op.fleet_json("ls", rc=res.returncode)["hosts"]}
        assert listed[ids[2]]["violation"] is not None
        assert listed[ids[0]]["verified"] == "ok" and listed[ids[1]]["verified"] == "ok"
    finally:
        for g in hosts:
            g.close()
        for marker in markers:
            kill_all(marker)
        server.stop()


def _forge(kid: str, seq: int) -> str:
    """A well-formed event in the name of key ``kid``, signed by another key."""
    import nacl.signing

    from graced.protocol import Signer, canonical_text

    attacker = Signer(nacl.signing.SigningKey.generate())
    ev = attacker.make_event(seq=seq, ts=time.time(), topic="mission.resolved",
                             payload={"id": 1, "state": "resolved"}, prev="0" * 64)
    return canonical_text({**ev.fields, "kid": kid})


def _inject(url: str, subject: str, body: str) -> None:
    """Publish a message into the stream as an attacker with access to NATS would."""
    import nats

    async def go() -> None:
        nc = await nats.connect(url)
        js = nc.jetstream()
        await js.publish(subject, body.encode())
        await nc.close()

    asyncio.run(go())
