"""gracectl's client paths as a newcomer met them (#18, findings B): wait honours
--answer-timeout against a frozen graced (exit 3, not 6), tail and top say the handshake
timed out as the other commands do, tail --verify -n 0 finds a stream stale from the
moment it is connected, a key file is read only if it is a small regular file, a
command's option before the command says where it goes, and a payload with no
canonical JSON form is a bad option value (exit 2). A frozen graced is a real SIGSTOP."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from graced.protocol import ExitCode
from tests.conftest import Graced, bin_path
from tests.helpers.procs import poll_until
from tests.test_hostile_daemon_e2e import Impostor, impostor  # noqa: F401 - a fixture


@contextmanager
def frozen(g: Graced) -> Iterator[None]:
    """graced stopped with SIGSTOP for the block, then resumed."""
    assert g.proc is not None
    os.kill(g.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(g.proc.pid, signal.SIGCONT)


def _timed(g: Graced, *args: str, env: dict[str, str] | None = None
           ) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    res = g.ctl(*args, env=env, timeout=60)
    return res, time.monotonic() - started


@pytest.mark.slow
def test_wait_tail_and_top_give_up_on_a_frozen_graced_at_answer_timeout(
        graced: Graced) -> None:
    """wait's handshake honours --answer-timeout (env too), with or without --timeout:
    a hung graced is exit 3 ("daemon hung"), never wait's exit 6 ("still running") nor
    the default 10 s; tail and top say it the same words as the other commands."""
    g = graced
    g.ctl("status", check=True)  # pins the key
    handshake = "did not complete the WebSocket handshake within 1 s (--answer-timeout)"
    with frozen(g):
        for args, env in (
                (["--answer-timeout", "1", "wait", "4", "--state", "resolved",
                  "--timeout", "15"], None),
                (["wait", "4", "--state", "resolved", "--timeout", "0"],
                 {**g.env, "GRACE_ANSWER_TIMEOUT": "1"}),
                (["--answer-timeout", "1", "tail", "-n", "1", "--no-follow"], None),
                (["--answer-timeout", "1", "tail", "--verify", "-n", "0"], None),
                (["--answer-timeout", "1", "top", "--once"], None)):
            res, took = _timed(g, *args, env=env)
            assert res.returncode == ExitCode.UNREACHABLE, (args, res.returncode, res.stderr)
            assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr, res.stderr
            assert handshake in res.stderr, (args, res.stderr)
            assert took < 8, (args, took)  # 1 s, Python's start and the close; not 10 or 15
    # Alive again: wait's own verdicts are unchanged (no such mission: exit 5).
    res = g.ctl("--answer-timeout", "1", "wait", "4", "--state", "resolved",
                "--timeout", "15")
    assert res.returncode == ExitCode.NOT_FOUND, res.stderr


@pytest.mark.slow
def test_tail_verify_from_the_head_finds_a_frozen_graced_stale(make_graced: Any) -> None:
    """tail --verify -n 0 on a graced frozen before any event came: stale (exit 13)
    once --stale-after has passed since it connected, not never. (Heartbeats every 30 s:
    no event reaches tail before the freeze.)"""
    g: Graced = make_graced(heartbeat=30)
    g.ctl("status", check=True)
    tail = g.ctl_popen("tail", "--verify", "-n", "0", "--stale-after", "2")
    try:
        poll_until(lambda: json.loads(g.ctl("status", "--json", check=True).stdout)
                   ["wire"]["subscribers"] >= 1, 20, "tail subscribed")
        with frozen(g):
            frozen_at = time.monotonic()
            try:
                _, err = tail.communicate(timeout=20)
            except subprocess.TimeoutExpired:
                pytest.fail("tail --verify -n 0 never found the frozen stream stale")
            took = time.monotonic() - frozen_at
    finally:
        if tail.poll() is None:
            tail.kill()
            tail.wait()
    assert tail.returncode == ExitCode.STALE, err
    assert "stream stale: no event or heartbeat for" in err and "(limit 2 s)" in err, err
    assert took < 10, took


def _limited_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))


def test_a_key_file_is_read_only_if_small_and_regular(graced: Graced) -> None:
    """--key /dev/zero (or a FIFO, or a 5000-byte file) is refused at once in one line
    naming it, exit 1 as any unusable key file, for every command that reads one (under
    a 1 GiB address-space limit: it must not be read whole)."""
    g = graced
    fifo = g.base / "key.fifo"
    os.mkfifo(fifo)
    big = g.base / "big.pub"
    big.write_text("ed25519 " + "A" * 5000 + "\n")
    saved = g.base / "saved.jsonl"
    saved.write_text("{}\n")
    every = (["--key", "/dev/zero", "status"], ["verify", "--key", "/dev/zero", str(saved)],
             ["tail", "--key", "/dev/zero", "--no-follow"],
             ["top", "--once", "--key", "/dev/zero"], ["keys", "trust", "--key", "/dev/zero"])
    for args in (*every, ["--key", str(fifo), "status"], ["--key", str(big), "status"]):
        bad = args[args.index("--key") + 1]
        started = time.monotonic()
        res = subprocess.run([bin_path("gracectl"), *args], env=g.env, text=True,
                             capture_output=True, stdin=subprocess.DEVNULL, timeout=30,
                             preexec_fn=_limited_memory)
        assert res.returncode == ExitCode.ERROR, (args, res.returncode, res.stderr)
        assert res.stderr.startswith(f"gracectl: {bad}: not a key file ("), (
            args, res.stderr)
        assert res.stderr.count("\n") == 1, res.stderr
        assert time.monotonic() - started < 10
    good = g.ctl("--key", str(g.state / "key.pub"), "status", "-q")
    assert good.returncode == 0, good.stderr


def test_a_commands_option_before_the_command_says_it_goes_after() -> None:
    """gracectl --json status: exit 2 saying where --json goes (a subcommand's too);
    an option no command has keeps click's own message."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRACE_")}
    for args, hint in ((["--json", "status"], "gracectl status --json"),
                       (["--json", "missions", "ls"], "gracectl missions ls --json"),
                       (["--socket", "/nowhere", "--json", "missions", "show", "3"],
                        "gracectl missions show --json")):
        res = subprocess.run([bin_path("gracectl"), *args], env=env, text=True,
                             capture_output=True, stdin=subprocess.DEVNULL, timeout=30)
        assert res.returncode == ExitCode.USAGE, (args, res.stderr)
        assert f"Error: --json goes after the command ({hint})" in res.stderr, res.stderr
        assert "Traceback" not in res.stderr
    res = subprocess.run([bin_path("gracectl"), "--jsn", "status"], env=env, text=True,
                         capture_output=True, stdin=subprocess.DEVNULL, timeout=30)
    assert res.returncode == ExitCode.USAGE and "No such option '--jsn'" in res.stderr


def test_a_payload_with_no_canonical_json_form_is_a_bad_option_value(
        graced: Graced) -> None:
    """emit --payload of 1e400, NaN, 2**64 or a lone surrogate is exit 2 naming --payload,
    as '{bad' is; nothing is published."""
    g = graced
    for payload, words in (('{"n":1e400}', "inf is not a JSON number"),
                           ('{"n":NaN}', "nan is not a JSON number"),
                           ('{"n":18446744073709551616}', "beyond 2**53-1"),
                           ('{"s":"\\ud800"}', "lone surrogate"),
                           ('{"a":' + "[" * 100_000, "nested too deep"),
                           ("{bad", "not JSON")):
        res = g.ctl("emit", "user.note", "--payload", payload)
        assert res.returncode == ExitCode.USAGE, (payload[:20], res.returncode, res.stderr)
        assert "Error: Invalid value for --payload: " in res.stderr, res.stderr
        assert words in res.stderr and "Traceback" not in res.stderr, res.stderr
    notes = g.ctl("tail", "--no-follow", "-n", "all", "-o", "json", "user.note", check=True)
    assert notes.stdout == "", notes.stdout
    assert g.ctl("emit", "user.note", "--payload", '{"n":1e300}').returncode == 0



@pytest.mark.slow
def test_wait_gives_up_on_a_request_not_answered_at_answer_timeout(
        impostor: Impostor) -> None:  # noqa: F811
    """Past the handshake too: a peer that completes it, then answers nothing, ends
    wait at --answer-timeout with exit 3 naming the request, well before --timeout's
    exit 6 (with and without one)."""
    sock = impostor.start("silent")
    for timeout in ("15", "0"):
        started = time.monotonic()
        rc, err, _ = impostor.ctl(sock, "--answer-timeout", "1", "wait", "4", "--state",
                                  "resolved", "--timeout", timeout)
        took = time.monotonic() - started
        assert rc == ExitCode.UNREACHABLE, (timeout, rc, err)
        assert "did not answer subscribe within 1 s (--answer-timeout)" in err, err
        assert err.count("\n") == 1, err
        assert took < 8, took
