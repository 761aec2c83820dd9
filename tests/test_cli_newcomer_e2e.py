"""The newcomer review of the command line, each finding against a real graced and the
real gracectl: wait --json prints the mission as it is now, tail fits a terminal, the
time forms journalctl takes, a failing detector's reason in plain words, --utc and
--color everywhere, emit's payload an object, --plan in upper case."""

from __future__ import annotations

import json
import re
import shutil
import time
from datetime import datetime
from pathlib import Path

import pytest

from tests.conftest import Graced
from tests.helpers.procs import LineCollector
from tests.helpers.pty_run import run_on_tty
from tests.test_cli_output_e2e import VALUE, awaiting_approval
from tests.test_learning_e2e import FAULT, SETTINGS, fix, playbook, value_detector


def _subscribers(g: Graced) -> int:
    return int(json.loads(g.ctl("status", "--json", check=True).stdout)["wire"]["subscribers"])


@pytest.mark.slow
def test_wait_json_prints_the_mission_as_it_is_and_plan_takes_upper_case(
        make_graced, shortdir: Path) -> None:
    queue = shortdir / "queue"
    queue.write_text(FAULT)
    g = make_graced(detectors=value_detector("backlog", queue, "high")
                    + playbook("drain", "backlog", "high", fix(queue))
                    + SETTINGS.format(approval=600))
    g.ctl("wait", "1", "--state", "awaiting_approval", "--timeout", "20", check=True)
    status = g.ctl("status").stdout  # what waits for a person, said so
    assert "missions   1 active: 1 high; 1 awaiting approval" in status, status
    before = _subscribers(g)
    waiter = g.ctl_popen("wait", "1", "--state", "final", "--timeout", "30", "--json")
    try:
        deadline = time.monotonic() + 10
        # The waiter subscribes before it reads the state: approve only once it has.
        while _subscribers(g) <= before:
            assert time.monotonic() < deadline, "wait never subscribed"
        sha = json.loads(g.ctl("missions", "show", "1", "--json",
                               check=True).stdout)["plan"]["sha256"]
        # A hash copied from a tool that writes hex in upper case is the same hash.
        g.ctl("missions", "approve", "1", "--plan", sha[:16].upper(), check=True)
        out, err = waiter.communicate(timeout=30)
    finally:
        if waiter.poll() is None:
            waiter.kill()
    assert waiter.returncode == 0, err
    waited = json.loads(out)
    shown = json.loads(g.ctl("missions", "show", "1", "--json", check=True).stdout)
    assert waited["state"] == "resolved" and waited["closed_at"] is not None, waited
    # What a script gets is the mission as it is now (kubectl wait + get -o json).
    for field in ("state", "closed_at", "updated_at", "timeline", "steps", "approvals"):
        assert waited[field] == shown[field], field
    assert [t["to"] for t in waited["timeline"]][-1] == "resolved"


def test_emit_payload_must_be_a_json_object(graced: Graced) -> None:
    for payload in ("[1]", "3", '"text"', "null"):
        res = graced.ctl("emit", "user.note", "--payload", payload)
        assert res.returncode == 2, (payload, res)
        assert "JSON object" in res.stderr and "Traceback" not in res.stderr
    assert "user.note" not in graced.ctl("tail", "--no-follow", "user.*").stdout
    assert graced.ctl("emit", "user.note", "--payload", '{"a": 1}').returncode == 0


def _tty(g: Graced, *args: str, columns: int = 80) -> str:
    env = {**g.env, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "TERM": "xterm-256color"}
    rc, text = run_on_tty([g.ctl_argv0(), *args], env, columns, 24)
    assert rc == 0, text
    return text


