"""End-to-end: gracectl verify on a complete stream saved from a real graced, and every
hostile change to its bytes refused with its documented exit code, one line, no
traceback."""

from __future__ import annotations

import io
import json
import re
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gracectl.verify import verify_stream
from graced.keys import parse_public_key
from graced.protocol import ExitCode, Violation
from tests.conftest import Graced
from tests.helpers.procs import LineCollector
from tests.helpers.streams import complete_stream, mutate


def verify(g: Graced, data: bytes, *args: str) -> tuple[int, str]:
    path = g.base / "stream.jsonl"
    path.write_bytes(data)
    res = g.ctl("verify", "--key", str(g.state / "key.pub"), *args, str(path))
    assert "Traceback" not in res.stderr, res.stderr
    # The result on stdout, an error on stderr, never both.
    assert not (res.stdout and res.stderr) or "--json" in args, res
    return res.returncode, res.stderr if res.returncode else res.stdout


def joined(lines: list[str]) -> bytes:
    return "".join(x + "\n" for x in lines).encode()


@pytest.fixture
def saved(graced: Graced) -> tuple[Graced, list[str], int]:
    lines = complete_stream(graced)
    note = next(i for i, x in enumerate(lines) if '"user.note"' in x)
    return graced, lines, note


@pytest.mark.slow
def test_a_complete_stream_verifies_and_its_cut_versions_do_not(
        saved: tuple[Graced, list[str], int]) -> None:
    g, lines, note = saved
    rc, err = verify(g, joined(lines))
    assert rc == 0, err
    assert "from genesis, to daemon.stopping" in err and "signatures valid" in err
    last = json.loads(lines[-1])

    rc, err = verify(g, joined(lines[3:]))  # the head dropped
    assert rc == ExitCode.CHAIN_BROKEN and "seq 4: missing head" in err, err
    assert "verifies from its checkpoint: --from FIRST_SEQ:FIRST_HASH" in err, err  # a hint
    rc, err = verify(g, joined(lines[:-1]))  # the tail cut off
    assert rc == ExitCode.STALE and "missing tail" in err, err
    rc, err = verify(g, joined(lines[:-1]), "--partial")
    assert rc == 0, err
    rc, err = verify(g, b"")
    assert rc == ExitCode.CHAIN_BROKEN and "empty stream" in err, err
    rc, err = verify(g, bytes(range(256)) * 64)
    assert rc == ExitCode.CHAIN_BROKEN and len(err.strip().splitlines()) == 1, err

    # From an anchor printed by a previous verification: the rest verifies on its own.
    rc, err = verify(g, joined(lines[:note + 1]), "--partial", "--json")
    assert rc == 0, err
    path = g.base / "stream.jsonl"
    out = json.loads(g.ctl("verify", "--key", str(g.state / "key.pub"), "--partial", "--json",
                           str(path)).stdout)
    anchor = f"{out['last_seq']}:{out['last_hash']}"
    rc, err = verify(g, joined(lines[note + 1:]), "--from", anchor)
    assert rc == 0 and f"seq {note + 2}..{last['seq']}" in err, err
    rc, err = verify(g, joined(lines[note + 2:]), "--from", anchor)
    assert rc == ExitCode.CHAIN_BROKEN and "missing head" in err, err


def _edit(line: str, old: str, new: str) -> str:
    assert old in line, (old, line)
    return line.replace(old, new, 1)


