"""``gracectl top`` driven in a real terminal (tmux send-keys / capture-pane) against a
real graced: a real fault shows up, is approved from the dashboard and really fixed; a
tampering proxy turns the signature status red; 80x24 and 200x60 render cleanly."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import Graced
from tests.test_learning_e2e import FAULT, NORMAL, SETTINGS, fix, playbook, value_detector
from tests.test_stream_e2e import _proxy

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")


class Terminal:
    """A tmux session on a private server, running one command."""

    def __init__(self, command: list[str], env: dict[str, str], width: int,
                 height: int) -> None:
        self.server = f"grace-test-{uuid.uuid4().hex[:8]}"
        exports = " ".join(f"{k}={shlex_quote(v)}" for k, v in env.items())
        script = (f"env {exports} {' '.join(shlex_quote(c) for c in command)}; "
                  'echo "TOP EXITED rc=$?"; sleep 600')
        self.tmux("new-session", "-d", "-s", "t", "-x", str(width), "-y", str(height),
                  "sh", "-c", script)

    def tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.server, *args], check=True,
                              capture_output=True, text=True, timeout=10).stdout

    def screen(self, escapes: bool = False) -> str:
        return self.tmux("capture-pane", "-p", *(["-e"] if escapes else []), "-t", "t")

    def keys(self, *keys: str) -> None:
        self.tmux("send-keys", "-t", "t", *keys)

    def wait_for(self, pred: Callable[[str], bool], timeout: float,
                 escapes: bool = False) -> str:
        # The screen is the thing observed and it raises no event: poll it until the
        # deadline (each capture is a real round trip to the tmux server).
        deadline = time.monotonic() + timeout
        while True:
            text = self.screen(escapes)
            if pred(text):
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"screen never matched within {timeout} s:\n{text}")
            time.sleep(0.05)  # between two reads, so the poll never spins a core

    def resize(self, width: int, height: int) -> None:
        self.tmux("resize-window", "-t", "t", "-x", str(width), "-y", str(height))

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.server, "kill-server"], capture_output=True,
                       check=False)


def shlex_quote(s: str) -> str:
    import shlex

    return shlex.quote(s)


@pytest.fixture
def terminal() -> Iterator[Callable[..., Terminal]]:
    made: list[Terminal] = []

    def open_(g: Graced, *args: str, socket: str | None = None, width: int = 80,
              height: int = 24) -> Terminal:
        env = {k: v for k, v in g.env.items() if k in (
            "GRACE_SOCKET", "XDG_CONFIG_HOME", "XDG_STATE_HOME", "XDG_RUNTIME_DIR", "HOME",
            "PATH")}
        env.update(LANG="C.UTF-8", LC_ALL="C.UTF-8", TERM="screen-256color")
        if socket:
            env["GRACE_SOCKET"] = socket
        t = Terminal([g.ctl_argv0(), "top", *args], env, width, height)
        made.append(t)
        return t

    yield open_
    for t in made:
        t.close()


FOOTERS = (" q quit", " mission")


def drawn(text: str, height: int) -> bool:
    """The whole frame is on screen: curses writes it top to bottom, so a capture can
    catch one half-written; its last row, the footer, comes last."""
    lines = text.split("\n")
    return len(lines) >= height and lines[height - 1].startswith(FOOTERS)


def clean(text: str, width: int, height: int) -> None:
    """Every line fits, the sections are there, the footer (key help, or the latest
    message for a few seconds) is on the last line."""
    lines = text.split("\n")
    assert len(lines) <= height + 1
    assert all(len(line) <= width for line in lines), max(lines, key=len)
    for part in ("Grace", "signature: verified", "Active missions", "Activity", "Health"):
        assert part in text, part
    assert lines[height - 1].startswith(FOOTERS), lines[height - 1]


@pytest.mark.slow
def test_fault_appears_is_approved_from_the_dashboard_and_fixed(
        make_graced, shortdir: Path, terminal) -> None:
    queue = shortdir / "queue"
    queue.write_text(NORMAL)
    g = make_graced(detectors=value_detector("backlog", queue, "high")
                    + playbook("drain", "backlog", "high", fix(queue))
                    + SETTINGS.format(approval=120.0))
    t = terminal(g)
    text = t.wait_for(lambda s: "backlog" in s and "ok" in s and "verified" in s
                      and drawn(s, 24), 15)
    clean(text, 80, 24)
    assert "no active missions" in text

    queue.write_text(FAULT)
    started = time.monotonic()
    # The mission's row (selected: '>'), not the activity feed's line for the event,
    # which may be drawn a refresh before the row.
    def row_of(screen: str) -> str | None:
        return next((line for line in screen.splitlines()
                     if line.startswith(">") and "awaiting_approval" in line), None)

    text = t.wait_for(lambda s: row_of(s) is not None, 10)
    assert time.monotonic() - started <= 2.0, time.monotonic() - started
    missions = json.loads(g.ctl("missions", "ls", "--json", check=True).stdout)
    assert len(missions) == 1
    mid = missions[0]["id"]
    row = row_of(text) or ""
    assert row.startswith(f">{mid:>5} high") and "backlog:queue" in row

    t.keys("Enter")
    t.wait_for(lambda s: f"mission {mid}: backlog" in s and "more lines below" in s, 10)
    t.keys("Escape")
    t.wait_for(lambda s: "Active missions (1)" in s, 10)
    shown = json.loads(g.ctl("missions", "show", str(mid), "--json", check=True).stdout)
    sha = shown["plan"]["sha256"]
    t.keys("a")
    # The prompt shows the plan it approves (the detail view, with its steps and hash).
    text = t.wait_for(lambda s: f"approve mission {mid}, the plan shown (sha256 {sha[:16]})"
                      in s, 10)
    # Wrapped at words: the hash whole on a line of its own at 80 columns.
    assert "plan: playbook drain (risk high), sha256" in text and sha in text, text
    assert "1. run: argv" in text
    t.keys("y")
    waited = g.ctl("wait", str(mid), "--state", "resolved", "--timeout", "20", "--json")
    assert waited.returncode == 0, waited.stderr
    assert queue.read_text().strip() == NORMAL  # the playbook really ran
    m = json.loads(g.ctl("missions", "show", str(mid), "--json", check=True).stdout)
    assert m["approvals"][0]["decision"] == "approved"
    assert m["approvals"][0]["comment"] == "from gracectl top"
    assert m["approvals"][0]["plan_sha256"] == sha == m["plan"]["sha256"]
    t.wait_for(lambda s: "no active missions" in s and "mission.resolved" in s, 10)

    # Bigger terminal: the same screen, laid out to the new size.
    t.resize(200, 60)
    text = t.wait_for(lambda s: s.split("\n")[2].startswith("-- Active missions")
                      and len(s.split("\n")[2]) == 200 and drawn(s, 60), 10)
    clean(text, 200, 60)
    t.resize(80, 24)
    text = t.wait_for(lambda s: len(s.split("\n")[2]) == 80 and drawn(s, 24), 10)
    clean(text, 80, 24)

    t.keys("q")
    text = t.wait_for(lambda s: "TOP EXITED rc=0" in s, 10)
    assert "Active missions" not in text  # the terminal is restored


@pytest.mark.slow
def test_tampered_stream_turns_the_signature_status_red(graced: Graced, terminal) -> None:
    g = graced
    g.ctl("keys", "trust", check=True)
    head = int(json.loads(g.ctl("status", "--json", check=True).stdout)["head_seq"])
    target = head + 6
    proxy, path = _proxy(g, "alter", target)
    try:
        t = terminal(g, socket=path)
        t.wait_for(lambda s: "verified" in s, 15)
        g.ctl("emit", "user.push", "--count", "20", check=True)
        text = t.wait_for(lambda s: "SIGNATURE FAILED" in s, 15, escapes=True)
        line = next(x for x in text.splitlines() if "SIGNATURE FAILED" in x)
        assert f"seq {target}" in line and "chain broken" in line, line
        assert "41m" in line or ";41" in line, "not on red: " + repr(line)
        plain = t.screen()
        assert "verified" not in plain.split("\n")[1]
        # --once replays the recent stream through the same proxy: same verdict, for scripts.
        once = g.ctl("--socket", path, "top", "--once")
        assert once.returncode == 11, once.stderr
        assert f"SIGNATURE FAILED: seq {target} chain broken" in once.stdout
        direct = g.ctl("top", "--once")
        assert direct.returncode == 0 and "signature: verified" in direct.stdout
    finally:
        proxy.kill()
        proxy.wait()
