"""The parallel pass of ``gracectl verify`` and the one-pass verifier agree on every
event that changes how a time gap is judged, when it opens a chunk (attacker review of
#15, finding 1: a heartbeat announcing a shorter interval at a seam was judged by the
old one, so ``--jobs 2`` accepted a stale stream that ``--jobs 1`` refused)."""

from __future__ import annotations

import resource
import subprocess
from pathlib import Path

import nacl.signing
import pytest

from gracectl.verify import CHUNK_BYTES, CHUNKS_PER_WORKER, PARALLEL_MIN_BYTES, _boundaries
from graced.keys import format_public_key
from graced.protocol import ExitCode
from graced.protocol.signing import GENESIS_PREV, Signer
from tests.conftest import bin_path

N, T0, PAD = 3600, 1_790_000_000.0, "x" * 1150
SIGNER = Signer(nacl.signing.SigningKey(b"\x07" * 32))


def stream(seam: int | None, case: str) -> bytes:
    """N heartbeats 1 s apart announcing 30 s (limit 91 s), ending in daemon.stopping;
    at ``seam`` the event named by ``case`` comes after a 60 s gap."""
    prev, ts, out = GENESIS_PREV, T0, []
    for seq in range(1, N + 1):
        topic, payload, step = "daemon.heartbeat", {"interval": 30, "pad": PAD}, 1.0
        if seq == N:
            topic, payload = "daemon.stopping", {"pad": PAD}
        if seam is not None and seq == seam:
            step = 60.0
            if case == "heartbeat":  # announces 10 s: limit 31 s, the gap is stale
                payload = {"interval": 10, "pad": PAD}
            elif case == "config_reloaded":
                topic, payload = "daemon.config_reloaded", {"heartbeat_interval": 10,
                                                            "pad": PAD}
            elif case == "restart":  # a restart may follow any silence
                topic, payload = "crypto.key_loaded", {"pad": PAD}
            elif case == "after_stopping":  # a clean stop, then a new run
                step = 600.0
            elif case == "plain":  # beyond the 91 s limit
                step = 100.0
        if seam is not None and seq == seam - 1 and case == "after_stopping":
            topic, payload = "daemon.stopping", {"pad": PAD}
        if seam is not None and seq > seam and case in ("heartbeat", "config_reloaded"):
            payload = {"interval": 10, "pad": PAD}
        event = SIGNER.make_event(seq=seq, ts=ts + step, topic=topic, payload=payload,
                                  prev=prev)
        ts += step
        out.append(event.text.encode())
        prev = event.hash
    return b"".join(x + b"\n" for x in out)


def gracectl(args: list[str], stdin: bytes | None = None) -> tuple[int, str]:
    res = subprocess.run([bin_path("gracectl"), *args], input=stdin, capture_output=True,
                         timeout=120)
    err = res.stderr.decode()
    assert "Traceback" not in err, err
    return res.returncode, (err or res.stdout.decode()).strip()


@pytest.mark.slow
@pytest.mark.parametrize("case", ["heartbeat", "config_reloaded", "restart",
                                  "after_stopping", "plain"])
def test_a_gap_event_at_a_chunk_seam_gets_the_same_verdict_in_parallel_and_in_one_pass(
        tmp_path: Path, case: str) -> None:
    path, key = tmp_path / "s.jsonl", tmp_path / "key.pub"
    key.write_text(format_public_key(SIGNER.public_key))
    data, seam = stream(None, case), None
    for _ in range(4):  # the changed events change the sizes a little: until it settles
        path.write_bytes(data)
        size = len(data)
        # Where a 2-worker run starts its second chunk.
        cut = _boundaries(str(path), size,
                          max(2 * CHUNKS_PER_WORKER, size // CHUNK_BYTES))[1][0]
        if seam == data[:cut].count(b"\n") + 1:
            break
        seam = data[:cut].count(b"\n") + 1
        data = stream(seam, case)
    else:
        pytest.fail("the seam did not settle")
    assert size >= PARALLEL_MIN_BYTES
    verdicts = {
        "jobs 2": gracectl(["verify", "--key", str(key), "--jobs", "2", str(path)]),
        "jobs 1": gracectl(["verify", "--key", str(key), "--jobs", "1", str(path)]),
        "stdin": gracectl(["verify", "--key", str(key), "-"], stdin=data),
    }
    expected = ExitCode.STALE if case in ("heartbeat", "config_reloaded", "plain") else 0
    assert len(set(verdicts.values())) == 1, verdicts
    for how, (rc, out) in verdicts.items():
        assert rc == expected, (how, out)
        if expected:
            assert out.startswith(
                f"gracectl: verification failed: seq {seam}: stream stale: "
                f"{100 if case == 'plain' else 60}.0 s"), (how, out)
        else:
            assert f"verified {N} events" in out, (how, out)


@pytest.mark.slow
def test_with_few_file_descriptors_and_many_jobs_the_verdict_comes_and_no_worker_stays(
        tmp_path: Path) -> None:
    """--jobs 300 is capped at the usable cores; a pool that cannot be had (too many open
    files at some point of its making) leaves no worker behind holding the pipe (the
    review's pipeline never ended) and the file is verified in one pass."""
    path, key = tmp_path / "s.jsonl", tmp_path / "key.pub"
    key.write_text(format_public_key(SIGNER.public_key))
    path.write_bytes(stream(None, "clean"))
    for limit in (12, 14, 16, 64):
        def low(limit: int = limit) -> None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

        # communicate() reads to EOF: a forked worker left alive would hold the pipes.
        proc = subprocess.Popen([bin_path("gracectl"), "verify", "--key", str(key),
                                 "--jobs", "300", str(path)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, preexec_fn=low)
        out, err = proc.communicate(timeout=60)
        assert b"Traceback" not in err, err
        assert proc.returncode == 0 and out.startswith(f"verified {N} events".encode()), (
            limit, out, err)
