"""Strings with no UTF-8 form, from any client, never wedge or kill graced.

A command line argument that is not UTF-8 reaches Python as a lone surrogate
(U+DC80-U+DCFF), and a JSON request may carry ``\\udcff`` escapes: neither can be
signed nor journaled. Once, an ``emit`` topic holding one wedged the journal (every
commit failed, every event queued behind it was lost at the next crash) and a silence
comment holding one killed graced when the silence expired. Against a real graced:
gracectl refuses to send such bytes (exit 2), graced refuses them from a raw client
(bad_request), and the journal keeps committing."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import nacl.signing
import pytest
import trio
import trio_websocket

from graced.journal import Journal
from graced.mesh import Mesh
from graced.protocol import Signer
from tests.conftest import Graced

BAD = "\udcff\udcfe"  # the bytes 0xFF 0xFE as Python decodes them from argv


async def raw_requests(g: Graced, *texts: str) -> list[dict[str, Any]]:
    """Send each request text as is on graced's Unix socket; the responses, in order."""
    out: list[dict[str, Any]] = []
    async with trio.open_nursery() as nursery:
        stream = await trio.open_unix_socket(str(g.socket))
        ws = await trio_websocket.wrap_client_stream(nursery, stream, "localhost", "/")
        with trio.fail_after(20):
            for text in texts:
                await ws.send_message(text)
                got = None
                while got is None:
                    for line in str(await ws.get_message()).split("\n"):
                        frame = json.loads(line)
                        if frame.get("type") == "response":
                            got = frame
                out.append(got)
        await ws.aclose()
    return out


def request(rid: int, method: str, params: dict[str, Any]) -> str:
    # json.dumps writes a lone surrogate as its \udcff escape, as any client could.
    return json.dumps({"id": rid, "nonce": f"n{rid}", "method": method, "params": params})


def one_line_usage_error(res: Any) -> None:
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr
    # One error line (click's usage lines may come before it).
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith(("Error:", "gracectl:"))]
    assert len(errors) == 1, res.stderr
    assert "UTF-8" in res.stderr or "TOPIC" in res.stderr, res.stderr


def journaled(g: Graced, pattern: str) -> list[dict[str, Any]]:
    res = g.ctl("tail", "--no-follow", "--json", "--since", "1", pattern, check=True,
                timeout=20)
    return [json.loads(line) for line in res.stdout.splitlines()]


def still_serving(g: Graced) -> None:
    """graced runs, and a new event is journaled and answered at once."""
    assert g.proc is not None and g.proc.poll() is None, g.stderr()
    started = time.monotonic()
    res = g.ctl("emit", "user.after", "--payload", '{"ok": true}', timeout=20)
    assert res.returncode == 0, (res.returncode, res.stderr, g.stderr()[-2000:])
    assert time.monotonic() - started < 10
    assert [e["payload"] for e in journaled(g, "user.after")][-1] == {"ok": True}
    status = g.ctl("status", "--json", timeout=20)
    assert status.returncode == 0, status.stderr
    journal = json.loads(status.stdout)["journal"]
    assert journal["failing_since"] is None and journal["commit_errors"] == 0
    assert "lone surrogate" not in g.stderr() and "Traceback" not in g.stderr()


@pytest.mark.slow
async def test_strings_with_no_utf8_form_are_refused_and_the_journal_goes_on(
        graced: Graced) -> None:
    g = graced
    await trio.to_thread.run_sync(lambda: g.ctl("status", check=True))  # pins its key
    # gracectl refuses the bytes itself: one line, exit 2, nothing sent.
    for args in (["emit", f"user.{BAD}"], ["emit", "user.x", "--payload", f'{{"a": "{BAD}"}}'],
                 ["silence", "add", "h1", "--for", "10s", "--comment", f"maint{BAD}"],
                 ["silence", "add", f"h1:{BAD}", "--for", "10s", "--comment", "maint"]):
        one_line_usage_error(await trio.to_thread.run_sync(lambda a=args: g.ctl(*a)))
    # Topics that are empty after 'user.' or hold a glob or NATS wildcard (tail could not
    # select them alone) are refused too.
    for topic in ("user.", "user.*", "user.>", "user.a b", "user.[x]"):
        one_line_usage_error(await trio.to_thread.run_sync(lambda t=topic: g.ctl("emit", t)))

    # A raw client sending the same as JSON escapes: refused before anything is queued.
    answers = await raw_requests(
        g,
        request(1, "emit", {"topic": f"user.{BAD}", "payload": {}}),
        request(2, "emit", {"topic": "user.x", "payload": {"k": BAD}, "count": 3}),
        request(3, "emit", {"topic": "user.*", "payload": {}}),
        request(4, "silence.add", {"target": "h1", "duration": 1, "comment": f"maint{BAD}"}),
        request(5, "silence.add", {"target": f"h1:{BAD}", "duration": 1, "comment": "m"}),
        request(6, "silence.add", {"target": "h1", "duration": 1, "comment": "m",
                                   f"k{BAD}": 1}),
        # A surrogate in the nonce: answered, though unattributed (it echoes no nonce).
        json.dumps({"id": 7, "nonce": f"n{BAD}", "method": "status"}),
        request(8, "hello", {}),
    )
    for a in answers[:7]:
        assert a["ok"] is False and a["error"]["code"] == "bad_request", a
    assert "params.topic is not valid UTF-8 (byte 0xFF)" in answers[0]["error"]["message"]
    assert "params.payload.k is not valid UTF-8" in answers[1]["error"]["message"]
    assert "params.topic: a topic is 'user.' then a name" in answers[2]["error"]["message"]
    assert "params.comment is not valid UTF-8" in answers[3]["error"]["message"]
    assert answers[6]["nonce"] is None and answers[6]["id"] is None
    assert answers[7]["ok"] is True  # the same connection is still served
    listed = await trio.to_thread.run_sync(
        lambda: g.ctl("silence", "ls", "--json", check=True))
    assert json.loads(listed.stdout) == []
    await trio.to_thread.run_sync(still_serving, g)
    assert journaled(g, "silence.*") == []
    assert [e["topic"] for e in journaled(g, "user.*")] == ["user.after"]