@pytest.mark.slow
def test_tail_fits_a_terminal_and_is_whole_when_piped_or_wide(graced: Graced) -> None:
    g = graced
    words = " ".join(f"word{i}" for i in range(40))
    g.ctl("emit", "user.note", "--payload", json.dumps({"text": words, "end": "THE-END"}),
          check=True)
    args = ("tail", "-n", "1", "--no-follow", "user.note")
    shown = [ln for ln in _tty(g, *args).split("\n") if ln]
    assert len(shown) == 1, shown  # one event, one line: no wrapping mid-word
    assert len(shown[0]) == 80 and shown[0].endswith("…"), shown
    assert "user.note" in shown[0]
    for flag in ("--wide", "-l", "--full"):  # whole, as journalctl's --full
        whole = [ln for ln in _tty(g, *args, flag).split("\n") if ln]
        assert "end=THE-END" in whole[0] and words in whole[0], whole
    piped = g.ctl(*args, check=True).stdout
    assert "end=THE-END" in piped and words in piped
    # -o cat and -o json are data for a pipe or a human to read whole: never cut.
    assert "end=THE-END" in _tty(g, *args, "-o", "cat")
    assert "THE-END" in json.loads(_tty(g, *args, "-o", "json"))["payload"]["end"]


def _topics(g: Graced, *args: str) -> list[str]:
    out = g.ctl("tail", "--no-follow", "-o", "json", *args, check=True).stdout
    return [json.loads(line)["topic"] for line in out.splitlines()]


@pytest.mark.slow
def test_tail_takes_journalctl_time_forms_and_habits(graced: Graced) -> None:
    g = graced
    a = json.loads(g.ctl("emit", "user.a", "--json", check=True).stdout)
    ts_a = json.loads(g.ctl("tail", "--no-follow", "-o", "json", "-n", "1", "user.a",
                            check=True).stdout)["ts"]
    at = datetime.fromisoformat(ts_a.replace("Z", "+00:00"))
    g.ctl("emit", "user.b", check=True)
    second = at.replace(microsecond=0)  # user.a is at or after its own second
    local = second.astimezone()
    forms = [local.strftime("%H:%M:%S"), f"@{int(second.timestamp())}",
             f"today {local.strftime('%H:%M:%S')}"]
    if local.date() == datetime.now().astimezone().date():  # not across midnight
        for form in forms:
            assert _topics(g, "--since", form, "user.*") == ["user.a", "user.b"], form
        assert _topics(g, "--since", local.strftime("%H:%M"), "user.*")[-2:] == [
            "user.a", "user.b"]
        # yesterday at this time: everything of the last day, these two included.
        yesterday = f"yesterday {local.strftime('%H:%M')}"
        assert _topics(g, "--since", yesterday, "user.*") == ["user.a", "user.b"]
    assert _topics(g, "--until", f"@{int(second.timestamp()) - 1}", "user.*") == []
    # -n all: every matching event kept; --no-pager as scripts carry it; short-iso.
    assert _topics(g, "-n", "all", "user.*") == ["user.a", "user.b"]
    assert _topics(g, "-n", "ALL", "--no-pager", "user.*") == ["user.a", "user.b"]
    # -r: newest first, and it does not follow (exit at the head, as journalctl -r).
    rev = g.ctl("tail", "-r", "-n", "all", "-o", "json", "user.*", timeout=20, check=True)
    assert [json.loads(x)["topic"] for x in rev.stdout.splitlines()] == ["user.b", "user.a"]
    assert g.ctl("tail", "-r", "-f").returncode == 2
    iso = g.ctl("tail", "--no-follow", "-o", "short-iso", "-n", "1", "user.a", check=True)
    assert iso.stdout.split()[1:3] == [str(a["first_seq"]), "user.a"], iso.stdout
    for bad in ("25:00", "@x", "yesterday 9"):
        res = g.ctl("tail", "--no-follow", "--since", bad)
        assert res.returncode == 2 and "Traceback" not in res.stderr, res
    assert g.ctl("tail", "--no-follow", "-n", "some").returncode == 2


