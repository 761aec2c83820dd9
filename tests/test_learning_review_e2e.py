"""The attacker review of learning (issue #22), finding by finding, against a real graced
and the real gracectl: each test failed on the code the review broke, and holds now.

1. a second local user holding a watched file demoted a working playbook;
2. a large import broke ``knowledge ls/show`` and stalled graced per read request;
3. "cleared before approval" started the flap window;
4. a key pinned for one endpoint counted for any daemon id, and ``--key`` silently
   replaced the pinned key;
5. graced never verified the export itself;
6. an approval while the symptom was clearing still ran the playbook;
8. control characters in imported names forged output lines;
9. a stored row nested too deep, a BLOB or bytes that are not UTF-8 stopped graced at
   every start;
10. an older export replayed over a newer one;
11. a lone surrogate changed memory without a journal entry;
12. a chunked import was not all or nothing.
(7, held-back runs counted through similar missions, is a pure-core test in
tests/test_learning.py.)
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import nacl.signing
import pytest
import trio

from gracectl.client import Endpoint, connect
from gracectl.errors import CtlError, RemoteError
from graced.protocol import Signer
from tests.conftest import Graced
from tests.helpers.procs import LineCollector, poll_until
from tests.test_learning_e2e import FAULT, NORMAL, fix, value_detector
from tests.test_learning_hostile_e2e import SETTINGS, Exporter, answering, record, status_within
from tests.test_learning_slow_e2e import second_user  # noqa: F401  (a fixture)
from tests.test_missions_e2e import Watch

pytestmark = pytest.mark.slow


def quick_playbook(name: str, detector: str, risk: str, argv: list[str]) -> str:
    return (f'[[playbook]]\nname = "{name}"\ndetector = "{detector}"\nrisk = "{risk}"\n'
            f"budget = 1000\nverify_timeout = 2.0\n"
            f'[[playbook.step]]\naction = "run"\nargv = {json.dumps(argv)}\ntimeout = 10.0\n')


def recovered_once_more(recovered: LineCollector, detector: str, seen: int) -> None:
    assert recovered.wait_for(lambda _: len([
        e for e in recovered.events() if e["payload"]["detector"] == detector]) > seen, 20)


def recoveries(recovered: LineCollector, detector: str) -> int:
    return len([e for e in recovered.events() if e["payload"]["detector"] == detector])


# -- 1 -------------------------------------------------------------------------------

HOLDER = 'while :; do echo 99 > "$1"; sleep 0.05; done'


def test_a_second_user_holding_the_symptom_cannot_demote_a_working_playbook(
        make_graced, second_user: str) -> None:  # noqa: F811
    """Finding 1: hold a world-writable watched file high through the verifications of
    two incidents (demote_after = 2, demote_span = 0): the working playbook's steps all
    succeed, so its failures are ones anyone could cause; they count in its record but
    do not demote it, and on the next real fault it runs and fixes it."""
    shared = Path(tempfile.mkdtemp(prefix="ghold", dir="/tmp"))
    try:
        shared.chmod(0o755)
        watched = shared / "queue"
        watched.write_text(NORMAL)
        watched.chmod(0o666)
        g = make_graced(detectors=value_detector("queue", watched)
                        + quick_playbook("fix-queue", "queue", "low", fix(watched))
                        + SETTINGS)
        w = Watch(g)
        recovered = LineCollector(g.ctl_popen("tail", "--json", "detector.recovered"))
        for n in (1, 2):
            seen = recoveries(recovered, "queue")
            holder = subprocess.Popen(
                ["runuser", "-u", second_user, "--", "/bin/sh", "-c", HOLDER, "sh",
                 str(watched)], start_new_session=True)
            try:
                escalated = w.wait("mission.escalated", "queue", 40, count=n)["payload"]
            finally:
                os.killpg(holder.pid, signal.SIGTERM)
                holder.wait(10)
            assert "failed 2 times in this incident" in escalated["reason"], escalated
            watched.write_text(NORMAL)
            recovered_once_more(recovered, "queue", seen)
        shown = json.loads(g.ctl("knowledge", "show", "queue:queue", "--json",
                                 check=True).stdout)["pattern"]
        fixer = shown["playbooks"][0]
        assert (fixer["playbook"], fixer["failures"], fixer["demoted"]) == (
            "fix-queue", 4, False), fixer
        assert "never demotes alone" in fixer["held_back"], fixer
        human = g.ctl("knowledge", "show", "queue:queue", check=True).stdout
        assert "fix-queue not demoted" in human
        # A real fault now: the working playbook runs and fixes it.
        watched.write_text(FAULT)
        fixed = w.wait("mission.resolved", "queue", 30)["payload"]
        assert fixed["playbook"] == "fix-queue"
        assert not g.ctl("tail", "--json", "--since", "1", "--no-follow", "learning.demoted",
                         check=True).stdout
        recovered.proc.terminate()
        w.close()
    finally:
        shutil.rmtree(shared, ignore_errors=True)


# -- 3 and 6 ---------------------------------------------------------------------------

def critical(make_graced: Any, shortdir: Path, settings: str) -> tuple[Graced, Path, Path]:
    crit, ran = shortdir / "crit", shortdir / "ran"
    crit.write_text(NORMAL)
    g = make_graced(detectors=value_detector("crit", crit, "critical") + quick_playbook(
        "drain", "crit", "high", ["/bin/sh", "-c", f"echo ran >> {ran}; echo {NORMAL} > {crit}"])
        + settings)
    return g, crit, ran


def test_a_critical_fault_that_cleared_before_approval_is_approvable_when_it_returns(
        make_graced, shortdir: Path) -> None:
    """Finding 3: on the default flap_window (600 s), a critical mission that cleared
    while waiting for approval made its return "flapping": escalated, unapprovable. It
    waits for approval again, and the approval runs it."""
    g, crit, ran = critical(make_graced, shortdir, "\n[missions]\nresolve_after = 2\n")
    w = Watch(g)
    crit.write_text(FAULT)
    first = w.wait("mission.awaiting_approval", "crit", 20)["payload"]
    crit.write_text(NORMAL)
    cleared = w.wait("mission.resolved", "crit", 20)["payload"]
    assert cleared["id"] == first["id"] and cleared["reason"].startswith(
        "cleared before approval")
    crit.write_text(FAULT)  # the real fault comes back a moment later
    again = w.wait("mission.awaiting_approval", "crit", 20, count=2)["payload"]
    assert not again["flapping"] and again["severity"] == "critical"
    assert not w.events("mission.escalated", "crit")
    g.ctl("missions", "approve", str(again["id"]), "--yes", check=True)
    assert w.wait("mission.resolved", "crit", 30, count=2)["payload"]["id"] == again["id"]
    assert ran.read_text() == "ran\n"
    w.close()


def test_an_approval_while_the_symptom_is_clearing_is_refused_unless_forced(
        make_graced, shortdir: Path) -> None:
    """Finding 6: approving a mission whose latest samples were normal (clearing, not
    yet resolved as cleared) ran the playbook. It is refused with the reason and runs
    nothing; --even-if-clearing runs it, with a warning."""
    g, crit, ran = critical(make_graced, shortdir,
                            "\n[missions]\nresolve_after = 100\n")
    w = Watch(g)
    crit.write_text(FAULT)
    mid = w.wait("mission.awaiting_approval", "crit", 20)["payload"]["id"]
    crit.write_text(NORMAL)

    def streak() -> int:
        m = json.loads(g.ctl("missions", "show", str(mid), "--json", check=True).stdout)
        return int(m["normal_streak"])

    poll_until(lambda: streak() >= 1, 10, "a normal sample counted towards clearing")
    res = g.ctl("missions", "approve", str(mid), "--yes")
    assert res.returncode == 1 and "the symptom is clearing" in res.stderr, res.stderr
    assert res.stderr.count("\n") == 1 and "--even-if-clearing" in res.stderr
    assert json.loads(g.ctl("missions", "show", str(mid), "--json", check=True).stdout)[
        "state"] == "awaiting_approval"
    assert not ran.exists()
    res = g.ctl("missions", "approve", str(mid), "--yes", "--even-if-clearing", check=True)
    assert "warning: the latest sample of crit queue was normal" in res.stderr, res.stderr
    w.wait("mission.verifying", "crit", 30)  # its steps ran
    assert ran.read_text() == "ran\n"
    w.close()


# -- 2 --------------------------------------------------------------------------------

def test_a_large_import_is_capped_paged_and_leaves_graced_answering(
        make_graced, shortdir: Path) -> None:
    """Finding 2: 100,000 records for one pattern made knowledge ls/show answer 16 MiB
    and stalled graced about 13 s per request. One pattern holds at most 64 playbooks
    (refused with one line naming the field); 20,000 patterns import, and ls and show
    answer pages, quickly, while status stays within 1 s."""
    star = shortdir / "star"
    star.write_text(NORMAL)
    g = make_graced(detectors=value_detector("star", star) + SETTINGS)
    ex = Exporter(shortdir)
    wide = ex.write(shortdir / "wide.json", [record(playbook=f"p{i}") for i in range(65)])
    res = g.ctl("knowledge", "import", "--key", str(ex.key), str(wide))
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert "patterns[64].playbook: more than 64 playbooks for pattern star:queue" in res.stderr
    many = ex.write(shortdir / "many.json", [
        record(signature=f"star:q{i:05}", subject=f"q{i:05}", last_seen=2.0 + i)
        for i in range(20_000)])
    g.ctl("knowledge", "import", "--key", str(ex.key), str(many), check=True, timeout=120)
    for _ in range(3):
        started = time.monotonic()
        page = json.loads(g.ctl("knowledge", "ls", "--json", "--limit", "5", "--offset",
                                "10", check=True).stdout)
        assert time.monotonic() - started < 5
        assert [p["pattern"] for p in page] == [f"star:q{i:05}" for i in
                                                range(19_989, 19_984, -1)]
        status_within(g, 1.0)
    listed = g.ctl("knowledge", "ls", "--limit", "3", "--offset", "3", check=True)
    assert "patterns 4-6 of 20000 shown" in listed.stderr, listed.stderr
    shown = g.ctl("knowledge", "show", "star:q00007", "--limit", "1", "--json", check=True)
    assert json.loads(shown.stdout)["pattern"]["playbooks_total"] == 1
    g.stop()
    g.start()
    answering(g)


# -- 4, 5, 10, 11, 12: graced checks the import itself -----------------------------------

async def raw_import(g: Graced, raw: bytes, key: bytes, **params: Any) -> dict[str, Any]:
    """Upload a file and import it over the socket, bypassing gracectl's own checks."""
    async with connect(Endpoint(socket=str(g.socket))) as conn:
        for offset in range(0, len(raw), 30_000):
            await conn.request("knowledge.upload", {
                "offset": offset,
                "data": base64.b64encode(raw[offset:offset + 30_000]).decode()})
        result: dict[str, Any] = await conn.request("knowledge.import", {
            "key": base64.b64encode(key).decode(), **params})
        return result


