"""The second attacker review of learning (issue #22), against a real graced and the
real gracectl: each test failed on the code the review broke, and holds now.
(The pure-core halves are in tests/test_learning_review2.py.)"""

from __future__ import annotations

import base64
import json
import os
import signal
import sqlite3
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import nacl.signing
import pytest
import trio

from gracectl.client import Endpoint, connect
from gracectl.errors import RemoteError
from graced.keys import format_public_key
from graced.protocol import Signer
from tests.conftest import Graced
from tests.helpers.procs import LineCollector, poll_until
from tests.test_learning_e2e import FAULT, NORMAL, value_detector
from tests.test_learning_hostile_e2e import SETTINGS, status_within
from tests.test_learning_review_e2e import (
    HOLDER,
    critical,
    quick_playbook,
    recovered_once_more,
    recoveries,
)
from tests.test_missions_e2e import Watch

pytestmark = pytest.mark.slow


class Daemon:
    """A foreign daemon (its own id and key) that signs exports the way graced does."""

    def __init__(self, base: Path, source: str) -> None:
        self.source = source
        self.signer = Signer(nacl.signing.SigningKey.generate())
        self.key = base / f"{source}.pub"
        self.key.write_text(format_public_key(self.signer.public_key))
        self.base = base

    def export(self, patterns: list[dict[str, Any]], exported_at: float | None = None,
               name: str = "") -> Path:
        path = self.base / f"{self.source}{name}.json"
        path.write_text(json.dumps(self.signer.sign_frame({
            "format": "grace-knowledge", "version": 2, "source": self.source,
            "host": f"host-{self.source}", "patterns": patterns,
            "exported_at": time.time() if exported_at is None else exported_at})))
        return path

    def load(self, g: Graced, path: Path, *more: str) -> Any:
        return g.ctl("knowledge", "import", "--key", str(self.key), *more, str(path),
                     timeout=180)


def rec(sig: str, playbook: str, **over: Any) -> dict[str, Any]:
    det, subj = sig.split(":", 1)
    return {"signature": sig, "detector": det, "subject": subj, "playbook": playbook,
            "successes": 5, "failures": 0, "ttr_total": 0.0, "ttr_count": 0,
            "first_seen": 1.0, "last_seen": 2.0, **over}


# -- 1 ---------------------------------------------------------------------------------

def test_two_wide_imports_leave_the_default_ls_answering_and_graced_live(
        make_graced, shortdir: Path) -> None:
    """Finding 1: two imports of 64 playbooks for each pattern made the default
    ``knowledge ls`` answer more than a frame may hold (exit 3) after seconds on the event
    loop. Now the default page answers (a page bounded in records, the next offset on
    stderr), the pages cover every pattern, and status answers within 1 s meanwhile."""
    g = make_graced(extra_config=SETTINGS)
    wide = [rec(f"queue:s{i:04}", f"pb{j:02}", last_seen=2.0 + i) for i in range(500)
            for j in range(64)]
    for name in ("daemon-a", "daemon-b"):
        d = Daemon(shortdir, name)
        res = d.load(g, d.export(wide))
        assert res.returncode == 0, res.stderr
    late: list[float] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            started = time.monotonic()
            status_within(g, 5.0)
            late.append(time.monotonic() - started)
            done.wait(0.1)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        res = g.ctl("knowledge", "ls")
        assert res.returncode == 0, res.stderr
        assert "patterns 1-39 of 500 shown" in res.stderr, res.stderr
        assert "the next page: --offset 39" in res.stderr, res.stderr
        assert res.stdout.splitlines()[2].startswith("queue:s0499")
        last = g.ctl("knowledge", "ls", "--offset", "468", check=True)
        assert "patterns 469-500 of 500 shown" in last.stderr, last.stderr
        assert "next page" not in last.stderr
        page = json.loads(g.ctl("knowledge", "ls", "--json", "--offset", "468",
                                check=True).stdout)
        assert [p["pattern"] for p in page] == [f"queue:s{i:04}" for i in range(31, -1, -1)]
    finally:
        done.set()
        watcher.join()
    assert late and max(late) < 1.5, late
    res = g.ctl("knowledge", "ls", "--limit", "1001")
    assert res.returncode == 2 and "1001 is not in the range 1<=x<=1000" in res.stderr


# -- 4 ---------------------------------------------------------------------------------

