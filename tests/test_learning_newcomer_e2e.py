"""The newcomer review of learning (issue #22), against a real graced and the real
gracectl: each test failed on the code the review used, and holds now."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Graced, bin_path
from tests.helpers.procs import poll_until
from tests.helpers.pty_run import run_on_tty
from tests.test_config_keys import graced_cmd
from tests.test_learning_e2e import FAULT, NORMAL, fix, value_detector
from tests.test_learning_hostile_e2e import SETTINGS
from tests.test_learning_review2_e2e import Daemon, rec
from tests.test_missions_e2e import Watch


def slow_detector(name: str, file: Path, interval: float) -> str:
    return (f'[[detector]]\nname = "{name}"\nkind = "value"\nfile = "{file}"\n'
            f'subject = "queue"\ninterval = {interval}\nthreshold = 50.0\n')


def one_playbook(name: str, detector: str, argv: list[str], *, risk: str = "low",
                 verify_timeout: float = 10.0, budget: int = 1000) -> str:
    return (f'[[playbook]]\nname = "{name}"\ndetector = "{detector}"\nrisk = "{risk}"\n'
            f"budget = {budget}\nverify_timeout = {verify_timeout}\n"
            f'[[playbook.step]]\naction = "run"\nargv = {json.dumps(argv)}\ntimeout = 10.0\n')


def high_risk(make_graced: Any, shortdir: Path, flap_window: float) -> tuple[Graced, Path]:
    """A graced with a critical value detector "crit" and its high-risk playbook "drain"
    (which fixes it once approved); the detector's file."""
    crit = shortdir / "crit"
    crit.write_text(NORMAL)
    g = make_graced(detectors=value_detector("crit", crit, "critical")
                    + one_playbook("drain", "crit", fix(crit), risk="high")
                    + f"\n[missions]\nresolve_after = 2\nflap_window = {flap_window:g}\n")
    return g, crit


def explain(g: Graced, mission: int) -> str:
    return g.ctl("missions", "explain", str(mission), check=True).stdout


# -- P1 --------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_fix_seen_within_verify_timeout_is_a_success_though_confirmed_after_it(
        make_graced, shortdir: Path) -> None:
    """P1: resolve_after x interval (6 x 0.5 s) does not fit in verify_timeout (1.5 s).
    The fix works at once; the first normal sample comes within verify_timeout, the
    confirming ones after it: the mission resolves and learning counts a success (it
    failed with "still anomalous" next to last_value 0)."""
    queue = shortdir / "queue"
    queue.write_text(NORMAL)
    g = make_graced(detectors=slow_detector("slowq", queue, 0.5)
                    + one_playbook("drain-slowq", "slowq", fix(queue), verify_timeout=1.5)
                    + "\n[missions]\nresolve_after = 6\nflap_window = 0\n")
    w = Watch(g)
    try:
        queue.write_text(FAULT)
        resolved = w.wait("mission.resolved", "slowq", 30)["payload"]
        assert not w.events("mission.failed", "slowq")
    finally:
        w.close()
    text = explain(g, resolved["id"])
    assert "verification failed" not in text and "still anomalous" not in text, text
    assert "past verify_timeout" in text, text
    assert "counted as a success of drain-slowq" in text, text


def test_config_check_warns_when_verification_cannot_fit(tmp_path: Path) -> None:
    """P1: config check printed only "ok" for numbers that cannot fit; now a warning
    says what happens (graced.toml(5) verify_timeout)."""
    path = tmp_path / "graced.toml"
    queue = tmp_path / "q"
    queue.write_text(NORMAL)
    path.write_text(slow_detector("slowq", queue, 30.0)
                    + one_playbook("drain-slowq", "slowq", fix(queue), verify_timeout=60.0)
                    + slow_detector("rareq", queue, 90.0)
                    + one_playbook("drain-rareq", "rareq", fix(queue), verify_timeout=60.0))
    res = graced_cmd("config", "check", str(path))
    assert (res.returncode, res.stdout) == (0, f"{path}: ok\n"), res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith(f"graced: warning: {path}:13: [[playbook]] #1 (drain-slowq) "
                               "verify_timeout: 60 s is shorter than [missions] resolve_after x "
                               "detector 'slowq''s interval (3 x 30 s): a fix seen normal "
                               "within verify_timeout is confirmed after it"), lines
    assert lines[1].startswith(f"graced: warning: {path}:30: [[playbook]] #2 (drain-rareq) "
                               "verify_timeout: 60 s is not longer than detector 'rareq''s "
                               "interval (90 s)"), lines


# -- P3 --------------------------------------------------------------------------------

