"""gracectl top's screen, computed from a model (pure: no terminal, no daemon)."""

from __future__ import annotations

import time

import pytest

from gracectl import top
from gracectl.top import SPARK_UTF8, Model, plain, render, scale, sparkline

NOW = time.time()


def _mission(**kw: object) -> dict:
    m = {"id": 7, "severity": "high", "state": "awaiting_approval", "opened_at": NOW - 60,
         "detector": "disk", "subject": "/var/lib/app/cache-b",
         "summary": "disk /var/lib/app/cache-b at 97.0 %, above the threshold 90.0 %",
         "flapping": False, "samples": [], "occurrences": 3, "timeline": [], "kind": "disk",
         "reason": None, "steps": [], "approvals": []}
    m.update(kw)
    return m


def _detector(values: list[float], unit: str = "%", threshold: float | None = 90.0) -> dict:
    return {"kind": "memory", "state": "up", "threshold": threshold, "below": False,
            "subjects": {"host": {"value": values[-1], "unit": unit, "ts": NOW,
                                  "anomalous": False, "summary": "memory at 2.9 %"}},
            "history": {"host": values}}


def test_a_percentage_is_drawn_on_0_to_100_with_its_threshold() -> None:
    assert scale("%", [1.9, 2.9], 90.0) == (0.0, 100.0)
    assert sparkline([1.9, 2.4, 2.9], 3, SPARK_UTF8, 0, 100) == "▁▁▁"  # not a full bar
    assert sparkline([1.9, 2.9], 2, SPARK_UTF8) == "▁█"  # its own range would say "full"
    lo, hi = scale("ms", [10, 20], 2000.0)
    assert (lo, hi) == (0.0, 2500.0)
    model = Model(detectors={"memory": _detector([1.9, 2.2, 2.9])})
    text = plain(render(model, 100, 30, NOW), 100)
    row = next(line for line in text.splitlines() if line.startswith(" memory"))
    assert "▁▁▁" in row and ">90" in row and "█" not in row


def test_subjects_keep_their_end_and_each_mission_shows_its_reason() -> None:
    model = Model(missions=[_mission(), _mission(id=8, subject="/var/lib/app/cache-c",
                                                 summary="disk /var/lib/app/cache-c at 95.0 %,"
                                                         " above the threshold 90.0 %")])
    for width in (80, 200):
        text = plain(render(model, width, 24, NOW), width)
        assert all(len(line) <= width for line in text.splitlines())
        assert "cache-b" in text and "cache-c" in text  # the end that tells them apart
        assert "at 97.0 %, above the threshold 90.0 %" in text
        assert "at 95.0 %, above the threshold 90.0 %" in text
        assert "disk /var/lib/app/cache-b at" not in text  # no repeat of the columns


def test_the_detail_view_wraps_the_plan_and_scrolls() -> None:
    argv = ["/usr/local/bin/drain-queue", "--really-long-option-name=value-one",
            "--another-long-option=/var/lib/app/cache/with/a/long/path", "--final-arg"]
    steps = [{"step": 1, "action": "run", "argv": argv, "timeout": 10.0}]
    detail = {**_mission(), "plan": {"playbook": "drain", "risk": "high", "sha256": "ab" * 32,
                                     "steps": steps},
              "timeline": [{"ts": NOW - i, "from": "open", "to": "open", "reason": f"r{i}"}
                           for i in range(40)]}
    model = Model(detail=detail)
    text = plain(render(model, 80, 24, NOW), 80)
    lines = text.splitlines()
    assert all(len(line) <= 80 for line in lines)
    joined = "".join(line.strip() for line in lines)
    assert all(a in joined for a in argv)  # every argument, never clipped
    assert "more lines below" in lines[-2]
    model.scroll = 10**9  # G: the end
    end = plain(render(model, 80, 24, NOW), 80).splitlines()
    assert "more lines above" in end[2] and "r39" in "\n".join(end)
    assert "more lines below" not in "\n".join(end)


def test_question_mark_shows_the_keys() -> None:
    model = Model(help=True)
    text = plain(render(model, 80, 24, NOW), 80)
    assert "q            quit" in text and "PgDn/PgUp" in text
    assert " q quit  ? keys" in plain(render(Model(), 80, 24, NOW), 80)