def test_a_mission_row_sqlite_cannot_parse_is_mended_or_quarantined_at_start(
        make_graced) -> None:
    """Finding 4: a mission whose data held Infinity (copied from an edited outcomes row)
    made every later start fail ("malformed JSON", exit 1). Now graced starts: a
    non-finite number is kept as null, a row that is not JSON at all is moved to
    missions_quarantine, and the other missions are untouched."""
    g = make_graced(extra_config=SETTINGS)
    g.stop()
    db = sqlite3.connect(g.state / "journal.db")
    cols = ("INSERT INTO missions (id, detector, kind, subject, severity, state, summary, "
            "opened_at, updated_at, closed_at, occurrences, flapping, data) VALUES "
            "(?, 'queue', 'value', 'q', 'medium', ?, 'queue high', 1.0, 2.0, ?, 1, 0, ?)")
    db.execute(cols, (1, "resolved", 2.0, '{"steps": [], "similar": [{"ttr": Infinity}], '
                                          '"samples": [], "timeline": []}'))
    db.execute(cols, (2, "resolved", 2.0, "not json {"))
    db.execute(cols, (3, "open", None, '{"steps": [], "samples": [], "timeline": []}'))
    db.commit()
    db.close()
    g.start()
    shown = json.loads(g.ctl("missions", "show", "1", "--json", check=True).stdout)
    assert shown["similar"] == [{"ttr": None}], shown.get("similar")
    assert g.ctl("missions", "show", "2").returncode == 5
    assert json.loads(g.ctl("missions", "show", "3", "--json", check=True).stdout)[
        "state"] == "open"
    db = sqlite3.connect(g.state / "journal.db")
    assert [r[0] for r in db.execute("SELECT id FROM missions_quarantine")] == [2]
    db.close()
    assert "quarantined stored mission 2" in g.stderr()
    g.stop()
    g.start()  # and again: nothing left to mend


# -- 7 ---------------------------------------------------------------------------------

def test_a_future_export_is_refused_and_a_replaced_key_resets_the_export_time(
        make_graced, shortdir: Path) -> None:
    """Finding 7: an export dated 2286 claiming a daemon id locked that id out for ever
    (every genuine export was "older"). graced refuses an export dated more than the
    allowed skew ahead (exit 1, one line naming the field); and an operator who imports the genuine
    daemon's export with --replace-key (journaled) resets the export time the other key
    claimed."""
    g = make_graced(extra_config=SETTINGS)
    g.ctl("status", check=True)  # the daemon's key pinned: no note on stderr below
    impostor = Daemon(shortdir, "victim")
    far = impostor.export([rec("queue:q", "p")], exported_at=9.9e9, name="-far")
    res = impostor.load(g, far)
    assert res.returncode == 1 and res.stderr.count("\n") == 1, res.stderr
    assert "in the future" in res.stderr and "exported_at" in res.stderr
    # Within the skew (clocks differ a little) it imports, and pins the impostor's key.
    soon = impostor.export([rec("queue:q", "p")], exported_at=time.time() + 500,
                           name="-soon")
    assert impostor.load(g, soon).returncode == 0
    (shortdir / "genuine").mkdir()
    genuine = Daemon(shortdir / "genuine", "victim")
    real = genuine.export([rec("queue:q", "p", successes=9)])
    res = genuine.load(g, real)
    assert res.returncode != 0 and "--replace-key" in res.stderr, res.stderr
    res = genuine.load(g, real, "--replace-key", "--json")
    assert res.returncode == 0, res.stderr
    assert any("export time stored for daemon victim" in n
               for n in json.loads(res.stdout)["notes"]), res.stdout
    shown = json.loads(g.ctl("knowledge", "show", "queue:q", "--json",
                             check=True).stdout)["pattern"]["playbooks"][0]
    assert shown["imported"][0]["successes"] == 9
    ev = g.ctl("tail", "--json", "--since", "1", "--no-follow", "learning.imported",
               check=True).stdout.splitlines()
    assert json.loads(ev[-1])["payload"]["key_replaced"] is True


# -- 5 ---------------------------------------------------------------------------------

def test_one_knowledge_upload_at_a_time_and_a_file_that_is_no_export_is_refused_early(
        make_graced, shortdir: Path) -> None:
    """Finding 5: uploads had no daemon-wide bound (eight unfinished 32 MB uploads on
    eight connections, four imports parsed at once: gigabytes). One connection uploads
    (and has its file parsed) at a time: another is refused (unavailable) until it
    imports, goes away or idles past the deadline; a file that does not start as a JSON
    object is refused at its first part."""
    g = make_graced(extra_config=SETTINGS)
    d = Daemon(shortdir, "peer")
    raw = d.export([rec("queue:q", "p")]).read_bytes()
    part = {"offset": 0, "data": base64.b64encode(raw[:100]).decode()}

    async def scenario() -> None:
        async with connect(Endpoint(socket=str(g.socket))) as a:
            assert (await a.request("knowledge.upload", part))["received"] == 100
            async with connect(Endpoint(socket=str(g.socket))) as b:
                with pytest.raises(RemoteError) as info:
                    await b.request("knowledge.upload", part)
                assert info.value.code_name == "unavailable", info.value
                assert "another knowledge import" in str(info.value)
            # a finishes its file and imports it: the upload is free again.
            await a.request("knowledge.upload", {
                "offset": 100, "data": base64.b64encode(raw[100:]).decode()})
            done = await a.request("knowledge.import", {
                "key": base64.b64encode(d.signer.public_key).decode()})
            assert done["imported"] == 1
        async with connect(Endpoint(socket=str(g.socket))) as c:
            await c.request("knowledge.upload", part)  # a left it: c may start
        async with connect(Endpoint(socket=str(g.socket))) as e:
            # c's connection is gone: e takes over its unfinished upload.
            await e.request("knowledge.upload", part)
            with pytest.raises(RemoteError) as info:
                await e.request("knowledge.upload", {
                    "offset": 0, "data": base64.b64encode(b"  [1, 2, 3]").decode()})
            assert "not a knowledge export" in str(info.value)

    trio.run(scenario)
    status_within(g, 1.0)


