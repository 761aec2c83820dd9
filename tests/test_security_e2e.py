"""The attacks of issue 14, each against a real graced: a second Unix user where a uid
matters (created here when root; skipped with the reason otherwise)."""

from __future__ import annotations

import base64
import grp
import json
import os
import pwd
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from graced.protocol import parse_ts
from graced.protocol.signing import b64
from tests.helpers.locks import apt_install
from tests.helpers.procs import poll_until
from tests.helpers.tcp import keyed_daemon
from tests.helpers.users import ensure_user
from tests.test_documented_e2e import (  # noqa: F401
    APPROVER,
    GROUP,
    approver,
    awaiting_group_approval,
    marker,
)
from tests.test_remediation_e2e import kill_all, process_detector, restart_playbook, setup

HANDOFF = Path(__file__).parent / "helpers" / "handoff.py"
OUTSIDER = "grace-outsider"


def _outsider() -> str:
    """A local user in no approver group (created here; the caller checked for root)."""
    return ensure_user(OUTSIDER)


def _reuse_pid(pid: int, argv: list[str]) -> subprocess.Popen[bytes]:
    """Start ``argv`` so that it gets ``pid`` (ns_last_pid), retrying while others race."""
    for _ in range(500):
        try:
            Path("/proc/sys/kernel/ns_last_pid").write_text(str(pid - 1))
        except OSError as exc:
            pytest.skip(f"cannot choose the next pid (ns_last_pid: {exc.strerror})")
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
        if proc.pid == pid:
            return proc
        proc.kill()
        proc.wait()
    pytest.skip(f"pid {pid} could not be reused: other processes kept taking it")


def _groups_of(pid: int) -> set[int]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Groups:"):
            return {int(g) for g in line.split()[1:]}
    return set()


def test_a_reused_pid_lends_no_approver_groups(make_graced, marker, approver) -> None:  # noqa: F811
    """The pid-reuse attack: an outsider connects, hands its socket to a child and exits;
    an approver's process takes the pid; the child's approval must still be refused."""
    outsider = _outsider()
    g, w, waiting = awaiting_group_approval(make_graced, marker)
    request = json.dumps({"id": 1, "nonce": "pid-reuse", "method": "missions.approve",
                          "params": {"id": waiting["id"], "comment": "not mine to approve"}})
    attacker = subprocess.Popen(
        ["setpriv", "--reuid", outsider, "--regid", "nogroup", "--clear-groups",
         sys.executable, str(HANDOFF), str(g.socket), request],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=g.env)
    assert attacker.stdout is not None and attacker.stdin is not None
    pid = int(attacker.stdout.readline())
    assert attacker.wait(timeout=10) == 0  # the connecting process is gone, pid free
    squatter = _reuse_pid(pid, ["setpriv", "--reuid", approver, "--regid", "nogroup",
                                "--init-groups", "sleep", "120"])
    try:
        # The precondition of the attack holds: the pid now belongs to an approver.
        gid = grp.getgrnam(GROUP).gr_gid
        poll_until(lambda: gid in _groups_of(pid), 10, f"pid {pid} in group {GROUP}",
                   pause=0.02)
        attacker.stdin.write("go\n")
        attacker.stdin.flush()
        reply = json.loads(attacker.stdout.readline())
    finally:
        squatter.kill()
        squatter.wait()
    assert reply["ok"] is False, reply
    assert reply["error"]["code"] == "not_authorised"
    who = f"{outsider} (uid {pwd.getpwnam(outsider).pw_uid})"
    assert f"{who} may not approve" in reply["error"]["message"]
    shown = json.loads(g.ctl("missions", "show", str(waiting["id"]), "--json",
                             check=True).stdout)
    assert shown["state"] == "awaiting_approval" and not shown["approvals"]
    w.close()


