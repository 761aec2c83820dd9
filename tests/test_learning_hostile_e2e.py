"""Learning that nobody can poison, against a real graced, before and after a restart:
hostile knowledge records are refused at import with one line naming the field, or
quarantined when found stored, and graced keeps answering; imported knowledge is a
bounded prior (an "excellent" import is demoted after local failures, a "hopeless" one is
still tried); knowledge reset undoes a demotion; a stale approval runs nothing."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import nacl.signing
import pytest
import trio

from gracectl.client import Endpoint, connect
from graced.keys import format_public_key
from graced.protocol import Signer
from tests.conftest import Graced
from tests.helpers.procs import LineCollector, poll_until
from tests.test_learning_e2e import FAULT, NORMAL, fix, playbook, value_detector
from tests.test_missions_e2e import Watch

pytestmark = pytest.mark.slow

SETTINGS = ('\n[missions]\nresolve_after = 2\nflap_window = 0\nupdate_interval = 60\n'
            "[remediation]\nmax_actions_per_hour = 10000\napproval_timeout = 120\n"
            '[learning]\ndemote_after = 2\ndemote_span = 0\n')


def record(**over: Any) -> dict[str, Any]:
    base = {"signature": "star:queue", "detector": "star", "subject": "queue",
            "playbook": "imported-star", "successes": 3, "failures": 0, "ttr_total": 3.0,
            "ttr_count": 3, "first_seen": 1.0, "last_seen": 2.0}
    return {**base, **over}


class Exporter:
    """A foreign daemon's key, signing export files the way graced does."""

    def __init__(self, base: Path) -> None:
        self.signer = Signer(nacl.signing.SigningKey.generate())
        self.key = base / "foreign.pub"
        self.key.write_text(format_public_key(self.signer.public_key))

    def write(self, path: Path, patterns: Any, raw: str | None = None) -> Path:
        doc = self.signer.sign_frame({
            "format": "grace-knowledge", "version": 2, "source": "foreign-daemon",
            "host": "foreign-host", "exported_at": 100.0, "patterns": patterns})
        path.write_text(raw if raw is not None else json.dumps(doc))
        return path


def listed(g: Graced, name: str) -> dict[str, Any]:
    """What playbooks ls says a playbook learned (without when it last ran)."""
    pbs = json.loads(g.ctl("playbooks", "ls", "--json", check=True).stdout)["playbooks"]
    learned = dict(next(p for p in pbs if p["name"] == name)["learned"])
    learned.pop("last_run")
    return learned


def status_within(g: Graced, limit: float) -> dict[str, Any]:
    """Ask graced for its status over its socket; the answer must come within ``limit``."""

    async def ask() -> Any:
        async with connect(Endpoint(socket=str(g.socket))) as conn:
            with trio.fail_after(limit):
                return await conn.request("status")

    started = time.monotonic()
    status: dict[str, Any] = trio.run(ask)
    assert time.monotonic() - started < limit + 0.5  # + the connection itself
    return status


def answering(g: Graced) -> dict[str, Any]:
    """status within 1 s, and every learning view working."""
    status = status_within(g, 1.0)
    res = g.ctl("status", "--json", check=True)
    for view in (["knowledge", "ls"], ["knowledge", "ls", "--json"], ["knowledge", "stats"],
                 ["missions", "ls", "--all"], ["missions", "ls", "--all", "--json"]):
        out = g.ctl(*view)
        assert out.returncode == 0 and "Traceback" not in out.stderr, (view, out.stderr)
    assert json.loads(res.stdout)["head_seq"] >= status["head_seq"]
    return status