def test_activity_values_are_written_as_json() -> None:
    ev = {"topic": "executor.step_finished", "payload": {"mission": 3, "playbook": "p",
                                                         "step": 1, "ok": False,
                                                         "error": None}}
    assert top.describe_event(ev) == "#3 p step 1 FAILED null"
    other = {"topic": "daemon.started", "payload": {"ok": True, "error": None, "x": "a b"}}
    assert top.describe_event(other) == 'ok=true error=null x="a b"'


@pytest.mark.parametrize("topic", ["mission.opened", "integration.changed",
                                   "executor.step_started", "detector.anomaly",
                                   "detector.error", "learning.consulted", "daemon.started"])
def test_the_feed_never_shows_python_none(topic: str) -> None:
    """Review of #16: a field missing or null in a payload read 'None' in the feed."""
    keys = ("id", "detector", "subject", "state", "reason", "component", "was", "mission",
            "playbook", "step", "summary", "error")
    for payload in ({}, dict.fromkeys(keys)):
        line = top.describe_event({"topic": topic, "payload": payload})
        assert "None" not in line, (topic, payload, line)
    appeared = {"topic": "integration.changed", "payload": {
        "component": "detector:web", "was": None, "state": "up"}}
    assert top.describe_event(appeared) == "detector:web new, up"


def test_why_graced_cannot_be_reached_is_wrapped_whole() -> None:
    why = ("cannot reach graced at /work/scratch/a-rather-long-state-dir/run/graced/"
           "graced.sock: No such file or directory; retrying")
    model = Model(connection=why, last_seq=12)
    text = plain(render(model, 80, 24, NOW), 80)
    assert all(len(line) <= 80 for line in text.splitlines()), text
    joined = " ".join(line.strip() for line in text.splitlines()[1:4])
    assert "signature: verified up to seq 12;" in joined
    assert why in joined, text  # nothing cut mid-path


def _sample(value: float | None, unit: str, failed: str | None = None,
            anomalous: bool = False) -> dict:
    return {"value": value, "unit": unit, "ts": NOW, "anomalous": anomalous,
            "summary": failed or "", "failed": failed}


def test_health_units_are_never_cut_and_only_a_failing_probe_is_failing() -> None:
    # At 80 columns the value column is 10 wide: '1 processe' and '1.507 /cor' were cut.
    gone = "0 process(es) named 'hog' running, expected at least 1"
    model = Model(
        detectors={
            "load": {"kind": "load", "state": "up", "threshold": 2.0, "below": False,
                     "subjects": {"host": _sample(1.507, "per core")}, "history": {}},
            "worker": {"kind": "process", "state": "up", "threshold": None, "below": False,
                       "subjects": {"worker": _sample(1.0, "processes")}, "history": {}},
            "hog-rss": {"kind": "process", "state": "up", "threshold": None, "below": False,
                        "subjects": {"hog": _sample(0.0, "processes", gone, True)},
                        "history": {}},
            "redis": {"kind": "tcp", "state": "up", "threshold": None, "below": False,
                      "subjects": {"127.0.0.1:6379": _sample(None, "ms", "refused", True)},
                      "history": {}}},
        status={"integration": {
            "detector:load": {"state": "up"}, "detector:worker": {"state": "up"},
            "detector:hog-rss": {"state": "up"},  # as status says: running, anomalous
            "detector:redis": {"state": "failing", "last_error": "refused"}}})
    text = plain(render(model, 80, 24, NOW), 80)
    rows = {line.split()[0]: line for line in text.splitlines()
            if line.startswith(" ") and line.split()
            and line.split()[0] in ("load", "worker", "hog-rss", "redis")}
    assert "1.507/core" in rows["load"] and "/cor " not in rows["load"]
    assert " 1 process " in rows["worker"] and "processe" not in rows["worker"]
    assert rows["hog-rss"].split()[1] == "up" and "ANOMALY" in rows["hog-rss"]
    assert "failing" not in rows["hog-rss"]
    assert rows["redis"].split()[1] == "failing"
