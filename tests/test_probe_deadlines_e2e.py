"""A probe has one deadline for the whole sample, whatever its peer does (review of #16):
a TCP peer dripping a byte every 0.5 s and a PostgreSQL server that logs the client in and
then never answers are failed probes within their timeout, shown in status, and every
detector keeps sampling (the watchdog's proof)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from graced.protocol import parse_ts
from tests.test_missions_e2e import helper, watched  # noqa: F401


@pytest.mark.slow
def test_a_dripping_peer_and_a_mute_postgres_fail_by_their_deadline(
        watched, shortdir: Path) -> None:  # noqa: F811
    pytest.importorskip("psycopg", reason="the postgres probe needs the postgres extra")
    drip_file, mute_file = shortdir / "drip.port", shortdir / "mute.port"
    drip = helper("trickle", str(drip_file))
    mute = helper("mute_postgres", str(mute_file))
    try:
        dsn = f"host=127.0.0.1 port={mute_file.read_text()} dbname=x user=x sslmode=disable"
        started = time.monotonic()
        g, w = watched(
            '[[detector]]\nname = "drip"\nkind = "tcp"\nhost = "127.0.0.1"\n'
            f'port = {drip_file.read_text()}\nsend = "PING\\r\\n"\nexpect = "PONG"\n'
            'interval = 0.5\ntimeout = 1.0\n'
            f'[[detector]]\nname = "mute"\nkind = "postgres"\ndsn = "{dsn}"\n'
            'query = "SELECT 1"\ninterval = 0.5\ntimeout = 1.0\n'
            '[[detector]]\nname = "load"\nkind = "load"\ninterval = 0.5\n')
        drip_opened = w.wait("mission.opened", "drip", 20)
        assert "timed out after 1 s" in drip_opened["payload"]["summary"], drip_opened
        mute_opened = w.wait("mission.opened", "mute", 20)
        assert "no answer within 2 s" in mute_opened["payload"]["summary"], mute_opened
        assert time.monotonic() - started < 20
        # Each keeps failing by its deadline, sample after sample; nothing else stalls.
        dets = json.loads(g.ctl("detectors", "--json", check=True).stdout)
        for name in ("drip", "mute"):
            (sample,) = dets[name]["subjects"].values()
            assert sample["value"] is None, (name, sample)
            assert time.time() - parse_ts(sample["ts"]) < 5, (name, sample)
        (load,) = dets["load"]["subjects"].values()
        assert time.time() - parse_ts(load["ts"]) < 2, load
    finally:
        for proc in (drip, mute):
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_a_postgres_probe_reads_a_bounded_share_of_a_huge_answer() -> None:
    """A real PostgreSQL asked for 3 million rows of 100 bytes (300 MB): the probe reads
    them row by row, stops after MAX_ROWS and cancels the rest, so graced's memory does
    not grow with the answer; the connection then serves the next sample."""
    import resource

    pytest.importorskip("psycopg", reason="the postgres probe needs the postgres extra")
    from graced.config import DetectorConfig
    from graced.detectors.probes import PostgresProbe
    from tests.helpers.postgres import postgres_server

    with postgres_server() as sock:
        probe = PostgresProbe(DetectorConfig(
            name="db", kind="postgres", dsn=f"host={sock} dbname=postgres user=postgres",
            query="SELECT repeat('x', 100) FROM generate_series(1, 3000000)", timeout=20.0))
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            for _ in range(2):
                (obs,) = probe.sample()
                assert obs.failed is None and obs.value is not None, obs
        finally:
            probe.close()
        grew_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
        assert grew_mb < 50, grew_mb