HOSTILE: list[tuple[str, Any, str]] = [
    ("huge", record(successes=1e308), "patterns[0].successes: must be between 0 and 1000000"),
    ("inf-ttr", record(ttr_total=1e308, ttr_count=1e-10), "patterns[0].ttr_count"),
    ("overflow", record(failures=123454321), "patterns[0].failures: must be between"),
    ("int64", record(successes=123454321), "patterns[0].successes: must be between"),
    ("subnormal", record(successes=5e-324), "patterns[0].successes: must be an integer"),
    ("tiny-count", record(ttr_count=1e-300), "patterns[0].ttr_count: must be an integer"),
    ("negative", record(failures=-1), "patterns[0].failures: must be between"),
    ("mean-ttr", record(ttr_total=1e12, ttr_count=1), "patterns[0].ttr_total"),
    ("bool", record(successes=True), "patterns[0].successes: must be an integer"),
    ("bad-signature-key", record(signature="other:queue"), "patterns[0].signature"),
]


def test_hostile_imports_are_refused_with_one_line_and_graced_keeps_answering(
        make_graced, shortdir: Path) -> None:
    star = shortdir / "star"
    star.write_text(NORMAL)
    g = make_graced(detectors=value_detector("star", star)
                    + playbook("imported-star", "star", "low", fix(star)) + SETTINGS)
    ex = Exporter(shortdir)
    # Integers past 2**53 cannot even be signed (canonical JSON refuses them): written
    # into the file after signing, where a hostile editor would put them.
    big = {"overflow": str(10**400), "int64": str(2**63)}
    for name, bad, where in HOSTILE:
        path = ex.write(shortdir / f"{name}.json", [record(), bad])
        if name in big:
            path.write_text(path.read_text().replace("123454321", big[name]))
        res = g.ctl("knowledge", "import", "--key", str(ex.key), str(path))
        assert res.returncode == 2, (name, res.stderr)
        assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr, res.stderr
        assert where.replace("[0]", "[1]") in res.stderr, (name, res.stderr)
    # NaN and Infinity are not JSON, but Python's parser reads them: refused too.
    text = json.dumps(ex.signer.sign_frame({
        "format": "grace-knowledge", "version": 2, "source": "foreign-daemon", "host": "h",
        "exported_at": 1.0, "patterns": [record(ttr_total=2.5)]})).replace("2.5", "NaN")
    res = g.ctl("knowledge", "import", "--key", str(ex.key),
                str(ex.write(shortdir / "nan.json", None, raw=text)))
    assert res.returncode == 2 and "patterns[0].ttr_total" in res.stderr
    # A million patterns: refused before it is even parsed.
    million = shortdir / "million.json"
    one = json.dumps(record(), separators=(",", ":"))
    with million.open("w") as fh:
        fh.write('{"format": "grace-knowledge", "version": 2, "patterns": [')
        for _ in range(1000):
            fh.write(",".join([one] * 1000) + ",")
        fh.write(one + "]}")
    res = g.ctl("knowledge", "import", "--key", str(ex.key), str(million))
    assert res.returncode == 2 and "larger than 32 MB" in res.stderr, res.stderr
    # 100,001 small records fit in the size but not in the count.
    many = ex.write(shortdir / "many.json", [
        {**record(), "subject": f"q{i}", "signature": f"star:q{i}", "ttr_total": 0,
         "ttr_count": 0} for i in range(100_001)])
    res = g.ctl("knowledge", "import", "--key", str(ex.key), str(many))
    assert res.returncode == 2 and "patterns: 100001 records; at most 100000" in res.stderr
    # Negative zero and integral floats are harmless: imported as 0 and 3.
    ok = ex.write(shortdir / "ok.json", [record(failures=-0.0, successes=3.0,
                                                ttr_total=-0.0, ttr_count=0)] + [
        record(signature=f"star:q{i}", subject=f"q{i}", last_seen=1.5) for i in range(2)])
    g.ctl("knowledge", "import", "--key", str(ex.key), str(ok), check=True)
    listed = g.ctl("knowledge", "ls", "--limit", "1", check=True)
    assert "star:queue" in listed.stdout and "patterns 1-1 of 3 shown" in listed.stderr
    status = answering(g)
    assert status["learning"]["quarantined"]["rows"] == 0
    shown = json.loads(g.ctl("knowledge", "show", "star:queue", "--json",
                             check=True).stdout)["pattern"]
    assert shown["playbooks"][0]["imported"][0]["failures"] == 0
    g.stop()
    g.start()
    answering(g)
    # Most recently seen first (star:queue last seen at 2.0, the others at 1.5).
    assert [p["pattern"] for p in json.loads(g.ctl("knowledge", "ls", "--json",
                                                   check=True).stdout)] == [
        "star:queue", "star:q1", "star:q0"]


