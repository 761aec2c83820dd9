"""The newcomer review of learning (issue #22): the pure halves (gracectl's text for
explain and knowledge, out.fold), by value. The end-to-end halves are in
tests/test_learning_newcomer_e2e.py."""

from __future__ import annotations

from typing import Any

from gracectl import out
from gracectl.learn import _held, explain_lines
from graced.protocol.text import count


def mission(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": 7, "detector": "q", "subject": "queue", "severity": "medium", "flapping": False,
        "state": "failed", "summary": "q queue at 99.0", "samples": [{"value": 99.0}],
        "occurrences": 1, "opened_at": 100.0, "closed_at": 130.0, "reason": "verification "
        "failed: q still anomalous (value 99) after 10 s", "timeline": [], "approvals": [],
        "playbook": "poke", "steps": [{"ok": True}], "held_back": None, "plan": None,
        "decision": {
            "similar": {"found": 1, "same_key": 1, "text": 0, "resolved": 0},
            "lookup_ms": 0.5, "strategy": "thompson", "chosen": "poke", "explored": False,
            "reason": "poke: highest Thompson draw", "candidates": [{
                "playbook": "poke", "risk": "low", "successes": 0, "runs": 1, "ratio": 0.0,
                "mean": 0.33, "score": 0.4, "mttr_s": None, "demoted": False,
                "chosen": True, "prior": [0, 0], "budget": [1, 3],
                "imported_from": ["vm (daemon f2e2abcd, key 0123456789abcdef)"]}],
            "held_back": ["poke: success 0% is below 25%, but its steps always succeeded "
                          "and the symptom stayed: evidence anyone who can hold the "
                          "symptom can forge, which never demotes alone"]}}
    return {**base, **over}


def test_explain_labels_demotion_apart_from_learning_held_back() -> None:
    """P6: the note on why a poor record did not demote a playbook was labelled "held
    back", the label of learning held back; now "demotion"."""
    lines = explain_lines(mission(), 140.0)
    assert any(line.startswith("demotion  poke: success 0% is below 25%") for line in lines)
    assert not any(line.startswith("held back") for line in lines), lines


def test_explain_names_the_daemon_and_key_of_an_import_in_the_right_number() -> None:
    """P10: "a prior of 1 runs' weight from vm" (every host named vm); "1 samples"."""
    m = mission()
    m["decision"]["candidates"][0]["prior"] = [1, 0]
    text = "\n".join(explain_lines(m, 140.0))
    assert ("imported  poke: a prior weighing as much as 1 run here, from vm (daemon "
            "f2e2abcd, key 0123456789abcdef) (bounded, fading)") in text, text
    assert "(1 sample, peak 99;" in text, text
    assert "1 similar past mission (1 same" in text, text


def test_held_back_counts_name_what_happened_not_a_pseudo_setting() -> None:
    """P6: knowledge ls showed "credit 1" under HELD BACK, as if credit were a setting."""
    assert _held({"credit": 1, "missions.flap_window": 3}) == (
        "not credited 1, missions.flap_window 3")
    assert _held({}) == "-"


def test_counts_in_the_right_number() -> None:
    assert [count(n, "run") for n in (0, 1, 2, 0.5)] == ["0 runs", "1 run", "2 runs",
                                                        "0.5 runs"]
    assert count(3, "daemon id", "daemon ids") == "3 daemon ids"


def test_fold_wraps_prose_under_its_label_and_leaves_pipes_whole() -> None:
    line = "outcome   " + "word " * 30
    folded = out.fold(line, 40).splitlines()
    assert len(folded) > 1 and all(len(x) <= 40 for x in folded)
    assert all(x.startswith(" " * 10) for x in folded[1:]), folded
    assert out.fold(line, None) == line