@pytest.mark.slow
async def test_a_captured_approval_is_refused_by_another_daemon_and_mission(
        make_graced, marker, shortdir) -> None:  # noqa: F811
    """Two daemons trust the same operator key; an approval signed for one daemon's
    mission, replayed byte for byte to the other, or naming an earlier incarnation of
    the mission, is refused; the original is accepted (the request itself was good)."""
    import nacl.signing

    from graced.protocol import Signer
    from tests.conftest import Graced
    from tests.test_missions_e2e import MISSIONS, Watch
    from tests.test_remediation_e2e import _send_raw, _signed, mission

    key = Signer(nacl.signing.SigningKey.generate())
    pub = f"ed25519 {b64(key.public_key)} {key.kid}"
    def body(worker: str) -> str:
        return (process_detector(worker) + restart_playbook(worker, "high")
                + MISSIONS.format(flap=0) + f'\n[remediation]\ncontrol_keys = ["{pub}"]\n')

    # Each daemon watches a worker of its own: a's approved fix starting its worker must
    # not clear b's mission.
    other = f"grace-other-{uuid.uuid4().hex[:8]}"
    a = make_graced(extra_config='listen = ["127.0.0.1:0"]\n', detectors=body(marker))
    (shortdir / "b").mkdir()
    b = Graced(shortdir / "b", 'listen = ["127.0.0.1:0"]\n', detectors=body(other))
    b.start()
    try:
        targets = {}
        for name, g in (("a", a), ("b", b)):
            w = Watch(g)
            mid = w.wait("mission.awaiting_approval", "worker", 15)["payload"]["id"]
            w.close()
            st = json.loads(g.ctl("status", "--json", check=True).stdout)
            targets[name] = (g, mid, mission(g, mid)["opened_at"], st["daemon_id"],
                             f"ws://127.0.0.1:{st['wire']['tcp_ports'][0]}")
        ga, mid_a, opened_a, id_a, url_a = targets["a"]
        gb, mid_b, _, id_b, url_b = targets["b"]
        assert id_a != id_b and mid_a == mid_b  # the same mission id on both daemons
        captured = _signed(key, mid_a, time.time(), id_a, opened_a,
                           plan=mission(ga, mid_a)["plan"]["sha256"])
        elsewhere = await _send_raw(url_b, captured)
        assert elsewhere["ok"] is False and elsewhere["error"]["code"] == "not_authorised"
        assert f"bound to daemon '{id_a}', not this one ({id_b})" \
            in elsewhere["error"]["message"]
        # --json printed the time it opened in ISO 8601; the request may name it so or
        # as the number of seconds; the refusal names both times as --json writes them.
        earlier = await _send_raw(url_a, _signed(key, mid_a, time.time(), id_a,
                                                 parse_ts(opened_a) - 600))
        assert earlier["ok"] is False and earlier["error"]["code"] == "invalid"
        assert f"but mission {mid_a} opened at {opened_a}" in earlier["error"]["message"]
        assert mission(gb, mid_b)["state"] == "awaiting_approval"
        assert mission(ga, mid_a)["state"] == "awaiting_approval"
        accepted = await _send_raw(url_a, captured)
        assert accepted["ok"], accepted
        assert mission(ga, mid_a)["approvals"][0]["key"] == key.kid
        assert mission(gb, mid_b)["state"] == "awaiting_approval"
    finally:
        b.close()
        kill_all(other)