STORED = [  # as 0.1.0 could store them: what its import check let through, and worse
    ("star:queue", "a", "x", "star", "queue", 1e308, 0, 0.0, 0, 1.0, 2.0),
    ("star:queue", "b", "x", "star", "queue", 1, 0, 1e308, 1e-10, 1.0, 2.0),
    ("star:queue", "c", "x", "star", "queue", -5, 0, 0.0, 0, 1.0, 2.0),
    ("star:queue", "d", "x", "star", "queue", 2**63 - 1, 0, 0.0, 0, 1.0, 2.0),
    ("star:queue", "e", "x", "star", "queue", "lots", 0, 0.0, 0, 1.0, 2.0),
    ("star:queue", "f", "x", "star", "queue", 1, 0, 0.0, 0, 1e300, 1e301),
    ("star:queue", "g", "x", "star", "queue", 5e-324, 0, 0.0, 0, 1.0, 2.0),
]


def test_hostile_stored_rows_are_quarantined_and_graced_stays_live(
        make_graced, shortdir: Path) -> None:
    star = shortdir / "star"
    star.write_text(NORMAL)
    g = make_graced(detectors=value_detector("star", star)
                    + playbook("a", "star", "low", fix(star)) + SETTINGS)
    g.stop()
    with sqlite3.connect(g.state / "journal.db") as db:
        db.executemany(
            "INSERT INTO patterns (signature, playbook, source, detector, subject, successes, "
            "failures, ttr_total, ttr_count, first_seen, last_seen) VALUES "
            "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", STORED)
        db.execute("INSERT INTO patterns (signature, playbook, source, detector, subject, "
                   "successes, failures, ttr_total, ttr_count, first_seen, last_seen, data) "
                   "VALUES ('star:queue', 'h', 'x', 'star', 'queue', 1, 0, 0, 0, 1, 2, "
                   "'{\"w_s\": 1e308}')")
    g.start()
    status = answering(g)
    q = status["learning"]["quarantined"]
    assert q["rows"] == len(STORED) + 1 and q["this_start"] == len(STORED) + 1
    assert any("successes" in r for r in q["reasons"])
    assert "quarantined stored pattern" in g.stderr()
    human = g.ctl("status", check=True).stdout
    assert f"{len(STORED) + 1} stored learning records out of bounds" in human
    assert json.loads(g.ctl("knowledge", "ls", "--json", check=True).stdout) == []
    # A real fault: the mission consults memory (none of the bad rows) and is fixed.
    w = Watch(g)
    star.write_text(FAULT)
    done = w.wait("mission.resolved", "star", 20)["payload"]
    w.close()
    assert done["playbook"] == "a"
    explain = g.ctl("missions", "explain", str(done["id"]), check=True).stdout
    assert "chosen" in explain
    g.stop()
    g.start()  # after a restart: nothing left to quarantine, still reported
    status = answering(g)
    assert status["learning"]["quarantined"] == {**q, "this_start": 0, "reasons": []}


