"""Peers who may reach graced but hold no right to act: what they can cost it.

From the attacker's review of #14: a local user who may open the socket (not an
approver) had every event pruned by refused approvals; a captured signed ``emit`` was
accepted again after a restart; unauthenticated TCP peers held every slot and flooded
the log; a reader grew graced's memory by hundreds of MB.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import subprocess
import sys
import time
from typing import Any

import pytest

from tests.helpers.users import ensure_user
from tests.test_missions_e2e import MISSIONS, Watch
from tests.test_remediation_e2e import _send_raw

OUTSIDER = "grace-outsider"

# Sends COUNT missions.approve requests per connection on CONNS Unix connections, all
# pipelined, and prints how they were answered ({error code: count}) as JSON.
APPROVER_FLOOD = r"""
import json, sys, collections
import trio, trio_websocket
path, ids, conns = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
codes = collections.Counter()
async def one(c):
    async with trio.open_nursery() as nursery:
        stream = await trio.open_unix_socket(path)
        ws = await trio_websocket.wrap_client_stream(nursery, stream, "localhost", "/",
                                                     max_message_size=2**24)
        async def send():
            for i, mid in enumerate(ids):
                await ws.send_message(json.dumps({"id": i, "nonce": f"n{c}-{i}",
                    "method": "missions.approve", "params": {"id": mid}}))
        nursery.start_soon(send)
        got = 0
        while got < len(ids):
            for line in (await ws.get_message()).split("\n"):
                frame = json.loads(line)
                if frame.get("type") == "response":
                    got += 1
                    codes[frame["error"]["code"] if not frame["ok"] else "ok"] += 1
        await ws.aclose()
        nursery.cancel_scope.cancel()
async def main():
    async with trio.open_nursery() as nursery:
        for c in range(conns):
            nursery.start_soon(one, c)
trio.run(main)
print(json.dumps(codes))
"""


def _outsider() -> str:
    if os.geteuid() != 0:
        pytest.skip("needs root to create a second local user (not an approver)")
    return ensure_user(OUTSIDER)


def _events(g: Any, since: int, *patterns: str) -> list[dict[str, Any]]:
    out = g.ctl("tail", "--json", "--since", str(since), "--no-follow", *patterns,
                check=True).stdout
    return [json.loads(line) for line in out.splitlines()]


def _head(g: Any) -> int:
    return int(json.loads(g.ctl("status", "--json", check=True).stdout)["head_seq"])


@pytest.mark.slow
def test_a_non_approvers_refused_approvals_cannot_fill_the_journal(make_graced,
                                                                   shortdir) -> None:
    """A local user who may open the socket but not approve sends 3000 approvals over 3
    connections, half for the mission awaiting approval, half for missions that do not
    exist: all are refused, at most 10 are journaled (a minute's budget for that uid;
    none for a mission that does not exist), the rest are counted in status."""
    _outsider()
    value = shortdir / "v"
    value.write_text("100")
    g = make_graced(detectors=(
        f'[[detector]]\nname = "m"\nkind = "value"\ninterval = 1.0\nfile = "{value}"\n'
        'threshold = 50.0\n\n[[playbook]]\nname = "fix"\ndetector = "m"\nrisk = "high"\n'
        '[[playbook.step]]\naction = "run"\nargv = ["true"]\n'
        + MISSIONS.format(flap=0.0) + '\n[remediation]\napprovers = ["root"]\n'))
    w = Watch(g)
    try:
        mid = w.wait("mission.awaiting_approval", "m", 20)["payload"]["id"]
    finally:
        w.close()
    shortdir.chmod(0o755)
    os.chmod(g.socket, 0o666)
    before = _head(g)
    ids = [mid, 10**6 + 1] * 500
    flood = subprocess.run(
        ["setpriv", f"--reuid={OUTSIDER}", f"--regid={OUTSIDER}", "--clear-groups",
         sys.executable, "-c", APPROVER_FLOOD,
         str(g.socket), json.dumps(ids), "3"],
        capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert flood.returncode == 0, flood.stderr
    assert json.loads(flood.stdout) == {"not_authorised": 3000}, flood.stdout
    refused = _events(g, before, "mission.approval_refused")
    assert 1 <= len(refused) <= 10, len(refused)
    assert {e["payload"]["mission"] for e in refused} == {mid}
    journaled = sum(len(json.dumps(e)) for e in refused)
    assert journaled < 10 * 1024, journaled  # bytes the flood put in the journal
    status = json.loads(g.ctl("status", "--json", check=True).stdout)
    assert status["wire"]["refused_requests"] >= 3000 - len(refused), status["wire"]
    shown = json.loads(g.ctl("missions", "show", str(mid), "--json", check=True).stdout)
    assert shown["state"] == "awaiting_approval"


def _control_key() -> tuple[Any, str]:
    import nacl.signing

    from graced.protocol import Signer

    key = Signer(nacl.signing.SigningKey.generate())
    return key, f"ed25519 {base64.b64encode(key.public_key).decode()} {key.kid}"


def _signed(key: Any, daemon: str, method: str, params: dict[str, Any]) -> dict[str, Any]:
    from graced.protocol.wire import request_signing_bytes

    nonce, ts = secrets.token_hex(16), time.time()
    sig = key.sign_bytes(request_signing_bytes(1, nonce, method, params, ts, key.kid, daemon))
    return {"id": 1, "nonce": nonce, "method": method, "params": params,
            "auth": {"kid": key.kid, "ts": ts, "daemon": daemon, "sig": sig}}


def _url(g: Any) -> str:
    status = json.loads(g.ctl("status", "--json", check=True).stdout)
    return f"ws://127.0.0.1:{status['wire']['tcp_ports'][0]}"


@pytest.mark.slow
async def test_a_captured_signed_emit_is_refused_after_a_restart(make_graced) -> None:
    """A signed emit (one event, and many) captured on the wire and sent again after
    graced restarted (its memory of nonces gone) is refused as a replay; the journal
    holds the events once."""
    key, pub = _control_key()
    g = make_graced(f'listen = ["127.0.0.1:0"]\n\n[remediation]\ncontrol_keys = ["{pub}"]\n')
    daemon = json.loads(g.ctl("status", "--json", check=True).stdout)["daemon_id"]
    one = _signed(key, daemon, "emit", {"topic": "user.captured", "payload": {"n": 1}})
    many = _signed(key, daemon, "emit", {"topic": "user.captured", "payload": {"n": 2},
                                         "count": 3})
    for frame in (one, many):
        assert (await _send_raw(_url(g), frame))["ok"]
    assert g.stop() == 0
    g.start()
    for frame in (one, many):
        again = await _send_raw(_url(g), frame)
        assert not again["ok"] and again["error"]["code"] == "not_authorised", again
        assert "replayed request" in again["error"]["message"], again
    assert len(_events(g, 1, "user.captured")) == 4