def _state_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@pytest.mark.slow
async def test_refused_network_requests_write_nothing(make_graced) -> None:
    """3000 requests from a TCP peer without a key, each with a 60 KB field (a key id,
    a comment, a method name): all refused, none journaled; the state dir grows by less
    than 1 MB and graced's RSS by less than 10 MB; status counts them."""
    import psutil
    import trio
    import trio_websocket

    g = make_graced(extra_config='listen = ["127.0.0.1:0"]\nmax_clients_per_address = 16\n'
                                 'max_unauthenticated_per_address = 16\n')
    st = json.loads(g.ctl("status", "--json", check=True).stdout)
    url = f"ws://127.0.0.1:{st['wire']['tcp_ports'][0]}"
    proc = psutil.Process(st["pid"])
    head = st["head_seq"]
    big = "f" * 60_000
    shapes = [
        {"method": "missions.approve", "params": {"id": 1, "comment": big}},
        {"method": "missions.approve", "params": {"id": 1},
         "auth": {"kid": big, "ts": time.time(), "daemon": "x", "sig": "A" * 88}},
        {"method": "missions.reject", "params": {"id": 1, "opened": 1.0},
         "auth": {"kid": "0123456789abcdef", "ts": time.time(), "daemon": big,
                  "sig": "A" * 88}},
        {"method": "emit", "params": {"topic": "user." + big}},
    ]

    async def attacker(n: int, count: int) -> list[str]:
        """``count`` requests, reconnecting whenever graced closes the connection (it
        serves a few requests to a TCP peer that has shown no key, then closes it)."""
        codes: list[str] = []
        sent = 0
        while sent < count:
            async with trio_websocket.open_websocket_url(url, max_message_size=1 << 24) as ws:
                try:
                    while sent < count:
                        req = {"id": sent, "nonce": f"n{n}-{sent}",
                               **shapes[sent % len(shapes)]}
                        sent += 1
                        await ws.send_message(json.dumps(req))
                        reply = json.loads(str(await ws.get_message()))
                        codes.append(reply["error"]["code"])
                except trio_websocket.ConnectionClosed as exc:
                    codes.append(f"closed {exc.reason.code}")
        return codes

    async def measure() -> tuple[int, int]:
        return _state_bytes(g.state), proc.memory_info().rss

    # One warm-up round, so the first connection's buffers are not counted as growth.
    await attacker(99, 8)
    state0, rss0 = await measure()
    results: list[str] = []
    with trio.fail_after(300):
        async with trio.open_nursery() as nursery:
            async def run(n: int) -> None:
                results.extend(await attacker(n, 300))
            for n in range(10):
                nursery.start_soon(run, n)
    state1, rss1 = await measure()
    assert len(results) == 3000
    assert set(results) <= {"not_authorised", "bad_request", "closed 1008"}, set(results)
    assert results.count("closed 1008") < len(results) / 2  # most got their refusal
    assert state1 - state0 < 1 << 20, (state0, state1)
    assert rss1 - rss0 < 10 << 20, (rss0, rss1)
    after = json.loads(g.ctl("status", "--json", check=True).stdout)
    assert after["wire"]["refused_requests"] >= 1500
    # Nothing but heartbeats was journaled meanwhile, and nothing carries the big field.
    lines = g.ctl("tail", "--json", "--since", str(head + 1), "--no-follow",
                  check=True).stdout.splitlines()
    assert {json.loads(ln)["topic"] for ln in lines} <= {"daemon.heartbeat"}
    assert big[:100] not in g.stderr()


def _self_signed(where: Path) -> tuple[Path, Path]:
    """A self-signed certificate for localhost and 127.0.0.1 (openssl, installed when
    root and missing)."""
    import shutil

    if shutil.which("openssl") is None:
        if os.geteuid() != 0:
            pytest.skip("needs the openssl command to make a certificate (apt-get install "
                        "openssl)")
        apt_install(["openssl"], lambda: shutil.which("openssl") is not None)
    cert, key = where / "cert.pem", where / "cert.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "2", "-subj", "/CN=localhost", "-addext",
                    "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True, stdin=subprocess.DEVNULL)
    return cert, key


@pytest.mark.slow
def test_wss_end_to_end_with_a_self_signed_certificate(make_graced, shortdir) -> None:
    """graced serves wss:// with the configured certificate; gracectl --cacert trusts it,
    streams and verifies; without --cacert, or over plain ws://, nothing is served."""
    cert, key = _self_signed(shortdir)
    g = make_graced(start=False, extra_config=(
        f'listen = ["127.0.0.1:0"]\ntls_cert = "{cert}"\ntls_key = "{key}"\n'
        '[remediation]\ncontrol_keys = ["KEY"]\n'))
    line = g.ctl("keys", "generate", check=True).stdout.strip()
    g.config.write_text(g.config.read_text().replace('"KEY"', json.dumps(line)))
    g.start()
    port = json.loads(g.ctl("status", "--json", check=True).stdout)["wire"]["tcp_ports"][0]
    env = {k: v for k, v in g.env.items() if k != "GRACE_SOCKET"}

    def ctl(url: str, *args: str) -> subprocess.CompletedProcess[str]:
        return g.ctl("--url", url, *args, env=env)

    wss = f"wss://127.0.0.1:{port}"
    tail = ("tail", "--verify", "--since", "1", "--no-follow", "--key", str(g.state / "key.pub"))
    res = g.ctl("--url", wss, "--cacert", str(cert), *tail, env=env)
    assert res.returncode == 0, res.stderr
    assert "daemon.started" in res.stdout
    emitted = g.ctl("--url", wss, "--cacert", str(cert), "--key", str(g.state / "key.pub"),
                    "emit", "user.over_tls", env=env)
    assert emitted.returncode == 0, emitted.stderr
    untrusted = ctl(wss, *tail)
    assert untrusted.returncode == 3 and "CERTIFICATE_VERIFY_FAILED" in untrusted.stderr, \
        untrusted.stderr
    assert untrusted.stdout == ""
    plain = ctl(f"ws://127.0.0.1:{port}", *tail)  # no TLS: the handshake never completes
    assert plain.returncode == 3 and plain.stdout == "", plain.stderr


