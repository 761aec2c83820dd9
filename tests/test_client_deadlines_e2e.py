"""gracectl never waits for ever nor grows without bound, whatever answers on the
socket (attacker review of #18, findings 3, 4, 7, 11): a daemon that goes silent after
the handshake, drips a byte at a time, floods pings, sends a message in endless empty
fragments or events nobody subscribed to; a real graced stopped with SIGSTOP. Each is
one line on stderr and a documented exit code."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from graced.protocol import ExitCode
from tests.conftest import Graced
from tests.test_hostile_daemon_e2e import Impostor, impostor  # noqa: F401 - a fixture

CASES = [
    # (mode, exit code, words in the message)
    ("silent", ExitCode.UNREACHABLE, "did not answer status within 1 s (--answer-timeout)"),
    ("drip", ExitCode.UNREACHABLE, "did not answer status within 1 s (--answer-timeout)"),
    ("ping-flood", ExitCode.UNREACHABLE, "did not answer status within 1 s"),
    # 125-byte pings, a hundred a write, never reading: our pongs fill the socket.
    ("deaf-ping-flood", ExitCode.UNREACHABLE, "did not answer status within 1 s"),
    ("fragments", ExitCode.PROTOCOL, "in more than 4096 fragments"),
    ("unsubscribed-events", ExitCode.PROTOCOL, "an event on a connection that never "
                                               "subscribed"),
]


@pytest.mark.slow
@pytest.mark.parametrize("mode, code, words", CASES, ids=[c[0] for c in CASES])
def test_a_one_shot_request_has_an_answer_deadline(impostor: Impostor,  # noqa: F811
                                                   mode: str, code: int, words: str) -> None:
    sock = impostor.start(mode)
    started = time.monotonic()
    rc, err, rss = impostor.ctl(sock, "--answer-timeout", "1", "status")
    took = time.monotonic() - started
    assert rc == code, (rc, err)
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert words in err, err
    assert took < 10, took  # 1 s, Python's start and the close; never the peer's pace
    assert rss < 100 * 2**20, rss


@pytest.mark.slow
def test_a_stopped_graced_gives_exit_3_naming_the_deadline(graced: Graced) -> None:
    """A real graced, SIGSTOPped: status, a missions list and a first-use hello (no key
    pinned yet) each end at --answer-timeout with exit 3, not when graced resumes."""
    graced.ctl("status", check=True)  # pins its key
    assert graced.proc is not None
    os.kill(graced.proc.pid, signal.SIGSTOP)
    try:
        env = {**graced.env, "GRACE_ANSWER_TIMEOUT": "1"}
        fresh = {**env, "XDG_CONFIG_HOME": str(graced.base / "fresh")}  # nothing pinned
        for args, e in ((["status", "-q"], env), (["missions", "ls", "--json"], env),
                        (["status"], fresh)):
            started = time.monotonic()
            res = graced.ctl(*args, env=e, timeout=30)
            took = time.monotonic() - started
            assert res.returncode == ExitCode.UNREACHABLE, (args, res.returncode, res.stderr)
            assert "Traceback" not in res.stderr
            if "-q" not in args:
                assert "within 1 s (--answer-timeout)" in res.stderr, res.stderr
            assert took < 10, (args, took)
    finally:
        os.kill(graced.proc.pid, signal.SIGCONT)
    graced.ctl("status", check=True)


@pytest.mark.slow
def test_float_options_refuse_non_finite_values(tmp_path: Path) -> None:
    """nan, inf and absurd numbers are usage errors (exit 2, one error line), checked
    before any connection (the socket named does not exist)."""
    import subprocess

    from tests.conftest import bin_path

    env = {k: v for k, v in os.environ.items() if not k.startswith("GRACE_")}
    env.update(HOME=str(tmp_path), GRACE_SOCKET=str(tmp_path / "none.sock"))
    for args in (["--answer-timeout", "nan", "status"], ["--answer-timeout", "0", "status"],
                 ["wait", "1", "--state", "resolved", "--timeout", "nan"],
                 ["wait", "1", "--timeout", "inf"], ["wait", "1", "--timeout", "1e308"],
                 ["reload", "--timeout", "nan"], ["emit", "user.x", "--rate", "nan"],
                 ["emit", "user.x", "--count", "2", "--rate", "inf"],
                 ["tail", "--stale-after", "nan"], ["tail", "--reconnect-timeout", "nan"],
                 ["top", "--interval", "inf"], ["top", "--interval", "nan"]):
        res = subprocess.run([bin_path("gracectl"), *args], env=env, capture_output=True,
                             text=True, stdin=subprocess.DEVNULL, timeout=30)
        assert res.returncode == ExitCode.USAGE, (args, res.returncode, res.stderr)
        errors = [ln for ln in res.stderr.splitlines() if ln.startswith("Error:")]
        assert len(errors) == 1 and "Traceback" not in res.stderr, (args, res.stderr)
        assert "is not a number" in errors[0], (args, errors)


def test_a_flag_overrides_the_other_endpoints_environment_variable(tmp_path: Path) -> None:
    """--url with GRACE_SOCKET set (and --socket with GRACE_URL set) uses the flag."""
    import subprocess

    from tests.conftest import bin_path

    env = {k: v for k, v in os.environ.items() if not k.startswith("GRACE_")}
    env.update(HOME=str(tmp_path), GRACE_SOCKET=str(tmp_path / "env.sock"))
    res = subprocess.run([bin_path("gracectl"), "--url", "ws://127.0.0.1:9/", "--key",
                          str(tmp_path / "k.pub"), "status"], env=env, capture_output=True,
                         text=True, stdin=subprocess.DEVNULL, timeout=30)
    assert "not both" not in res.stderr and "k.pub" in res.stderr, res.stderr
    env.update(GRACE_URL="ws://127.0.0.1:9/")
    del env["GRACE_SOCKET"]
    res = subprocess.run([bin_path("gracectl"), "--socket", str(tmp_path / "flag.sock"),
                          "status"], env=env, capture_output=True, text=True,
                         stdin=subprocess.DEVNULL, timeout=30)
    assert res.returncode == ExitCode.UNREACHABLE and "flag.sock" in res.stderr, res.stderr
    env.update(GRACE_SOCKET=str(tmp_path / "env.sock"))
    res = subprocess.run([bin_path("gracectl"), "status"], env=env, capture_output=True,
                         text=True, stdin=subprocess.DEVNULL, timeout=30)
    assert res.returncode == ExitCode.USAGE and "both set" in res.stderr, res.stderr


BAD_TIMES = ["string", "huge", "bool", "leap", "year0", "list"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", BAD_TIMES)
def test_an_answer_whose_times_are_no_times_is_a_protocol_violation(
        impostor: Impostor, kind: str) -> None:  # noqa: F811
    """A signed answer with a time field that holds no sane time (attacker review 5):
    exit 14 naming the field, never "internal error" nor a year-0 or 1e308 date."""
    sock = impostor.start(f"bad-time-{kind}")
    for command in (("status",), ("missions", "ls"), ("missions", "show", "1"),
                    ("missions", "ls", "--json")):
        rc, err, _ = impostor.ctl(sock, "--answer-timeout", "5", *command)
        assert rc == ExitCode.PROTOCOL, (command, rc, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert "is not a time" in err and ("opened_at" in err or "started_at" in err), err


def test_answer_timeout_goes_before_the_command_as_socket_does(
        impostor: Impostor) -> None:  # noqa: F811
    """--answer-timeout is gracectl's own option, as --socket and --url are: before the
    command it bounds the wait (a silent daemon: exit 3 naming it); after the command it
    is a usage error that says where it goes, as --socket's is (review of #18). A
    command's own option of the same name (tail --key) is still the command's."""
    sock = impostor.start("silent")
    rc, err, _ = impostor.ctl(sock, "--answer-timeout", "0.5", "status")
    assert rc == ExitCode.UNREACHABLE and "within 0.5 s (--answer-timeout)" in err, err
    for args, option, metavar in (
            (("status", "--answer-timeout", "0.5"), "--answer-timeout", "SECONDS"),
            (("missions", "ls", "--answer-timeout=0.5"), "--answer-timeout", "SECONDS"),
            (("status", "--socket", str(sock)), "--socket", "PATH")):
        rc, err, _ = impostor.ctl(sock, *args)
        assert rc == ExitCode.USAGE, (args, rc, err)
        assert "Traceback" not in err
        place = " ".join(a for a in args if not a.startswith("-") and a != str(sock)
                         and a != "0.5")
        assert (f"Error: {option} is an option of gracectl itself: give it before the "
                f"command (gracectl {option} {metavar} {place} ...)") in err, err
    rc, err, _ = impostor.ctl(sock, "tail", "--key", str(impostor.base / "no-such.pub"))
    assert rc == ExitCode.ERROR and "no-such.pub: cannot read key" in err, err
