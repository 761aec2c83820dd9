"""The fleet on real NATS JetStream: real nats-server processes (one, or a three-node
cluster on loopback), real graced processes forwarding to them, the real gracectl fleet.

Skipped with the reason where nats-server cannot be installed (tests/helpers/nats.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from graced import keys
from graced.protocol import parse_ts
from graced.protocol.signing import b64
from tests.conftest import Graced, bin_path
from tests.helpers.nats import (
    NatsServer,
    Operator,
    StallingRelay,
    cluster,
    ensure_nats,
    fleet_section,
    led_by,
    one_host,
    status,
    wait_caught_up,
)
from tests.helpers.procs import LineCollector, poll_until
from tests.test_missions_e2e import MISSIONS, Watch
from tests.test_playbooks_e2e import OnTerminal
from tests.test_remediation_e2e import (
    kill_all,
    process_detector,
    restart_playbook,
    start_sleeper,
)
from tests.test_top_e2e import Terminal


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
    # The hosts' keys, made before their first start, so that each config can name its
    # peers' keys: host 0 imports host 1's knowledge; host 2 trusts only host 0's.
    key_lines = []
    for i in range(3):
        (shortdir / f"h{i}" / "state").mkdir(parents=True, mode=0o700)
        signer, _ = keys.load_or_create(shortdir / f"h{i}" / "state")
        key_lines.append(f"ed25519 {b64(signer.public_key)} {signer.kid}")
    peers = [[key_lines[1]], [], [key_lines[0]]]
    try:
        for i, marker in enumerate(markers):
            start_sleeper(marker)
            g = Graced(shortdir / f"h{i}", detectors=(
                process_detector(marker) + restart_playbook(marker, "high")
                + MISSIONS.format(flap=0)
                + f'\n[remediation]\ncontrol_keys = ["{operator_key}"]\n'
                + fleet_section(server.url, "knowledge_interval = 1\nknowledge_keys = "
                                + json.dumps(peers[i]) + "\n")))
            g.start()
            hosts.append(g)
        imports = LineCollector(hosts[0].ctl_popen("tail", "--json", "--since", "1",
                                                   "learning.imported"))
        ids = [op.pin(g) for g in hosts]
        for g in hosts:
            wait_caught_up(g)

        listed = op.fleet_json("ls")["hosts"]
        assert sorted(h["daemon_id"] for h in listed) == sorted(ids)
        assert all(h["verified"] == "ok" and h["first_seq"] == 1 and h["copies"] == 0
                   for h in listed), listed
        assert op.fleet_json("missions", "ls") == []
        # The three share a host name: naming it names them all, wherever a host is named.
        name = listed[0]["host"]
        assert len({h["host"] for h in listed}) == 1
        for args in (("trust", name), ("tail", "--no-follow", "--host", name)):
            res = op.fleet(*args)
            assert res.returncode == 5, res  # not found: no one host by that name
            assert f"{name!r} names 3 hosts" in res.stderr and ids[0] in res.stderr, res.stderr
        # Oldest first across the hosts, not host by host.
        events = [json.loads(line) for line in
                  op.fleet("tail", "--no-follow", "--json").stdout.splitlines()]
        times = [parse_ts(e["ts"]) for e in events]
        assert len({e["kid"] for e in events}) == 3 and times == sorted(times)
        one = op.fleet("tail", "--no-follow", "--json", "--host", ids[1][:8])
        assert {json.loads(line)["kid"] for line in one.stdout.splitlines()} == {
            h["kid"] for h in listed if h["daemon_id"] == ids[1]}

        # A real fault on host 1: its worker dies. The live fleet view (fleet tail) must
        # show the mission within 1 s of the host opening it.
        tail = subprocess.Popen([bin_path("gracectl"), "fleet", "tail", "--json",
                                 "--verify"], env=op.env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL)
        seen: list[tuple[float, dict[str, Any]]] = []
        reading, got = threading.Event(), threading.Event()
        waiting_kids: set[str] = set()

        def read() -> None:
            assert tail.stdout is not None
            for line in tail.stdout:
                seen.append((time.time(), json.loads(line)))
                reading.set()
                if seen[-1][1]["topic"] == "mission.awaiting_approval":
                    waiting_kids.add(seen[-1][1]["kid"])  # each host signs with its key
                    if len(waiting_kids) == 3:
                        got.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        # One consumer reads the stream from its start, then live: whatever comes after
        # its first line reaches it.
        assert reading.wait(30), "fleet tail printed nothing"
        killed = time.time()
        for marker in markers:  # a real fault on every host: its worker dies
            kill_all(marker)
        assert got.wait(30), tail.stderr.read() if tail.poll() is not None else seen[-5:]

        missions_seen = [(arrived, e) for arrived, e in seen
                         if e["topic"].startswith("mission.")]
        assert missions_seen and all(parse_ts(e["ts"]) >= killed - 0.5
                                     for _, e in missions_seen)
        for arrived, event in missions_seen:  # host opened it -> the fleet view shows it
            assert arrived - parse_ts(event["ts"]) < 1.0, (event["topic"], arrived)
        tail.terminate()
        tail.wait(10)

        missions = op.fleet_json("missions", "ls")
        assert sorted((m["daemon_id"], m["state"]) for m in missions) == sorted(
            (i, "awaiting_approval") for i in ids)
        mid = next(m["id"] for m in missions if m["daemon_id"] == ids[1])
        assert {m["id"] for m in missions} == {mid}  # the same id on every host
        only = op.fleet_json("missions", "ls", "--host", ids[0])
        assert [m["daemon_id"] for m in only] == [ids[0]]
        # The fleet's Mission Control: every host up, the three approvals waiting; live
        # on a real terminal too (tmux), where q quits.
        frame = op.ctl("top", "--fleet", "--once")
        assert frame.returncode == 0, frame.stderr
        assert "3 hosts: 3 up" in frame.stdout, frame.stdout
        assert "3 open missions, 3 awaiting approval" in frame.stdout, frame.stdout
        if shutil.which("tmux"):
            env = {k: v for k, v in op.env.items()
                   if k in ("HOME", "XDG_CONFIG_HOME", "GRACE_NATS", "PATH")}
            live = Terminal([op.ctl_argv0(), "top", "--fleet"],
                            {**env, "LANG": "C.UTF-8", "TERM": "screen-256color"}, 120, 30)
            try:
                live.wait_for(lambda text: "3 awaiting approval" in text
                              and " q quit" in text, 30)
                live.keys("q")
                live.wait_for(lambda text: "TOP EXITED rc=0" in text, 15)
            finally:
                live.close()

        # The plan can be reviewed from the fleet, as on the host (its steps' argv whole),
        # and without a terminal to review it on, an approval must name it.
        local = hosts[1].ctl("missions", "show", str(mid), check=True).stdout
        remote = op.fleet("missions", "show", ids[1][:8], str(mid))
        assert remote.returncode == 0, remote.stderr
        assert "awaiting approval of this plan" in remote.stdout, remote.stdout
        plan_lines = [x for x in local.splitlines() if x.startswith(("plan:", "  1."))]
        assert plan_lines and all(x in remote.stdout.splitlines() for x in plan_lines)
        unnamed = op.fleet("approve", ids[1], str(mid))
        assert unnamed.returncode == 2 and "without a terminal" in unnamed.stderr, unnamed
        # On a terminal: the plan, then y/N; "n" sends nothing.
        no = OnTerminal(op, "fleet", "approve", ids[1], str(mid))  # type: ignore[arg-type]
        screen = no.read_until("[y/N]")
        assert all(x in screen for x in plan_lines), screen
        assert no.answer("n") == 1 and "not approved" in no.screen, no.screen
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
        for other in (hosts[0], hosts[2]):  # the same mission id elsewhere: untouched
            still = json.loads(other.ctl("missions", "show", str(mid), "--json",
                                         check=True).stdout)
            assert still["state"] == "awaiting_approval", still
            assert still["steps"] == [] and still["approvals"] == []
        # What host 1 learned from that run reaches host 0 (which trusts host 1's key)
        # through the knowledge bucket, as a bounded prior; host 2 refuses it.
        assert imports.wait_for(lambda lines: any(
            json.loads(x)["payload"]["source"] == ids[1]
            and json.loads(x)["payload"]["patterns"] >= 1 for x in lines), 30), imports.lines
        imports.proc.kill()
        learned = json.loads(hosts[0].ctl("knowledge", "ls", "--json", check=True).stdout)
        prior = [pb for p in learned for pb in p["playbooks"]
                 if any(i["source"] == ids[1] for i in pb["imported"])]
        assert prior and prior[0]["playbook"] == "restart-worker" and prior[0]["runs"] == 0
        poll_until(lambda: status(hosts[2])["fleet"]["knowledge"]["refused"] >= 1, 30,
                   "host 2 refusing host 1's export")
        assert not any(pb["imported"] for p in json.loads(hosts[2].ctl(
            "knowledge", "ls", "--json", check=True).stdout) for pb in p["playbooks"])
        # By NATS as over TCP: an unsigned approval is refused before anything else.
        unsigned = _ask(server.url, ids[0], {"id": 1, "nonce": "n" * 32,
                                             "method": "missions.approve",
                                             "params": {"id": mid, "opened": 1.0}})
        assert unsigned["ok"] is False and unsigned["error"]["code"] == "not_authorised"
        assert "must be signed" in unsigned["error"]["message"], unsigned
        # A key already pinned for a host is not replaced by another one quietly.
        other_pub = str(shortdir / "h2" / "state" / "key.pub")
        swap = op.fleet("trust", ids[0], "--key", other_pub)
        assert swap.returncode == 10 and "refused" in swap.stderr, swap.stderr
        # The same approval again is not accepted (the mission is closed: exit 9).
        again = op.fleet("approve", ids[1], str(mid), "--yes")
        assert again.returncode == 9 and "not waiting for a decision" in again.stderr, \
            again.stderr

        # A forged event, injected into JetStream on host 2's subjects: a mission
        # "resolved" that host 2 never signed, in its key's name, at its next seq.
        for g in hosts:
            wait_caught_up(g)
        head = op.fleet_json("ls")["hosts"]
        target = next(h for h in head if h["daemon_id"] == ids[2])
        forged = _forge(target["kid"], target["last_seq"] + 1)
        _inject(server.url, f"grace.{ids[2]}.mission.resolved", forged)
        res = op.fleet("tail", "--verify", "--no-follow")
        assert res.returncode == 10, res.stderr
        failed = [line for line in res.stderr.splitlines() if "message rejected:" in line]
        assert len(failed) == 1 and ids[2] in failed[0], res.stderr
        assert "forged" in failed[0], res.stderr
        listed = {h["daemon_id"]: h
                  for h in op.fleet_json("ls", rc=res.returncode)["hosts"]}
        # Reported, but host 2 is still read from its own verified events.
        assert listed[ids[2]]["violation"] is None, listed[ids[2]]
        assert listed[ids[2]]["rejected"] == 1, listed[ids[2]]
        assert listed[ids[2]]["rejection"]["code"] == 10, listed[ids[2]]
        assert listed[ids[2]]["state"] == "up" and listed[ids[2]]["last_heartbeat"]
        assert all(h["verified"] == "ok" for h in listed.values()), listed
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


def _ask(url: str, daemon_id: str, request: dict[str, Any]) -> Any:
    """A raw request to a host by NATS request/reply, as anyone on NATS may send."""
    import nats

    async def go() -> Any:
        nc = await nats.connect(url)
        reply = await nc.request(f"grace-rpc.{daemon_id}", json.dumps(request).encode(),
                                 timeout=10)
        await nc.close()
        return json.loads(reply.data)

    return asyncio.run(go())


def _inject(url: str, subject: str, body: str) -> None:
    """Publish a message into the stream as an attacker with access to NATS would."""
    import nats

    async def go() -> None:
        nc = await nats.connect(url)
        js = nc.jetstream()
        await js.publish(subject, body.encode())
        await nc.close()

    asyncio.run(go())


def _host(op: Operator, daemon_id: str, *wait: str) -> dict[str, Any]:
    listed = op.fleet_json(*wait, "ls")["hosts"]
    return next(h for h in listed if h["daemon_id"] == daemon_id)


def assert_whole(op: Operator, g: Graced, daemon_id: str, *wait: str) -> dict[str, Any]:
    """JetStream holds this host's every event from seq 1, each once, and it verifies
    (``wait``: e.g. ``--timeout 20`` for each read, on a cluster that just lost a node)."""
    st = wait_caught_up(g, 60)
    host = _host(op, daemon_id, *wait)
    assert host["verified"] == "ok", host
    assert host["first_seq"] == 1 and host["last_seq"] >= st["fleet"]["acked_seq"], host
    assert host["events"] == host["last_seq"], host  # no gap
    assert host["copies"] == 0, host  # no duplicate stored
    res = op.fleet(*wait, "tail", "--verify", "--no-follow", "--host", daemon_id, timeout=120)
    assert res.returncode == 0, res.stderr
    return host


@pytest.mark.slow
def test_nats_down_for_30_s_graced_keeps_working_and_catches_up_without_gap(
        shortdir: Path) -> None:
    """NATS stops for 30 s; meanwhile graced answers, journals 1000 events and is even
    restarted (it starts without NATS); once NATS is back it catches up: every event
    once, no gap, and the forwarding lag it showed while NATS was down is gone."""
    with one_host(shortdir) as site:
        server, op, g = site.server, site.op, site.g
        daemon_id = op.pin(g)
        wait_caught_up(g)
        down_from = status(g)["head_seq"]
        server.stop()
        down_at = time.monotonic()
        emitted = 0
        restarted = False
        lag_seen = 0
        while time.monotonic() - down_at < 30:
            st = status(g)
            lag_seen = max(lag_seen, st["fleet"]["lag_events"])
            res = g.ctl("emit", "user.outage", "--count", "200", "--json")
            assert res.returncode == 0, res.stderr
            emitted += 200
            if not restarted and time.monotonic() - down_at > 15:
                g.stop()
                g.start()  # READY without NATS: forwarding waits, graced does not
                restarted = True
            time.sleep(1)  # the outage lasts 30 s of real time: this paces the load
        st = status(g)
        assert not st["fleet"]["connected"] and st["fleet"]["lag_events"] > 0
        assert emitted >= 1000 and lag_seen >= 100 and restarted
        # Nothing in graced waited on NATS: its heartbeat kept its pace (0.5 s) all along,
        # in both runs (the uptime it carries starts again at the restart).
        beats = [json.loads(line) for line in g.ctl(
            "tail", "--json", "--no-follow", "--since", str(down_from), "daemon.heartbeat",
            check=True).stdout.splitlines()]
        from graced.protocol.verify import stale_limit

        gaps = [parse_ts(b["ts"]) - parse_ts(a["ts"])
                for a, b in zip(beats, beats[1:], strict=False)
                if b["payload"]["uptime"] > a["payload"]["uptime"]]
        # Never stale, as a verifier counts it (three heartbeats missed and 1 s).
        assert len(gaps) > 40 and max(gaps) < stale_limit(0.5), gaps
        server.start()
        host = assert_whole(op, g, daemon_id)
        assert host["last_seq"] >= emitted
        # The outage is in the journal too: the fleet component went down and came back.
        # (A change event, or the summary of the restarted graced, which began without
        # NATS: its first round is summarised, not a change.)
        fleet_states = []
        for e in map(json.loads, g.ctl("tail", "--json", "--no-follow", "--since",
                                       str(down_from), "integration.*",
                                       check=True).stdout.splitlines()):
            if e["topic"] == "integration.changed" and e["payload"]["component"] == "fleet":
                fleet_states.append(e["payload"]["state"])
            elif e["topic"] == "integration.summary" and "fleet" in e["payload"]["components"]:
                fleet_states.append(e["payload"]["components"]["fleet"]["state"])
        assert "disconnected" in fleet_states and fleet_states[-1] == "up", fleet_states
        out = op.fleet("tail", "--no-follow", "--json", "--host", daemon_id, "user.outage")
        payloads = [json.loads(line) for line in out.stdout.splitlines()]
        assert len(payloads) == emitted


@pytest.mark.slow
def test_a_read_that_stalls_inside_nats_is_tried_again_by_the_view(shortdir: Path) -> None:
    """The connection to NATS stalls for 4 s in the middle of a read (a real TCP relay
    that stops passing bytes either way): the view, waiting 2 s at a time, says it
    tries again and resumes after the last message it got, so it ends with every event
    once, in order (before, it gave up at the first timeout: exit 3). A stall longer
    than its three tries is exit 3, one line, no traceback."""
    with one_host(shortdir) as site:
        op, g = site.op, site.g
        daemon_id = op.pin(g)
        assert g.ctl("emit", "user.load", "--count", "3000").returncode == 0
        acked = wait_caught_up(g, 60)["fleet"]["acked_seq"]
        relay = StallingRelay(site.server.port, after=300_000, stall=4.0)
        try:
            res = op.fleet("--nats", relay.url, "--timeout", "2", "tail", "--no-follow",
                           "--json", "--verify")
        finally:
            relay.close()
        assert relay.stalled.is_set()
        assert res.returncode == 0, res.stderr
        assert "trying again (2 of 3)" in res.stderr, res.stderr
        seqs = [json.loads(line)["seq"] for line in res.stdout.splitlines()]
        assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) >= acked, res.stderr
        assert _host(op, daemon_id)["verified"] == "ok"

        relay = StallingRelay(site.server.port, after=300_000, stall=30.0)
        try:
            res = op.fleet("--nats", relay.url, "--timeout", "1", "ls")
        finally:
            relay.close()
        assert res.returncode == 3, res.stderr
        assert "3 times in a row" in res.stderr and "Traceback" not in res.stderr, res.stderr


def _connected_node(nodes: list[NatsServer], name: str) -> NatsServer:
    """The node a client named ``name`` is connected to (its monitoring /connz)."""
    import urllib.request

    for node in nodes:
        with urllib.request.urlopen(f"http://127.0.0.1:{node.monitor}/connz",
                                    timeout=2) as resp:
            if any(c.get("name") == name for c in json.loads(resp.read())["connections"]):
                return node
    raise AssertionError(f"no node has a client named {name!r}")


@pytest.mark.slow
def test_a_three_node_cluster_with_a_node_killed_mid_run_loses_nothing(
        shortdir: Path) -> None:
    """A stream of 3 replicas on a three-node cluster on loopback; the node graced is
    connected to is killed (SIGKILL) while graced publishes 3000 events; graced moves to
    another node and JetStream ends with every event once, from seq 1, verified."""
    ensure_nats()
    nodes = cluster(shortdir)
    url = ",".join(n.url for n in nodes)
    op = Operator(shortdir, url)
    (shortdir / "h").mkdir()
    g = Graced(shortdir / "h", fleet_section(url, "replicas = 3\n"))
    g.start()
    try:
        daemon_id = op.pin(g)
        start = wait_caught_up(g)["head_seq"]
        load = g.ctl_popen("emit", "user.load", "--count", "3000", "--rate", "400")
        poll_until(lambda: status(g)["fleet"]["acked_seq"] > start + 500, 30,
                   "forwarding under way")
        victim = _connected_node(nodes, f"graced {daemon_id}")
        victim.kill()
        assert load.wait(60) == 0, load.stderr.read() if load.stderr else ""
        survivors = [n for n in nodes if n is not victim]
        op.env["GRACE_NATS"] = ",".join(n.url for n in survivors)
        # The survivors elect new leaders (the meta group's and the stream's): JetStream
        # answers nothing until then, for tens of seconds on a loaded machine.
        poll_until(lambda: led_by(survivors), 180, "the survivors elect leaders")
        first = op.fleet("--timeout", "20", "ls", "--json", timeout=120)
        assert first.returncode == 0, first.stderr
        # The survivors answer slowly for a while after the election: 20 s per read.
        host = assert_whole(op, g, daemon_id, "--timeout", "20")
        out = op.fleet("--timeout", "20", "tail", "--no-follow", "--json", "--host", daemon_id,
                       "user.load", timeout=120)
        assert len(out.stdout.splitlines()) == 3000
        assert host["last_seq"] >= start + 3000
    finally:
        g.close()
        for node in nodes:
            node.stop()


@pytest.mark.slow
def test_fleet_view_errors_are_one_line_with_their_exit_code(shortdir: Path) -> None:
    """NATS unreachable: exit 3; a NATS where no graced forwarded yet: exit 5; a bad URL:
    a usage error (2). One line on stderr each, never a traceback."""
    from tests.helpers.nats import free_port

    server = NatsServer(shortdir)
    server.start()
    try:
        op = Operator(shortdir, server.url)
        empty = op.fleet("ls")
        assert empty.returncode == 5 and "no stream GRACE" in empty.stderr, empty.stderr
        op.env["GRACE_NATS"] = f"nats://127.0.0.1:{free_port()}"
        down = op.fleet("missions", "ls")
        assert down.returncode == 3 and "cannot reach NATS" in down.stderr, down.stderr
        bad = op.ctl("fleet", "--nats", "http://127.0.0.1:4222", "ls")
        assert bad.returncode == 2
        for res in (empty, down, bad):
            assert "Traceback" not in res.stderr and res.stdout == ""
    finally:
        server.stop()
