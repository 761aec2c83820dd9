"""Whatever a client sends, the daemon answers or closes cleanly, and keeps serving."""

from __future__ import annotations

import json
import os
import subprocess
import time

import psutil
import pytest
import trio
import trio_websocket

from graced.keys import parse_public_key
from graced.protocol import ExitCode, check_signature
from tests.conftest import Graced
from tests.helpers.procs import LineCollector
from tests.helpers.tcp import keyed_daemon


async def _ws(g: Graced, nursery: trio.Nursery) -> trio_websocket.WebSocketConnection:
    stream = await trio.open_unix_socket(str(g.socket))
    return await trio_websocket.wrap_client_stream(nursery, stream, "localhost", "/")


async def _reply(ws: trio_websocket.WebSocketConnection) -> dict:
    with trio.fail_after(10):
        while True:
            for line in str(await ws.get_message()).split("\n"):
                frame = json.loads(line)
                if frame.get("type") == "response":
                    return frame


async def test_bad_requests_get_signed_error_replies(make_graced) -> None:
    g = make_graced(extra_config="max_request_bytes = 2048\n")
    pub = parse_public_key((g.state / "key.pub").read_text())
    cases = [
        ("{not json", "bad_request"),
        ("[1, 2, 3]", "bad_request"),
        ('{"id": 1, "method": "hello"}', "bad_request"),  # no nonce
        ('{"id": 1, "nonce": "n", "method": "no.such.method"}', "unknown_method"),
        ('{"id": 1, "nonce": "n", "method": "hello", "params": [1]}', "bad_request"),
        ('{"id": 1e400, "nonce": "n", "method": "hello"}', "bad_request"),
        ('{"id": 99999999999999999999999, "nonce": "n", "method": "hello"}', "bad_request"),
        ('{"id": 1, "nonce": "n", "method": "hello", "params": {"a": ' + "[" * 200 + "]" * 200
         + "}}", "bad_request"),
        ('{"id": 1, "nonce": "n", "method": "subscribe", "params": {"since": "x"}}',
         "bad_request"),
        ('{"id": 1, "nonce": "n", "method": "emit", "params": {"topic": "daemon.x"}}',
         "bad_request"),
        ('{"id": 1, "nonce": "n", "method": "hello", "extra": 1}', "bad_request"),
        ('{"id": 1, "nonce": "n", "method": "hello", "params": {"pad": "' + "x" * 4000 + '"}}',
         "too_large"),
        ("\udcff", "bad_request"),
    ]
    async with trio.open_nursery() as nursery:
        ws = await _ws(g, nursery)
        bystander = await _ws(g, nursery)
        for text, code in cases:
            try:
                await ws.send_message(text)
            except UnicodeEncodeError:
                # invalid UTF-8 cannot be produced by this client library as text:
                # send the raw bytes as a binary frame instead
                await ws.send_message(b"\xff\xfe")
            frame = await _reply(ws)
            assert frame["ok"] is False and frame["error"]["code"] == code, (text[:60], frame)
            assert check_signature(frame, pub)
        await ws.send_message(b"binary")
        frame = await _reply(ws)
        assert frame["error"]["code"] == "bad_request"
        # Still serving, to this client and to another one.
        for conn in (ws, bystander):
            await conn.send_message(json.dumps({"id": 2, "nonce": "abc", "method": "hello"}))
            frame = await _reply(conn)
            assert frame["ok"] and frame["nonce"] == "abc" and check_signature(frame, pub)
        await ws.aclose()
        await bystander.aclose()
        nursery.cancel_scope.cancel()
    assert g.proc.poll() is None


async def test_abrupt_disconnects_and_half_handshakes_do_not_hurt(graced: Graced) -> None:
    for _ in range(20):
        s = await trio.open_unix_socket(str(graced.socket))
        await s.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n")  # half a handshake
        await s.aclose()
    for _ in range(20):
        s = await trio.open_unix_socket(str(graced.socket))
        await s.send_all(b"\x00\xff garbage \r\n\r\n")
        await s.aclose()
    assert graced.ctl("status").returncode == 0


