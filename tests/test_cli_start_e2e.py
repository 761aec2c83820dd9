"""gracectl starts fast because a one-shot command imports only what it uses (#18, "Fast
to start"; bench/cli.py prints the figure): ``status``, ``missions ls --json`` and
``emit``, run as the installed script against a real graced, load no event loop, none of
the other commands' modules and none of PyNaCl's signing side, and still verify what
they are answered (an answer signed by another key is exit 10)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from graced.protocol import ExitCode
from tests.conftest import Graced

NOT_FOR_ONE_SHOT = (
    # an event loop and what runs on one: over the Unix socket a plain socket does
    "trio", "trio_websocket", "wsproto", "asyncio", "nats", "gracectl.client",
    "socket",  # socket.py: the one-shot client calls its core, _socket, alone
    # the other commands' modules, imported when one of them is asked for
    "gracectl.learn", "gracectl.playbooks", "gracectl.silence", "gracectl.tail",
    "gracectl.timespec", "gracectl.top", "gracectl.verify", "gracectl.fleet",
    "gracectl.web",
    # to verify a signature takes libsodium, not every primitive PyNaCl binds
    "nacl.signing", "nacl.bindings", "secrets",
    # nothing of the daemon but the protocol (and paths, keys, errors)
    "graced.api", "graced.mesh", "graced.config", "graced.learning",
)


RUN = """
import json, sys
out, sys.argv = sys.argv[1], ["gracectl", *sys.argv[2:]]
from gracectl.cli import _main  # what the installed script runs (main() exits at once)
code = _main()
with open(out, "w") as fh:
    json.dump(sorted(sys.modules), fh)
sys.exit(code)
"""


def imported(argv: list[str], env: dict[str, str], out: Path) -> tuple[int, str, set[str]]:
    """Run gracectl's command line in a fresh interpreter: (exit, stderr, every module
    loaded by the end, however it was imported)."""
    res = subprocess.run([sys.executable, "-c", RUN, str(out), *argv], env=env,
                         capture_output=True, text=True, stdin=subprocess.DEVNULL,
                         timeout=60)
    return res.returncode, res.stderr, set(json.loads(out.read_text()))


@pytest.mark.parametrize("argv, wanted", [
    (["status"], "gracectl.cli"),
    (["missions", "ls", "--json"], "gracectl.missions"),
    (["emit", "user.start"], "gracectl.cli"),
])
def test_a_one_shot_command_imports_only_what_it_uses(graced: Graced, argv: list[str],
                                                      wanted: str) -> None:
    graced.ctl("status", check=True)  # pins the daemon's key
    rc, err, modules = imported(argv, graced.env, graced.base / "modules.json")
    assert rc == 0, err
    # The measure is the real one: the command ran over the one-shot client and verified.
    assert {wanted, "gracectl.wsclient", "nacl._sodium"} <= modules
    heavy = sorted(m for m in modules
                   if any(m == n or m.startswith(n + ".") for n in NOT_FOR_ONE_SHOT))
    assert heavy == [], heavy


def test_the_light_status_still_refuses_an_answer_under_another_key(graced: Graced) -> None:
    """What was left out is not the check: with another key given, status is exit 10."""
    other = graced.base / "other.pub"
    other.write_text("ed25519 " + "A" * 43 + "= x\n")
    res = graced.ctl("--key", str(other), "status")
    assert res.returncode == ExitCode.BAD_SIGNATURE, res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