def test_imported_prior_is_bounded_demotion_needs_local_failures_and_reset_undoes_it(
        make_graced, shortdir: Path) -> None:
    star, hope = shortdir / "star", shortdir / "hope"
    for f in (star, hope):
        f.write_text(NORMAL)
    g = make_graced(detectors=value_detector("star", star)
                    + playbook("imported-star", "star", "low", ["false"])
                    + value_detector("hope", hope)
                    + playbook("hopeless", "hope", "low", fix(hope)) + SETTINGS)
    ex = Exporter(shortdir)
    path = ex.write(shortdir / "seed.json", [
        record(successes=1_000_000, ttr_total=1_000_000.0, ttr_count=1_000_000),
        record(signature="hope:queue", detector="hope", playbook="hopeless", successes=0,
               failures=1_000_000, ttr_total=0, ttr_count=0)])
    dry = g.ctl("knowledge", "import", "--dry-run", "--key", str(ex.key), str(path),
                "--json", check=True)
    changes = json.loads(dry.stdout)["changes"]
    assert [c["change"] for c in changes] == ["new", "new"]
    assert changes[0]["prior"] == [5.0, 0.0]  # a million successes weigh five runs
    g.ctl("knowledge", "import", "--key", str(ex.key), str(path), check=True)
    w = Watch(g)
    recovered = LineCollector(g.ctl_popen("tail", "--json", "detector.recovered"))

    def incident(file: Path, detector: str, final: str, n: int) -> dict[str, Any]:
        seen = len([e for e in recovered.events() if e["payload"]["detector"] == detector])
        file.write_text(FAULT)
        ev = w.wait(f"mission.{final}", detector, 20, count=n)["payload"]
        file.write_text(NORMAL)
        # The incident ends when the detector has seen it normal again.
        assert recovered.wait_for(lambda _: len([
            e for e in recovered.events() if e["payload"]["detector"] == detector]) > seen, 20)
        return ev

    # Imported as hopeless, yet still tried here: it works, and it is credited.
    fixed = incident(hope, "hope", "resolved", 1)
    assert fixed["playbook"] == "hopeless"
    # Imported as excellent: it runs and fails, twice, and the incident escalates. The
    # next incident's failure is the second distinct one (demote_after = 2): demoted;
    # from then on, as the only playbook for the symptom, it runs once an incident
    # before the mission escalates (a real fault gets its fix).
    first = incident(star, "star", "escalated", 1)
    assert "failed 2 times in this incident" in first["reason"], first["reason"]
    assert len(w.events("mission.failed", "star")) == 2
    second = incident(star, "star", "escalated", 2)
    assert "demoted" in second["reason"], second["reason"]
    assert len(w.events("mission.failed", "star")) == 3
    third = incident(star, "star", "escalated", 3)
    assert "demoted" in third["reason"], third["reason"]
    assert len(w.events("mission.failed", "star")) == 4
    shown = json.loads(g.ctl("knowledge", "show", "star:queue", "--json",
                             check=True).stdout)["pattern"]["playbooks"][0]
    assert (shown["failures"], shown["demoted"]) == (4, True)
    assert shown["imported"][0]["successes"] == 1_000_000
    # playbooks ls reads the same records: the credited runs, and the demotion.
    assert listed(g, "imported-star") == {
        "runs": shown["runs"], "successes": shown["successes"],
        "success_rate": shown["success_rate"], "demoted": ["star:queue"]}
    row = next(x for x in g.ctl("playbooks", "ls", check=True).stdout.splitlines()
               if x.startswith("imported-star"))
    assert "demoted" in row, row
    # Reset (control rights, a signed event): tried again on the next fault.
    recovered.proc.terminate()
    res = g.ctl("knowledge", "reset", "imported-star", "--json", check=True)
    assert json.loads(res.stdout)["records"] == 2  # the local record and the import
    assert listed(g, "imported-star") == {"runs": 0, "successes": 0, "success_rate": None,
                                          "demoted": []}
    g.stop()
    g.start()  # the reset is durable
    w = Watch(g)
    star.write_text(FAULT)
    again = w.wait("mission.failed", "star", 20)["payload"]
    star.write_text(NORMAL)
    assert again["playbook"] == "imported-star"
    events = g.ctl("tail", "--json", "--since", "1", "--no-follow", "learning.reset",
                   "--verify", "--key", str(g.state / "key.pub"), check=True).stdout
    reset = [json.loads(line) for line in events.splitlines()]
    assert [e["payload"]["target"] for e in reset] == ["imported-star"]
    w.close()
    assert g.ctl("knowledge", "reset", "no-such-playbook").returncode == 5


