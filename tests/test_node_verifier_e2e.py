"""An independent verifier in another language: tests/js/verify.mjs, Node with its
built-in WebCrypto only, written from docs/protocol.md, proves a real graced's stream
byte for byte and refuses the tampered ones with gracectl's exit codes."""

from __future__ import annotations

import json
import shutil
import subprocess

import nacl.signing
import pytest

from graced.protocol import ExitCode, canonical_text, signing_bytes
from graced.protocol.signing import b64
from tests.conftest import ROOT, Graced
from tests.helpers.streams import complete_stream

NODE = shutil.which("node")
pytestmark = pytest.mark.skipif(NODE is None, reason="node (Node.js) is not installed: "
                                "apt-get install nodejs")


def node_verify(g: Graced, lines: list[str]) -> tuple[int, str]:
    path = g.base / "stream.jsonl"
    path.write_bytes("".join(x + "\n" for x in lines).encode())
    assert NODE is not None
    res = subprocess.run([NODE, str(ROOT / "tests" / "js" / "verify.mjs"),
                          str(g.state / "key.pub"), str(path)],
                         capture_output=True, text=True, timeout=120)
    return res.returncode, res.stdout + res.stderr


@pytest.mark.slow
def test_node_proves_a_real_stream_and_refuses_tampering(graced: Graced) -> None:
    g = graced
    g.ctl("emit", "user.load", "--count", "50", "--payload",
          json.dumps({"x": 2.0, "y": 1e-7, "z": 0.00001, "big": 1e21, "t": "tab\t😀 é",
                      "ﬁ": 1, "😀": 2}), check=True)
    lines = complete_stream(g)
    rc, out = node_verify(g, lines)
    assert rc == 0, out
    last = json.loads(lines[-1])
    assert f"verified {len(lines)} events (seq 1..{last['seq']})" in out, out
    # The same verdict as gracectl, and the same last hash.
    ctl = json.loads(g.ctl("verify", "--key", str(g.state / "key.pub"), "--json",
                           str(g.base / "stream.jsonl")).stdout)
    assert ctl["ok"] and ctl["last_hash"] in out

    note = next(i for i, x in enumerate(lines) if '"user.note"' in x)
    ev = json.loads(lines[note])
    forged = dict(ev, sig=b64(nacl.signing.SigningKey.generate().sign(
        signing_bytes(ev)).signature))
    cases = {
        "altered": (canonical_text(dict(ev, payload={"msg": "evil"})), ExitCode.CHAIN_BROKEN),
        "forged": (canonical_text(forged), ExitCode.BAD_SIGNATURE),
        "duplicate key": ('{"topic":"mission.rejected",' + lines[note][1:],
                          ExitCode.CHAIN_BROKEN),
        "number form": (lines[note].replace("99.5", "99.50"), ExitCode.CHAIN_BROKEN),
        "escape form": (lines[note].replace("é", "\\u00e9"), ExitCode.CHAIN_BROKEN),
    }
    for name, (line, code) in cases.items():
        assert line != lines[note], name
        rc, out = node_verify(g, lines[:note] + [line] + lines[note + 1:])
        assert rc == code and f"seq {ev['seq']}" in out, (name, rc, out)
    rc, out = node_verify(g, lines[:note] + lines[note + 1:])
    assert rc == ExitCode.CHAIN_BROKEN and "gap" in out, out
    rc, out = node_verify(g, lines[:-1])
    assert rc == ExitCode.STALE and "missing tail" in out, out
