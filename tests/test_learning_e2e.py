"""The learning loop against a real graced: every outcome stored, a failing playbook
demoted in favour of the one that really fixes the fault, explain, similar missions, and
knowledge exported from one daemon seeding a fresh one."""

from __future__ import annotations

import json
import sqlite3
import tempfile
from pathlib import Path
from typing import Any

import pytest

from graced.missions.engine import FINAL
from tests.conftest import Graced
from tests.helpers.procs import LineCollector
from tests.test_missions_e2e import Watch

FAULT, NORMAL = "99", "0"


def value_detector(name: str, file: Path, severity: str = "medium") -> str:
    return (f'[[detector]]\nname = "{name}"\nkind = "value"\nfile = "{file}"\n'
            f'subject = "queue"\ninterval = 0.2\nthreshold = 50.0\nseverity = "{severity}"\n')


def playbook(name: str, detector: str, risk: str, argv: list[str]) -> str:
    return (f'[[playbook]]\nname = "{name}"\ndetector = "{detector}"\nrisk = "{risk}"\n'
            f"budget = 1000\nverify_timeout = 10.0\n"
            f'[[playbook.step]]\naction = "run"\nargv = {json.dumps(argv)}\ntimeout = 10.0\n')


def fix(file: Path) -> list[str]:
    return ["/bin/sh", "-c", f"echo {NORMAL} > {file}"]


SETTINGS = ('\n[missions]\nresolve_after = 2\nflap_window = 0\nupdate_interval = 60\n'
            "[remediation]\nmax_actions_per_hour = 10000\napproval_timeout = {approval}\n"
            '[learning]\nstrategy = "ucb"\ndemote_after = 2\ndemote_below = 0.25\n'
            "demote_span = 0\n")


def outcomes(g: Graced) -> dict[int, tuple[Any, ...]]:
    with sqlite3.connect(g.state / "journal.db") as db:
        return {r[0]: r[1:] for r in db.execute(
            "SELECT mission_id, outcome, playbook, ran, success, consulted FROM outcomes")}


def missions(g: Graced, detector: str) -> list[dict[str, Any]]:
    out = json.loads(g.ctl("missions", "ls", "--all", "--json", check=True).stdout)
    return sorted((m for m in out if m["detector"] == detector), key=lambda m: m["id"])


@pytest.mark.slow
def test_every_final_state_is_stored_as_an_outcome(make_graced, shortdir: Path) -> None:
    a, c, d = shortdir / "a", shortdir / "c", shortdir / "d"
    for f in (a, c, d):
        f.write_text(NORMAL)
    detectors = (value_detector("fixable", a) + playbook("fix-a", "fixable", "low", fix(a))
                 + value_detector("risky", c, "high")
                 + playbook("risky-fix", "risky", "high", fix(c))
                 + value_detector("broken", d) + playbook("never-works", "broken", "low",
                                                          ["false"]))
    g = make_graced(detectors=detectors + SETTINGS.format(approval=3.0))
    w = Watch(g)
    a.write_text(FAULT)
    w.wait("mission.resolved", "fixable", 15)
    c.write_text(FAULT)
    waiting = w.wait("mission.awaiting_approval", "risky", 15)["payload"]
    g.ctl("missions", "reject", str(waiting["id"]), "--comment", "not now", check=True)
    w.wait("mission.rejected", "risky", 15)
    # Handed to a human: no new mission while the fault lasts; once it has cleared and
    # comes back, graced asks again, and this time nobody answers.
    recovered = LineCollector(g.ctl_popen("tail", "--json", "detector.recovered"))
    c.write_text(NORMAL)
    assert recovered.wait_for(lambda _: any(
        e["payload"]["detector"] == "risky" for e in recovered.events()), 15)
    recovered.proc.terminate()
    assert len(missions(g, "risky")) == 1
    c.write_text(FAULT)
    w.wait("mission.expired", "risky", 20)
    c.write_text(NORMAL)
    d.write_text(FAULT)
    # never-works fails twice; the fault never cleared, so it is one incident: it is not
    # run a third time, and the third mission escalates to a human.
    w.wait("mission.failed", "broken", 15, count=2)
    escalated = w.wait("mission.escalated", "broken", 15)["payload"]
    assert "keeps failing" in escalated["reason"]
    assert "failed 2 times in this incident" in escalated["reason"]
    d.write_text(NORMAL)
    w.close()
    assert len(missions(g, "broken")) == 3  # held after the escalation: no storm

    every = [m for det in ("fixable", "risky", "broken") for m in missions(g, det)]
    stored = outcomes(g)
    final = [m for m in every if m["state"] in FINAL]
    assert {m["state"] for m in final} >= {"resolved", "failed", "escalated", "rejected",
                                           "expired"}
    for m in final:
        assert m["id"] in stored, f"mission {m['id']} ({m['state']}) has no outcome"
        assert stored[m["id"]][0] == m["state"]
    first = missions(g, "fixable")[0]
    assert stored[first["id"]][1:4] == ("fix-a", 1, 1)  # ran, and it worked
    rejected = next(m for m in every if m["state"] == "rejected")
    assert stored[rejected["id"]][2:4] == (0, None)  # nothing ran: no verdict on the playbook
    status = json.loads(g.ctl("status", "--json", check=True).stdout)["learning"]
    assert status["outcomes"] == len(stored) and status["patterns"] == 2
    assert status["consulted_share"] is not None and status["consulted_share"] > 0.5


