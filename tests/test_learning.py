"""The learning core with plain values: ranking, demotion, knowledge, and the similar-mission
lookup on a real SQLite journal."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from graced.journal import Journal
from graced.learning import memory
from graced.learning.knowledge import Knowledge, check
from graced.learning.ranking import Record, rank
from graced.missions.engine import Mission


def simulate(strategy: str, probs: dict[str, float], rounds: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    world = random.Random(seed + 1)
    records = {name: Record() for name in probs}
    chosen = []
    for _ in range(rounds):
        d = rank([(n, "low") for n in probs], records, strategy=strategy, rng=rng,
                 demote_after=3, demote_below=0.25)
        assert d.chosen is not None
        chosen.append(d.chosen)
        if world.random() < probs[d.chosen]:
            records[d.chosen].successes += 1
        else:
            records[d.chosen].failures += 1
    return chosen


@pytest.mark.parametrize("strategy", ["thompson", "ucb"])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_ranking_comes_to_prefer_the_playbook_that_works(strategy: str, seed: int) -> None:
    probs = {"restart": 0.5, "drop-caches": 0.1, "kill-hog": 0.9}
    chosen = simulate(strategy, probs, 300, seed)
    late = chosen[-100:]
    assert late.count("kill-hog") >= 80, {n: late.count(n) for n in probs}


def test_uniform_is_learning_off() -> None:
    probs = {"a": 0.9, "b": 0.1, "c": 0.1}
    late = simulate("uniform", probs, 600, 7)[-300:]
    assert 60 <= late.count("a") <= 140  # about a third, whatever worked


def test_failing_playbook_is_demoted_and_all_demoted_escalates() -> None:
    rng = random.Random(0)
    records = {"bad": Record(successes=0, failures=3), "good": Record()}
    for _ in range(50):
        d = rank([("bad", "low"), ("good", "high")], records, strategy="thompson", rng=rng,
                 demote_after=3, demote_below=0.25)
        assert d.chosen == "good"
    bad = next(c for c in d.candidates if c["playbook"] == "bad")
    assert bad["demoted"] and "demoted" in d.reason and "bad" in d.reason
    # Learning picks which playbook, never its risk: "good" is still high risk.
    assert next(c for c in d.candidates if c["chosen"])["risk"] == "high"
    records["good"] = Record(successes=1, failures=4)
    d = rank([("bad", "low"), ("good", "high")], records, strategy="thompson", rng=rng,
             demote_after=3, demote_below=0.25)
    assert d.escalate and d.chosen is None and "keeps failing" in d.reason
    # Learning off never demotes.
    d = rank([("bad", "low"), ("good", "high")], records, strategy="first", rng=rng,
             demote_after=3, demote_below=0.25)
    assert d.chosen == "bad" and not d.escalate


def test_equal_records_go_to_the_faster_playbook() -> None:
    records = {"slow": Record(5, 1, 50.0, 5), "fast": Record(5, 1, 5.0, 5)}
    d = rank([("slow", "low"), ("fast", "low")], records, strategy="ucb",
             rng=random.Random(0), demote_after=3, demote_below=0.25)
    assert d.chosen == "fast"


def _mission(mid: int, detector: str, subject: str, summary: str, state: str,
             playbook: str | None = None, ran: bool = False) -> Mission:
    m = Mission(id=mid, detector=detector, kind="value", subject=subject, severity="medium",
                state=state, summary=summary, opened_at=1000.0 + mid,
                updated_at=1010.0 + mid, closed_at=1010.0 + mid, last_value=95.0,
                samples=[{"ts": 1000.0, "value": 95.0, "summary": summary}])
    if playbook:
        m.playbook = playbook
    if ran:
        m.steps = [{"step": 1, "action": "run", "ok": state != "failed", "exit_code": 0,
                    "duration_s": 0.1}]
    return m


def test_similar_lookup_finds_same_key_first_then_similar_text(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.db", synchronous="normal")
    missions = [
        _mission(1, "web", "api.example", "http latency 900 ms above threshold", "resolved",
                 "restart-web", True),
        _mission(2, "disk", "/var", "disk usage 97% above threshold", "failed", "rotate",
                 True),
        _mission(3, "web", "api.example", "http latency 1200 ms above threshold", "failed",
                 "restart-web", True),
        _mission(4, "api2", "other.example", "http latency 700 ms above threshold",
                 "resolved", "restart-web", True),
        _mission(5, "mem", "host", "memory used 93% above threshold", "escalated"),
        _mission(6, "web", "api.example", "http latency 800 ms above threshold", "resolved",
                 "restart-web", True),
    ]
    # Unrelated history, so that the HTTP words are rare enough to carry weight (bm25).
    missions += [_mission(100 + i, f"cpu{i}", "host", f"cpu load {i} high", "resolved")
                 for i in range(10)]
    for m in missions:
        journal.append([], memory.outcome_writes(memory.outcome_of(m)))
    reader = memory.MemoryReader(journal.path)
    try:
        found = reader.similar(detector="web", kind="value", subject="api.example",
                               severity="medium", summary="http latency 1500 ms above threshold",
                               before=105, limit=5)
    finally:
        reader.close()
        journal.close()
    ids = [f["id"] for f in found]
    # Missions 6, 3 and 1 share detector and subject (newest first).
    assert ids[:3] == [6, 3, 1]
    assert all(f["match"] == "same detector and subject" for f in found[:3])
    # Then the one with the most similar symptoms: the other HTTP latency mission; only
    # missions before the one asked about (105) count.
    assert ids[3] == 4 and found[3]["match"] == "similar symptoms"
    assert found[3]["score"] > found[4]["score"]
    assert not set(ids) & set(range(105, 110)), ids  # none of the five at or after 105
    assert found[1]["outcome"] == "failed" and found[2]["playbook"] == "restart-web"


def test_outcome_row_says_what_happened() -> None:
    m = _mission(9, "web", "api", "latency high", "resolved", "restart-web", True)
    m.approvals = [{"decision": "approved", "user": "alice", "at": 1.0}]
    o = memory.outcome_of(m)
    assert (o["outcome"], o["ran"], o["success"], o["approved_by"]) == (
        "resolved", 1, 1, "alice")
    assert o["ttr"] == 10.0 and o["sample_values"]["peak"] == 95.0
    o = memory.outcome_of(_mission(10, "web", "api", "latency", "rejected", "restart-web"))
    assert (o["ran"], o["success"], o["approved_by"]) == (0, None, None)


def test_knowledge_export_import_reproduces_records_once() -> None:
    a = Knowledge()
    for ok in (True, True, False):
        a.learn(sig="web:api", detector="web", subject="api", playbook="restart", success=ok,
                ttr=4.0 if ok else None, now=100.0)
    a.learn(sig="web:api", detector="web", subject="api", playbook="reboot", success=False,
            ttr=None, now=101.0)
    exported = a.export("daemon-a", "host-a", 200.0)
    b = Knowledge()
    b.import_("daemon-a", check(exported["patterns"]), replace=True)
    b.import_("daemon-a", check(exported["patterns"]), replace=True)  # again: counted once
    assert b.records("web:api") == a.records("web:api")
    assert b.summary("web:api", 3, 0.25)["best_playbook"] == "restart"


@pytest.mark.parametrize("bad, where", [
    ("x", "patterns: must be a list"),
    ([{"signature": "s", "detector": "d", "subject": "x", "playbook": "p"}],
     "patterns[0].successes"),
    ([{"signature": "", "detector": "d", "subject": "x", "playbook": "p"}],
     "patterns[0].signature"),
])
def test_import_check_names_the_field(bad: object, where: str) -> None:
    with pytest.raises(ValueError, match=where.replace("[", r"\[").replace("]", r"\]")):
        check(bad)