def test_tail_says_when_nothing_matches(graced: Graced) -> None:
    g = graced
    g.ctl("emit", "user.a", check=True)
    res = g.ctl("tail", "--no-follow", "queue")
    assert res.returncode == 0 and res.stdout == ""
    assert "no topic can match 'queue'" in res.stderr and "'detector.*'" in res.stderr
    assert "-- No entries --" in res.stderr
    # A pattern that matches: no hint, no note.
    ok = g.ctl("tail", "--no-follow", "user.*", check=True)
    assert "user.a" in ok.stdout and ok.stderr == "", ok.stderr
    # One that could match but has nothing yet: only the note.
    none = g.ctl("tail", "--no-follow", "mission.*", check=True)
    assert none.stderr.strip() == "gracectl: -- No entries --", none.stderr


@pytest.mark.slow
def test_tail_refuses_a_since_after_its_until_and_escapes_as_the_docs_say(
        graced: Graced) -> None:
    """A range no event can be in is a usage error (exit 2, one line), as journalctl's
    '--since= must be before --until='; the same range the right way round is shown.
    A bare value shows ESC as \\e (as every other control: \\x07, \\u202e); inside a
    value written in JSON (a quoted string, a list) it is JSON's \\u001b: the README and
    gracectl(1) say both, with this example."""
    g = graced
    g.ctl("emit", "user.a", "--count", "3", check=True)
    seqs = [json.loads(x)["seq"] for x in g.ctl("tail", "--no-follow", "-o", "json", "-n",
                                                 "3", "user.a", check=True).stdout.splitlines()]
    low, high = str(seqs[0]), str(seqs[-1])
    for since, until in ((high, low), ("now", "-1h")):
        res = g.ctl("tail", "--no-follow", "-S", since, "-U", until, "user.*")
        assert res.returncode == 2 and res.stdout == "", res
        assert res.stderr == (f"gracectl: --since {since!r} is after --until {until!r}: "
                              "no event can be in that range\n"), res.stderr
    ok = g.ctl("tail", "--no-follow", "-o", "json", "-S", low, "-U", high, "user.*",
               check=True)
    assert [json.loads(x)["seq"] for x in ok.stdout.splitlines()] == seqs

    payload = {"bare": "a\x1b[31mb", "bell": "x\x07y", "list": ["\x1b"],
               "rlo": "x\u202ey", "spaced": "a b\x1b[31m"}
    g.ctl("emit", "user.esc", "--payload", json.dumps(payload), check=True)
    shown = (r'bare=a\e[31mb bell=x\x07y list=["\u001b"] rlo=x\u202ey '
             r'spaced="a b\u001b[31m"')
    short = g.ctl("tail", "--no-follow", "-n", "1", "user.esc", check=True).stdout
    assert short.split(" user.esc ", 1)[1].strip() == shown, short
    cat = g.ctl("tail", "--no-follow", "-n", "1", "-o", "cat", "user.esc", check=True)
    assert cat.stdout == shown + "\n", cat.stdout
    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text()
    assert r"(`\e`, `\x07`," in readme and r'`"a b\u001b[31m"`' in readme
    man = (root / "man" / "gracectl.1").read_text()
    assert r'.RB ( \ee ", " \ex07 ", " \eu202e ),' in man
    assert r'.RB ( "spaced=""a b\eu001b[31m""" ),' in man