def refused(g: Graced, raw: bytes, key: bytes, **params: Any) -> RemoteError:
    with pytest.raises(CtlError) as info:
        trio.run(lambda: raw_import(g, raw, key, **params))
    assert isinstance(info.value, RemoteError), info.value
    return info.value


def imports_journaled(g: Graced) -> int:
    out = g.ctl("tail", "--json", "--since", "1", "--no-follow", "learning.imported",
                check=True).stdout
    return len(out.splitlines())


def test_graced_verifies_imports_itself_all_or_nothing(make_graced, shortdir: Path) -> None:
    """Findings 5, 10, 11, 12 (and 4 on graced's side): a file sent straight to the
    socket is checked by graced: an edited one (signature), one signed by another key
    for a daemon it holds (unless replace_key, journaled), one older than the export it
    holds, one with a lone surrogate in a name, one that would break a cap when added
    to what is held: each refused whole, nothing changed in memory or the journal."""
    star = shortdir / "star"
    star.write_text(NORMAL)
    g = make_graced(detectors=value_detector("star", star) + SETTINGS)
    ex = Exporter(shortdir)

    def doc(patterns: list[dict[str, Any]], exported_at: float = 100.0,
            signer: Any = None) -> dict[str, Any]:
        return dict((signer or ex.signer).sign_frame({
            "format": "grace-knowledge", "version": 2, "source": "foreign-daemon",
            "host": "foreign-host", "exported_at": exported_at, "patterns": patterns}))

    def raw(d: dict[str, Any]) -> bytes:
        return json.dumps(d).encode()

    key = ex.signer.public_key
    v1 = doc([record(), record(playbook="other")], exported_at=200.0)
    done = trio.run(lambda: raw_import(g, raw(v1), key))
    assert done["counts"] == {"new": 2, "changed": 0, "same": 0, "removed": 0}
    def shown() -> Any:
        return json.loads(g.ctl("knowledge", "show", "star:queue", "--json",
                                check=True).stdout)["pattern"]["playbooks"]

    before = shown()
    journaled = imports_journaled(g)

    # 5: edited after signing.
    edited = {**v1, "patterns": [record(successes=5000)]}
    err = refused(g, raw(edited), key)
    assert err.code_name == "bad_signature" and "the signature does not match" in str(err)
    # 4: another key for this daemon id (an impostor's valid signature).
    impostor = Signer(nacl.signing.SigningKey.generate())
    forged = doc([record(successes=1000)], exported_at=300.0, signer=impostor)
    err = refused(g, raw(forged), impostor.public_key)
    assert err.code_name == "key_changed" and "--replace-key" in str(err)
    # 10: an older export of the same daemon, replayed.
    older = doc([record(failures=1)], exported_at=150.0)
    err = refused(g, raw(older), key)
    assert "older than the one imported already" in str(err)
    # The newcomer's P9: the times in local ISO 8601, not epoch seconds.
    assert re.search(r"daemon \S+ \(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d([+-]\d\d:\d\d|Z)\) "
                     r"is older than the one imported already \(\d{4}-", str(err)), str(err)
    # 11: a lone surrogate in a name (valid JSON, valid UTF-8 bytes).
    lone = raw(doc([record()], exported_at=300.0)).replace(
        b'"imported-star"', b'"imported-\\ud800"')
    err = refused(g, lone, key)
    assert "playbook: holds the control character U+D800" in str(err)
    # 12: a cap broken by what the file adds to what is held: refused whole.
    other = Exporter(shortdir)
    wide = dict(other.signer.sign_frame({
        "format": "grace-knowledge", "version": 2, "source": "second-daemon", "host": "h2",
        "exported_at": 1.0, "patterns": [record(playbook=f"p{i}") for i in range(63)]}))
    err = refused(g, raw(wide), other.signer.public_key)
    assert "would have more than 64 playbooks" in str(err)
    # 8: a newline in a name, refused at import.
    newline = doc([record(playbook="noop\nstar:queue  fix  removed")], exported_at=300.0)
    err = refused(g, raw(newline), key)
    assert "holds the control character U+000A" in str(err)
    # Nothing of it changed anything, nor was journaled.
    assert shown() == before
    assert imports_journaled(g) == journaled
    assert answering(g)["learning"]["quarantined"]["rows"] == 0
    # The dry run is the plan the import applies; a replaced key is journaled.
    newer = doc([record(successes=4)], exported_at=400.0, signer=impostor)
    dry = trio.run(lambda: raw_import(g, raw(newer), impostor.public_key, dry_run=True,
                                      replace_key=True))
    real = trio.run(lambda: raw_import(g, raw(newer), impostor.public_key,
                                       replace_key=True))
    assert dry["changes"] == real["changes"] and dry["counts"] == real["counts"] == {
        "new": 0, "changed": 1, "same": 0, "removed": 1}
    event = json.loads(g.ctl("tail", "--json", "--since", "1", "--no-follow",
                             "learning.imported", check=True).stdout.splitlines()[-1])
    assert event["payload"]["key_replaced"] and event["payload"]["kid"] == impostor.kid
    g.stop()
    g.start()  # the import, its source's key and export time are durable
    err = refused(g, raw(v1), key)
    assert err.code_name == "key_changed"


