"""The browser's verifier (gracectl/webui/verify.js, run by the page's Worker) on a real
graced's stream, in Node: it proves the stream whole and stops at the first frame of each
kind of tampering, naming the seq the page's red banner names."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from tests.conftest import ROOT, Graced
from tests.helpers.streams import complete_stream
from tests.helpers.tamper_proxy import tamper_frames

NODE = shutil.which("node")
pytestmark = pytest.mark.skipif(NODE is None, reason="node (Node.js) is not installed: "
                                "apt-get install nodejs")


def page_verify(g: Graced, lines: list[str], per: int = 7) -> dict:
    path = g.base / "web-stream.jsonl"
    path.write_text("".join(x + "\n" for x in lines))
    assert NODE is not None
    res = subprocess.run([NODE, str(ROOT / "tests" / "js" / "webverify.mjs"),
                          str(g.state / "key.pub"), str(path), str(per)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


@pytest.mark.slow
def test_the_pages_verifier_proves_a_real_stream_and_stops_at_each_tampering(
        graced: Graced) -> None:
    g = graced
    lines = complete_stream(g)
    last = json.loads(lines[-1])["seq"]
    for per in (1, 7, 1000):  # one frame a message, several, the whole stream in one
        assert page_verify(g, lines, per) == {"ok": True, "verified": len(lines), "last": last}
    target = 4
    cases = {  # mode: (the seq named, words of the reason)
        "forge": (target, "bad signature"),
        "alter": (target, "bad signature"),
        "drop": (target + 1, "gap"),
        "swap": (target + 1, "gap"),
        "replay": (target, "replayed"),
        "drop-head": (target, "missing head: expected seq 1"),
    }
    for mode, (seq, words) in cases.items():
        got = page_verify(g, tamper_frames(lines, mode, target, {}))
        assert got["ok"] is False and got["seq"] == seq and words in got["reason"], (mode, got)
    # Not canonical: the same event with a space, or a key twice.
    spaced = [*lines]
    spaced[2] = spaced[2].replace('"seq":', '"seq": ')
    assert page_verify(g, spaced) == {"ok": False, "seq": 3, "reason": "not in canonical form"}
    twice = [*lines]
    twice[2] = twice[2][:-1] + ',"v":2}'
    assert page_verify(g, twice)["reason"] == "not in canonical form"
