"""gracectl in a real 80x24 terminal (tmux) against a real graced: missions ls, detectors
and top fit and show each mission's reason; top's ? shows the keys, its detail view
scrolls and shows a plan's every argument, q quits at once; top --once with the wrong key
still prints the frame, its signature line red with the reason."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import Graced
from tests.helpers.pty_run import run_on_tty
from tests.test_cli_output_e2e import VALUE
from tests.test_top_e2e import Terminal, drawn

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")

LONG_ARGV = ["/bin/sh", "-c", "exit 0", "drain", "--first-long-option=/var/lib/app/cache/one",
             "--second-long-option=/var/lib/app/cache/two", "--third-and-last-argument"]
PLAYBOOK = ('[[playbook]]\nname = "drain-the-queue"\ndetector = "queue-depth"\nrisk = "high"\n'
            '[[playbook.step]]\naction = "run"\nargv = ' + str(LONG_ARGV).replace("'", '"')
            + "\ntimeout = 5.0\n")
REASON = "at 99.0, above the threshold 50.0"


def _env(g: Graced) -> dict[str, str]:
    env = {k: v for k, v in g.env.items() if k in (
        "GRACE_SOCKET", "XDG_CONFIG_HOME", "XDG_STATE_HOME", "XDG_RUNTIME_DIR", "HOME", "PATH")}
    env.update(LANG="C.UTF-8", LC_ALL="C.UTF-8", TERM="screen-256color")
    return env


def _fits(text: str, width: int) -> None:
    assert all(len(line) <= width for line in text.split("\n")), max(text.split("\n"), key=len)


@pytest.mark.slow
def test_80x24_tables_and_top_fit_and_show_each_reason(make_graced, shortdir: Path) -> None:
    value = shortdir / "value"
    value.write_text("99\n")
    g = make_graced(detectors=VALUE.format(file=value) + PLAYBOOK)
    g.ctl("wait", "1", "--state", "awaiting_approval", "--timeout", "20", check=True)
    terms: list[Terminal] = []
    try:
        for cmd in (["missions", "ls"], ["detectors"]):
            t = Terminal([g.ctl_argv0(), *cmd], _env(g), 80, 24)
            terms.append(t)
            text = t.wait_for(lambda s: "TOP EXITED rc=0" in s, 20)
            _fits(text, 80)
            assert REASON in text, text
            assert "…" in text and "long-name" in text  # the subject's end is kept

        t = Terminal([g.ctl_argv0(), "top"], _env(g), 80, 24)
        terms.append(t)
        text = t.wait_for(lambda s: "awaiting_approval" in s and "verified" in s
                          and drawn(s, 24), 20)
        _fits(text, 80)
        assert REASON in text, text
        t.keys("?")
        t.wait_for(lambda s: "q            quit" in s, 10)
        t.keys("x")  # any key closes the help
        t.wait_for(lambda s: "Active missions" in s, 10)
        t.keys("Enter")
        text = t.wait_for(lambda s: "mission 1:" in s and "more lines below" in s, 10)
        _fits(text, 80)
        # The ranking table fits the screen: its header and each row on one line each
        # (not wrapped into broken rows).
        rows = text.split("\n")
        head = next(i for i, line in enumerate(rows) if "PLAYBOOK" in line)
        assert "PICK" in rows[head] and "RISK" in rows[head], text
        assert "high" in rows[head + 2] and "chosen" in rows[head + 2], text
        seen = screen = text
        while "more lines below" in screen:  # a page at a time, reading what goes by
            t.keys("NPage")
            before = screen
            screen = t.wait_for(lambda s, before=before: s != before
                                and s.split("\n")[23].startswith(" Esc/Enter back"), 10)
            seen += screen
        joined = "".join(line.strip() for line in seen.split("\n"))
        for arg in LONG_ARGV:  # an approver sees every argument of what they approve
            assert arg.replace(" ", "") in joined.replace(" ", ""), arg
        assert "timeline:" in seen and "more lines above" in seen
        t.keys("Escape")
        t.wait_for(lambda s: "Active missions" in s, 10)
        t.keys("q")
        quit_at = time.monotonic()
        t.wait_for(lambda s: "TOP EXITED rc=0" in s, 5)
        assert time.monotonic() - quit_at < 0.6  # at once, not after a second
    finally:
        for t in terms:
            t.close()


def test_top_once_with_the_wrong_key_prints_the_frame_red(graced: Graced,
                                                          shortdir: Path) -> None:
    other = shortdir / "other.pub"
    other.write_text(f"ed25519 {base64.b64encode(os.urandom(32)).decode()}\n")
    res = graced.ctl("top", "--once", "--key", str(other))
    assert res.returncode == 10, res
    assert "SIGNATURE FAILED" in res.stdout and "unknown key" in res.stdout, res.stdout
    assert "Active missions" in res.stdout  # the frame, with nothing unverified in it
    assert "Traceback" not in res.stderr


@pytest.mark.slow
def test_80_columns_reasons_whole_units_never_cut_states_as_status_plans_folded(
        make_graced, shortdir: Path) -> None:
    """The newcomer's four findings at 80 columns: a reason moved under its row is whole,
    top never cuts a unit mid-word (and says '1 process'), a watched process that is not
    running is its detector's anomaly (up, as status says), not 'failing', and the
    approve prompt folds the plan's hash line as missions show does."""
    value = shortdir / "value"
    value.write_text("99\n")
    worker = f"grace-worker-{uuid.uuid4().hex[:8]}"
    absent = f"grace-hog-that-is-never-running-{uuid.uuid4().hex}"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", worker],
                               stdin=subprocess.DEVNULL)
    terms: list[Terminal] = []
    try:
        g = make_graced(detectors=VALUE.format(file=value) + PLAYBOOK
                        + f'[[detector]]\nname = "worker"\nkind = "process"\ninterval = 0.5\n'
                          f'process = "{worker}"\nmatch_cmdline = true\n'
                        + f'[[detector]]\nname = "hog-rss"\nkind = "process"\ninterval = 0.5\n'
                          f'process = "{absent}"\nmatch_cmdline = true\n')
        opened = g.ctl_popen("tail", "--since", "1", "-o", "jsonl", "mission.opened")
        ids: dict[str, int] = {}
        try:
            assert opened.stdout is not None
            while not {"queue-depth", "hog-rss"} <= set(ids):
                p = json.loads(opened.stdout.readline())["payload"]
                ids[p["detector"]] = p["id"]
        finally:
            opened.kill()
            opened.wait()
        g.ctl("wait", str(ids["queue-depth"]), "--state", "awaiting_approval", "--timeout",
              "20", check=True)

        # 1. detectors: the reason under its row is whole, wrapped at words.
        t = Terminal([g.ctl_argv0(), "detectors"], _env(g), 80, 24)
        terms.append(t)
        rows = t.wait_for(lambda s: "TOP EXITED rc=0" in s, 20).split("\n")
        start = next(i for i, r in enumerate(rows) if r.startswith("hog-rss"))
        under = []
        for r in rows[start + 1:]:
            if not r.startswith(" "):
                break
            under.append(r.strip())
        assert len(under) >= 2 and "…" not in "".join(under), rows
        assert f"'{absent}' running, expected at least 1" in " ".join(under), under

        # 2, 3. top --once: '1 process', whole; hog-rss up with its ANOMALY, not failing.
        rc, text = run_on_tty([g.ctl_argv0(), "top", "--once"], _env(g), 80, 24)
        assert rc == 0, text
        frame = re.sub(r"\x1b\[[0-9;]*m", "", text).split("\n")
        _fits("\n".join(frame), 80)
        health = {r.split()[0]: r for r in frame if r.startswith(" ") and r.split()}
        assert " 1 process " in health["worker"], health["worker"]
        assert health["hog-rss"].split()[1] == "up" and "ANOMALY" in health["hog-rss"]
        assert "failing" not in health["hog-rss"]
        st = json.loads(g.ctl("status", "--json", check=True).stdout)
        assert "hog-rss" not in st["failing_detectors"], st  # status: running

        # 4. missions approve: the plan's sha256 line folded, the hash whole on one line.
        sha = json.loads(g.ctl("missions", "show", str(ids["queue-depth"]), "--json",
                               check=True).stdout)["plan"]["sha256"]
        t = Terminal([g.ctl_argv0(), "missions", "approve", str(ids["queue-depth"])],
                     _env(g), 80, 24)
        terms.append(t)
        screen = t.wait_for(lambda s: "[y/N]" in s, 20)
        # Folded at words: the 64 hex digits whole on one row (the terminal did not wrap it).
        assert any(r.strip() == sha for r in screen.split("\n")), screen
        rc, text = run_on_tty([g.ctl_argv0(), "missions", "show", str(ids["queue-depth"])],
                              _env(g), 80, 24)
        assert rc == 0, text
        _fits(text, 80)
        assert any(line.strip() == sha for line in text.split("\n")), text  # the same way
        t.keys("n", "Enter")
        t.wait_for(lambda s: "nothing was sent" in s and "TOP EXITED rc=1" in s, 10)
    finally:
        sleeper.kill()
        sleeper.wait()
        for t in terms:
            t.close()