@pytest.mark.slow
def test_tail_compares_a_seq_with_a_time_by_when_its_event_was_published(
        graced: Graced) -> None:
    """-S SEQ -U TIME (or -S TIME -U SEQ): graced says when the seq's event was published,
    and a --since after the --until is exit 2 with one line, as for two of one kind."""
    from graced.protocol import parse_ts

    g = graced
    g.ctl("emit", "user.a", check=True)
    g.ctl("emit", "user.b", check=True)  # another gracectl later: a later time
    a, b = (json.loads(x) for x in g.ctl("tail", "--no-follow", "-o", "json", "-n", "all",
                                          "user.*", check=True).stdout.splitlines())
    between = f"@{(parse_ts(a['ts']) + parse_ts(b['ts'])) / 2:.6f}"
    for since, until, why in (
            (str(b["seq"]), between, f"seq {b['seq']} was published at "),
            (between, str(a["seq"]), f"seq {a['seq']} was published before that time")):
        res = g.ctl("tail", "--no-follow", "-S", since, "-U", until, "user.*")
        assert res.returncode == 2 and res.stdout == "", res
        assert res.stderr.startswith("gracectl: --since ") and " is after --until " \
            in res.stderr, res.stderr
        assert why in res.stderr and res.stderr.endswith(
            "; no event can be in that range\n") and res.stderr.count("\n") == 1, res.stderr
    # The right way round, each range holds one event.
    for since, until, seq in ((str(a["seq"]), between, a["seq"]),
                              (between, str(b["seq"]), b["seq"])):
        ok = g.ctl("tail", "--no-follow", "-o", "json", "-S", since, "-U", until, "user.*",
                   check=True)
        assert [json.loads(x)["seq"] for x in ok.stdout.splitlines()] == [seq], ok
    # A seq not published yet has no time: nothing to compare, nothing to show.
    later = g.ctl("tail", "--no-follow", "-S", str(b["seq"] + 1000), "-U", between)
    assert later.returncode == 0 and later.stdout == "", later
    assert "-- No entries --" in later.stderr, later.stderr


@pytest.mark.slow
def test_a_failing_detector_says_why_in_plain_words(make_graced, shortdir: Path) -> None:
    queue = shortdir / "queue"
    queue.write_text(FAULT)
    g = make_graced(detectors=value_detector("backlog", queue))
    first = LineCollector(g.ctl_popen("tail", "--json", "--since", "1", "detector.error",
                                      "mission.opened"))
    try:  # a mission opens from a sample: the detector has one to show
        assert first.wait_for(lambda ls: any('"mission.opened"' in x for x in ls), 15)
        queue.unlink()  # a real fault: the file it reads is gone
        assert first.wait_for(lambda ls: any('"detector.error"' in x for x in ls), 15)
    finally:
        first.proc.kill()
    why = f"cannot read {queue}: no such file or directory"
    table = g.ctl("detectors", "--wide").stdout
    row = next(line for line in table.splitlines() if line.startswith("backlog"))
    assert f"FAILING: {why} (last sample" in row, table  # not the old sample alone
    status = g.ctl("status")
    assert status.returncode == 7
    assert f"detector backlog failing: {why}" in status.stdout, status.stdout
    for text in (table, status.stdout):
        assert "Error" not in text and "Errno" not in text, text
    # --json: one object keyed by detector name, subjects keyed by subject, as documented.
    dets = json.loads(g.ctl("detectors", "--json", check=True).stdout)
    assert list(dets) == ["backlog"] and set(dets["backlog"]) == DETECTOR_KEYS, dets
    assert set(dets["backlog"]["subjects"]["queue"]) == SAMPLE_KEYS, dets
    root = Path(__file__).resolve().parent.parent
    man = (root / "man" / "gracectl.1").read_text()
    section = man.split(".SS detectors", 1)[1].split(".SS ", 1)[0]
    shape = " ".join(section.split("keyed by detector name", 1)[1].split())
    row = next(x for x in (root / "docs" / "protocol.md").read_text().splitlines()
               if x.startswith("| `detectors` |"))
    for key in DETECTOR_KEYS | SAMPLE_KEYS:
        assert re.search(rf"\b{key}\b", shape) and f"`{key}`" in row, key
    assert "one object keyed by detector name" in (root / "README.md").read_text()


DETECTOR_KEYS = {"kind", "interval", "threshold", "below", "state", "errors", "last_error",
                 "skipped", "last_skipped", "mode", "mode_note", "cadence", "subjects"}
