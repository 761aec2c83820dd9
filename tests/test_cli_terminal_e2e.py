"""gracectl in a real 80x24 terminal (tmux) against a real graced: missions ls, detectors
and top fit and show each mission's reason; top's ? shows the keys, its detail view
scrolls and shows a plan's every argument, q quits at once; top --once with the wrong key
still prints the frame, its signature line red with the reason."""

from __future__ import annotations

import base64
import os
import shutil
import time
from pathlib import Path

import pytest

from tests.conftest import Graced
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