@pytest.mark.slow
def test_approved_runs_do_not_use_up_the_automatic_cap(make_graced, shortdir: Path) -> None:
    """P3: max_actions_per_hour caps *automatic* runs; two approved high-risk runs used
    it up and the next low-risk fault escalated "global cap spent". Now the low-risk
    fault is fixed, and status counts only the automatic run."""
    risky, plain = shortdir / "risky", shortdir / "plain"
    for f in (risky, plain):
        f.write_text(NORMAL)
    g = make_graced(detectors=value_detector("risky", risky, "high")
                    + one_playbook("drain-risky", "risky", fix(risky), risk="high")
                    + value_detector("plain", plain)
                    + one_playbook("drain-plain", "plain", fix(plain))
                    + "\n[missions]\nresolve_after = 2\nflap_window = 0\n"
                    "[remediation]\nmax_actions_per_hour = 2\n")
    w = Watch(g)
    try:
        for n in (1, 2):
            risky.write_text(FAULT)
            waiting = w.wait("mission.awaiting_approval", "risky", 15, count=n)["payload"]
            g.ctl("missions", "approve", str(waiting["id"]), "--yes", check=True)
            w.wait("mission.resolved", "risky", 20, count=n)
        plain.write_text(FAULT)
        w.wait("mission.resolved", "plain", 20)
        assert not w.events("mission.escalated", "plain")
    finally:
        w.close()
    status = json.loads(g.ctl("status", "--json", check=True).stdout)
    assert status["executor"]["actions_last_hour"] == 1, status["executor"]


# -- P4 --------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_spent_budget_hands_the_fault_to_the_next_ranked_playbook(
        make_graced, shortdir: Path) -> None:
    """P4: the chosen playbook's budget was spent and the mission escalated although
    another matching playbook had budget left; the ranking said "chosen" with no budget
    shown. Now the next in the ranking runs, explain shows each one's budget and why the
    first was skipped; once every budget is spent, the escalation says so."""
    queue = shortdir / "queue"
    queue.write_text(NORMAL)
    g = make_graced(detectors=value_detector("q", queue)
                    + one_playbook("first-fix", "q", fix(queue), budget=1)
                    + one_playbook("second-fix", "q", fix(queue), budget=1)
                    + "\n[missions]\nresolve_after = 2\nflap_window = 0\n"
                    '[learning]\nstrategy = "first"\n')
    w = Watch(g)
    try:
        for n in (1, 2):
            queue.write_text(FAULT)
            w.wait("mission.resolved", "q", 20, count=n)
        queue.write_text(FAULT)
        escalated = w.wait("mission.escalated", "q", 20)["payload"]
    finally:
        w.close()
    done = [m for m in json.loads(g.ctl("missions", "ls", "--all", "--json",
                                        check=True).stdout) if m["detector"] == "q"]
    done.sort(key=lambda m: m["id"])
    assert [m["playbook"] for m in done[:2]] == ["first-fix", "second-fix"]
    text = explain(g, done[1]["id"])
    assert "BUDGET" in text, text
    row = next(line for line in text.splitlines() if line.strip().startswith("first-fix"))
    assert row.split()[-2:] == ["1/1", "SKIPPED"], row
    row = next(line for line in text.splitlines() if line.strip().startswith("second-fix"))
    assert row.split()[-2:] == ["0/1", "chosen"], row
    assert ("choice    second-fix: the next in the ranking with budget left; first-fix "
            "ranked first, but its budget spent: ran 1 time for queue in 3600 s (budget 1)"
            in text), text
    assert escalated["reason"] == (
        "budget spent: playbook first-fix ran 1 time for queue in 3600 s (budget 1); no "
        "other matching playbook has budget left (second-fix)"), escalated


# -- P5 --------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_mission_kept_open_for_a_person_is_explained(make_graced, shortdir: Path) -> None:
    """P5: after three clears before approval the next mission is kept open for a
    person; approving it said "the latest 7 sample(s) were normal, 2 resolve it" (it did
    not) and explain said nothing. Now explain says it was kept open and what to do, and
    the refusal says why it did not resolve."""
    g, crit = high_risk(make_graced, shortdir, flap_window=600)
    w = Watch(g)
    try:
        for n in (1, 2, 3):
            crit.write_text(FAULT)
            w.wait("mission.awaiting_approval", "crit", 15, count=n)
            crit.write_text(NORMAL)
            w.wait("mission.resolved", "crit", 15, count=n)
        crit.write_text(FAULT)
        mid = w.wait("mission.awaiting_approval", "crit", 15, count=4)["payload"]["id"]
        crit.write_text(NORMAL)
        poll_until(lambda: "kept open" in explain(g, mid), 15, "the mission kept open")
        assert len(w.events("mission.resolved", "crit")) == 3
    finally:
        w.close()
    text = explain(g, mid)
    assert "waiting   kept open for a person since " in text, text
    assert (f"to do: reject it if the fault is gone (gracectl missions reject {mid}), or "
            "approve it, with --even-if-clearing") in text, text
    res = g.ctl("missions", "approve", str(mid), "--yes")
    assert res.returncode == 1 and res.stderr.count("\n") == 1, res.stderr
    assert "were normal (value 0); it was kept open for a person" in res.stderr, res.stderr
    assert "resolve it as cleared" not in res.stderr, res.stderr