SAMPLE_KEYS = {"ts", "value", "unit", "anomalous", "score", "summary", "failed"}
ESC = "\x1b["
LOCAL = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{3})?[+-]\d\d:\d\d")
UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{3})?Z")


@pytest.mark.slow
def test_utc_and_color_are_global_and_a_flag_beats_no_color(make_graced,
                                                            shortdir: Path) -> None:
    value = shortdir / "value"
    value.write_text("99\n")
    g = make_graced(detectors=VALUE.format(file=value))
    opened = LineCollector(g.ctl_popen("tail", "--since", "1", "mission.opened"))
    try:
        assert opened.wait_for(lambda ls: any("mission.opened" in x for x in ls), 15)
    finally:
        opened.proc.kill()
    g.ctl("silence", "add", "queue-depth", "--for", "1h", "--comment", "test", check=True)
    # --utc wherever a time is printed, before or after the command.
    for cmd in (["missions", "show", "1"], ["checkpoint"], ["silence", "ls"],
                ["tail", "--no-follow", "-n", "1", "mission.*"]):
        local = g.ctl(*cmd, check=True).stdout
        assert LOCAL.search(local) and not UTC.search(local), (cmd, local)
        for utc in (g.ctl("--utc", *cmd, check=True), g.ctl(*cmd, "--utc", check=True)):
            assert UTC.search(utc.stdout) and not LOCAL.search(utc.stdout), (cmd, utc.stdout)
    for cmd in (["status"], ["missions", "ls"], ["detectors"]):  # accepted, as everywhere
        assert g.ctl(*cmd, "--utc").returncode in (0, 7), cmd
        assert g.ctl("--utc", *cmd).returncode in (0, 7), cmd
    # A flag overrides NO_COLOR (no-color.org); --color also after the command.
    no_colour = {**g.env, "NO_COLOR": "1"}
    assert ESC not in g.ctl("missions", "ls", env=no_colour).stdout
    for args in (["--color=always", "missions", "ls"], ["missions", "ls", "--color=always"],
                 ["missions", "ls", "--colour", "always"]):
        res = g.ctl(*args, env=no_colour)
        assert res.returncode == 0 and ESC in res.stdout, (args, res)
    assert ESC in g.ctl("missions", "ls", env={**no_colour, "GRACE_COLOR": "always"}).stdout
    # NO_COLOR set but empty is not set (no-color.org): colour on a terminal.
    env = {**g.env, "NO_COLOR": "", "TERM": "xterm-256color"}
    rc, text = run_on_tty([g.ctl_argv0(), "missions", "ls"], env)
    assert rc == 0 and ESC in text, text
    rc, text = run_on_tty([g.ctl_argv0(), "missions", "ls"], {**env, "NO_COLOR": "1"})
    assert rc == 0 and ESC not in text, text


@pytest.mark.slow
def test_command_probes_say_why_and_are_told_apart(make_graced, shortdir: Path) -> None:
    missing = shortdir / "nothing-here"
    long_script = f"test -e {missing} && echo " + "x" * 80
    g = make_graced(detectors=(
        '[[detector]]\nname = "a"\nkind = "command"\ninterval = 0.3\n'
        f'argv = ["/bin/sh", "-c", "test -e {missing}"]\n\n'
        '[[detector]]\nname = "b"\nkind = "command"\ninterval = 0.3\n'
        f'argv = ["/bin/sh", "-c", "{long_script}"]\n\n'
        '[[detector]]\nname = "c"\nkind = "command"\ninterval = 0.3\n'
        'argv = ["/bin/sh", "-c", "echo disk on fire >&2; exit 3"]\n'))
    opened = LineCollector(g.ctl_popen("tail", "--json", "--since", "1", "mission.opened"))
    try:
        assert opened.wait_for(lambda ls: len(ls) >= 3, 20), opened.lines
    finally:
        opened.proc.kill()
    found = {m["detector"]: m for m in json.loads(
        g.ctl("missions", "ls", "--json", check=True).stdout)}
    assert found["a"]["subject"] == f"test -e {missing}"  # the script, not /bin/sh
    assert found["b"]["subject"] == long_script[:59] + "…"
    assert found["a"]["summary"].endswith("/bin/sh exited 1"), found["a"]["summary"]
    assert found["c"]["summary"].endswith("/bin/sh exited 3: disk on fire")
    assert found["c"]["subject"] == "echo disk on fire >&2; exit 3"