def test_plain_ws_is_refused_off_loopback(make_graced) -> None:
    g = make_graced(start=False, extra_config='listen = ["0.0.0.0:0"]\n')
    with pytest.raises(RuntimeError) as failed:
        g.start()
    assert "graced exited 3" in str(failed.value)
    assert ("[daemon] listen '0.0.0.0:0': plain ws:// is served only on loopback; set "
            "[daemon] tls_cert and tls_key") in str(failed.value)


def _server(shortdir: Path, name: str, *args: str) -> tuple[subprocess.Popen[str], int, Path]:
    """A fault server from tests.helpers.faults as a real process: (proc, port, hits)."""
    from tests.test_missions_e2e import helper

    port_file, hits = shortdir / f"{name}.port", shortdir / f"{name}.hits"
    hits.touch()
    kind = args[0]
    rest = args[1:]
    proc = helper(kind, str(port_file), *((str(hits),) if kind != "silent" else ()), *rest)
    return proc, int(port_file.read_text()), hits


@pytest.mark.slow
def test_a_redirecting_webhook_reaches_no_second_service(
        make_graced, shortdir, marker) -> None:  # noqa: F811
    """A webhook answering 302 to another loopback service: the notification fails
    saying so, and the second service never hears from graced."""

    other, other_port, other_hits = _server(shortdir, "other", "http", "204", "")
    hook, hook_port, hook_hits = _server(
        shortdir, "hook", "http", "302", f"http://127.0.0.1:{other_port}/stolen")
    try:
        g, w = setup(make_graced, process_detector(marker) + restart_playbook(marker, "high")
                     + '\n[[notifier]]\nname = "hook"\nkind = "webhook"\n'
                       f'url = "http://127.0.0.1:{hook_port}/grace"\n')
        w.wait("mission.awaiting_approval", "worker", 10)
        lines: list[str] = []

        def notified_once() -> bool:
            lines[:] = g.ctl("tail", "--json", "--since", "1", "--no-follow",
                             "executor.notified", check=True).stdout.splitlines()
            return bool(lines)

        poll_until(notified_once, 15, "no executor.notified")
        payload = json.loads(lines[0])["payload"]
        assert payload["ok"] is False
        assert payload["error"] == "status 302 (redirects are not followed)"
        assert hook_hits.read_text() == "POST /grace\n"
        assert other_hits.read_text() == ""
        w.close()
    finally:
        for proc in (hook, other):
            proc.kill()
            proc.wait()