# -- P8 --------------------------------------------------------------------------------

@pytest.mark.slow
def test_replace_key_warns_only_when_the_key_is_replaced(make_graced, shortdir: Path) -> None:
    """P8: ``--replace-key`` printed "WARNING: replacing the key pinned ..." and then
    refused the file (exit 10, pin unchanged). Now a refusal warns of nothing, a dry run
    says what would be, and the import that replaces the key says so."""
    g = make_graced(extra_config=SETTINGS)
    a = Daemon(shortdir, "daemon-a")
    first = a.export([rec("queue:q", "drain")], exported_at=time.time() - 60)
    assert a.load(g, first).returncode == 0
    (shortdir / "new").mkdir()
    new = Daemon(shortdir / "new", "daemon-a")  # the same daemon id, a new key
    # A file signed by the old key, offered with the new one: refused before anything.
    res = g.ctl("knowledge", "import", "--key", str(new.key), "--replace-key", str(first))
    assert res.returncode == 10, res.stderr
    assert "WARNING" not in res.stderr and "replac" not in res.stderr, res.stderr
    renewed = new.export([rec("queue:q", "drain")], name="-renewed")
    res = g.ctl("knowledge", "import", "--key", str(new.key), "--replace-key", "--dry-run",
                str(renewed))
    assert res.returncode == 0, res.stderr
    assert "WARNING: dry run: would be: the key pinned for daemon daemon-a is replaced: " \
        in res.stderr, res.stderr
    res = g.ctl("knowledge", "import", "--key", str(new.key), "--replace-key", str(renewed))
    assert res.returncode == 0, res.stderr
    assert "WARNING: the key pinned for daemon daemon-a is replaced: " in res.stderr, res.stderr


# -- P11 -------------------------------------------------------------------------------

@pytest.mark.slow
def test_graced_refuses_a_new_key_over_a_journal_its_old_key_signed(make_graced) -> None:
    """P11: with its key moved away, graced made a new one silently and signed on over
    the old chain (tail --verify --since 1 then failed, unknown key). Now it refuses to
    start (exit 4, one line naming the old key id); --new-key makes one, journaled as
    replacing the old key."""
    g = make_graced()
    old = json.loads(g.ctl("status", "--json", check=True).stdout)
    assert g.stop() == 0
    (g.state / "key").rename(g.base / "key.moved")
    res = subprocess.run([bin_path("graced"), "run", "--config", str(g.config)], env=g.env,
                         capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=30)
    assert res.returncode == 4, res
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr, res.stderr
    assert f"key file {g.state / 'key'} is missing, but the journal holds events" \
        in res.stderr, res.stderr
    assert "run graced run --new-key" in res.stderr, res.stderr
    assert not (g.state / "key").exists()
    g.run_args = ["--new-key"]
    g.start()
    # A client that pinned the old key refuses the new one (as it should): a fresh one.
    fresh = {**g.env, "XDG_CONFIG_HOME": str(g.base / "fresh-config")}
    created = [json.loads(line) for line in g.ctl(
        "tail", "--json", "-n", "1", "--no-follow", "crypto.key_created",
        check=True, env=fresh).stdout.splitlines()]
    replaced = [e for e in created if e["payload"].get("replaces")]
    assert len(replaced) == 1, created
    assert replaced[0]["payload"]["replaces"] == old["kid"] != replaced[0]["kid"]
    assert "--new-key" in replaced[0]["payload"]["reason"]


# -- P2 --------------------------------------------------------------------------------

LONG_SUBJECT = "/var/lib/app/cache/worker-queue-with-a-rather-long-name"