def _plant_silence(state: Path, comment: str, expires_at: float) -> None:
    """Write a silence into the journal's meta table as an older graced stored it."""
    db = sqlite3.connect(state / "journal.db")
    try:
        (text,) = db.execute("SELECT value FROM meta WHERE key = 'silences'").fetchone()
        data = json.loads(text)
        data["items"][0].update(comment=comment, expires_at=expires_at)
        db.execute("UPDATE meta SET value = ? WHERE key = 'silences'", (json.dumps(data),))
        db.commit()
    finally:
        db.close()


@pytest.mark.slow
def test_a_stored_silence_that_cannot_be_journaled_expires_without_killing_graced(
        make_graced: Any) -> None:
    """Stored by an older graced that let such a comment through: at its expiry graced
    journals silence.expired (U+FFFD for what has no UTF-8 form) and goes on."""
    g = make_graced()
    g.ctl("silence", "add", "h1", "--for", "1h", "--comment", "maintenance", check=True)
    assert g.stop() == 0
    _plant_silence(g.state, f"maint{BAD}", time.time() + 2)
    g.start()
    deadline = time.monotonic() + 30
    while not (expired := journaled(g, "silence.expired")):
        assert time.monotonic() < deadline, g.stderr()[-2000:]
        time.sleep(0.2)  # polled: the event is what the loop waits for
    assert expired[0]["payload"]["comment"] == "maint\ufffd\ufffd"
    assert json.loads(g.ctl("silence", "ls", "--json", check=True).stdout) == []
    assert g.proc is not None and g.proc.poll() is None
    res = g.ctl("emit", "user.after", timeout=20)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in g.stderr()


async def test_the_writer_drops_an_event_it_cannot_sign_and_commits_the_rest(
        tmp_path: Path) -> None:
    """The journal queue never wedges: an item that can never be signed (let through as
    already checked) is dropped once, logged, its publisher told; the rest commits."""
    journal = Journal(tmp_path / "journal.db", synchronous="normal")
    mesh = Mesh(journal, Signer(nacl.signing.SigningKey.generate()))
    async with trio.open_nursery() as nursery:
        await nursery.start(mesh.run)
        mesh.publish_nowait("user.before", {"i": 1})
        mesh.publish_nowait("user.bad", {"k": BAD}, checked=True,
                            writes=[("INSERT INTO meta (key, value) VALUES ('bad', '1')", ())])
        with pytest.raises(ValueError, match="lone surrogate"):
            await mesh.publish("user.x", {"k": BAD})  # refused in the publisher
        with pytest.raises(ValueError, match="lone surrogate"):
            await mesh.publish(f"user.{BAD}", {})
        ev = await mesh.publish("user.after", {"i": 2})
        assert ev is not None and ev.seq == 2
        assert mesh.dropped == 1 and mesh.commit_errors == 0 and mesh.failing_since is None
        nursery.cancel_scope.cancel()
    mesh.close()
    journal.close()
    db = sqlite3.connect(tmp_path / "journal.db")
    try:
        topics = [t for (t,) in db.execute("SELECT topic FROM events ORDER BY seq")]
        assert topics == ["user.before", "user.after"]
        assert db.execute("SELECT 1 FROM meta WHERE key = 'bad'").fetchone() is None
    finally:
        db.close()