@pytest.mark.slow
async def test_a_dripping_webhook_and_a_silent_probe_starve_nothing(
        make_graced, shortdir, marker) -> None:  # noqa: F811
    """45 webhooks that drip a byte a second (more than trio's 40 default worker threads)
    and an http probe whose target never answers: the load detector keeps its interval,
    status answers within 1 s, the probe fails by its own deadline."""
    import trio
    import trio_websocket


    drip, drip_port, drip_hits = _server(shortdir, "drip", "drip")
    silent, silent_port, _ = _server(shortdir, "silent", "silent")
    hooks = "".join(f'\n[[notifier]]\nname = "drip{i}"\nkind = "webhook"\ntimeout = 60.0\n'
                    f'url = "http://127.0.0.1:{drip_port}/hook{i}"\n' for i in range(45))
    try:
        g, w = setup(make_graced, process_detector(marker) + restart_playbook(marker, "high")
                     + '[[detector]]\nname = "load"\nkind = "load"\ninterval = 0.5\n'
                     + '[[detector]]\nname = "hang"\nkind = "http"\ninterval = 1.0\n'
                       f'timeout = 2.0\nurl = "http://127.0.0.1:{silent_port}/"\n' + hooks)
        w.wait("mission.awaiting_approval", "worker", 15)
        poll_until(lambda: drip_hits.read_text().count("hit") >= 4, 15, "webhooks called")
        stream = await trio.open_unix_socket(str(g.socket))
        async with trio.open_nursery() as nursery:
            ws = await trio_websocket.wrap_client_stream(nursery, stream, "localhost", "/",
                                                         max_message_size=1 << 24)

            async def ask(n: int, method: str) -> dict:
                await ws.send_message(json.dumps({"id": n, "nonce": f"n{n}", "method": method}))
                while True:
                    for line in str(await ws.get_message()).split("\n"):
                        frame = json.loads(line)
                        if frame.get("type") == "response" and frame["id"] == n:
                            return frame["result"]  # type: ignore[no-any-return]

            worst, stale = 0.0, []
            for n in range(30):  # 15 s under the stalled webhooks
                started = time.monotonic()
                with trio.fail_after(5):
                    await ask(2 * n, "status")
                worst = max(worst, time.monotonic() - started)
                dets = (await ask(2 * n + 1, "detectors"))
                ages = {name: dets["now"] - max(s["ts"] for s in d["subjects"].values())
                        for name, d in dets["detectors"].items()
                        if name == "load" and d["subjects"]}
                if ages.get("load", 99) > 1.5:
                    stale.append(ages)
                await trio.sleep(0.5)
            await ws.aclose()
            nursery.cancel_scope.cancel()
        assert worst < 1.0, worst
        assert stale == [], stale
        hang = json.loads(g.ctl("detectors", "--json", check=True).stdout)["hang"]
        assert hang["subjects"], hang
        (sample,) = hang["subjects"].values()
        assert sample["value"] is None  # failed, by its own deadline, again and again
        w.close()
    finally:
        for proc in (drip, silent):
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_no_secret_from_a_url_is_journaled_or_shown(make_graced, shortdir) -> None:
    """An http detector whose URL carries user:password@ and ?token=: its subject,
    failures, missions, the journal, gracectl's output and graced's log show neither."""
    from tests.test_missions_e2e import MISSIONS, Watch

    server, port, hits = _server(shortdir, "web", "http", "500", "")
    url = f"http://ops:s3cretpw@127.0.0.1:{port}/health?token=t0kenval&x=1"
    try:
        g = make_graced(detectors='[[detector]]\nname = "web"\nkind = "http"\n'
                        f'interval = 0.5\nurl = "{url}"\n' + MISSIONS.format(flap=0))
        w = Watch(g)
        opened = w.wait("mission.opened", "web", 15)["payload"]
        assert opened["subject"] == (f"http://REDACTED@127.0.0.1:{port}/health?"
                                     "token=REDACTED&x=REDACTED")
        # The real URL is used, its user:password as HTTP Basic authentication (as curl).
        basic = base64.b64encode(b"ops:s3cretpw").decode()
        assert f"GET /health?token=t0kenval&x=1 auth=Basic {basic}\n" in hits.read_text()
        shown = [g.ctl("tail", "--json", "--since", "1", "--no-follow", check=True).stdout,
                 g.ctl("detectors", "--json", check=True).stdout,
                 g.ctl("detectors", check=True).stdout,
                 g.ctl("missions", "ls", "--all", check=True).stdout,
                 g.ctl("missions", "show", str(opened["id"]), "--json", check=True).stdout,
                 g.ctl("status", "--json", check=True).stdout,
                 *(p.read_bytes().decode("latin-1") for p in g.state.iterdir() if p.is_file()),
                 g.stderr()]
        for text in shown:
            assert "s3cretpw" not in text and "t0kenval" not in text
        w.close()
    finally:
        server.kill()
        server.wait()


def _start_fails(g) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(RuntimeError) as failed:
        g.start()
    return str(failed.value)