def test_a_stale_approval_runs_nothing_before_or_after_a_restart(
        make_graced, shortdir: Path) -> None:
    crit, ran = shortdir / "crit", shortdir / "ran"
    crit.write_text(NORMAL)
    g = make_graced(detectors=value_detector("crit", crit, "critical")
                    + playbook("risky", "crit", "high",
                               ["/bin/sh", "-c", f"echo ran >> {ran}; echo {NORMAL} > {crit}"])
                    + SETTINGS)
    w = Watch(g)
    crit.write_text(FAULT)
    waiting = w.wait("mission.awaiting_approval", "crit", 20)["payload"]
    crit.write_text(NORMAL)  # the symptom clears while it waits
    cleared = w.wait("mission.resolved", "crit", 20)["payload"]
    w.close()
    assert cleared["id"] == waiting["id"]
    assert cleared["reason"].startswith("cleared before approval")
    assert "playbook risky was not run" in cleared["reason"] and cleared["playbook"] is None
    for restart in (False, True):
        if restart:
            g.stop()
            g.start()
        res = g.ctl("missions", "approve", str(waiting["id"]), "--yes")
        assert res.returncode == 9 and "cleared before approval" in res.stderr, res.stderr
        assert res.stderr.count("\n") == 1
    assert not ran.exists()
    explain = g.ctl("missions", "explain", str(waiting["id"]), check=True).stdout
    assert "held back: cleared before approval" in explain
    with sqlite3.connect(g.state / "journal.db") as db:
        row = db.execute("SELECT playbook, ran, success, held_back FROM outcomes "
                         "WHERE mission_id = ?", (waiting["id"],)).fetchone()
    assert row == (None, 0, None, "missions.resolve_after")


def test_learning_at_the_bounds_is_learned_and_published(make_graced,
                                                        shortdir: Path) -> None:
    """0.1.0 died publishing learning.pattern_updated with an infinite mean time to
    resolve; every figure is now finite, so the outcome is learned and published."""
    star = shortdir / "star"
    star.write_text(NORMAL)
    g = make_graced(detectors=value_detector("star", star)
                    + playbook("a", "star", "low", fix(star)) + SETTINGS)
    ex = Exporter(shortdir)
    g.ctl("knowledge", "import", "--key", str(ex.key), str(ex.write(
        shortdir / "edge.json", [record(playbook="a", successes=1_000_000, failures=0,
                                        ttr_total=7 * 86400.0 * 1_000_000,
                                        ttr_count=1_000_000)])), check=True)
    w = Watch(g)
    star.write_text(FAULT)
    w.wait("mission.resolved", "star", 20)
    w.close()
    learned = g.ctl("tail", "--json", "--since", "1", "--no-follow", "learning.pattern_*",
                    check=True).stdout
    assert [json.loads(line)["payload"]["playbook"] for line in learned.splitlines()] == ["a"]
    answering(g)


@pytest.mark.slow
def test_a_deferred_mission_that_then_runs_is_not_marked_held_back(make_graced,
                                                                   shortdir: Path) -> None:
    """Paused, a mission is deferred ("paused: nothing ran, nothing learned"); run by hand,
    or run after resume, its mark says what finally happened, not that nothing ran."""
    queue = shortdir / "queue"
    queue.write_text(NORMAL)
    g = make_graced(detectors=value_detector("backlog", queue, "high")
                    + playbook("drain", "backlog", "low", fix(queue)) + SETTINGS)
    w = Watch(g)
    would = LineCollector(g.ctl_popen("tail", "--json", "--since", "1", "executor.would_run"))
    try:
        assert g.ctl("pause").returncode == 0
        ran = []
        for count, go in ((1, ("playbooks", "run", "drain", "--mission", "{id}", "--yes")),
                          (2, ("resume",))):
            queue.write_text(FAULT)
            mid = w.wait("mission.opened", "backlog", 20, count)["payload"]["id"]
            assert would.wait_for(lambda ls, n=count: len(ls) >= n, 20)
            deferred = g.ctl("missions", "explain", str(mid), check=True).stdout
            assert "held back: paused" in deferred, deferred
            g.ctl(*(a.format(id=mid) for a in go), check=True)
            g.ctl("wait", str(mid), "--state", "resolved", "--timeout", "30", check=True)
            explain = g.ctl("missions", "explain", str(mid), check=True).stdout
            assert "paused" not in explain and "nothing ran" not in explain, explain
            ran.append(mid)
        with sqlite3.connect(g.state / "journal.db") as db:
            rows = db.execute("SELECT mission_id, playbook, ran, success, held_back "
                              "FROM outcomes ORDER BY mission_id").fetchall()
        assert rows == [(ran[0], "drain", 1, 1, None), (ran[1], "drain", 1, 1, None)]
    finally:
        would.proc.terminate()
        w.close()


