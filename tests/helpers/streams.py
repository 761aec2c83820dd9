"""Saving a real graced's stream, as a user would, for verifiers to check."""

from __future__ import annotations

import json

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