# -- 8 ---------------------------------------------------------------------------------

def test_a_symptom_toggled_while_awaiting_approval_stops_paging(make_graced,
                                                                 shortdir: Path) -> None:
    """Finding 8: anyone toggling a critical symptom opened a new mission awaiting
    approval at every return (17 requests in 30 s). After three clears before approval
    within flap_window, the fourth request is kept open for a person: further toggles
    update it and ask nobody again."""
    g, crit, ran = critical(make_graced, shortdir, "\n[missions]\nresolve_after = 2\n")
    w = Watch(g)
    for n in (1, 2, 3):
        crit.write_text(FAULT)
        w.wait("mission.awaiting_approval", "crit", 20, count=n)
        crit.write_text(NORMAL)
        assert w.wait("mission.resolved", "crit", 20, count=n)["payload"]["reason"].startswith(
            "cleared before approval")
    crit.write_text(FAULT)
    kept = w.wait("mission.awaiting_approval", "crit", 20, count=4)["payload"]["id"]
    crit.write_text(NORMAL)

    def mission() -> dict[str, Any]:
        return dict(json.loads(g.ctl("missions", "show", str(kept), "--json",
                                     check=True).stdout))

    poll_until(lambda: any(t.get("note") == "kept open" for t in mission()["timeline"]),
               20, "the mission kept open")
    for _ in range(3):
        seen = mission()["occurrences"]
        crit.write_text(FAULT)
        poll_until(lambda: mission()["occurrences"] > seen, 20, "the symptom back")  # noqa: B023
        crit.write_text(NORMAL)
        poll_until(lambda: mission()["normal_streak"] >= 2, 20, "the symptom gone")
    assert mission()["state"] == "awaiting_approval"
    assert len(w.events("mission.awaiting_approval", "crit")) == 4
    assert len(w.events("mission.resolved", "crit")) == 3
    assert not ran.exists()
    w.close()


# -- 2 ---------------------------------------------------------------------------------

def test_one_step_failure_someone_caused_does_not_demote_a_working_playbook(
        make_graced, shortdir: Path) -> None:
    """Finding 2: one incident held through the verifications (the steps succeed, the
    symptom stays), then one in which a step fails because someone put a directory where
    the step removes a file: with demote_after = 2 that single step failure demoted the
    working playbook. Demotion needs step failures in demote_after incidents: it stays
    in service, says why, and fixes the next real fault."""
    watched, lock = shortdir / "queue", shortdir / "lock"
    watched.write_text(NORMAL)
    g = make_graced(detectors=value_detector("queue", watched) + quick_playbook(
        "fix-queue", "queue", "low",
        ["/bin/sh", "-c", f"rm -f {lock} && echo {NORMAL} > {watched}"]) + SETTINGS)
    w = Watch(g)
    recovered = LineCollector(g.ctl_popen("tail", "--json", "detector.recovered"))
    # Incident 1: the symptom held through the fix and its verification.
    seen = recoveries(recovered, "queue")
    holder = subprocess.Popen(["/bin/sh", "-c", HOLDER, "sh", str(watched)],
                              start_new_session=True)
    try:
        w.wait("mission.escalated", "queue", 60)
    finally:
        os.killpg(holder.pid, signal.SIGTERM)
        holder.wait(10)
    watched.write_text(NORMAL)
    recovered_once_more(recovered, "queue", seen)
    # Incident 2: a directory where the step removes a file: the step itself fails.
    seen = recoveries(recovered, "queue")
    lock.mkdir()
    watched.write_text(FAULT)
    w.wait("mission.escalated", "queue", 60, count=2)
    watched.write_text(NORMAL)
    recovered_once_more(recovered, "queue", seen)
    fixer = json.loads(g.ctl("knowledge", "show", "queue:queue", "--json",
                             check=True).stdout)["pattern"]["playbooks"][0]
    assert (fixer["playbook"], fixer["successes"], fixer["demoted"]) == (
        "fix-queue", 0, False), fixer
    assert "own steps failed in 1 distinct incident within" in fixer["held_back"], fixer
    # The directory gone, a real fault: the playbook runs and fixes it.
    lock.rmdir()
    watched.write_text(FAULT)
    assert w.wait("mission.resolved", "queue", 30)["payload"]["playbook"] == "fix-queue"
    assert not g.ctl("tail", "--json", "--since", "1", "--no-follow", "learning.demoted",
                     check=True).stdout
    recovered.proc.terminate()
    w.close()