def star_sampled(make_graced: Any, shortdir: Path) -> tuple[Graced, Exporter]:
    """A graced whose detector star has reported its subject once (so whether a record's
    subject is reported here is settled), and a foreign exporter."""
    star = shortdir / "star"
    star.write_text(NORMAL)
    g = make_graced(detectors=value_detector("star", star)
                    + playbook("imported-star", "star", "low", ["false"]) + SETTINGS)
    poll_until(lambda: "queue" in json.loads(g.ctl("detectors", "--json", check=True).stdout)
               ["star"]["subjects"], 15, "a first sample of star")
    return g, Exporter(shortdir)


def test_import_dry_run_and_import_list_the_same_changes_removed_records_included(
        make_graced, shortdir: Path) -> None:
    """A peer re-exports without a record it reset: the import removes that record, and
    the dry run says so beforehand; the real import lists the same changes."""
    g, ex = star_sampled(make_graced, shortdir)
    other = record(playbook="other", successes=1, failures=4, ttr_total=1.0, ttr_count=1)
    g.ctl("knowledge", "import", "--key", str(ex.key),
          str(ex.write(shortdir / "v1.json", [record(), other])), check=True)
    again = ex.write(shortdir / "v2.json", [record(successes=4)])
    dry = json.loads(g.ctl("knowledge", "import", "--dry-run", "--key", str(ex.key),
                           str(again), "--json", check=True).stdout)
    expected = [("star:queue", "imported-star", "changed", [3, 0], [4, 0]),
                ("star:queue", "other", "removed", [1, 4], None)]
    assert [(c["pattern"], c["playbook"], c["change"], c["before"], c["after"])
            for c in dry["changes"]] == expected
    human = g.ctl("knowledge", "import", "--dry-run", "--key", str(ex.key), str(again),
                  check=True).stdout
    assert next(x for x in human.splitlines() if " other " in x).split()[2] == "removed"
    real = json.loads(g.ctl("knowledge", "import", "--key", str(ex.key), str(again),
                            "--json", check=True).stdout)
    assert real["changes"] == dry["changes"]
    shown = json.loads(g.ctl("knowledge", "show", "star:queue", "--json", check=True).stdout)
    assert "other" not in json.dumps(shown), shown
    # An export larger than one request is uploaded in parts and imported whole: one
    # record left out in the middle is removed and listed, nothing else.
    many = [record(signature=f"star:q{i:03}", subject=f"q{i:03}") for i in range(600)]
    g.ctl("knowledge", "import", "--key", str(ex.key),
          str(ex.write(shortdir / "v3.json", many)), check=True)
    fewer = ex.write(shortdir / "v4.json", many[:300] + many[301:])
    assert fewer.stat().st_size > 3 * 36_000  # several parts
    dry = json.loads(g.ctl("knowledge", "import", "--dry-run", "--key", str(ex.key),
                           str(fewer), "--json", check=True).stdout)
    assert dry["counts"] == {"new": 0, "changed": 0, "same": 599, "removed": 1}
    assert [(c["pattern"], c["change"]) for c in dry["changes"]
            if c["change"] != "same"] == [("star:q300", "removed")]
    real = json.loads(g.ctl("knowledge", "import", "--key", str(ex.key), str(fewer),
                            "--json", check=True).stdout)
    assert real["changes"] == dry["changes"] and real["counts"] == dry["counts"]
    listed = g.ctl("knowledge", "ls", "--json", check=True).stdout
    assert '"star:q301"' in listed and '"star:q300"' not in listed


