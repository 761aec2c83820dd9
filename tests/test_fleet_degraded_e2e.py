"""Fleet forwarding behind is degraded once it has lasted, connected or not: a real
nats-server stopped under a real graced, or its stream capped so that JetStream refuses
every publish, read with the real gracectl status (and status -q, as a cron check
would)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Graced
from tests.helpers.nats import OneHost, one_host, wait_caught_up
from tests.helpers.procs import poll_until

DEGRADED_AFTER = 5.0


def poll_degraded(g: Graced, connected: bool) -> list[dict[str, Any]]:
    """Read status until forwarding is degraded; every answer on the way is consistent:
    degraded exactly when the oldest unacknowledged event has waited degraded_after, and
    the exit status says so. Returns the fleet parts seen."""
    seen: list[dict[str, Any]] = []

    def degraded() -> bool:
        res = g.ctl("status", "--json")
        st = json.loads(res.stdout)
        fl = st["fleet"]
        said = [d for d in st["degraded"] if d.startswith("fleet forwarding")]
        seen.append(fl)
        assert fl["connected"] == connected, fl
        late = fl["lag_events"] > 0 and fl["lag_seconds"] >= DEGRADED_AFTER
        assert bool(said) == late, (fl, st["degraded"])
        assert res.returncode == (7 if st["degraded"] else 0), (res.returncode, st)
        return late

    poll_until(degraded, 60, "status degraded by forwarding behind", pause=0.3)
    # Behind but not yet for degraded_after: shown, not degraded.
    assert any(fl["lag_events"] and fl["lag_seconds"] < DEGRADED_AFTER for fl in seen), seen
    return seen


def health_line(site: OneHost) -> str:
    """The degraded health line of status (exit 7, and 7 for status -q), one-spaced,
    past the part every cause shares; asserts that part."""
    res = site.g.ctl("status")
    assert res.returncode == 7, (res.stdout, res.stderr)
    assert site.g.ctl("status", "-q").returncode == 7
    [health] = [line for line in res.stdout.splitlines() if line.startswith("health")]
    line = " ".join(health.split())
    assert f"fleet forwarding to {site.server.url} " in line and "events behind for " \
        in line and f"s (more than [fleet] degraded_after {DEGRADED_AFTER:g} s): " in line, line
    return line


@pytest.mark.slow
def test_forwarding_disconnected_past_degraded_after_is_degraded_until_it_catches_up(
        shortdir: Path) -> None:
    with one_host(shortdir, fleet=f"degraded_after = {DEGRADED_AFTER}\n") as site:
        g = site.g
        wait_caught_up(g)
        assert g.ctl("status", "-q").returncode == 0
        site.server.stop()
        g.ctl("emit", "user.note", check=True)

        poll_degraded(g, connected=False)
        line = health_line(site)
        assert "): disconnected for " in line, line

        site.server.start()
        wait_caught_up(g, 60)
        assert g.ctl("status", "-q").returncode == 0


def cap_stream(url: str, capped: bool) -> None:
    """Cap the stream at the messages it holds, new ones refused ("maximum messages
    exceeded"), as anyone allowed to edit the stream can; or lift that cap."""
    import nats

    async def go() -> None:
        nc = await nats.connect(url)
        try:
            js = nc.jetstream()
            info = await js.stream_info("GRACE")
            cfg = info.config
            cfg.max_msgs = info.state.messages if capped else -1
            cfg.discard = nats.js.api.DiscardPolicy.NEW if capped else \
                nats.js.api.DiscardPolicy.OLD
            await js.update_stream(cfg)
        finally:
            await nc.close()

    asyncio.run(go())


@pytest.mark.slow
def test_publishes_refused_while_connected_past_degraded_after_is_degraded_until_lifted(
        shortdir: Path) -> None:
    with one_host(shortdir, fleet=f"degraded_after = {DEGRADED_AFTER}\n") as site:
        g = site.g
        wait_caught_up(g)
        cap_stream(site.server.url, capped=True)
        for _ in range(3):
            g.ctl("emit", "user.note", check=True)

        seen = poll_degraded(g, connected=True)
        assert "maximum messages exceeded" in (seen[-1]["last_error"] or ""), seen[-1]
        line = health_line(site)
        assert "): publishes refused: publish: " in line, line
        assert "maximum messages exceeded" in line, line

        cap_stream(site.server.url, capped=False)
        wait_caught_up(g, 60)
        assert g.ctl("status", "-q").returncode == 0


def users(deny: str) -> str:
    """nats-server's users: graced's may publish anything but ``deny``."""
    return ("authorization { users = [ {user: g, password: pw, permissions: "
            f'{{publish: {{deny: ["{deny}"]}}}}}} ] }}\n')


@pytest.mark.slow
def test_publishes_denied_by_a_permission_past_degraded_after_is_degraded_until_allowed(
        shortdir: Path) -> None:
    with one_host(shortdir, fleet=f'user = "g"\npassword = "pw"\n'
                  f"degraded_after = {DEGRADED_AFTER}\n",
                  server_conf=users("nothing.>")) as site:
        g = site.g
        wait_caught_up(g)
        site.server.reload(users("grace.>"))
        g.ctl("emit", "user.note", check=True)

        poll_degraded(g, connected=True)
        line = health_line(site)
        # A denied publish is only a timeout to the publisher: the line says why.
        assert ("): publishes refused: publish: Error: nats: permissions violation for "
                'publish to "grace.') in line, line

        site.server.reload(users("nothing.>"))
        wait_caught_up(g, 60)
        assert g.ctl("status", "-q").returncode == 0
