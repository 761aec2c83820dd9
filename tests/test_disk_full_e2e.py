"""Disk full: graced's state dir on a small tmpfs that really fills up. It says so
clearly, keeps serving reads, acknowledges nothing it could not commit, never corrupts
the journal, and carries on by itself when space returns."""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Graced
from tests.helpers.procs import LineCollector


@pytest.fixture
def small_fs(shortdir: Path) -> Iterator[Path]:
    mnt = shortdir / "state"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m,mode=0700", "tmpfs",
                          str(mnt)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(path: Path) -> None:
    """Write until the filesystem says it is full (unbuffered: a buffered file would try
    its leftover bytes again when closed and raise ENOSPC from the close)."""
    chunk = b"\0" * 65536
    with open(path, "wb", buffering=0) as fh:
        while True:
            try:
                fh.write(chunk)
                fh.flush()
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                break
    for size in (4096, 512, 1):  # and the last crumbs
        try:
            with open(path, "ab", buffering=0) as fh:
                while True:
                    fh.write(b"\0" * size)
                    fh.flush()
        except OSError:
            continue


@pytest.mark.slow
def test_disk_full_is_reported_reads_go_on_and_it_recovers(small_fs: Path,
                                                           shortdir: Path) -> None:
    g = Graced(shortdir)
    assert g.state == small_fs
    g.start()
    try:
        g.ctl("keys", "trust", check=True)
        watcher = LineCollector(g.ctl_popen("tail", "--verify", "--json", "user.*"))
        g.ctl("emit", "user.before", check=True)
        assert watcher.wait_for(lambda ls: any("user.before" in x for x in ls), 10)

        fill(small_fs / "filler")
        # A durable publish now cannot be acknowledged: it waits, it does not lie.
        during = g.ctl_popen("emit", "user.during", "--json")
        # The failure is reported: in status (which, like every read, still works) ...
        failing = None
        # No event can say so (nothing commits): ask, as an operator would, up to 200 times.
        for _ in range(200):
            res = g.ctl("status", "--json")
            st = json.loads(res.stdout)["journal"]
            if st["failing_since"] is not None:
                failing = st
                assert res.returncode == 7  # degraded, for health checks
                break
            assert res.returncode == 0, res.stderr
        assert failing is not None, "status never reported failing commits"
        assert "full" in failing["last_error"], failing
        assert failing["commit_errors"] >= 1
        res = g.ctl("status")
        assert res.returncode == 7 and "COMMITS FAILING" in res.stdout
        health = next(ln for ln in res.stdout.splitlines() if ln.startswith("health"))
        assert "DEGRADED: journal commits failing: " in health and "full" in health, health
        # ... and in the daemon's log (stderr: the journal under systemd).
        assert "journal commit failed: database or disk is full" in g.stderr()
        assert during.poll() is None  # still not acknowledged
        replay = g.ctl("tail", "--since", "1", "--no-follow", "--json", "user.*", check=True)
        assert "user.before" in replay.stdout and "user.during" not in replay.stdout
        assert g.ctl("missions", "ls", "--json", check=True).stdout.strip() == "[]"
        assert g.ctl("detectors", "--json").returncode == 0
        # A verifying client is told too: with no signed heartbeat, the stream is stale.
        assert watcher.proc.wait(30) == 13
        assert "stale" in watcher.proc.stderr.read()  # type: ignore[union-attr]

        os.unlink(small_fs / "filler")  # space returns
        out, err = during.communicate(timeout=30)
        assert during.returncode == 0, err
        assert json.loads(out)["first_seq"] > 0
        st = json.loads(g.ctl("status", "--json", check=True).stdout)["journal"]
        assert st["failing_since"] is None and st["pending"] == 0
        assert "journal commits resumed" in g.stderr()
        assert g.stop() == 0
        with sqlite3.connect(small_fs / "journal.db") as db:
            assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        g.start()
        # The whole chain, before, during (the queued event) and after, verifies.
        whole = g.ctl("tail", "--verify", "--json", "--since", "1", "--no-follow",
                      "--stale-after", "3600", "--key", str(small_fs / "key.pub"))
        assert whole.returncode == 0, whole.stderr
        assert '"user.before"' in whole.stdout and '"user.during"' in whole.stdout
    finally:
        g.close()


@pytest.mark.slow
def test_a_reload_on_a_full_disk_answers_at_once_and_applies(small_fs: Path,
                                                            shortdir: Path) -> None:
    """The config is applied in memory: `gracectl reload` (systemd's ExecReload=) says so
    at once instead of waiting on a commit that cannot happen; its event follows once
    space returns."""
    g = Graced(shortdir)
    g.start()
    try:
        g.ctl("keys", "trust", check=True)
        fill(small_fs / "filler")
        g.ctl_popen("emit", "user.stuck")  # waits for a commit: the failure shows at once
        for _ in range(200):
            if json.loads(g.ctl("status", "--json").stdout)["journal"]["failing_since"]:
                break
        else:
            raise AssertionError("status never reported failing commits")
        g.config.write_text(g.config.read_text() + "\n[missions]\nresolve_after = 4\n")
        res = g.ctl("reload", "--json", "--timeout", "10", timeout=30)
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout)["sections"] == {"missions": ["resolve_after"]}
        # Refused on a full disk: said at once too.
        g.config.write_text(g.config.read_text() + "bogus = 1\n")
        res = g.ctl("reload", "--timeout", "10", timeout=30)
        assert res.returncode == 1 and "bogus: unknown key" in res.stderr, res.stderr
        tail = LineCollector(g.ctl_popen("tail", "--json", "--since", "1", "daemon.config_*"))
        os.unlink(small_fs / "filler")

        def topics() -> list[str]:
            return [e["topic"] for e in tail.events()]

        assert tail.wait_for(lambda _: len(topics()) >= 2, 30), tail.lines
        assert topics() == ["daemon.config_reloaded", "daemon.config_rejected"]
        tail.proc.terminate()
        tail.proc.wait(10)
    finally:
        g.close()