@pytest.mark.slow
def test_planted_symlinks_and_foreign_state_dirs_are_refused(make_graced, shortdir) -> None:
    """Symlinks planted in the state dir are never followed (the files they point at stay
    as they were); a lock that is a symlink, or a state dir another user owns or may
    write, is refused naming the path."""
    g = make_graced()
    assert g.stop() == 0
    victims = {}
    for name in ("key.tmp", "key.pub.tmp", "daemon-id.tmp"):
        victim = shortdir / f"victim-{name}"
        victim.write_text("precious\n")
        victims[name] = victim
        (g.state / name).symlink_to(victim)
    (g.state / "key").unlink()
    (g.state / "key.pub").unlink()
    (g.state / "daemon-id").unlink()
    lock_victim = shortdir / "victim-lock"
    lock_victim.write_text("precious\n")
    (g.state / "lock").unlink()
    (g.state / "lock").symlink_to(lock_victim)
    failed = _start_fails(g)
    assert "graced exited 4" in failed
    assert f"cannot open {g.state / 'lock'}: Too many levels of symbolic links" in failed
    assert lock_victim.read_text() == "precious\n"
    (g.state / "lock").unlink()
    g.run_args = ["--new-key"]  # the key is gone, its journal is not (graced(8))
    g.start()
    assert all(v.read_text() == "precious\n" for v in victims.values())
    assert not any((g.state / name).exists() for name in victims)
    assert (g.state / "key").is_file() and not (g.state / "key").is_symlink()
    assert g.stop() == 0
    g.state.chmod(0o777)
    failed = _start_fails(g)
    assert f"state dir {g.state} is writable by group or others (mode 0777)" in failed
    g.state.chmod(0o700)
    if os.geteuid() == 0:
        os.chown(g.state, pwd.getpwnam(_outsider()).pw_uid, -1)
        failed = _start_fails(g)
        assert f"state dir {g.state} is owned by uid {pwd.getpwnam(OUTSIDER).pw_uid}" in failed
        os.chown(g.state, 0, -1)
    g.start()


@pytest.mark.slow
def test_a_config_others_may_write_is_refused_naming_it(make_graced) -> None:
    g = make_graced(start=False)
    g.config.chmod(0o666)
    failed = _start_fails(g)
    assert "graced exited 3" in failed
    assert (f"{g.config}: is writable by group or others (mode 0666): refusing it "
            "(its commands would run as uid") in failed
    g.config.chmod(0o644)
    if os.geteuid() == 0:
        os.chown(g.config, pwd.getpwnam(_outsider()).pw_uid, -1)
        failed = _start_fails(g)
        assert f"{g.config}: is owned by uid {pwd.getpwnam(OUTSIDER).pw_uid}" in failed
        os.chown(g.config, 0, -1)
    g.start()
    assert g.ctl("status").returncode == 0


UPGRADE = (b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")


@pytest.mark.slow
async def test_idle_and_half_open_tcp_floods_leave_root_its_slots(
        make_graced, shortdir, marker) -> None:  # noqa: F811
    """Under a 1024 descriptor limit, 300 idle TCP WebSocket clients (from 60 addresses)
    and 1000 half-open connections: graced stays within its budget, root's status and
    approval over the Unix socket are answered within 1 s, detectors keep sampling, and
    the approved playbook runs and is not demoted."""
    import resource
    import socket

    import psutil
    import trio
    import trio_websocket

    from tests.test_missions_e2e import MISSIONS, Watch

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2000:
        pytest.skip(f"this test needs 2000 descriptors of its own (hard limit {hard})")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 4096) if hard ==
                                                resource.RLIM_INFINITY else hard, hard))
    g = make_graced(start=False, extra_config='listen = ["127.0.0.1:0"]\n',
                    detectors=process_detector(marker) + restart_playbook(marker, "high")
                    + '[[detector]]\nname = "load"\nkind = "load"\ninterval = 0.5\n'
                    + MISSIONS.format(flap=0))
    g.wrap = ["prlimit", "--nofile=1024:1024", "--"]
    g.start()
    w = Watch(g)
    mid = w.wait("mission.awaiting_approval", "worker", 15)["payload"]["id"]
    st = json.loads(g.ctl("status", "--json", check=True).stdout)
    port, daemon = st["wire"]["tcp_ports"][0], psutil.Process(st["pid"])
    assert daemon.rlimit(psutil.RLIMIT_NOFILE) == (1024, 1024)
    held: list[socket.socket] = []
    try:
        for i in range(300):  # idle clients: a WebSocket handshake, then silence
            s = socket.socket()
            s.bind((f"127.0.0.{2 + i % 60}", 0))
            s.connect(("127.0.0.1", port))
            s.sendall(UPGRADE)
            held.append(s)
        for i in range(1000):  # half-open: connected, never a byte
            s = socket.socket()
            s.bind((f"127.0.0.{70 + i % 100}", 0))
            s.connect(("127.0.0.1", port))
            held.append(s)
        wire = json.loads(g.ctl("status", "--json", check=True).stdout)["wire"]
        assert wire["tcp_clients"] <= 64 and wire["handshaking"] <= 32, wire
        assert daemon.num_fds() < 400, daemon.num_fds()

        stream = await trio.open_unix_socket(str(g.socket))
        async with trio.open_nursery() as nursery:
            ws = await trio_websocket.wrap_client_stream(nursery, stream, "localhost", "/")

            async def ask(n: int, method: str, params: dict | None = None) -> dict:
                started = time.monotonic()
                await ws.send_message(json.dumps({"id": n, "nonce": f"n{n}", "method": method,
                                                  "params": params or {}}))
                while True:
                    for line in str(await ws.get_message()).split("\n"):
                        frame = json.loads(line)
                        if frame.get("type") == "response" and frame["id"] == n:
                            assert time.monotonic() - started < 1.0, (method, frame)
                            return frame  # type: ignore[no-any-return]

            for n in range(10):
                status = (await ask(n, "status"))["result"]
                dets = (await ask(100 + n, "detectors"))["result"]
                (load,) = dets["detectors"]["load"]["subjects"].values()
                assert dets["now"] - load["ts"] < 1.5, load
                await trio.sleep(0.3)
            opened = (await ask(200, "missions.get", {"id": mid}))["result"]["mission"]
            decided = await ask(201, "missions.approve", {
                "id": mid, "comment": "under fire", "opened": opened["opened_at"],
                "plan": opened["plan"]["sha256"]})
            assert decided["ok"], decided
            await ws.aclose()
            nursery.cancel_scope.cancel()
        # The floods were turned away: refused, or (an idle one that proved no key) made
        # to give way to a newcomer.
        wire = status["wire"]
        assert wire["refused_total"] + wire["unauthenticated_closed"] > 0, wire
        assert g.ctl("status").returncode in (0, 7)  # the real gracectl, as root
        w.wait("mission.resolved", "worker", 30)
        demoted = g.ctl("tail", "--json", "--since", "1", "--no-follow", "learning.demoted",
                        check=True).stdout
        assert demoted == ""
    finally:
        for s in held:
            s.close()
        w.close()



