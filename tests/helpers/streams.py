"""Saving a real graced's stream, as a user would, for verifiers to check."""

from __future__ import annotations

import json

from hypothesis import strategies as st

from tests.conftest import Graced
from tests.helpers.procs import LineCollector


def complete_stream(g: Graced) -> list[str]:
    """Every event from genesis to daemon.stopping, as `tail --json` saved it. A
    ``user.after`` event follows the ``user.note``, so at least two events come after the
    note whatever the heartbeats do (a test drops the one after an anchor at the note)."""
    g.ctl("emit", "user.note", "--payload",
          json.dumps({"msg": "héllo", "price": 99.5, "count": 3, "ratio": 1e-7}), check=True)
    g.ctl("emit", "user.after", check=True)
    tail = LineCollector(g.ctl_popen("tail", "--json", "--since", "1",
                                     "--reconnect-timeout", "0"))
    assert tail.wait_for(lambda ls: any('"user.after"' in x for x in ls), 20), tail.lines
    g.stop()
    assert tail.wait_for(lambda ls: bool(ls) and '"daemon.stopping"' in ls[-1], 20), tail.lines
    tail.proc.terminate()
    tail.wait_exit(10)
    return list(tail.lines)


def mutate(data: st.DataObject, stream: bytes, *, longest_cut: int = 8,
           swap_lines: bool = True) -> bytes:
    """One to three hostile edits of a saved stream's bytes, drawn by hypothesis: a byte
    set, bytes inserted, up to ``longest_cut`` bytes deleted, two lines swapped."""
    buf = bytearray(stream)
    ops = ["set", "insert", "delete"] + (["swap lines"] if swap_lines else [])
    for _ in range(data.draw(st.integers(1, 3))):
        op = data.draw(st.sampled_from(ops))
        at = data.draw(st.integers(0, len(buf) - 1)) if buf else 0
        if op == "set" and buf:
            buf[at] = data.draw(st.integers(0, 255))
        elif op == "insert":
            buf[at:at] = data.draw(st.binary(min_size=1, max_size=4))
        elif op == "delete" and buf:
            del buf[at:at + data.draw(st.integers(1, longest_cut))]
        elif op == "swap lines":
            rows = bytes(buf).split(b"\n")
            i, j = (data.draw(st.integers(0, len(rows) - 1)) for _ in "ij")
            rows[i], rows[j] = rows[j], rows[i]
            buf = bytearray(b"\n".join(rows))
    return bytes(buf)