@pytest.mark.slow
def test_the_learning_commands_fit_an_80_column_terminal(make_graced, shortdir: Path) -> None:
    """P2: on an 80-column pty the learning commands printed lines of 97 to 197
    characters (missions similar cut SUMMARY at a fixed width with no …). Each fits now
    (tables cut with …, prose folded under its label); piped and --wide, nothing is
    cut."""
    queue, other = shortdir / "queue", shortdir / "other"
    for f in (queue, other):
        f.write_text(NORMAL)
    g = make_graced(detectors=(
        '[[detector]]\nname = "worker-queue-depth-detector"\nkind = "value"\n'
        f'file = "{queue}"\nsubject = "{LONG_SUBJECT}"\ninterval = 0.2\nthreshold = 50.0\n')
        + one_playbook("drain-the-worker-queue-and-restart-the-consumers",
                       "worker-queue-depth-detector", fix(queue))
        + one_playbook("flush-the-worker-queue-cache-to-disk-and-retry",
                       "worker-queue-depth-detector", ["/bin/false"])
        + "\n[missions]\nresolve_after = 2\nflap_window = 0\n"
        '[learning]\nstrategy = "first"\n')
    w = Watch(g)
    try:
        for n in (1, 2):
            queue.write_text(FAULT)
            w.wait("mission.resolved", "worker-queue-depth-detector", 20, count=n)
    finally:
        w.close()
    pattern = f"worker-queue-depth-detector:{LONG_SUBJECT}"
    ctl = bin_path("gracectl")
    commands = [["knowledge", "ls"], ["knowledge", "show", pattern], ["knowledge", "stats"],
                ["missions", "show", "2"], ["missions", "explain", "2"],
                ["missions", "similar", "2"], ["playbooks", "ls"], ["status"]]
    for cmd in commands:
        rc, text = run_on_tty([ctl, *cmd], g.env, columns=80)
        assert rc == 0, (cmd, text)
        plain = re.sub(r"\x1b\[[0-9;]*m", "", text)
        widest = max(plain.splitlines(), key=len)
        assert len(widest) <= 80, (cmd, widest)
        piped = g.ctl(*cmd, check=True).stdout
        assert "…" not in piped, (cmd, piped)
        if cmd[-1] not in ("status", "stats"):
            assert "drain-the-worker-queue-and-restart-the-consumers" in piped, (cmd, piped)
            rc, wide = run_on_tty([ctl, *cmd, "--wide"], g.env, columns=80)
            assert rc == 0 and "drain-the-worker-queue-and-restart-the-consumers" in wide, \
                (cmd, wide)
    rc, text = run_on_tty([ctl, "missions", "similar", "2"], g.env, columns=80)
    assert "…" in text, text  # the summary is cut with …, not at a fixed width
    # The import table of a dry run too.
    export = shortdir / "export.json"
    g.ctl("knowledge", "export", str(export), check=True)
    (shortdir / "h").mkdir()
    h = Graced(shortdir / "h", detectors=slow_detector("other", other, 0.2))
    h.start()
    try:
        rc, text = run_on_tty([ctl, "knowledge", "import", "--key", str(g.state / "key.pub"),
                               "--dry-run", str(export)], h.env, columns=80)
    finally:
        h.close()
    assert rc == 0, text
    assert "PATTERN" in text and max(len(line) for line in text.splitlines()) <= 80, text


# -- P12 -------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_rejected_mission_and_the_times_to_resolve_are_shown_alike(
        make_graced, shortdir: Path) -> None:
    """P12: a rejected mission named its playbook in missions ls but "- -> rejected" in
    knowledge show, and explain had no learning line for it; the mean times to resolve
    in knowledge show's header and rows and explain's "resolved in" were three figures
    with nothing to tell them apart."""
    g, crit = high_risk(make_graced, shortdir, flap_window=0)
    w = Watch(g)
    try:
        crit.write_text(FAULT)
        first = w.wait("mission.awaiting_approval", "crit", 15)["payload"]["id"]
        g.ctl("missions", "approve", str(first), "--yes", check=True)
        w.wait("mission.resolved", "crit", 20)
        crit.write_text(FAULT)
        second = w.wait("mission.awaiting_approval", "crit", 15, count=2)["payload"]["id"]
        g.ctl("missions", "reject", str(second), "--comment", "not now", check=True)
        w.wait("mission.rejected", "crit", 15)
    finally:
        w.close()
    listed = json.loads(g.ctl("missions", "ls", "--all", "--json", check=True).stdout)
    assert next(m for m in listed if m["id"] == second)["playbook"] == "drain"
    shown = g.ctl("knowledge", "show", "crit:queue", check=True).stdout
    assert re.search(rf"#{second} \S+ drain \(not run\) -> rejected", shown), shown
    assert "MTTR" in shown and "(every local fix)" in shown, shown
    assert "a row's is its own weighted record" in shown, shown
    why = explain(g, second)
    assert "learning  nothing learned: drain did not run (rejected)" in why, why
    why = explain(g, first)
    assert re.search(r"outcome   resolved \d+\.\ds after it opened, \d+\.\ds after the "
                     r"playbook started \(learning's time to resolve\)", why), why
