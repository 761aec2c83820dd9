"""gracectl's output as an operator reads it, against a real graced: tail as journalctl
(-n after the filter, --since/--until by time, -o formats), one clock, JSON-style values,
colour only on a terminal and never with NO_COLOR, tables that fit 80 columns."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Graced, bin_path
from tests.helpers.pty_run import run_on_tty

LOCAL_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{3})?[+-]\d\d:\d\d")
UTC_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{3})?Z")
ESC = "\x1b["


def _events(g: Graced, *args: str) -> list[dict]:
    out = g.ctl("tail", "--no-follow", "-o", "json", *args, check=True).stdout
    return [json.loads(line) for line in out.splitlines()]


@pytest.mark.slow
def test_tail_n_counts_matching_events_and_output_formats(graced: Graced) -> None:
    g = graced
    g.ctl("emit", "user.note", "--payload", '{"text": "hello world", "n": null, "ok": true}',
          check=True)
    g.ctl("emit", "user.other", check=True)
    # The last event is user.other: -n 1 counts matching events, as journalctl does.
    shown = g.ctl("tail", "-n", "1", "--no-follow", "user.note", check=True).stdout
    assert len(shown.splitlines()) == 1 and "user.note" in shown
    line = shown.strip()
    assert LOCAL_TIME.match(line), line
    # JSON's null and true, and a string with a space quoted.
    assert 'text="hello world"' in line and "n=null" in line and "ok=true" in line
    assert "None" not in line and "True" not in line
    two = g.ctl("tail", "-n", "2", "--no-follow", "user.*", check=True).stdout.splitlines()
    assert [ln.split()[2] for ln in two] == ["user.note", "user.other"]
    utc = g.ctl("tail", "-n", "1", "--no-follow", "--utc", "user.note", check=True).stdout
    assert UTC_TIME.match(utc.strip()), utc

    cat = g.ctl("tail", "-n", "1", "--no-follow", "-o", "cat", "user.note", check=True).stdout
    assert cat.split() == ['n=null', 'ok=true', 'text="hello', 'world"']
    for fmt in (["-o", "json"], ["-o", "jsonl"], ["--output", "json"], ["--json"]):
        text = g.ctl("tail", "-n", "1", "--no-follow", *fmt, "user.note", check=True).stdout
        ev = json.loads(text)  # one event, its exact signed line
        assert text.startswith('{"kid":') and ev["payload"]["text"] == "hello world"
    # -f is the follow flag it always was; --no-follow and -f together: the last wins.
    assert g.ctl("tail", "-f", "--no-follow", "-n", "0").returncode == 0
    bad = g.ctl("tail", "-o", "yaml")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_tail_since_and_until_take_a_time(graced: Graced) -> None:
    g = graced
    first = json.loads(g.ctl("emit", "user.a", "--json", check=True).stdout)["first_seq"]
    g.ctl("emit", "user.b", check=True)
    last = json.loads(g.ctl("emit", "user.c", "--json", check=True).stdout)["first_seq"]
    evs = {e["topic"]: e for e in _events(g, "--since", str(first), "--until", str(last),
                                           "user.*")}
    assert list(evs) == ["user.a", "user.b", "user.c"]
    b_ts = evs["user.b"]["ts"]  # ISO 8601 UTC, as signed
    since_b = [e["topic"] for e in _events(g, "--since", b_ts, "user.*")]
    assert since_b == ["user.b", "user.c"]
    until_b = [e["topic"] for e in _events(g, "--since", "-1h", "--until", b_ts, "user.*")]
    assert until_b == ["user.a", "user.b"]
    # The same instant in local time with its offset, and as journalctl's words.
    local = datetime.fromisoformat(b_ts.replace("Z", "+00:00")).astimezone().isoformat()
    assert [e["topic"] for e in _events(g, "--since", local, "user.*")] == since_b
    assert _events(g, "--since", "today", "user.a")[0]["seq"] == first
    assert _events(g, "--since", "+1h") == []
    for junk in ("yesterday-ish", "-10 parsecs", "2026-13-45", "0", "x" * 500):
        res = g.ctl("tail", "--since", junk, "--no-follow")
        assert res.returncode == 2 and "--since" in res.stderr, (junk, res.stderr)
        assert "Traceback" not in res.stderr


@pytest.mark.slow
def test_tail_n_with_since_counts_back_from_the_end_of_the_window(graced: Graced) -> None:
    """journalctl's -n with --since: the last N matching events of the window, never one
    before --since; --since alone shows the whole window."""
    g = graced
    before = json.loads(g.ctl("emit", "user.before", "--json", check=True).stdout)["first_seq"]
    g.ctl("emit", "user.in", "--count", "12", check=True)
    g.ctl("emit", "user.other", check=True)
    last = json.loads(g.ctl("emit", "user.in", "--json", check=True).stdout)["first_seq"]
    # The seqs as journaled: a heartbeat may fall between any two of them.
    ins = [e["seq"] for e in _events(g, "--since", str(before + 1), "user.in")]
    first = ins[0]
    users = [e["seq"] for e in _events(g, "--since", str(first), "user.*")]
    assert len(ins) == 13 and ins[-1] == last  # all of the window, not the default 10
    assert len(users) == 14 and users[12] not in ins  # user.other before the last
    assert [e["seq"] for e in _events(g, "-n", "5", "--since", str(first), "user.in")] == \
        ins[-5:]
    # The last matching ones before --until; more than the window holds: from --since.
    assert [e["seq"] for e in _events(g, "-n", "2", "--since", str(first), "--until",
                                      str(ins[6]), "user.in")] == ins[5:7]
    assert [e["seq"] for e in _events(g, "-n", "50", "--since", str(ins[9]),
                                      "user.*")] == users[9:]
    # --since as a time: the 'tail -n 5 --since -10min'.
    assert [e["seq"] for e in _events(g, "-n", "5", "--since", "-10min", "user.*")] == \
        users[-5:]
    # Nothing in the window: nothing, not the events before it.
    assert _events(g, "-n", "3", "--since", "+1h", "user.*") == []
    human = g.ctl("tail", "-n", "1", "--since", str(first), "--no-follow", "user.*",
                  check=True).stdout.splitlines()
    assert len(human) == 1 and f" {last} " in human[0]


def test_key_without_verify_verifies(graced: Graced, shortdir: Path) -> None:
    """--key is never ignored: a key that is not the daemon's fails as --verify does."""
    other = shortdir / "other.pub"
    other.write_text(f"ed25519 {base64.b64encode(os.urandom(32)).decode()}\n")
    res = graced.ctl("tail", "--key", str(other), "--no-follow")
    assert res.returncode == 10 and "Traceback" not in res.stderr, res
    own = graced.state / "key.pub"
    ok = graced.ctl("tail", "--key", str(own), "--no-follow", "-n", "3", check=True)
    assert len(ok.stdout.splitlines()) == 3