def test_import_dry_run_notes_records_no_local_detector_reports(make_graced,
                                                                shortdir: Path) -> None:
    """Imported knowledge applies to a DETECTOR:SUBJECT that matches exactly: the dry run
    says which records nothing here reports."""
    g, ex = star_sampled(make_graced, shortdir)
    path = ex.write(shortdir / "seed.json", [
        record(), record(signature="star:db-1", subject="db-1"),
        record(signature="web-queue:queue", detector="web-queue")])
    dry = json.loads(g.ctl("knowledge", "import", "--dry-run", "--key", str(ex.key),
                           str(path), "--json", check=True).stdout)
    notes = {c["pattern"]: c.get("note") for c in dry["changes"]}
    assert notes["star:queue"] is None
    assert notes["star:db-1"] == "no local detector reports this subject"
    assert notes["web-queue:queue"] == "no local detector named web-queue"
    human = g.ctl("knowledge", "import", "--dry-run", "--key", str(ex.key), str(path))
    assert "star:db-1" in human.stdout and "no local detector reports this subject" in (
        human.stdout + human.stderr)


@pytest.mark.slow
def test_an_escalated_incident_survives_a_restart(make_graced, shortdir: Path) -> None:
    """Every matching playbook kept failing and the incident went to a person; graced
    restarts with the fault still there: no new mission, no new run, nothing learned
    twice, until the symptom has been seen normal."""
    star = shortdir / "star"
    star.write_text(NORMAL)
    g = make_graced(detectors=value_detector("star", star)
                    + playbook("broken", "star", "low", ["false"]) + SETTINGS)
    w = Watch(g)
    star.write_text(FAULT)
    escalated = w.wait("mission.escalated", "star", 30)["payload"]
    assert "failed 2 times in this incident" in escalated["reason"], escalated["reason"]
    w.close()
    learned = outcomes_of(g)
    # (status exits 7 while an escalated mission waits for a person)
    head = json.loads(g.ctl("status", "--json").stdout)["head_seq"]
    assert g.stop() == 0
    g.start()
    tail = LineCollector(g.ctl_popen("tail", "--json", "--since", str(head + 1), "detector.*",
                                     "mission.*", "executor.*", "daemon.heartbeat"))

    def after(topic: str, seq: int = 0) -> list[dict[str, Any]]:
        return [e for e in tail.events() if e["topic"] == topic and e["seq"] > seq
                and e["payload"].get("detector", "star") == "star"]

    try:
        # The detector judged the fault after the restart, and everything up to a later
        # heartbeat has arrived: no mission, no run.
        assert tail.wait_for(lambda _: bool(after("detector.anomaly")), 30), tail.lines[-3:]
        seen = after("detector.anomaly")[0]["seq"]
        assert tail.wait_for(lambda _: bool(after("daemon.heartbeat", seen)), 30)
        assert [e["topic"] for e in tail.events()
                if e["topic"].startswith(("mission.", "executor."))] == []
        assert outcomes_of(g) == learned
        # Seen normal, then back: a new incident, a new mission.
        star.write_text(NORMAL)
        assert tail.wait_for(lambda _: bool(after("detector.recovered")), 30)
        star.write_text(FAULT)
        assert tail.wait_for(lambda _: bool(after("mission.opened")), 30)
        assert after("mission.opened")[0]["payload"]["id"] > escalated["id"]
    finally:
        tail.proc.terminate()


def outcomes_of(g: Graced) -> list[tuple[Any, ...]]:
    with sqlite3.connect(g.state / "journal.db") as db:
        return db.execute("SELECT mission_id, playbook, ran, success FROM outcomes "
                          "ORDER BY mission_id").fetchall()