def test_emit_needs_control_rights(make_graced) -> None:
    g = make_graced(extra_config='socket_mode = "0666"\n')
    nobody = subprocess.run(["id", "-u", "nobody"], capture_output=True, text=True)
    if os.geteuid() != 0 or nobody.returncode != 0:
        import pytest

        pytest.skip("needs root to act as another uid")
    os.chmod(g.base, 0o755)
    os.chmod(g.home, 0o777)
    env = g.env
    res = subprocess.run(
        ["setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups",
         g.ctl_argv0(), "emit", "user.x"], env=env, capture_output=True, text=True,
        stdin=subprocess.DEVNULL, timeout=30)
    assert res.returncode == ExitCode.NOT_AUTHORISED, res.stderr
    # graced runs as root: root is named once, not as "root or uid 0" (newcomer P12).
    assert "emit needs root (uid 0) over the Unix socket" in res.stderr, res.stderr
    res = subprocess.run(
        ["setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups",
         g.ctl_argv0(), "knowledge", "reset", "some-playbook"], env=env, capture_output=True,
        text=True, stdin=subprocess.DEVNULL, timeout=30)
    assert res.returncode == ExitCode.NOT_AUTHORISED, res.stderr
    assert "knowledge reset needs root (uid 0) over the Unix socket" in res.stderr, res.stderr
    res = subprocess.run(
        ["setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups",
         g.ctl_argv0(), "status", "--json"], env=env, capture_output=True, text=True,
        stdin=subprocess.DEVNULL, timeout=30)
    assert res.returncode == 0, res.stderr


@pytest.mark.slow
async def test_tcp_listener_reads_only_with_a_read_key_and_checks_origin(make_graced) -> None:
    """Over TCP nothing but hello without a key; a read key streams verifiably but
    cannot control; a foreign Origin is refused at the handshake."""
    g = make_graced(start=False, extra_config='listen = ["127.0.0.1:0"]\n'
                    '[remediation]\nread_keys = ["KEY"]\n')
    env = {k: v for k, v in g.env.items() if k != "GRACE_SOCKET"}
    no_key = dict(env, GRACE_CLIENT_KEY=str(g.base / "none.key"))
    line = g.ctl("keys", "generate", check=True).stdout.strip()
    g.config.write_text(g.config.read_text().replace('"KEY"', json.dumps(line)))
    g.start()
    port = json.loads(g.ctl("status", "--json", check=True).stdout)["wire"]["tcp_ports"][0]
    url = f"ws://127.0.0.1:{port}"
    tail = [g.ctl_argv0(), "--url", url, "tail", "--verify", "--since", "1", "--no-follow",
            "--key", str(g.state / "key.pub")]
    env["GRACE_KEY"] = no_key["GRACE_KEY"] = str(g.state / "key.pub")  # TCP: pinned or given
    with trio.fail_after(30):
        res = await trio.run_process(tail, env=no_key, capture_stdout=True,
                                     capture_stderr=True, check=False, stdin=b"")
    assert res.returncode == ExitCode.NOT_AUTHORISED, res.stderr
    assert b"must be signed by a key with the read role" in res.stderr
    assert res.stdout == b""
    with trio.fail_after(30):
        res = await trio.run_process(tail, env=env, capture_stdout=True,
                                     capture_stderr=True, check=False, stdin=b"")
    assert res.returncode == 0, res.stderr
    assert b"daemon.started" in res.stdout
    with trio.fail_after(30):
        res = await trio.run_process([g.ctl_argv0(), "--url", url, "emit", "user.x"], env=env,
                                     capture_stdout=True, capture_stderr=True, check=False,
                                     stdin=b"")
    assert res.returncode == ExitCode.NOT_AUTHORISED, res.stderr
    assert b"has the read role; emit needs control" in res.stderr
    rejected = None
    with trio.fail_after(10):
        try:
            async with trio.open_nursery() as nursery:
                await trio_websocket.connect_websocket_url(
                    nursery, url, extra_headers=[(b"Origin", b"http://evil.example")])
        except BaseExceptionGroup as group:
            rejected = group.exceptions[0]
        except trio_websocket.ConnectionRejected as exc:
            rejected = exc
    assert isinstance(rejected, trio_websocket.ConnectionRejected), rejected
    assert rejected.status_code == 403
    assert rejected.body == b"forbidden: Origin or Host not allowed\n"


