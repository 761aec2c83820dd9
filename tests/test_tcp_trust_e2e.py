"""What docs/security.md and docs/protocol.md promise about the TCP listener, against the
real graced: no trust on first use over TCP (a key must be pinned or given, and a key
file that is not the daemon's is refused), and the handshake's Host and Origin checks
(an exact origin, not a prefix; a Host this daemon does not listen on)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import nacl.signing
import pytest
import trio
import trio_websocket

from graced.keys import format_public_key, parse_public_key
from graced.protocol import ExitCode, key_id
from tests.conftest import Graced


def tcp_env(g: Graced) -> dict[str, str]:
    """gracectl's environment for the TCP listener: no socket, no client key, its own
    known keys file (the Unix socket's first use pinned that endpoint elsewhere)."""
    env = {k: v for k, v in g.env.items() if k not in ("GRACE_SOCKET", "GRACE_KEY")}
    env["GRACE_CLIENT_KEY"] = str(g.base / "no-client.key")
    env["GRACE_KNOWN_KEYS"] = str(g.base / "tcp-known-keys.json")
    return env


def tcp_port(g: Graced) -> int:
    return int(json.loads(g.ctl("status", "--json", check=True).stdout)["wire"]["tcp_ports"][0])


@pytest.mark.slow
def test_tcp_never_trusts_on_first_use(make_graced) -> None:
    g = make_graced(extra_config='listen = ["127.0.0.1:0"]\n')
    url = f"ws://127.0.0.1:{tcp_port(g)}"
    env = tcp_env(g)
    known = Path(env["GRACE_KNOWN_KEYS"])

    # Nothing pinned for the URL and no --key: refused before anything is asked.
    res = g.ctl("--url", url, "status", env=env)
    assert res.returncode == ExitCode.BAD_SIGNATURE, res
    assert res.stderr == (f"gracectl: no trusted key for {url}: pass --key FILE (the daemon's "
                          "key.pub) or pin it with 'gracectl keys trust'\n")
    assert res.stdout == "" and not known.exists()

    # keys trust --key with a key file that is not the daemon's: refused, nothing pinned.
    other = nacl.signing.SigningKey.generate().verify_key.encode()
    other_file = g.base / "other.pub"
    other_file.write_text(format_public_key(other))
    res = g.ctl("--url", url, "keys", "trust", "--key", str(other_file), env=env)
    assert res.returncode == ExitCode.BAD_SIGNATURE, res
    daemon_kid = key_id(parse_public_key((g.state / "key.pub").read_text()))
    assert res.stderr == (f"gracectl: the daemon's key {daemon_kid} is not {key_id(other)} "
                          f"from {other_file}\n"), res.stderr
    assert not known.exists()

    # The daemon's own key file is pinned for the URL.
    g.ctl("--url", url, "keys", "trust", "--key", str(g.state / "key.pub"), env=env,
          check=True)
    assert json.loads(known.read_text())[url]["kid"] == daemon_kid


async def _handshake(port: int, host: str, origin: str | None) -> int | None:
    """The HTTP status a WebSocket handshake with these Host and Origin headers gets
    (None: accepted)."""
    headers = [("Origin", origin)] if origin else []
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    try:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                ws = await trio_websocket.wrap_client_stream(nursery, stream, host, "/",
                                                             extra_headers=headers)
                await ws.aclose()
    except trio_websocket.ConnectionRejected as exc:
        return exc.status_code
    except BaseExceptionGroup as group:
        leaf = group.exceptions[0]
        if isinstance(leaf, trio_websocket.ConnectionRejected):
            return leaf.status_code
        raise
    return None


HANDSHAKES = [
    ("127.0.0.1", "https://ops.example", None),  # the allowed origin, a host it listens on
    ("127.0.0.1", None, None),  # no Origin: a non-browser client
    ("evil.example", None, 403),  # DNS rebinding: a name this daemon does not listen on
    ("evil.example", "https://ops.example", 403),
    ("127.0.0.1", "https://ops.example.evil.net", 403),  # starts with the allowed origin
    ("127.0.0.1", "https://ops.example:8443", 403),
]


async def test_handshake_checks_host_and_exact_origin(make_graced) -> None:
    g = make_graced(extra_config='listen = ["127.0.0.1:0"]\n'
                                 'allowed_origins = ["https://ops.example"]\n')
    port = tcp_port(g)
    got = [(host, origin, await _handshake(port, f"{host}:{port}", origin))
           for host, origin, _ in HANDSHAKES]
    assert got == HANDSHAKES


def _non_loopback_address() -> str | None:
    import psutil

    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family == socket.AF_INET and not a.address.startswith("127."):
                return str(a.address)
    return None


def test_plain_ws_to_a_non_loopback_address_is_a_usage_error_before_any_connection(
        shortdir: Path) -> None:
    """--url ws:// to an address that is not loopback would send requests (and a key's
    signatures) in clear: exit 2 before any connection; a bad port or host likewise."""
    address = _non_loopback_address()
    listener = socket.socket()
    listener.bind((address or "127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    g = Graced(shortdir)  # not started: nothing may be reached anyway
    env = tcp_env(g)
    key = shortdir / "any.pub"
    key.write_text(format_public_key(bytes(nacl.signing.SigningKey.generate().verify_key))
                   + "\n")
    env["GRACE_KEY"] = str(key)
    urls = [f"ws://{address or '10.1.2.3'}:{port}", "ws://127.0.0.1:99999", "ws://[::1"]
    try:
        for url in urls:
            res = g.ctl("--url", url, "status", env=env)
            assert res.returncode == ExitCode.USAGE, (url, res.returncode, res.stderr)
            assert "Traceback" not in res.stderr and url in res.stderr, res.stderr
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody connected
    finally:
        listener.close()
    assert "ws:// is plain text, only for a loopback address" in g.ctl(
        "--url", urls[0], "status", env=env).stderr