VALUE = ('[[detector]]\nname = "queue-depth"\nkind = "value"\nfile = "{file}"\n'
         'subject = "/var/lib/app/cache/worker-queue-long-name"\ninterval = 0.2\n'
         'threshold = 50.0\nseverity = "high"\n')


@pytest.fixture
def with_mission(make_graced, shortdir: Path) -> Graced:
    value = shortdir / "value"
    value.write_text("99\n")
    g = make_graced(detectors=VALUE.format(file=value))
    first = g.ctl_popen("tail", "--since", "1", "mission.opened")
    try:
        assert first.stdout is not None
        assert "mission.opened" in first.stdout.readline()
    finally:
        first.kill()
        first.wait()
    return g


@pytest.mark.slow
def test_tables_fit_80_columns_show_the_reason_and_colour_only_on_a_tty(
        with_mission: Graced) -> None:
    g = with_mission
    ctl = bin_path("gracectl")
    for cmd in (["missions", "ls"], ["detectors"]):
        rc, text = run_on_tty([ctl, *cmd], g.env, columns=80)
        assert rc == 0, text
        plain = re.sub(r"\x1b\[[0-9;]*m", "", text)
        assert all(len(line) <= 80 for line in plain.splitlines()), plain
        # The reason is there whole, without the detector and subject it repeats.
        assert "at 99.0, above the threshold 50.0" in plain, plain
        assert "queue-depth /var/lib" not in plain
        assert "…" in plain  # the long subject was cut, keeping its end
        assert ESC in text  # severity or anomaly in colour on a terminal
        for no_colour in ({"NO_COLOR": "1"}, {"GRACE_COLOR": "never"}):
            rc, text = run_on_tty([ctl, *cmd], {**g.env, **no_colour}, columns=80)
            assert rc == 0 and ESC not in text, text
        rc, text = run_on_tty([ctl, "--color=never", *cmd], g.env, columns=80)
        assert ESC not in text
        # Piped: nothing cut, no colour, one row a line; --color=always forces colour.
        piped = g.ctl(*cmd, check=True).stdout
        assert ESC not in piped and "…" not in piped
        assert "/var/lib/app/cache/worker-queue-long-name" in piped
        assert ESC in g.ctl("--color", "always", *cmd, check=True).stdout
        rc, wide = run_on_tty([ctl, *cmd, "--wide"], g.env, columns=80)
        assert "/var/lib/app/cache/worker-queue-long-name" in wide


