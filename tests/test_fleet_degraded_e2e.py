"""Fleet forwarding down is degraded once it has lasted: a real nats-server stopped
under a real graced, read with the real gracectl status (and status -q, as a cron check
would)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.nats import one_host, wait_caught_up
from tests.helpers.procs import poll_until

DEGRADED_AFTER = 5.0


@pytest.mark.slow
def test_forwarding_disconnected_past_degraded_after_is_degraded_until_it_catches_up(
        shortdir: Path) -> None:
    with one_host(shortdir, fleet=f"degraded_after = {DEGRADED_AFTER}\n") as site:
        g = site.g
        wait_caught_up(g)
        assert g.ctl("status", "-q").returncode == 0
        site.server.stop()

        seen: list[dict[str, Any]] = []

        def degraded() -> bool:
            res = g.ctl("status", "--json")
            st = json.loads(res.stdout)
            fl = st["fleet"]
            said = [d for d in st["degraded"] if d.startswith("fleet forwarding")]
            seen.append(fl)
            # Each answer is consistent: degraded exactly when disconnected that long
            # with events behind, and the exit status says so.
            late = (not fl["connected"] and fl["lag_events"] > 0
                    and fl["disconnected_seconds"] >= DEGRADED_AFTER)
            assert bool(said) == late, (fl, st["degraded"])
            assert res.returncode == (7 if st["degraded"] else 0), (res.returncode, st)
            return late

        poll_until(degraded, 60, "status degraded by forwarding down", pause=0.3)
        # Disconnected but not yet for degraded_after: shown, not degraded.
        assert any(not fl["connected"] and fl["disconnected_seconds"] < DEGRADED_AFTER
                   for fl in seen), seen
        res = g.ctl("status")
        assert res.returncode == 7
        [health] = [line for line in res.stdout.splitlines() if line.startswith("health")]
        line = " ".join(health.split())
        assert f"fleet forwarding to {site.server.url} disconnected for " in line, line
        assert f"events behind (more than [fleet] degraded_after {DEGRADED_AFTER:g} s)" \
            in line, line
        assert g.ctl("status", "-q").returncode == 7

        site.server.start()
        wait_caught_up(g, 60)
        assert g.ctl("status", "-q").returncode == 0