def test_knowledge_keys_are_pinned_per_daemon_id(make_graced, shortdir: Path) -> None:
    """Finding 4 in gracectl: a key pinned for any endpoint counted for every daemon id
    it claimed, the first one found winning, and --key silently replaced the pinned
    key. Now: two endpoints that pinned different keys for one id are ambiguous
    (refused); --key other than the key pinned for the id needs --replace-key."""
    star = shortdir / "star"
    star.write_text(NORMAL)
    g = make_graced(detectors=value_detector("star", star) + SETTINGS)
    (shortdir / "evil").mkdir()
    ex, evil = Exporter(shortdir), Exporter(shortdir / "evil")
    path = ex.write(shortdir / "seed.json", [record()])
    # First import with --key: pinned for daemon id foreign-daemon.
    g.ctl("knowledge", "import", "--key", str(ex.key), str(path), check=True)
    again = g.ctl("knowledge", "import", str(path), check=True)  # the pinned key
    assert "signature verified with its pinned key" in again.stderr
    forged = evil.write(shortdir / "forged.json", [record(successes=1000)])
    res = g.ctl("knowledge", "import", "--key", str(evil.key), str(forged))
    assert res.returncode == 10 and "is not the key pinned for daemon foreign-daemon" in (
        res.stderr) and res.stderr.count("\n") == 1, res.stderr
    # Two endpoints claiming the same daemon id with different keys: neither counts.
    known = Path(g.home / ".config" / "grace" / "known_keys.json")
    pins = json.loads(known.read_text())
    pins.pop("knowledge:foreign-daemon")
    for name, exp in (("unix:/a.sock", ex), ("unix:/b.sock", evil)):
        pins[name] = {"public_key": base64.b64encode(exp.signer.public_key).decode(),
                      "kid": exp.signer.kid, "daemon_id": "foreign-daemon",
                      "pinned_at": "2026-01-01T00:00:00Z"}
    known.write_text(json.dumps(pins))
    res = g.ctl("knowledge", "import", str(path))
    assert res.returncode == 10 and "pinned different keys for daemon id" in res.stderr
    # --replace-key: accepted loudly (gracectl and graced), and pinned instead.
    res = g.ctl("knowledge", "import", "--key", str(evil.key), "--replace-key",
                str(evil.write(shortdir / "newer.json", [record(successes=4)])))
    assert res.returncode == 0, res.stderr
    assert "WARNING" in res.stderr and evil.signer.kid in res.stderr


