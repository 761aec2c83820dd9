"""End-to-end: the real graced, the real gracectl, real sockets, real tampering."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import nacl.signing
import pytest

from graced.keys import format_public_key
from graced.protocol import ExitCode, canonical_text, signing_bytes
from graced.protocol.signing import b64
from tests.conftest import ROOT, Graced, bin_path
from tests.helpers.procs import LineCollector, poll_until, seq_at_least


def saved_stream(g: Graced) -> list[str]:
    out = g.ctl("tail", "--json", "--since", "1", "--no-follow", check=True)
    return out.stdout.splitlines()


def head_seq(g: Graced) -> int:
    return int(json.loads(g.ctl("status", "--json", check=True).stdout)["head_seq"])


def emit(g: Graced, count: int, rate: float | None = None) -> None:
    args = ["emit", "user.load", "--count", str(count)]
    if rate:
        args += ["--rate", str(rate)]
    g.ctl(*args, check=True)


def test_tail_shows_heartbeats(graced: Graced) -> None:
    proc = graced.ctl_popen("tail")
    lines = LineCollector(proc)
    try:
        assert lines.wait_for(lambda ls: sum("daemon.heartbeat" in x for x in ls) >= 2, 15), (
            lines.lines)
    finally:
        proc.terminate()
        proc.wait(10)


def _verify(g: Graced, lines: list[str], key: Path | None = None,
            partial: bool = True) -> subprocess.CompletedProcess:
    """gracectl verify of a saved stream; ``partial``: the daemon is still running, so
    the stream has no daemon.stopping yet."""
    path = g.base / "stream.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return g.ctl("verify", "--key", str(key or g.state / "key.pub"), str(path),
                 *(["--partial"] if partial else []))


@pytest.mark.slow
def test_verify_file_catches_each_tampering(graced: Graced) -> None:
    g = graced
    g.ctl("emit", "user.note", "--payload", '{"msg": "hello"}', check=True)
    emit(g, 30)
    clean = saved_stream(g)
    assert len(clean) >= 33
    ok = _verify(g, clean)
    assert ok.returncode == 0, ok.stderr
    assert "signatures valid, chain intact" in ok.stdout and not ok.stderr  # the result: stdout

    def mutate(i: int, **changes: object) -> list[str]:
        out = list(clean)
        ev = json.loads(out[i])
        ev.update(changes)
        out[i] = canonical_text(ev)
        return out

    ev10 = json.loads(clean[10])
    seq10 = ev10["seq"]
    other = nacl.signing.SigningKey.generate()
    forged_sig = b64(other.sign(signing_bytes(ev10)).signature)
    cases = {
        "forged signature": (mutate(10, sig=forged_sig), ExitCode.BAD_SIGNATURE, seq10),
        "altered payload": (mutate(10, payload={"msg": "evil"}), ExitCode.CHAIN_BROKEN, seq10),
        "dropped event": (clean[:10] + clean[11:], ExitCode.CHAIN_BROKEN, seq10 + 1),
        "swapped events": (clean[:10] + [clean[11], clean[10]] + clean[12:],
                           ExitCode.CHAIN_BROKEN, seq10 + 1),
        "replayed event": (clean[:12] + [clean[10]] + clean[12:], ExitCode.REPLAYED, seq10),
    }
    for name, (lines, code, seq) in cases.items():
        res = _verify(g, lines)
        assert res.returncode == code, (name, res.stderr)
        assert f"seq {seq}:" in res.stderr, (name, res.stderr)
        assert len(res.stderr.strip().splitlines()) == 1, (name, res.stderr)

    wrong = g.base / "other.pub"
    wrong.write_text(format_public_key(bytes(other.verify_key)))
    res = _verify(g, clean, key=wrong)
    assert res.returncode == ExitCode.BAD_SIGNATURE and "unknown key" in res.stderr


@pytest.mark.slow
def test_verify_file_catches_stopped_heartbeats(graced: Graced) -> None:
    g = graced
    lines = LineCollector(g.ctl_popen("tail", "--json", "-n", "0"))
    try:
        assert lines.wait_for(lambda ls: len(ls) >= 1, 10)
        g.proc.send_signal(signal.SIGSTOP)  # type: ignore[union-attr]
        stopped = time.monotonic()
        # Heartbeats every 0.5 s: anything over 2.5 s of silence is stale. Wait, on the
        # daemon being really stopped, by timing a status call that cannot answer.
        try:
            g.ctl("status", timeout=3.5)
        except subprocess.TimeoutExpired:
            pass
        assert time.monotonic() - stopped >= 3.0
    finally:
        g.proc.send_signal(signal.SIGCONT)  # type: ignore[union-attr]
    n = head_seq(g)
    assert lines.wait_for(seq_at_least(n + 1), 10)
    lines.proc.terminate()
    res = _verify(g, saved_stream(g))
    assert res.returncode == ExitCode.STALE, res.stderr
    assert "stale" in res.stderr
    # The way out is named, as a cut-short stream names --partial.
    assert "--stale-after SECONDS accepts a longer silence" in res.stderr, res.stderr
    assert res.stderr.count("\n") == 1, res.stderr


def _proxy(g: Graced, mode: str, seq: int) -> tuple[subprocess.Popen[str], str]:
    path = str(g.base / f"proxy-{mode}.sock")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.helpers.tamper_proxy", path, str(g.socket), mode, str(seq)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc, path


@pytest.mark.slow
def test_tail_verify_catches_each_live_tampering(graced: Graced) -> None:
    g = graced
    key = str(g.state / "key.pub")
    target = 4  # a heartbeat or later: the stream keeps going past it
    # mode: (exit code, seq named in the error, first seq that must not be printed). The
    # bad frame is the target itself (forge, alter), the event that arrives in its place
    # (drop, swap), the copy after target + 1 (replay), or the silence after it (cut, close).
    cases = {
        "none": None,
        "forge": (ExitCode.BAD_SIGNATURE, target, target),
        "alter": (ExitCode.CHAIN_BROKEN, target, target),
        "drop": (ExitCode.CHAIN_BROKEN, target + 1, target),
        "swap": (ExitCode.CHAIN_BROKEN, target + 1, target),
        "replay": (ExitCode.REPLAYED, target, target + 2),
        "cut": (ExitCode.STALE, target, target + 1),
        "close": (ExitCode.STALE, target, target + 1),
        # Every event before the target withheld: --since 1 must start at 1.
        "drop-head": (ExitCode.CHAIN_BROKEN, target, 1),
    }
    outputs = {}
    for mode, expect in cases.items():
        proxy, path = _proxy(g, mode, target)
        try:
            args = ["--socket", path, "tail", "--verify", "--json", "--since", "1", "--key", key]
            if expect is None:
                args.append("--no-follow")
            res = g.ctl(*args, timeout=30)
        finally:
            proxy.kill()
            proxy.wait()
        outputs[mode] = res.stdout.splitlines()
        if expect is None:
            assert res.returncode == 0, res.stderr
            continue
        code, seq, limit = expect
        assert res.returncode == code, (mode, res.returncode, res.stderr)
        assert f"seq {seq}:" in res.stderr, (mode, res.stderr)
        if mode == "drop-head":
            assert "missing head" in res.stderr, res.stderr
        # Nothing from the bad frame on was printed as if it were good.
        printed = [json.loads(x)["seq"] for x in outputs[mode]]
        assert all(s < limit for s in printed), (mode, printed)
    # And what was printed is the daemon's own stream, byte for byte, from seq 1 with no
    # gap, repeat or stranger in it: a prefix of the journal.
    genuine = saved_stream(g)
    for mode, printed_lines in outputs.items():
        assert printed_lines == genuine[:len(printed_lines)], (mode, printed_lines)
    assert outputs["none"] and outputs["replay"], outputs

    other = nacl.signing.SigningKey.generate()
    wrong = g.base / "other.pub"
    wrong.write_text(format_public_key(bytes(other.verify_key)))
    res = g.ctl("tail", "--verify", "--since", "1", "--key", str(wrong), timeout=30)
    assert res.returncode == ExitCode.BAD_SIGNATURE and "unknown key" in res.stderr


@pytest.mark.slow
def test_clean_stream_of_10000_events_across_a_restart_verifies(make_graced) -> None:
    g = make_graced(heartbeat=1.0)
    key = str(g.state / "key.pub")
    tail = LineCollector(g.ctl_popen("tail", "--verify", "--json", "--since", "1", "--key", key))
    emit(g, 5000)
    assert tail.wait_for(seq_at_least(5002), 60), tail.lines[-3:]
    assert g.stop() == 0
    g.start()
    emit(g, 5000)
    last = head_seq(g)
    assert last >= 10_000
    assert tail.wait_for(seq_at_least(last), 60), tail.proc.stderr.read() if tail.done else ""
    assert tail.proc.poll() is None, "tail --verify stopped"
    tail.proc.send_signal(signal.SIGINT)
    tail.wait_exit(10)
    topics = [e["topic"] for e in tail.events()]
    assert "daemon.stopping" in topics and topics.count("daemon.started") == 2
    res = _verify(g, saved_stream(g))
    assert res.returncode == 0, res.stderr
    assert len(tail.events()) >= 10_000


@pytest.mark.slow
def test_chain_broken_across_a_restart_is_caught(make_graced) -> None:
    g = make_graced()
    emit(g, 20)
    before = saved_stream(g)
    assert g.stop() == 0
    last_seen = json.loads(before[-1])["seq"]
    # Rewrite history while the daemon is down: drop from the last event the client saw,
    # so the restarted daemon signs a different event with that seq.
    db = sqlite3.connect(g.state / "journal.db")
    with db:
        db.execute("DELETE FROM events WHERE seq >= ?", (last_seen,))
    db.close()
    g.start()
    emit(g, 3)
    after = saved_stream(g)
    resumed = [x for x in after if json.loads(x)["seq"] > last_seen]
    res = _verify(g, before + resumed)
    assert res.returncode == ExitCode.CHAIN_BROKEN, res.stderr
    assert f"seq {last_seen + 1}:" in res.stderr


@pytest.mark.slow
def test_kill9_during_burst_loses_no_received_event(make_graced) -> None:
    g = make_graced()
    tail = LineCollector(g.ctl_popen("tail", "--json", "-n", "0"))
    assert tail.wait_for(lambda ls: len(ls) >= 1, 10)
    g.ctl("emit", "user.load", "--count", "200000", "--no-wait", check=True)
    assert tail.wait_for(lambda ls: len(ls) >= 3000, 60)
    g.kill()
    tail.wait_exit(20)
    received = tail.events()
    assert len(received) >= 3000
    g.start()
    stored = {json.loads(x)["seq"]: x for x in saved_stream(g)}
    for line in (x for x in tail.lines if x.startswith("{")):
        ev = json.loads(line)
        assert stored.get(ev["seq"]) == line, f"event {ev['seq']} was received but is lost"
    res = _verify(g, list(stored.values()))
    assert res.returncode == 0, res.stderr
    # The chain goes on after the crash: the restart's events follow the last one received.
    assert max(stored) > received[-1]["seq"]


@pytest.mark.slow
def test_stalled_client_is_dropped_while_another_keeps_receiving(make_graced) -> None:
    # A short queue, so the stalled client overflows within seconds while the good one,
    # checking every signature, keeps up at a pace even a heavily loaded machine allows
    # (it, too, is dropped if it falls a queue behind).
    g = make_graced(extra_config="send_timeout = 2.0\nclient_queue = 1000\n")
    slow = g.ctl_popen("tail", "--json", "-n", "0")
    slow_lines = LineCollector(slow)
    good = LineCollector(g.ctl_popen("tail", "--json", "-n", "0"))
    assert slow_lines.wait_for(lambda ls: len(ls) >= 1, 10)
    assert good.wait_for(lambda ls: len(ls) >= 1, 10)
    slow.send_signal(signal.SIGSTOP)
    try:
        g.ctl("emit", "user.load", "--count", "2500", "--rate", "300", "--no-wait",
              check=True)
        # The stopped client cannot tell us; graced's count says it (read, not spun on).
        poll_until(lambda: json.loads(g.ctl("status", "--json", check=True).stdout)["wire"][
            "dropped_total"] >= 1, 20, "the stalled client was never dropped", pause=0.2)
        assert good.wait_for(seq_at_least(2_500), 60)
        last = head_seq(g)
        assert good.wait_for(seq_at_least(last), 30)
        assert "slow consumer" in g.stderr()
    finally:
        slow.send_signal(signal.SIGCONT)
    assert slow_lines.wait_exit(20) == ExitCode.UNREACHABLE
    good.proc.terminate()


def test_sigterm_is_graceful_and_the_chain_continues(make_graced) -> None:
    g = make_graced()
    tail = LineCollector(g.ctl_popen("tail", "--json", "-n", "0", "--reconnect-timeout", "0"))
    assert tail.wait_for(lambda ls: len(ls) >= 1, 10)
    before = head_seq(g)
    t0 = time.monotonic()
    g.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
    g.wait_notify("STOPPING=1", 5)
    assert g.proc.wait(10) == 0  # type: ignore[union-attr]
    assert time.monotonic() - t0 < 5
    assert tail.wait_for(lambda ls: any("daemon.stopping" in x for x in ls), 5)
    tail.wait_exit(10)
    g.stderr_file.close()
    g.start()
    after = saved_stream(g)
    seqs = [json.loads(x)["seq"] for x in after]
    assert seqs == list(range(1, len(seqs) + 1)) and seqs[-1] > before
    assert _verify(g, after).returncode == 0


def test_unreachable_daemon_exits_3(shortdir: Path) -> None:
    env = dict(os.environ, GRACE_SOCKET=str(shortdir / "nope.sock"))
    res = subprocess.run([bin_path("gracectl"), "status"], env=env, capture_output=True, text=True,
                         stdin=subprocess.DEVNULL)
    assert res.returncode == ExitCode.UNREACHABLE
    assert res.stderr.startswith("gracectl: cannot reach graced at")
    assert res.stdout == ""
