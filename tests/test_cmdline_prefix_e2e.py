"""A ``match_cmdline`` process detector reads only a bounded prefix of each command line
(review s10: 150 processes with 1.8 MB command lines cost a third of a core)."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psutil

from graced.owners import CMDLINE_PREFIX, cmdline_prefix, in_cmdline
from tests.conftest import Graced
from tests.helpers.procs import poll_until


@contextmanager
def _process(*args: str) -> Iterator[subprocess.Popen[bytes]]:
    """A process of this user with ``args`` in its command line, until the block ends;
    running its own code (past exec: until then its command line reads empty)."""
    proc = subprocess.Popen([sys.executable, "-c", "import sys; print('ready', flush=True); "
                             "sys.stdin.read()", *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        yield proc
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(10)
        assert proc.stdout is not None
        proc.stdout.close()


def test_a_command_line_is_read_up_to_its_prefix_and_no_further() -> None:
    with _process("head-marker", *["x" * 100_000] * 10, "tail-marker") as proc:
        line = cmdline_prefix(proc.pid)
        full = " ".join(psutil.Process(proc.pid).cmdline())
        assert line is not None and len(line.encode()) == CMDLINE_PREFIX == 4096
        assert line == full[:CMDLINE_PREFIX]  # the same text psutil gives, cut
        assert in_cmdline(proc.pid, "head-marker")
        assert not in_cmdline(proc.pid, "tail-marker")
    with _process("short") as proc:  # a short one is whole, as psutil joins it
        assert cmdline_prefix(proc.pid) == " ".join(psutil.Process(proc.pid).cmdline())


def _count(g: Graced, name: str) -> float | None:
    subjects = json.loads(g.ctl("detectors", "--json", check=True).stdout)[name]["subjects"]
    return next(iter(subjects.values()))["value"] if subjects else None


def test_match_cmdline_matches_inside_the_prefix_and_not_beyond_it(make_graced) -> None:
    """A real graced, two match_cmdline detectors, one process whose command line names
    the first marker in its first 4 KiB and the second after 8 KiB of arguments: the
    first detector counts it, the second does not."""
    inside, beyond = f"grace-in-{uuid.uuid4().hex}", f"grace-past-{uuid.uuid4().hex}"
    with _process(inside, "x" * 8192, beyond):
        g = make_graced(detectors="".join(
            f'[[detector]]\nname = "{name}"\nkind = "process"\ninterval = 0.2\n'
            f'process = "{marker}"\nmatch_cmdline = true\n'
            for name, marker in (("inside", inside), ("beyond", beyond))))
        poll_until(lambda: _count(g, "inside") == 1 and _count(g, "beyond") is not None,
                   20, "both detectors sampled")
        assert _count(g, "beyond") == 0
