"""The learning core with plain values: ranking, demotion, knowledge, and the similar-mission
lookup on a real SQLite journal."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from graced.journal import Journal
from graced.learning import credit, memory
from graced.learning.knowledge import Knowledge, Settings
from graced.learning.ranking import Record, demoted, rank
from graced.missions.engine import Mission
from graced.protocol.knowledge import check


def simulate(strategy: str, probs: dict[str, float], rounds: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    world = random.Random(seed + 1)
    records = {name: Record() for name in probs}
    chosen = []
    for _ in range(rounds):
        blocked = {n: "demoted" for n, r in records.items() if demoted(r, 3, 0.25)}
        d = rank([(n, "low") for n in probs], records, strategy=strategy, rng=rng,
                 blocked=blocked)
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


def test_blocked_playbook_is_skipped_and_all_blocked_escalates() -> None:
    rng = random.Random(0)
    records = {"bad": Record(successes=0, failures=3), "good": Record()}
    for _ in range(50):
        d = rank([("bad", "low"), ("good", "high")], records, strategy="thompson", rng=rng,
                 blocked={"bad": "demoted: success below 25%"})
        assert d.chosen == "good"
    bad = next(c for c in d.candidates if c["playbook"] == "bad")
    assert bad["demoted"] and "not run automatically" in d.reason and "bad" in d.reason
    # Learning picks which playbook, never its risk: "good" is still high risk.
    assert next(c for c in d.candidates if c["chosen"])["risk"] == "high"
    d = rank([("bad", "low"), ("good", "high")], records, strategy="thompson", rng=rng,
             blocked={"bad": "demoted", "good": "failed 2 times in this incident"})
    assert d.escalate and d.chosen is None and "keeps failing" in d.reason
    # Learning off never blocks.
    d = rank([("bad", "low"), ("good", "high")], records, strategy="first", rng=rng,
             blocked={"bad": "demoted"})
    assert d.chosen == "bad" and not d.escalate


def test_thompson_says_when_it_explores_rather_than_picks_the_best_record() -> None:
    """A Thompson draw now and then favours the playbook with less evidence: the decision
    says so and names the one with the better record; picking the best says nothing."""
    records = {"proven": Record(successes=4, failures=1), "young": Record(successes=1)}
    rng = random.Random(5)
    seen = {True: 0, False: 0}
    for _ in range(400):
        d = rank([("proven", "low"), ("young", "low")], records, strategy="thompson",
                 rng=rng, exploration=1.0)
        seen[d.explored] += 1
        if d.chosen == "young":  # mean 0.67 against 0.71: exploring
            assert d.explored and d.best_known == "proven"
            assert d.as_dict()["explored"] is True
        else:
            assert not d.explored and d.best_known is None
    assert seen[True] > 40 and seen[False] > 40, seen
    # Equal records: whichever is drawn, no other has the better record.
    d = rank([("a", "low"), ("b", "low")], {}, strategy="thompson", rng=rng)
    assert not d.explored
    # Learning off never explores, whatever it picks.
    d = rank([("young", "low"), ("proven", "low")], records, strategy="first", rng=rng)
    assert d.chosen == "young" and not d.explored


def test_equal_records_go_to_the_faster_playbook() -> None:
    records = {"slow": Record(5, 1, 50.0, 5), "fast": Record(5, 1, 5.0, 5)}
    d = rank([("slow", "low"), ("fast", "low")], records, strategy="ucb",
             rng=random.Random(0))
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
    # Time waiting (for approval, or paused) before the playbook started is not its time.
    m.timeline = [{"ts": 1007.0, "from": "approved", "to": "executing", "reason": "run"}]
    assert memory.outcome_of(m)["ttr"] == 12.0
    o = memory.outcome_of(_mission(10, "web", "api", "latency", "rejected", "restart-web"))
    assert (o["ran"], o["success"], o["approved_by"], o["playbook"]) == (0, None, None, None)


def _learn(k: Knowledge, playbook: str, ok: bool, now: float, incident: int,
           own: bool = True) -> None:
    k.learn(sig="web:api", detector="web", subject="api", playbook=playbook, success=ok,
            ttr=4.0 if ok else None, now=now, incident=incident, own=own)


def _import(k: Knowledge, source: str, patterns: list[dict[str, object]], now: float,
            exported_at: float | None = None) -> None:
    plan = k.plan_import(source, check(patterns), host="h", kid="k", now=now,
                         exported_at=now if exported_at is None else exported_at)
    k.apply_import(plan)


def test_knowledge_export_import_is_a_bounded_prior_counted_once() -> None:
    a = Knowledge()
    for i, ok in enumerate((True, True, False)):
        _learn(a, "restart", ok, 100.0, i)
    _learn(a, "reboot", False, 101.0, 9)
    exported = a.export("daemon-a", "host-a", 200.0)
    b = Knowledge(settings=Settings(import_weight=5.0))
    _import(b, "daemon-a", exported["patterns"], 200.0)
    _import(b, "daemon-a", exported["patterns"], 200.0)  # again: counted once
    assert b.records("web:api", 200.0) == a.records("web:api", 100.0)
    assert b.summary("web:api", 200.0)["best_playbook"] == "restart"
    assert b.summary("web:api", 200.0)["imported_only"]
    # Nothing demoted or kept on imported figures alone.
    assert b.demotion("web:api", "reboot", 200.0) == (False, None)


def test_imported_evidence_is_bounded_fades_and_yields_to_local_runs() -> None:
    k = Knowledge(settings=Settings(import_weight=5.0, half_life=1000.0))
    record = {"signature": "web:api", "detector": "web", "subject": "api",
              "playbook": "great", "successes": 1_000_000, "failures": 0, "ttr_total": 0,
              "ttr_count": 0, "first_seen": 1.0, "last_seen": 2.0}
    _import(k, "other", [record], 0.0)
    assert k.prior("web:api", "great", 0.0).runs == pytest.approx(5.0)
    assert k.prior("web:api", "great", 1000.0).runs == pytest.approx(2.5)  # one half-life
    for i in range(5):
        _learn(k, "great", False, 0.0, i)
    # Five local failures: the prior shrinks to half, local evidence dominates.
    assert k.prior("web:api", "great", 0.0).runs == pytest.approx(2.5)
    assert k.records("web:api", 0.0)["great"].mean < 0.5


def test_demotion_needs_distinct_incidents_over_a_time_span() -> None:
    k = Knowledge(settings=Settings(demote_after=3, demote_below=0.25, demote_span=600.0))
    for n in range(3):  # three failures in one incident: one incident for demotion
        _learn(k, "flaky", False, 10.0 + n, 1)
    assert k.failures_in("web:api", "flaky", 1) == 3
    assert k.local("web:api", "flaky", 20.0).failures == pytest.approx(3.0, rel=1e-3)
    is_demoted, held = k.demotion("web:api", "flaky", 20.0)
    assert not is_demoted and "own steps failed in 1 distinct incident within" in (held or "")
    _learn(k, "flaky", False, 20.0, 2)
    _learn(k, "flaky", False, 30.0, 3)
    is_demoted, held = k.demotion("web:api", "flaky", 30.0)
    assert not is_demoted and "demote_span" in (held or "")
    _learn(k, "flaky", False, 700.0, 4)
    assert k.demotion("web:api", "flaky", 700.0) == (True, None)
    # Failures fade: one older than half_life (30 days) no longer counts.
    is_demoted, held = k.demotion("web:api", "flaky", 30.0 + 30 * 86400 + 1)
    assert not is_demoted and "within half_life" in (held or "")
    writes, removed = k.reset("flaky")
    assert removed == 1 and k.demotion("web:api", "flaky", 700.0) == (False, None)
    assert writes == [("DELETE FROM patterns WHERE playbook = ?", ("flaky",))]


def test_outcomes_decay_with_a_half_life() -> None:
    k = Knowledge(settings=Settings(half_life=100.0))
    _learn(k, "p", True, 0.0, 1)
    assert k.local("web:api", "p", 100.0).successes == pytest.approx(0.5)
    _learn(k, "p", True, 100.0, 2)
    assert k.local("web:api", "p", 100.0).successes == pytest.approx(1.5)


HOSTILE = [1e308, float("inf"), float("nan"), -1.0, -0.0, 5e-324, 2**64, 10**400, 0.5]


@pytest.mark.parametrize("value", HOSTILE, ids=[repr(v)[:12] for v in HOSTILE])
def test_ranking_stays_bounded_in_time_whatever_the_record(value: float) -> None:
    """A pathological record (the 0.1.0 hang was betavariate(1 + 1e308, 1)) is clamped."""
    import time

    rec = Record(successes=value, failures=value, ttr_total=value, ttr_count=value)
    started = time.perf_counter()
    for strategy in ("thompson", "ucb"):
        for _ in range(20):
            d = rank([("a", "low"), ("b", "low")], {"a": rec, "b": Record(2, 1)},
                     strategy=strategy, rng=random.Random(1))
            assert d.chosen in ("a", "b")
    assert time.perf_counter() - started < 1.0
    import json

    json.dumps(d.as_dict(), allow_nan=False)  # every figure is encodable


@pytest.mark.parametrize("field, value, where", [
    ("successes", 1e308, "patterns[0].successes: must be between 0 and 1000000"),
    ("successes", 10**400, "patterns[0].successes: must be between"),
    ("successes", 2**63, "patterns[0].successes: must be between"),
    ("successes", 5e-324, "patterns[0].successes: must be an integer count"),
    ("failures", -1, "patterns[0].failures: must be between"),
    ("failures", 1.5, "patterns[0].failures: must be an integer count"),
    ("ttr_count", 1e-10, "patterns[0].ttr_count: must be an integer count"),
    ("ttr_total", 1e308, "patterns[0].ttr_total: must be between"),
    ("ttr_total", float("nan"), "patterns[0].ttr_total: must be between"),
    ("last_seen", float("inf"), "patterns[0].last_seen: must be between"),
    ("successes", True, "patterns[0].successes: must be an integer count"),
    ("successes", "5", "patterns[0].successes: must be an integer count"),
])
def test_import_check_names_the_field(field: str, value: object, where: str) -> None:
    record = {"signature": "web:api", "detector": "web", "subject": "api",
              "playbook": "p", "successes": 2, "failures": 1, "ttr_total": 8.0,
              "ttr_count": 2, "first_seen": 1.0, "last_seen": 2.0, field: value}
    with pytest.raises(ValueError, match=where.replace("[", r"\[").replace("]", r"\]")):
        check([record])


def test_negative_zero_and_integral_floats_are_normalised() -> None:
    record = {"signature": "web:api", "detector": "web", "subject": "api",
              "playbook": "p", "successes": 5.0, "failures": -0.0, "ttr_total": -0.0,
              "ttr_count": 0, "first_seen": -0.0, "last_seen": 2}
    (out,) = check([record])
    assert out["successes"] == 5 and isinstance(out["successes"], int)
    assert str(out["ttr_total"]) == "0.0" and str(out["first_seen"]) == "0.0"
    with pytest.raises(ValueError, match="patterns: must be a list"):
        check("x")
    with pytest.raises(ValueError, match=r"patterns\[0\]\.signature"):
        check([{**record, "signature": ""}])
    with pytest.raises(ValueError, match=r"patterns: 100001 records; at most 100000"):
        check([record] * 100_001)


def test_stored_rows_out_of_bounds_are_quarantined_not_used() -> None:
    good = ("web:api", "p", "local", "web", "api", 2, 1, 8.0, 2, 1.0, 2.0, "{}")
    rows = [good,
            ("web:api", "q", "x", "web", "api", 1e308, 1, 0.0, 0, 1.0, 2.0, "{}"),
            ("web:api", "r", "x", "web", "api", 1, 0, 1e308, 1e-10, 1.0, 2.0, "{}"),
            ("web:api", "s", "x", "web", "api", 1, 0, 0.0, 0, 1.0, 2.0, "not json"),
            ("web:api", "t", "x", "web", "api", 1, 0, 0.0, 0, 1.0, 2.0,
             '{"w_s": 1e308}')]
    k = Knowledge(rows)
    assert list(k.patterns["web:api"]) == ["p"]
    assert [q[1] for q in k.quarantined] == ["q", "r", "s", "t"]
    assert "successes" in k.quarantined[0][3] and "w_s" in k.quarantined[3][3]


def test_stored_rows_nested_deep_or_blobs_are_quarantined_not_fatal() -> None:
    """Finding 9: a data column nested 100,000 deep (RecursionError in the parser) or a
    BLOB in a text column stopped graced at every start; now each is quarantined."""
    good = ("web:api", "p", "local", "web", "api", 2, 1, 8.0, 2, 1.0, 2.0, "{}")
    deep = (*good[:1], "deep", *good[2:11], "[" * 100_000 + "]" * 100_000)
    blob = (b"web:api", "blob", *good[2:])
    blob_data = (*good[:1], "blobdata", *good[2:11], b"\x00\xff")
    k = Knowledge([good, deep, blob, blob_data])
    assert list(k.patterns["web:api"]) == ["p"]
    assert [q[1] for q in k.quarantined] == ["deep", "blob", "blobdata"]
    assert "data" in k.quarantined[0][3] and "signature" in k.quarantined[1][3]


def test_verification_failures_alone_never_demote_and_a_demoted_playbook_is_retried() -> None:
    """Finding 1: anyone who can hold the symptom can make a working playbook's runs look
    failed (its steps succeed, the symptom stays). Such failures count in the record but
    never demote alone; a failure of the playbook's own steps can; a demoted playbook is
    tried again once retry_after passed since its last failure."""
    st = Settings(demote_after=3, demote_below=0.25, demote_span=600.0, retry_after=3600.0)
    k = Knowledge(settings=st)
    for n, at in enumerate((0.0, 1800.0, 3620.0)):  # the attack: three held incidents
        _learn(k, "fix", False, at, n, own=False)
    is_demoted, held = k.demotion("web:api", "fix", 3700.0)
    assert not is_demoted and "never demotes alone" in (held or "")
    assert k.records("web:api", 3700.0)["fix"].failures > 2.9  # still in the record
    # The playbook's own steps failing in demote_after (3) of the incidents: that can
    # demote (one step failure alone cannot: tests/test_learning_review2.py).
    for n, at in enumerate((10.0, 1810.0, 3630.0)):
        _learn(k, "fix", False, at, n, own=True)
    assert k.demotion("web:api", "fix", 3700.0) == (True, None)
    assert not k.retry_due("web:api", "fix", 3700.0)
    assert k.retry_due("web:api", "fix", 3630.0 + 3600.0)


def test_import_plan_is_all_or_nothing_and_the_dry_run_is_the_plan() -> None:
    """Findings 11 and 12: an import is planned in full (checked against the caps) before
    anything changes; the plan lists exactly what applying it does, removals included."""
    k = Knowledge()
    rec = {"signature": "web:api", "detector": "web", "subject": "api", "playbook": "a",
           "successes": 3, "failures": 0, "ttr_total": 0, "ttr_count": 0,
           "first_seen": 1.0, "last_seen": 2.0}
    _import(k, "peer", [rec, {**rec, "playbook": "b"}], 10.0)
    plan = k.plan_import("peer", check([{**rec, "successes": 4}]), host="h", kid="k",
                         exported_at=20.0, now=20.0)
    assert plan.counts == {"new": 0, "changed": 1, "same": 0, "removed": 1}
    assert [(c["playbook"], c["change"]) for c in plan.changes] == [("a", "changed"),
                                                                     ("b", "removed")]
    assert set(k.patterns["web:api"]) == {"a", "b"}  # planning changed nothing
    k.apply_import(plan)
    assert set(k.patterns["web:api"]) == {"a"} and k.sources["peer"]["exported_at"] == 20.0
    # Over a cap: refused whole, nothing changed.
    many = [{**rec, "playbook": f"p{i}"} for i in range(60)]
    _import(k, "other", many, 30.0)
    with pytest.raises(ValueError, match="more than 64 playbooks"):
        k.plan_import("third", check([{**rec, "playbook": f"q{i}"} for i in range(10)]),
                      host="h", kid="k", exported_at=1.0, now=40.0)
    assert len(k.patterns["web:api"]) == 61


def test_imported_prior_fades_from_export_time() -> None:
    """Finding 10: an import fades from when it was exported, not imported."""
    k = Knowledge(settings=Settings(import_weight=5.0, half_life=1000.0))
    rec = {"signature": "web:api", "detector": "web", "subject": "api", "playbook": "old",
           "successes": 100, "failures": 0, "ttr_total": 0, "ttr_count": 0,
           "first_seen": 1.0, "last_seen": 2.0}
    _import(k, "peer", [rec], now=2000.0, exported_at=1000.0)
    assert k.prior("web:api", "old", 2000.0).runs == pytest.approx(2.5)  # one half-life
    # An export time in the future (after its import, within the clock skew allowed)
    # fades from the import.
    _import(k, "later", [{**rec, "playbook": "new"}], now=2000.0, exported_at=2500.0)
    assert k.prior("web:api", "new", 2000.0).runs == pytest.approx(5.0)


@pytest.mark.parametrize("name", ["noop\nqueue:queue  fix-queue  removed", "a\x1b[2J",
                                  "rtl\u202eevil", "lone\ud800", "nul\x00"])
def test_names_with_control_characters_are_refused_at_import(name: str) -> None:
    """Findings 8 and 11: a newline in a name forged output lines; a lone surrogate
    changed memory without a journal entry. Both are refused by the check, naming the
    field."""
    rec = {"signature": "web:api", "detector": "web", "subject": "api", "playbook": name,
           "successes": 1, "failures": 0, "ttr_total": 0, "ttr_count": 0,
           "first_seen": 1.0, "last_seen": 2.0}
    with pytest.raises(ValueError, match=r"patterns\[0\]\.playbook: holds the control"):
        check([rec])


def test_similar_missions_held_back_are_no_evidence() -> None:
    """Finding 7: an uncredited (held back) run on a similar mission counted as a success
    of its playbook through text similarity; now it counts for nothing."""
    from graced.config import LearningConfig
    from graced.learning import Learning

    k = Knowledge()
    learning = Learning(LearningConfig(), k, Path("/nonexistent/journal.db"))
    m = _mission(5, "web", "api", "latency", "open", None)
    held = {"id": 1, "match": "similar symptoms", "playbook": "p", "success": 1, "ttr": 3.0,
            "held_back": "credit"}
    credited = {**held, "id": 2, "held_back": None}
    assert learning.records(m, ["p"], [held], 0.0)["p"].runs == 0
    assert learning.records(m, ["p"], [credited], 0.0)["p"].runs == pytest.approx(0.5)


def test_signed_export_verifies_and_an_edited_one_does_not() -> None:
    import nacl.signing

    from graced.protocol import Signer
    from graced.protocol.knowledge import check_header, verify_export

    signer = Signer(nacl.signing.SigningKey.generate())
    k = Knowledge()
    _learn(k, "restart", True, 100.0, 1)
    doc = signer.sign_frame(k.export("daemon-a", "host-a", 200.0))
    check_header(doc)
    verify_export(doc, signer.public_key)
    edited = {**doc, "patterns": [{**doc["patterns"][0], "successes": 5000}]}
    with pytest.raises(ValueError, match="^sig: the signature does not match"):
        verify_export(edited, signer.public_key)
    other = Signer(nacl.signing.SigningKey.generate())
    with pytest.raises(ValueError, match="^kid: signed by key"):
        verify_export(doc, other.public_key)
    unsigned = {k2: v for k2, v in doc.items() if k2 not in ("sig", "kid")}
    with pytest.raises(ValueError, match="^kid: must be a string"):
        check_header(unsigned)


def test_a_step_that_failed_inside_graced_is_not_held_against_the_playbook() -> None:
    """graced's own error (the executor marks the step graced_error) is no evidence
    about the playbook: no failure is credited, so it cannot be demoted for it."""
    knowledge = Knowledge()
    m = _mission(1, "web", "api", "latency", "failed", "restart-web", ran=True)
    assert credit(m, knowledge, "sig") == (False, None)  # the playbook's own failure
    m.steps[0].update(error="graced internal error: TypeError: x", graced_error=True)
    success, why = credit(m, knowledge, "sig")
    assert success is None and why is not None and "inside graced" in why


def test_a_demoted_playbook_is_offered_again_once_retry_after_passed() -> None:
    """Finding 1 (recovery): a demoted playbook was never run again. It is blocked
    until retry_after has passed since its last failure, then offered (with a note
    saying why), so a playbook that works again can recover."""
    from graced.config import LearningConfig
    from graced.learning import Learning

    config = LearningConfig(demote_after=2, demote_span=0.0, retry_after=600.0)
    k = Knowledge()
    learning = Learning(config, k, Path("/nonexistent/journal.db"))
    for incident, at in ((1, 0.0), (2, 100.0)):
        _learn(k, "bad", False, at, incident)
    m = _mission(5, "web", "api", "latency", "open", None)
    blocked, notes = learning.blocked(m, ["bad", "other"], 200.0)
    assert blocked["bad"].startswith("demoted") and not notes
    blocked, notes = learning.blocked(m, ["bad", "other"], 700.0)
    assert not blocked and "retry_after" in notes[0]
    _learn(k, "bad", False, 700.0, 3)  # the retry failed: blocked for retry_after again
    assert learning.blocked(m, ["bad", "other"], 800.0)[0]["bad"].startswith("demoted")


def test_local_records_with_control_characters_are_kept_but_not_exported() -> None:
    """A subject is monitored data: a local record may hold a control character (shown
    escaped); it stays across a restart, and is left out of an export, which an
    importer would refuse whole for it."""
    row = ("web:a\x1bb", "p", "local", "web", "a\x1bb", 2, 1, 8.0, 2, 1.0, 2.0, "{}")
    k = Knowledge([row, (*row[:2], "peer", *row[3:])])
    assert list(k.patterns) == ["web:a\x1bb"] and list(k.patterns["web:a\x1bb"]["p"]) == [
        "local"]
    assert "control character" in k.quarantined[0][3]
    _learn(k, "p", True, 5.0, 1)
    exported = k.export("me", "host", 10.0)["patterns"]
    assert [p["signature"] for p in exported] == ["web:api"]
    check(exported)


def test_a_playbook_whose_steps_succeed_is_said_never_to_demote_from_its_first_failure(
        ) -> None:
    """The newcomer's P6: after one or two such incidents the reason said "it failed in
    2 distinct incident(s) ... demotion needs 3", as if a third would demote it; it
    never does. The true reason is given from the first failure, and the count is
    grammatical when a step of its own did fail."""
    k = Knowledge(settings=Settings(demote_after=3, demote_below=0.25, demote_span=0.0))
    for incident in (1, 2, 3, 4):
        _learn(k, "held", False, 10.0 * incident, incident, own=False)
        is_demoted, held = k.demotion("web:api", "held", 10.0 * incident)
        assert not is_demoted
        assert held == ("success 0% is below 25%, but its steps always succeeded and the "
                        "symptom stayed: evidence anyone who can hold the symptom can forge, "
                        "which never demotes alone, however often it happens "
                        "(docs/security.md)"), (incident, held)
    _learn(k, "broken", False, 10.0, 1)
    _learn(k, "broken", False, 20.0, 2, own=False)
    assert k.demotion("web:api", "broken", 20.0)[1] == (
        "success 0% is below 25%, but its own steps failed in 1 distinct incident within "
        "half_life and demotion needs 3 ([learning] demote_after; docs/security.md)")