# -- 9 --------------------------------------------------------------------------------

def test_rows_nested_too_deep_blobs_and_bad_utf8_are_quarantined_at_start(
        make_graced, shortdir: Path) -> None:
    """Finding 9: a stored row whose data is nested 100,000 deep, a BLOB in a text
    column, or bytes that are not UTF-8, stopped graced at every start. Each is
    quarantined (status counts them) and graced starts and answers."""
    star = shortdir / "star"
    star.write_text(NORMAL)
    g = make_graced(detectors=value_detector("star", star) + SETTINGS)
    g.stop()
    good = ["star:queue", "ok", "x", "star", "queue", 1, 0, 0.0, 0, 1.0, 2.0]
    with sqlite3.connect(g.state / "journal.db") as db:
        cols = ("signature, playbook, source, detector, subject, successes, failures, "
                "ttr_total, ttr_count, first_seen, last_seen, data")
        ins = f"INSERT INTO patterns ({cols}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        db.execute(ins, (*good, "{}"))
        db.execute(ins, (*good[:1], "deep", *good[2:], "[" * 100_000 + "]" * 100_000))
        db.execute(ins, (b"star:queue", "blob", *good[2:], "{}"))
        db.execute(ins, (*good[:1], "blobdata", *good[2:], b"\x00\xff"))
        db.execute(f"INSERT INTO patterns ({cols}) VALUES (?, CAST(? AS TEXT), ?, ?, ?, ?, "
                   "?, ?, ?, ?, ?, ?)", (*good[:1], b"bad\xff", *good[2:], "{}"))
    for _ in range(2):
        g.start()
        status = answering(g)
        assert status["learning"]["quarantined"]["rows"] == 4, status["learning"]
        shown = json.loads(g.ctl("knowledge", "show", "star:queue", "--json",
                                 check=True).stdout)["pattern"]
        assert [p["playbook"] for p in shown["playbooks"]] == ["ok"]
        g.stop()