@pytest.mark.slow
@pytest.mark.parametrize("verify", [False, True], ids=["plain", "verify"])
def test_a_reload_that_revokes_a_read_key_closes_its_open_stream(make_graced, verify: bool
                                                                 ) -> None:
    """A stream opened over TCP with a read key ends when a reload takes the key out of
    the config: not authorised (exit 4) with the reason, also under --verify, where a
    routine revocation is no tampering; the next request with it is refused."""
    g = make_graced(start=False, extra_config='listen = ["127.0.0.1:0"]\n'
                    '[remediation]\nread_keys = ["KEY"]\n')
    line = g.ctl("keys", "generate", check=True).stdout.strip()
    with_key = g.config.read_text().replace('"KEY"', json.dumps(line))
    g.config.write_text(with_key)
    g.start()
    port = json.loads(g.ctl("status", "--json", check=True).stdout)["wire"]["tcp_ports"][0]
    env = {k: v for k, v in g.env.items() if k != "GRACE_SOCKET"}
    env["GRACE_KEY"] = str(g.state / "key.pub")
    url = f"ws://127.0.0.1:{port}"
    proc = subprocess.Popen([g.ctl_argv0(), "--url", url, "tail", "--since", "1", "--json",
                             *(["--verify"] if verify else [])],
                            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    stream = LineCollector(proc)
    try:
        assert stream.wait_for(lambda ls: any("daemon.started" in x for x in ls), 30), \
            proc.stderr
        g.config.write_text(with_key.replace(json.dumps(line), ""))
        reload = g.ctl("reload")
        assert reload.returncode == 0, reload.stderr
        rc = stream.wait_exit(30)
        assert proc.stderr is not None
        err = proc.stderr.read()
        assert rc == ExitCode.NOT_AUTHORISED, (rc, err)
        assert "no longer has the read role" in err and err.count("\n") == 1, err
    finally:
        if proc.poll() is None:
            proc.kill()
    again = g.ctl("--url", url, "status", env=env)
    assert again.returncode == ExitCode.NOT_AUTHORISED, again.stderr


def test_a_peer_that_leaves_mid_handshake_frees_its_slot_at_once(make_graced) -> None:
    """Half a handshake, then the peer closes: graced lets the connection go when it sees
    the close, not at its handshake deadline (10 s), so such peers cannot hold slots."""
    import socket

    from tests.helpers.procs import poll_until

    g = make_graced()
    daemon = psutil.Process(g.proc.pid)  # type: ignore[union-attr]
    assert g.ctl("status").returncode == 0
    baseline = daemon.num_fds()
    started = time.monotonic()
    for _ in range(50):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(g.socket))
            s.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n")  # half, then gone
    poll_until(lambda: daemon.num_fds() <= baseline, 8, "descriptors back", pause=0.1)
    assert time.monotonic() - started < 8
    assert json.loads(g.ctl("status", "--json", check=True).stdout)["wire"]["handshaking"] == 0


def test_pause_and_resume_record_who_asked(make_graced) -> None:
    """executor.paused / executor.resumed name who asked, as silences do: ``key KID`` for
    a request signed by a control key over TCP, the user name over the Unix socket."""
    import pwd

    g, port, env, line = keyed_daemon(make_graced, "control_keys")
    g.ctl("--url", f"ws://127.0.0.1:{port}", "pause", env=env, check=True)
    g.ctl("resume", check=True)
    events = [json.loads(x) for x in g.ctl(
        "tail", "--json", "--since", "1", "--no-follow", "executor.*", check=True
    ).stdout.splitlines()]
    me = pwd.getpwuid(os.geteuid()).pw_name
    assert [(e["topic"], e["payload"]["by"]) for e in events] == [
        ("executor.paused", f"key {line.split()[2]}"), ("executor.resumed", me)], events


@pytest.mark.slow
def test_a_tcp_client_over_the_per_address_limit_is_told_why(make_graced) -> None:
    """Over max_clients_per_address, a TCP client gets HTTP 503 and the reason (not a
    bare EOF), which gracectl prints (exit 3); graced's log names the refusal too."""
    from tests.helpers.procs import poll_until

    g, port, env, _ = keyed_daemon(make_graced, "read_keys", "max_clients_per_address = 1\n")
    url = f"ws://127.0.0.1:{port}"
    holder = subprocess.Popen([g.ctl_argv0(), "--url", url, "tail", "-n", "0", "nothing.*"],
                              env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        poll_until(lambda: json.loads(g.ctl("status", "--json", check=True).stdout)["wire"][
            "tcp_clients"] == 1, 20, "the first TCP client connected")
        res = g.ctl("--url", url, "status", env=env)
        assert res.returncode == ExitCode.UNREACHABLE and res.stdout == "", res
        assert res.stderr == (f"gracectl: graced at {url} refused the connection (503: too "
                              "many clients: 1 from 127.0.0.1 (limit 1), 1 over TCP (limit "
                              "64))\n"), res.stderr
        assert "1 from 127.0.0.1 (limit 1)" in g.stderr()
    finally:
        holder.kill()
        holder.wait()