@pytest.mark.slow
def test_reload_serves_a_certificate_renewed_at_the_same_path(make_graced, shortdir) -> None:
    """As nginx's reload: a certificate and key replaced at the same paths are served to
    new connections after `gracectl reload`, which says so; a certificate graced cannot
    load is refused (exit 1, the old one still served), and `reload --json` prints the
    refusal as JSON on stdout."""
    old_dir, new_dir = shortdir / "old", shortdir / "new"
    old_dir.mkdir()
    new_dir.mkdir()
    old_cert, _ = _self_signed(old_dir)
    new_cert, new_key = _self_signed(new_dir)
    live_cert, live_key = shortdir / "live.pem", shortdir / "live.key"
    live_cert.write_bytes(old_cert.read_bytes())
    live_key.write_bytes((old_dir / "cert.key").read_bytes())
    g, port, env, _ = keyed_daemon(make_graced, "read_keys",
                                   f'tls_cert = "{live_cert}"\ntls_key = "{live_key}"\n')

    def status(cacert: Path) -> subprocess.CompletedProcess[str]:
        return g.ctl("--url", f"wss://127.0.0.1:{port}", "--cacert", str(cacert), "status",
                     env=env)

    assert status(old_cert).returncode == 0
    live_cert.write_bytes(new_cert.read_bytes())
    live_key.write_bytes(new_key.read_bytes())
    res = g.ctl("reload", check=True)
    assert "[daemon] tls_cert/tls_key contents" in res.stderr, res.stderr
    assert status(new_cert).returncode == 0
    refused = status(old_cert)
    assert refused.returncode != 0 and "CERTIFICATE_VERIFY_FAILED" in refused.stderr

    live_cert.write_text("not a certificate\n")
    res = g.ctl("reload", "--json")
    assert res.returncode == 1, res
    answer = json.loads(res.stdout)
    assert answer["applied"] is False and answer["error"]["code"] == "invalid", answer
    assert f"cannot load [daemon] tls_cert {live_cert}" in answer["error"]["message"]
    assert res.stderr.count("\n") == 1 and "config rejected" in res.stderr, res.stderr
    assert status(new_cert).returncode == 0  # the running certificate stays
