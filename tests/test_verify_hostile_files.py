"""Hostile files given to ``gracectl verify``: the parallel pass stops at its first
failing chunk, and a search for a chunk's first line that finds no newline within
MAX_LINE_BYTES goes straight to the one pass (attacker review: an 8 GB sparse file took
115 s to be refused by the parallel pass, 0.11 s with --jobs 1, and the cost grew with
the file). The verdict is always the one ``--jobs 1`` gives: the first failure in file
order."""

from __future__ import annotations

import os
import resource
import subprocess
from pathlib import Path

import pytest

from gracectl.verify import CHUNK_BYTES, CHUNKS_PER_WORKER, MAX_LINE_BYTES
from graced.keys import format_public_key
from graced.protocol import ExitCode
from tests.conftest import bin_path
from tests.test_verify_seams import SIGNER, N, stream

SIZE = 8 << 30  # a sparse file: no disk but a few blocks

# What the parallel pass of 8 GB must cost at most, in CPU seconds of gracectl and its
# workers (the review measured 79 s; the one pass needs about 0.1 s; alone it takes 0.2-1.3 s,
# beside the suite's other worker up to 12 s in CI: workers finish the chunks they hold).
CPU_BUDGET = 20.0


def verify(key: Path, path: Path, jobs: str) -> tuple[int, str, float]:
    """(exit code, its one line, CPU seconds of gracectl and its workers)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    res = subprocess.run([bin_path("gracectl"), "verify", "--key", str(key), "--jobs", jobs,
                          str(path)], capture_output=True, timeout=300,
                         stdin=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    err = res.stderr.decode()
    assert "Traceback" not in err, err
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return res.returncode, (err or res.stdout.decode()).strip(), cpu


def sparse(path: Path, newlines: list[int]) -> None:
    """SIZE bytes of zeros, holes but for a newline at each offset given."""
    with open(path, "wb") as f:
        f.truncate(SIZE)
        for at in newlines:
            f.seek(at)
            f.write(b"\n")
    if os.stat(path).st_blocks * 512 > 1 << 30:
        pytest.skip(f"{path.parent}'s file system does not keep holes in files")


@pytest.fixture
def key(tmp_path: Path) -> Path:
    key = tmp_path / "key.pub"
    key.write_text(format_public_key(SIGNER.public_key))
    return key


@pytest.mark.parametrize("case", ["no newline", pytest.param(
    "a junk line per chunk", marks=pytest.mark.slow)])  # 3-8 s on a loaded machine
def test_gigabytes_of_junk_are_refused_at_once_with_the_one_pass_verdict(
        tmp_path: Path, key: Path, case: str) -> None:
    """8 GB with no newline at all (the boundary search gives up within MAX_LINE_BYTES);
    or a newline just before every place a 2-process run cuts the file (the boundary
    search is cheap, every chunk is one junk line of 2 MB, and the first one that fails
    stops the pool)."""
    path = tmp_path / "junk.jsonl"
    pieces = max(2 * CHUNKS_PER_WORKER, SIZE // CHUNK_BYTES)
    sparse(path, [] if case == "no newline" else
           [SIZE * i // pieces - 1 for i in range(1, pieces)])
    expected = (f"line 1: longer than {MAX_LINE_BYTES} bytes" if case == "no newline"
                else "line 1: not JSON")
    one = verify(key, path, "1")
    assert one[0] == ExitCode.CHAIN_BROKEN and expected in one[1], one
    rc, out, cpu = verify(key, path, "2")
    assert (rc, out) == one[:2]
    assert cpu < CPU_BUDGET, f"{cpu:.1f} s of CPU to refuse {SIZE >> 30} GB of junk"


def test_random_bytes_get_the_one_pass_verdict(tmp_path: Path, key: Path) -> None:
    path = tmp_path / "junk.jsonl"
    path.write_bytes(os.urandom(6 << 20))
    one = verify(key, path, "1")
    assert one[0] == ExitCode.CHAIN_BROKEN and one[1].startswith(
        "gracectl: verification failed: line 1"), one
    assert verify(key, path, "2")[:2] == one[:2]


@pytest.mark.slow
def test_with_a_late_chunk_failing_too_the_earliest_failure_is_reported(
        tmp_path: Path, key: Path) -> None:
    """A forged signature in the middle and junk near the end of a long valid stream:
    whichever chunk fails first stops the parallel pass, and the verdict names the
    forged event, as --jobs 1 does."""
    lines = stream(None, "clean").split(b"\n")
    forged, junk = N // 2, N - 10
    line = lines[forged - 1]
    at = line.index(b'"sig":"') + len(b'"sig":"')
    lines[forged - 1] = line[:at] + (b"B" if line[at:at + 1] == b"A" else b"A") + line[at + 1:]
    lines[junk - 1] = b"\x00junk"
    path = tmp_path / "s.jsonl"
    path.write_bytes(b"\n".join(lines))
    one = verify(key, path, "1")
    assert one[0] == ExitCode.BAD_SIGNATURE and one[1].startswith(
        f"gracectl: verification failed: seq {forged}: bad signature"), one
    assert verify(key, path, "2")[:2] == one[:2]