HOSTILE = {
    "duplicate key": lambda x: '{"topic":"mission.rejected",' + x[1:],
    "whitespace": lambda x: _edit(x, '"count":3', '"count": 3'),
    "number form": lambda x: _edit(x, "99.5", "99.50"),
    "escape form": lambda x: _edit(x, "é", "\\u00e9"),
    "NaN": lambda x: _edit(x, "99.5", "NaN"),
    "infinity": lambda x: _edit(x, "99.5", "1e400"),
    "lone surrogate": lambda x: _edit(x, "é", "\\ud800"),
    "deep array": lambda x: _edit(x, "99.5", "[" * 100_000 + "]" * 100_000),
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_each_hostile_form_fails_with_exit_11_naming_the_seq(
        saved: tuple[Graced, list[str], int], kind: str) -> None:
    g, lines, note = saved
    seq = json.loads(lines[note])["seq"]
    bad = list(lines)
    bad[note] = HOSTILE[kind](bad[note])
    rc, err = verify(g, joined(bad))
    assert rc == ExitCode.CHAIN_BROKEN, (kind, err)
    assert err.startswith(f"gracectl: verification failed: seq {seq}: "), (kind, err)
    assert len(err.strip().splitlines()) == 1, (kind, err)


@pytest.mark.slow
def test_a_large_stream_is_verified_in_parallel_with_the_same_verdicts(
        graced: Graced, tmp_path: Path) -> None:
    """Big enough to be split across processes: whole, it verifies; tampered in the
    middle, the verdict is the one a sequential reader gives."""
    g = graced
    g.ctl("emit", "user.load", "--count", "20000", "--payload", '{"pad": "' + "x" * 200 + '"}',
          check=True)
    lines = complete_stream(g)
    assert len(lines) > 20000
    rc, err = verify(g, joined(lines), "--jobs", "2")
    assert rc == 0, err
    mid = len(lines) // 2
    seq = json.loads(lines[mid])["seq"]
    for jobs in ("1", "2"):
        rc, err = verify(g, joined(lines[:mid] + lines[mid + 1:]), "--jobs", jobs)
        assert rc == ExitCode.CHAIN_BROKEN and f"seq {seq + 1}: gap" in err, (jobs, err)


@pytest.mark.slow
def test_a_signed_checkpoint_anchors_a_later_verification(make_graced) -> None:
    """graced publishes daemon.checkpoint events; 'gracectl checkpoint' prints the latest,
    verified, and its anchor lets 'verify --from' prove the stream after it alone."""
    g = make_graced(extra_config="checkpoint_interval = 1.0\n")
    # The first one is published at start (just after READY): watch for it.
    tail = LineCollector(g.ctl_popen("tail", "--json", "--since", "1", "daemon.checkpoint"))
    assert tail.wait_for(lambda ls: bool(ls), 20), tail.lines
    tail.proc.terminate()
    tail.wait_exit(10)
    first = json.loads(g.ctl("checkpoint", "--json", check=True).stdout)
    assert first["anchor"] == f"{first['seq']}:{first['hash']}"
    g.ctl("emit", "user.load", "--count", "20", check=True)
    # Wait for a checkpoint after the burst, as a user would: watch for it.
    tail = LineCollector(g.ctl_popen("tail", "--json", "-n", "0", "daemon.checkpoint"))
    assert tail.wait_for(lambda ls: bool(ls), 20), tail.lines
    tail.proc.terminate()
    tail.wait_exit(10)
    latest = json.loads(g.ctl("checkpoint", "--json", check=True).stdout)
    assert latest["seq"] > first["seq"] and latest["head_seq"] >= first["seq"] + 20
    human = g.ctl("checkpoint", check=True).stdout  # a newer one may have come since
    shown = re.search(r"^anchor      (\d+):([0-9a-f]{64})  \(gracectl verify --from \1:\2 FILE\)$",
                      human, re.M)
    assert shown and int(shown.group(1)) >= latest["seq"], human
    lines = complete_stream(g)
    at = next(i for i, x in enumerate(lines) if json.loads(x)["seq"] == latest["seq"])
    assert lines[at] == latest["event"]  # the exact signed line, byte for byte
    rc, err = verify(g, joined(lines[at:]), "--from", latest["anchor"])
    assert rc == 0 and "from anchor" in err, err
    rc, err = verify(g, joined(lines[at + 1:]), "--from", latest["anchor"])
    assert rc == 0, err
    head = f"{latest['head_seq']}:{latest['head_hash']}"  # the head it vouches for
    rc, err = verify(g, joined(lines[latest["head_seq"] - 1:]), "--from", head)
    assert rc == 0, err
    tampered = list(lines[at + 1:])
    tampered[0] = tampered[0].replace('"seq":', '"seq": ', 1)
    rc, err = verify(g, joined(tampered), "--from", latest["anchor"])
    assert rc == ExitCode.CHAIN_BROKEN, err


def test_the_documented_pair_on_a_running_daemon_and_the_anchor_on_stdout(
        graced: Graced) -> None:
    """gracectl(1)'s example: a stream saved from a running daemon has no daemon.stopping,
    so verify says exit 13 without --partial and proves it with; the result line (its last
    word the anchor) is on stdout for a=$(...), and --json carries the anchor."""
    g = graced
    g.ctl("emit", "user.note", "--count", "3", "--payload", "{}", check=True)
    stream = g.base / "stream.jsonl"
    key = str(g.state / "key.pub")
    script = (f'"$CTL" tail --json --since 1 --no-follow > {stream}\n'
              f'"$CTL" verify --key {key} {stream}; echo "rc=$?"\n'
              f'a=$("$CTL" verify --partial --key {key} {stream}); echo "rc=$?"\n'
              'echo "anchor=${a##* }"\n')
    res = subprocess.run(["sh", "-c", script], env={**g.env, "CTL": g.ctl_argv0()},
                         capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60)
    out = res.stdout.splitlines()
    assert out[0] == "rc=13" and "missing tail" in res.stderr, res
    assert out[1] == "rc=0", res
    lines = stream.read_text().splitlines()
    last = json.loads(lines[-1])
    data = json.loads(g.ctl("verify", "--partial", "--json", "--key", key, str(stream),
                            check=True).stdout)
    assert data["anchor"] == f"{last['seq']}:{data['last_hash']}"
    assert out[2] == f"anchor={data['anchor']}"


@pytest.mark.slow
@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_any_mutation_of_a_real_stream_fails_or_is_byte_identical(
        saved: tuple[Graced, list[str], int], data: st.DataObject) -> None:
    """The property on a stream a real graced wrote (its key, its heartbeats, its
    start and stop): whatever is done to the bytes, verification fails or the bytes are
    the same. The verifier is gracectl's own (in-process, so hundreds of mutations fit)."""
    g, lines, _ = saved
    stream = joined(lines)
    buf = mutate(data, stream)
    key = parse_public_key((g.state / "key.pub").read_text())
    try:
        verify_stream(io.BytesIO(bytes(buf)), key)
    except Violation:
        return
    assert bytes(buf) == stream


@pytest.mark.slow
def test_a_junk_line_is_named_by_its_line_and_the_seq_before_it(saved) -> None:
    """The auditor's question is where: Python's 'line 1 column 1' of the line alone
    misled (newcomer review of #15)."""
    g, lines, _ = saved
    junk = [*lines[:5], "garbage junk {not json", *lines[5:]]
    code, err = verify(g, joined(junk))
    assert code == 11, err
    seq = json.loads(lines[4])["seq"]
    assert f"line 6 (after seq {seq}): not JSON" in err and err.count("\n") == 1


def test_the_daemons_private_key_given_as_key_is_refused_by_name(graced: Graced) -> None:
    """key sits next to key.pub: --key key read its seed as a public key and reported an
    'unknown key', sending an auditor after a key change that never happened."""
    stream = graced.base / "s.jsonl"
    stream.write_bytes(graced.ctl("tail", "--json", "--since", "1", "--no-follow",
                                  check=True).stdout.encode())
    res = graced.ctl("verify", "--partial", "--key", str(graced.state / "key"), str(stream))
    assert res.returncode == 1 and "Traceback" not in res.stderr, res
    assert "this is a private key" in res.stderr and "key.pub" in res.stderr
    ok = graced.ctl("verify", "--partial", "--key", str(graced.state / "key.pub"), str(stream))
    assert ok.returncode == 0, ok.stderr