@pytest.mark.slow
def test_missions_ls_says_why_a_mission_escalated(make_graced, shortdir: Path) -> None:
    queue = shortdir / "queue"
    queue.write_text(FAULT)
    g = make_graced(detectors=value_detector("backlog", queue)
                    + playbook("drain", "backlog", "low", fix(queue)).replace(
                        "budget = 1000", "budget = 1")
                    + SETTINGS.format(approval=600))
    g.ctl("wait", "1", "--state", "resolved", "--timeout", "20", check=True)
    escalated = LineCollector(g.ctl_popen("tail", "--json", "--since", "1",
                                          "mission.escalated"))
    try:
        queue.write_text(FAULT)  # back again: the playbook's budget of one run is spent
        assert escalated.wait_for(lambda ls: bool(ls), 20), escalated
    finally:
        escalated.proc.kill()
    assert json.loads(escalated.lines[0])["payload"]["id"] == 2
    reason = json.loads(g.ctl("missions", "show", "2", "--json", check=True).stdout)["reason"]
    assert "budget" in reason, reason
    listed = g.ctl("missions", "ls", check=True).stdout
    row = next(line for line in listed.splitlines() if line.split()[:1] == ["2"])
    assert row.endswith(f"; escalated: {reason}"), row  # not the symptom alone


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_top_at_80x24_wraps_at_words_and_keeps_detector_and_subject(
        make_graced, shortdir: Path) -> None:
    from tests.test_cli_terminal_e2e import PLAYBOOK, _env
    from tests.test_top_e2e import Terminal, drawn

    g = awaiting_approval(make_graced, shortdir, PLAYBOOK)
    t = Terminal([g.ctl_argv0(), "top"], _env(g), 80, 24)
    try:
        screen = t.wait_for(lambda s: "awaiting_approval" in s and "verified" in s
                            and "mission.opened" in s and drawn(s, 24), 20)
        lines = screen.split("\n")
        assert all(len(line) <= 80 for line in lines), screen
        row = next(line for line in lines if "awaiting_approval" in line)
        # The detector whole, the subject's end, in the width the row has free.
        assert "queue-depth:" in row and row.rstrip().endswith("worker-queue-long-name"), row
        # Activity with more to say than a line holds (a key, a long subject): cut with …
        cut = [line for line in lines if "crypto.key_created" in line
               or "mission.opened" in line]
        assert cut and all(line.endswith("…") for line in cut), cut

        t.keys("?")
        help_screen = t.wait_for(lambda s: "q            quit" in s, 10)
        words = " ".join(line.strip() for line in help_screen.split("\n")).split()
        from gracectl.top import HELP_KEYS, HELP_NOTE
        for _, text in HELP_KEYS:  # every word of each key's text, in order
            assert " ".join(text.split()) in " ".join(words), text
        assert " ".join(HELP_NOTE.split()) in " ".join(words)
        t.keys("x")
        t.wait_for(lambda s: "Active missions" in s, 10)

        t.keys("Enter")
        detail = t.wait_for(lambda s: "mission 1:" in s, 10)
        assert all(len(line) <= 80 for line in detail.split("\n")), detail
        text = " ".join(line.strip() for line in detail.split("\n"))
        assert "above the threshold 50.0" in text, detail  # no word split across lines
    finally:
        t.close()