def _fault_until_resolved(w: Watch, file: Path, count: int) -> None:
    file.write_text(FAULT)
    w.wait("mission.resolved", "learner", 20, count=count)


@pytest.mark.slow
def test_ranking_demotes_the_failing_playbook_and_knowledge_seeds_a_fresh_daemon(
        make_graced, shortdir: Path) -> None:
    b = shortdir / "b"
    b.write_text(NORMAL)
    # "reboot-queue" is listed first and never fixes anything; "flush-queue" does.
    detectors = (value_detector("learner", b)
                 + playbook("reboot-queue", "learner", "low", ["false"])
                 + playbook("flush-queue", "learner", "low", fix(b)))
    config = detectors + SETTINGS.format(approval=60.0)
    g = make_graced(detectors=config)
    w = Watch(g)
    for n in range(1, 6):
        _fault_until_resolved(w, b, n)
    learning = g.ctl_popen("tail", "--json", "--since", "1", "--no-follow", "learning.*")
    out, _ = learning.communicate(timeout=30)
    w.close()
    events = [json.loads(line) for line in out.splitlines()]
    demoted = [e for e in events if e["topic"] == "learning.demoted"]
    assert len(demoted) == 1 and demoted[0]["payload"]["playbook"] == "reboot-queue"
    ms = missions(g, "learner")
    runs = [m["playbook"] for m in ms]
    # Two failures in two distinct incidents (demote_after = 2), then never again.
    assert runs.count("reboot-queue") == 2, runs
    failed = [m for m in ms if m["playbook"] == "reboot-queue"]
    assert len({m["incident"] for m in failed}) == 2
    after = [m for m in ms if m["id"] > max(m2["id"] for m2 in failed)]
    assert after and all(m["playbook"] == "flush-queue" and m["state"] == "resolved"
                         for m in after)
    assert all(m["state"] == ("failed" if m["playbook"] == "reboot-queue" else "resolved")
               for m in ms)

    # explain: the evidence, the similar missions, the ranking figures, the policy.
    last = ms[-1]
    text = g.ctl("missions", "explain", str(last["id"]), check=True).stdout
    assert f"mission {last['id']}" in text and "evidence" in text
    assert "similar past missions" in text and "same detector and subject" in text
    assert "reboot-queue" in text and "DEMOTED" in text and "chosen" in text
    assert "risk low: approved automatically" in text
    assert "learning  counted as a success of flush-queue" in text
    assert "explore   no: no playbook it could run has a better record than flush-queue" in text
    # reboot-queue's second run came after flush-queue had fixed it: ucb explored, and
    # explain says so in words and in JSON.
    second = [m for m in ms if m["playbook"] == "reboot-queue"][1]
    text = g.ctl("missions", "explain", str(second["id"]), check=True).stdout
    assert ("explore   yes: tried reboot-queue although flush-queue has the better record"
            in text), text
    why = json.loads(g.ctl("missions", "explain", str(second["id"]), "--json",
                           check=True).stdout)
    assert why["explored"] is True and why["best_known"] == "flush-queue"
    assert why["decision"]["explored"] is True
    # similar: the earlier missions of the same detector and subject, newest first.
    sim = json.loads(g.ctl("missions", "similar", str(last["id"]), "--json",
                           check=True).stdout)
    ids = [s["id"] for s in sim["similar"]]
    assert ids == sorted((m["id"] for m in ms[:-1]), reverse=True)[:len(ids)] and ids
    assert all(s["match"] == "same detector and subject" for s in sim["similar"])

    shown = json.loads(g.ctl("knowledge", "show", "learner:queue", "--json",
                             check=True).stdout)["pattern"]
    assert shown["best_playbook"] == "flush-queue"
    assert [(p["playbook"], p["successes"], p["failures"], p["demoted"])
            for p in shown["playbooks"]] == [("flush-queue", 5, 0, False),
                                             ("reboot-queue", 0, 2, True)]
    stats = json.loads(g.ctl("knowledge", "stats", "--json", check=True).stdout)
    assert sum(w["runs"] for w in stats["success_rate_per_week"]) == 7  # 5 fixed, 2 failed
    assert sum(w["successes"] for w in stats["success_rate_per_week"]) == 5
    assert stats["patterns_added_per_day"][-1]["patterns"] == 1
    assert stats["consulted_share"] == 1.0  # every mission consulted memory first
    listed = json.loads(g.ctl("knowledge", "ls", "--json", check=True).stdout)
    assert [p["pattern"] for p in listed] == ["learner:queue"]
    export = g.base / "knowledge.json"
    g.ctl("knowledge", "export", str(export), check=True)
    signed = json.loads(export.read_text())
    assert signed["version"] == 2 and signed["kid"] and signed["sig"]

    # A fresh daemon, seeded with that file, ranks the same way before its first mission.
    other = Path(tempfile.mkdtemp(prefix="g", dir="/tmp"))
    b2 = other / "b"
    b2.write_text(NORMAL)
    fresh = Graced(other, detectors=config.replace(str(b), str(b2)))
    try:
        fresh.start()
        cut = other / "cut.json"
        cut.write_text(export.read_text()[:200])  # a truncated copy
        bad = fresh.ctl("knowledge", "import", str(cut))
        assert bad.returncode == 2 and bad.stdout == ""
        assert bad.stderr.startswith(f"gracectl: {cut}: not JSON") and bad.stderr.count("\n") == 1
        # No key trusted for the exporting daemon yet: refused.
        untrusted = fresh.ctl("knowledge", "import", str(export))
        assert untrusted.returncode == 10 and "no trusted key for daemon" in untrusted.stderr
        # Edited with jq-like care: the playbook that never worked made the best one.
        edited = other / "edited.json"
        forged = json.loads(export.read_text())
        for p in forged["patterns"]:
            if p["playbook"] == "reboot-queue":
                p["successes"] = 5000
        edited.write_text(json.dumps(forged, indent=2))
        refused = fresh.ctl("knowledge", "import", "--key", str(g.state / "key.pub"),
                            str(edited))
        assert refused.returncode == 10 and refused.stderr.count("\n") == 1
        assert "sig: the signature does not match" in refused.stderr
        unsigned = other / "unsigned.json"
        unsigned.write_text(json.dumps({k: v for k, v in forged.items()
                                        if k not in ("sig", "kid")}))
        no_sig = fresh.ctl("knowledge", "import", "--key", str(g.state / "key.pub"),
                           str(unsigned))
        assert no_sig.returncode == 2 and "kid: must be a string (an unsigned export)" \
            in no_sig.stderr
        assert json.loads(fresh.ctl("knowledge", "ls", "--json", check=True).stdout) == []
        # --dry-run: what would change, and nothing changes.
        dry = fresh.ctl("knowledge", "import", "--dry-run", "--key", str(g.state / "key.pub"),
                        str(export), check=True)
        assert "reboot-queue" in dry.stdout and "new" in dry.stdout
        assert "nothing changed" in dry.stderr
        assert json.loads(fresh.ctl("knowledge", "ls", "--json", check=True).stdout) == []
        # Pinned once (keys trust on the exporting daemon's socket), then no --key needed.
        fresh.ctl("--socket", str(g.socket), "keys", "trust", check=True)
        fresh.ctl("knowledge", "import", str(export), check=True)
        fresh.ctl("knowledge", "import", str(export), check=True)  # same host: counted once
        seeded = json.loads(fresh.ctl("knowledge", "show", "learner:queue", "--json",
                                      check=True).stdout)["pattern"]
        # Provenance: no local runs; the imported figures, from whom; never demoted on
        # imported evidence alone.
        by = {p["playbook"]: p for p in seeded["playbooks"]}
        assert seeded["imported_only"] and seeded["best_playbook"] == "flush-queue"
        assert [(i["successes"], i["failures"], i["kid"]) for i in
                by["reboot-queue"]["imported"]] == [(0, 2, signed["kid"])]
        assert by["reboot-queue"]["runs"] == 0 and not by["reboot-queue"]["demoted"]
        human = fresh.ctl("knowledge", "show", "learner:queue", check=True).stdout
        assert (f"from {signed['host']} (daemon {signed['source'][:8]}, key "
                f"{signed['kid']})") in human
        fw = Watch(fresh)
        _fault_until_resolved(fw, b2, 1)
        fw.close()
        first = missions(fresh, "learner")
        assert [m["playbook"] for m in first] == ["flush-queue"]
        why = fresh.ctl("missions", "explain", str(first[0]["id"]), check=True).stdout
        assert "reboot-queue" in why and (f"from {signed['host']} (daemon "
                                          f"{signed['source'][:8]}, key {signed['kid']})") in why
        assert "IMPORTED" in why
    finally:
        fresh.close()
        import shutil

        shutil.rmtree(other, ignore_errors=True)