def test_one_clock_in_human_output(with_mission: Graced) -> None:
    g = with_mission
    shown = g.ctl("missions", "show", "1", check=True).stdout
    opened = re.search(r"opened\s+(\S+)", shown)
    assert opened and LOCAL_TIME.fullmatch(opened.group(1)), shown
    utc = g.ctl("missions", "show", "1", "--utc", check=True).stdout
    opened_utc = re.search(r"opened\s+(\S+)", utc)
    assert opened_utc and UTC_TIME.fullmatch(opened_utc.group(1)), utc
    a = datetime.fromisoformat(opened.group(1))
    b = datetime.fromisoformat(opened_utc.group(1).replace("Z", "+00:00"))
    assert a == b  # the same instant, one clock
    # Every time in the timeline and samples is in the same form.
    stamps = re.findall(r"^\s+(\d{4}-\S+)\s", shown, re.M)
    assert stamps and all(LOCAL_TIME.fullmatch(s) for s in stamps), stamps


def test_bad_colour_is_a_usage_error() -> None:
    res = subprocess.run([bin_path("gracectl"), "--color", "sometimes", "status"],
                         capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert res.returncode == 2 and "Traceback" not in res.stderr


PLAYBOOK = ('[[playbook]]\nname = "drain"\ndetector = "queue-depth"\nrisk = "high"\n'
            '[[playbook.step]]\naction = "run"\nargv = ["/bin/true"]\ntimeout = 5.0\n')


def awaiting_approval(make_graced: Any, shortdir: Path, playbook: str = PLAYBOOK) -> Graced:
    """A real graced whose mission 1 (queue-depth, a long subject) awaits approval."""
    value = shortdir / "value"
    value.write_text("99\n")
    g: Graced = make_graced(detectors=VALUE.format(file=value) + playbook)
    g.ctl("wait", "1", "--state", "awaiting_approval", "--timeout", "20", check=True)
    return g


def _took(run: Callable[[], object]) -> float:
    t0 = time.monotonic()
    run()
    return time.monotonic() - t0


@pytest.mark.slow
def test_wait_timeout_is_exact_and_final_means_any_final_state(
        make_graced, shortdir: Path) -> None:
    g = awaiting_approval(make_graced, shortdir)
    for timeout in (1.0, 2.0):
        # What gracectl takes to start and answer here and now (a loaded machine
        # stretches it): the wait is counted from gracectl's own start, not before it.
        start = min(_took(lambda: g.ctl("status", check=True)) for _ in range(3))
        t0 = time.monotonic()
        res = g.ctl("wait", "1", "--state", "resolved", "--timeout", f"{timeout:g}")
        took = time.monotonic() - t0
        assert res.returncode == 6 and "did not reach resolved" in res.stderr, res
        # To a tenth of a second, past gracectl's own start.
        assert timeout - 0.02 <= took <= timeout + start + 0.1, (took, start)
    waiter = g.ctl_popen("wait", "1", "--state", "final", "--json")
    g.ctl("missions", "reject", "1", "--comment", "not now", check=True)
    out, err = waiter.communicate(timeout=30)
    assert waiter.returncode == 0, err
    assert json.loads(out)["state"] == "rejected"
    # Without --timeout the documented default applies (30 s): shown in --help.
    assert "default: 30" in g.ctl("wait", "--help").stdout.replace("\n", " ")


@pytest.mark.slow
def test_verify_of_a_big_file_shows_progress_on_a_terminal_only(graced: Graced,
                                                               shortdir: Path) -> None:
    g = graced
    g.ctl("emit", "user.load", "--count", "14000", "--payload",
          '{"text": "a load event with some words in it"}', check=True)
    stream = shortdir / "s.jsonl"
    with stream.open("w") as fh:
        subprocess.run([bin_path("gracectl"), "tail", "-o", "json", "--since", "1",
                        "--no-follow"], env=g.env, stdout=fh, check=True)
    assert stream.stat().st_size > 4 << 20  # large enough to be verified in parts
    rc, text = run_on_tty([bin_path("gracectl"), "verify", "--partial", "--jobs", "2",
                           str(stream)], g.env)
    assert rc == 0 and "verified" in text, text
    assert re.search(r"verifying: \d+/\d+ \(\d+%\)", text), text
    piped = g.ctl("verify", "--partial", "--jobs", "2", str(stream), check=True)
    assert "verifying" not in piped.stderr and "verified" in piped.stdout


@pytest.mark.slow
def test_last_n_and_a_future_since_hold_while_events_keep_coming(make_graced) -> None:
    """`tail -n 3 --no-follow` prints 3 lines and `--since +1h` nothing, even while the
    head moves between finding where to start and subscribing (a heartbeat every 50 ms;
    both raced before: 4 lines, and a heartbeat older than the asked time)."""
    g = make_graced(heartbeat=0.05)
    for _ in range(15):
        assert len(g.ctl("tail", "-n", "3", "--no-follow", check=True).stdout.splitlines()) == 3
        assert _events(g, "--since", "+1h") == []



def test_the_mode_column_is_never_cut() -> None:
    """Review of #19, newcomer 4: at 80 columns MODE read 'psi-trigg…'; it is at most 11
    characters and never cut, whatever else must give way."""
    from gracectl import out
    from gracectl.cli import DETECTOR_COLUMNS

    row = ["memory-pressure-of-the-host", "psi_memory", "starting", "psi-trigger",
           "/sys/fs/cgroup/system.slice/a-long-service-name.service", "12.345 %", "10s",
           "at 12.3 %"]
    for width in (80, 60):
        text = out.table([row], DETECTOR_COLUMNS, width=width)
        assert " psi-trigger " in text.splitlines()[2], text


BILLING = "restart-the-billing-queue-worker"
BILLING_PLAYBOOK = (
    f'[[playbook]]\nname = "{BILLING}"\ndetector = "queue-depth"\nrisk = "high"\n'
    '[[playbook.step]]\naction = "run"\nargv = ["/bin/sh", "-c", "exit 0", "drain", '
    '"--first-long-option=/var/lib/app/cache/one", "--second-long-option=/var/lib/app/two"]\n'
    '[[playbook.step]]\naction = "signal"\nsignal = "TERM"\npid_file = "{pid_file}"\n')


def _continued(lines: list[str], start: str, under: str) -> tuple[str, list[str]]:
    """The line that starts with ``start`` (after its indent) and the lines folded from
    it: those after it that begin exactly under its text ``under``."""
    head = next(x for x in lines if x.lstrip().startswith(start))
    indent = head.index(under)
    rest = []
    for x in lines[lines.index(head) + 1:]:
        if not (x.startswith(" " * indent) and x[indent:indent + 1].strip()):
            break
        rest.append(x)
    return head, rest


@pytest.mark.slow
def test_80_columns_a_playbooks_name_whole_and_plans_folded_under_their_text(
        make_graced, shortdir: Path) -> None:
    """A newcomer at 80 columns: playbooks ls cut the NAME that playbooks run takes (and
    its match) while BUDGET LEFT stayed whole; playbooks run --dry-run was not folded; and
    missions show folded a plan's lines without indenting what went on."""
    value = shortdir / "value"
    value.write_text("99\n")
    pid_file = shortdir / "the-billing-queue-worker.pid"
    pid_file.write_text("1\n")  # init: graced never signals it, and says so
    g = make_graced(detectors=VALUE.format(file=value)
                    + BILLING_PLAYBOOK.format(pid_file=pid_file))
    g.ctl("wait", "1", "--state", "awaiting_approval", "--timeout", "20", check=True)
    ctl = bin_path("gracectl")

    def at_80(*args: str) -> list[str]:
        rc, text = run_on_tty([ctl, *args], g.env, columns=80)
        assert rc == 0, text
        lines = re.sub(r"\x1b\[[0-9;]*m", "", text).splitlines()
        assert all(len(x) <= 80 for x in lines), lines
        return lines

    listed = at_80("playbooks", "ls")
    row = next(x for x in listed if x.startswith(BILLING))
    assert row.split()[:3] == [BILLING, "high", "(approval)"], listed  # the name whole
    assert "detector=queue-depth" in [x.strip() for x in listed]  # the match, whole, under

    dry = at_80("playbooks", "run", BILLING, "--mission", "1", "--dry-run")
    sha = json.loads(g.ctl("playbooks", "run", BILLING, "--mission", "1", "--dry-run",
                           "--json", check=True).stdout)["plan"]["sha256"]
    shown = at_80("missions", "show", "1")
    for lines in (dry, shown):  # folded the same way: each continuation under its text
        head, more = _continued(lines, "plan: playbook", "playbook")
        assert head.endswith("(risk high), sha256") and more == [" " * 6 + sha], lines
        head, more = _continued(lines, "1. run: argv", "argv")
        assert "--second-long-option=/var/lib/app/two" in " ".join([head, *more]), lines
        assert more, lines
    head, more = _continued(dry, "targets now:", "none")
    assert (" ".join(x.strip() for x in [head, *more]) == f"targets now: none (pid file "
            f"{pid_file}: names pid 1, which graced never signals)"), dry
