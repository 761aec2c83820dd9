"""Process detectors against hostile neighbours (review of #19): anyone can start processes
with a watched name, and graced must not spend its file descriptors holding them."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.conftest import Graced
from tests.helpers.users import ensure_user
from tests.test_event_sources_e2e import _started


def _pidfds(pid: int) -> int:
    fds = Path(f"/proc/{pid}/fd")
    count = 0
    for fd in fds.iterdir():
        try:
            count += "pidfd" in fd.readlink().name
        except OSError:
            continue
    return count


def _detectors(g: Graced) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(g.ctl("detectors", "--json", check=True).stdout)
    return out


@pytest.mark.slow
def test_many_processes_with_a_watched_name_do_not_exhaust_graceds_descriptors(
        make_graced, shortdir: Path) -> None:
    name = f"r19{uuid.uuid4().hex[:8]}"
    exe = shortdir / name
    shutil.copy(shutil.which("sleep") or "/bin/sleep", exe)
    detectors = "".join(f'[[detector]]\nname = "p{i}"\nkind = "process"\ninterval = 0.5\n'
                        f'process = "{name}"\n' for i in range(4))
    g = make_graced(detectors=detectors)
    assert g.proc is not None
    daemon = psutil.Process(g.proc.pid)
    # What LimitNOFILE does, tight: room for graced's own descriptors and 120 more.
    limit = daemon.num_fds() + 120
    daemon.rlimit(psutil.RLIMIT_NOFILE, (limit, limit))
    crowd = [subprocess.Popen([str(exe), "600"], stdin=subprocess.DEVNULL, start_new_session=True)
             for _ in range(150)]
    try:
        deadline = time.monotonic() + 30
        while True:
            dets = _detectors(g)
            if all(s["value"] == 150 for d in dets.values() for s in d["subjects"].values()):
                break
            assert time.monotonic() < deadline, f"the 150 never counted: {dets}"
            time.sleep(0.2)
        held = _pidfds(daemon.pid)
        assert 0 < held <= limit // 4, f"{held} pidfds held with a limit of {limit}"
        assert daemon.num_fds() < limit - 40
        status = json.loads(g.ctl("status", "--json", check=True).stdout)
        assert not status["failing_detectors"], status["failing_detectors"]
        assert all(d["state"] == "up" for d in dets.values())
        assert any("polled, not held by a pidfd" in d["mode_note"] for d in dets.values())
        table = g.ctl("detectors", check=True).stdout
        assert "; mode: " in table and "processes polled, not held by a pidfd" in table
        # Still listening: a new client is served.
        assert g.ctl("status", check=True).returncode == 0
    finally:
        for p in crowd:
            p.kill()
        for p in crowd:
            p.wait()


@pytest.mark.slow
def test_a_decoy_of_another_user_neither_hides_a_death_nor_closes_its_mission(
        make_graced) -> None:
    """Review of #19, attacker 3: another user ran a process of the watched name; the real
    one's death was reported as a restart onto the decoy. With ``user`` the decoy is not
    the service: the death opens a mission, which stays open while only the decoy runs."""
    if os.geteuid() != 0:
        pytest.skip("a second Unix user can only be created as root")
    if not shutil.which("useradd") or not shutil.which("runuser"):
        pytest.skip("useradd/runuser not installed: cannot create a second Unix user")
    try:
        decoy_user = ensure_user("grace-decoy")
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"useradd failed: {exc.stderr.strip()}")
    name = f"r19{uuid.uuid4().hex[:8]}"
    where = Path(tempfile.mkdtemp(prefix="grace-decoy-"))
    try:
        where.chmod(0o755)
        exe = where / name
        shutil.copy(shutil.which("sleep") or "/bin/sleep", exe)
        exe.chmod(0o755)
        real = subprocess.Popen([str(exe), "600"], stdin=subprocess.DEVNULL)
        decoy = subprocess.Popen(["runuser", "-u", decoy_user, "--", str(exe), "600"],
                                 stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            g, w = _started(make_graced, f'[[detector]]\nname = "svc"\nkind = "process"\n'
                                         f'interval = 0.5\nprocess = "{name}"\nuser = "root"\n')
            real.kill()
            real.wait()
            opened = w.wait("mission.opened", "svc", 10)
            assert "0 process(es)" in opened["payload"]["summary"], opened
            # Samples go on with the decoy running: still no process of root, still open.
            out = json.loads(g.ctl("detectors", "--json", check=True).stdout)["svc"]
            assert [s["value"] for s in out["subjects"].values()] == [0], out
            [mission] = w.missions("svc")
            assert mission["state"] != "resolved", mission
            w.close()
        finally:
            real.kill()
            os.killpg(decoy.pid, signal.SIGKILL)  # runuser and the decoy it started
            decoy.wait()
    finally:
        shutil.rmtree(where, ignore_errors=True)
