"""Process detectors against hostile neighbours (review of #19): anyone can start processes
with a watched name, and graced must not spend its file descriptors holding them."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import psutil
import pytest

from graced.detectors.process import _PidfdBudget
from graced.owners import login_uids, service_owner
from tests.conftest import Graced
from tests.helpers.procs import poll_until
from tests.helpers.users import login_user
from tests.test_event_sources_e2e import _started, killed_and_restarted


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
@pytest.mark.parametrize("user", ['user = "root"\n', ""], ids=["user", "no-user"])
def test_a_decoy_of_another_user_neither_hides_a_death_nor_closes_its_mission(
        make_graced, user: str) -> None:
    """Review of #19, attacker 3: another user ran a process of the watched name; the real
    one's death was reported as a restart onto the decoy. With ``user`` the decoy is not
    the service; without it, neither (a login user's process is never the service unless
    ``user`` names that user): the death opens a mission, which stays open while only the
    decoy runs, and graced holds no pidfd for the decoy."""
    decoy_user = login_user()
    assert pwd.getpwnam(decoy_user).pw_uid in login_uids(), "the decoy is a login account"
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
                                         f'interval = 0.5\nprocess = "{name}"\n{user}')
            real.kill()
            real.wait()
            opened = w.wait("mission.opened", "svc", 10)
            summary = opened["payload"]["summary"]
            assert "0 process(es)" in summary and "1 more named so" in summary, opened
            # Samples go on with the decoy running: still no process of root, still open.
            out = json.loads(g.ctl("detectors", "--json", check=True).stdout)["svc"]
            assert [s["value"] for s in out["subjects"].values()] == [0], out
            assert g.proc is not None and _pidfds(g.proc.pid) == 0, "the decoy is held"
            [mission] = w.missions("svc")
            assert mission["state"] != "resolved", mission
            w.close()
        finally:
            real.kill()
            os.killpg(decoy.pid, signal.SIGKILL)  # runuser and the decoy it started
            decoy.wait()
    finally:
        shutil.rmtree(where, ignore_errors=True)


@pytest.mark.slow
def test_a_crowded_name_leaves_other_process_detectors_their_share_of_pidfds(
        make_graced, shortdir: Path) -> None:
    """Review of #19: one process detector could take graced's whole pidfd budget (a
    crowd of processes with its name), so a detector added next held none and saw its
    service die only at its next tick. Each holds at most its fair share: the budget (a
    quarter of RLIMIT_NOFILE) divided among the process detectors."""
    name = f"r19{uuid.uuid4().hex[:8]}"
    exe = shortdir / name
    shutil.copy(shutil.which("sleep") or "/bin/sleep", exe)
    marker = f"grace-share-{uuid.uuid4().hex[:8]}"

    def service() -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", marker],
                                stdin=subprocess.DEVNULL)

    crowd = [subprocess.Popen([str(exe), "600"], stdin=subprocess.DEVNULL,
                              start_new_session=True) for _ in range(60)]
    svc = service()
    try:
        g, w = _started(make_graced, f'[[detector]]\nname = "crowd"\nkind = "process"\n'
                                     f'interval = 0.5\nprocess = "{name}"\n')
        assert g.proc is not None
        daemon = psutil.Process(g.proc.pid)
        deadline = time.monotonic() + 30
        while _pidfds(daemon.pid) < 60:  # a held pidfd has no event of its own: read it
            assert time.monotonic() < deadline, _detectors(g)
            time.sleep(0.2)
        # What LimitNOFILE does, tight: a budget of about 30 pidfds, all held by the crowd.
        limit = daemon.num_fds() + 40
        daemon.rlimit(psutil.RLIMIT_NOFILE, (limit, limit))
        share = limit // 4 // 2
        g.config.write_text(g.config.read_text() + (
            f'\n[[detector]]\nname = "svc"\nkind = "process"\ninterval = 5.0\n'
            f'process = "{marker}"\nmatch_cmdline = true\n'))
        g.ctl("reload", check=True)
        deadline = time.monotonic() + 30
        while True:  # the crowd gives back its excess; svc takes its pidfd at a sample
            dets = _detectors(g)
            if "svc" in dets and dets["svc"]["state"] == "up" and \
                    dets["svc"]["subjects"] and not dets["svc"]["mode_note"]:
                break
            assert time.monotonic() < deadline, f"svc never held its pidfd: {dets}"
            time.sleep(0.2)
        assert f"{60 - share} of 60 processes polled" in dets["crowd"]["mode_note"], dets
        assert _pidfds(daemon.pid) <= share + 1
        svc = killed_and_restarted(w, "svc", svc, service)  # its pidfd announces it
        w.close()
    finally:
        svc.kill()
        for p in crowd:
            p.kill()
        for p in crowd:
            p.wait()


def test_who_may_be_a_service_without_user(tmp_path: Path) -> None:
    """Login accounts come from /etc/login.defs (useradd's defaults where it is silent);
    their processes, and subordinate uids past UID_MAX, are decoys without ``user``."""
    defs = tmp_path / "login.defs"
    defs.write_text("# comment\nUID_MIN\t\t 500\nUID_MAX 2000\nSYS_UID_MAX 499\n")
    assert login_uids(str(defs)) == range(500, 2001)
    assert login_uids(str(tmp_path / "missing")) == range(1000, 60001)
    me = 1234
    assert [service_owner(uid, 500, me) for uid in (0, 499, 500, 1234, 1999, 100000)] == [
        True, True, False, True, False, False]
    assert service_owner(61184, 500, me) and service_owner(65534, 500, me)


def test_the_pidfd_budget_is_shared_fairly_among_process_detectors() -> None:
    class Budget(_PidfdBudget):
        limit = staticmethod(lambda: 30)

    budget, crowd, svc = Budget(), object(), object()
    budget.join(crowd)
    assert budget.take(crowd, 100) == 30  # alone: the whole budget
    budget.join(svc)  # a second detector: each may hold 15, the crowd gives 15 back
    assert budget.share() == 15 and budget.excess(crowd) == 15
    assert budget.take(svc, 1) == 0  # nothing left until it does
    budget.give_back(crowd, 15)
    assert budget.take(svc, 100) == 15 and budget.take(crowd, 1) == 0
    budget.leave(svc)
    assert budget.excess(crowd) == 0 and budget.take(crowd, 100) == 15


@pytest.mark.slow  # each sample reads every process on the host: 0.5 s on a busy one
def test_process_rss_summaries_say_what_a_login_users_process_of_the_name_is() -> None:
    """A newcomer's finding: 'hog X at 0.5 MB' while a login user's X ran uncounted, and,
    with nothing counted, 'no process named X running; 1 more named so', which contradicts
    itself. Every summary of the sample says how many of the name were not counted, and
    whose they are; 'running' only when none runs at all."""
    from graced.config import DetectorConfig
    from graced.detectors.process import ProcessPresence, ProcessRss
    from graced.detectors.scoring import Scorer

    decoy_user = login_user()
    uid = pwd.getpwnam(decoy_user).pw_uid
    name = f"r9{uuid.uuid4().hex[:8]}"
    where = Path(tempfile.mkdtemp(prefix="grace-rss-"))
    note = "1 more named so, of login users, not counted without the detector's user key"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        where.chmod(0o755)
        exe = where / name
        shutil.copy(shutil.which("sleep") or "/bin/sleep", exe)
        exe.chmod(0o755)
        rss = DetectorConfig(name="hog", kind="process_rss", process=name, threshold=1e6)
        count = DetectorConfig(name="svc", kind="process", process=name)

        def summary(cfg: DetectorConfig) -> str:
            det = ProcessRss(cfg) if cfg.kind == "process_rss" else ProcessPresence(cfg)
            try:
                [obs] = det.sample()
                return Scorer(cfg).judge(obs, 0.0).summary
            finally:
                det.close()

        real = subprocess.Popen([str(exe), "600"], stdin=subprocess.DEVNULL)
        procs.append(real)
        assert summary(rss).startswith(f"hog {name} at ")
        assert "more named so" not in summary(rss)  # nothing left out: nothing said
        procs.append(subprocess.Popen(["runuser", "-u", decoy_user, "--", str(exe), "600"],
                                      stdin=subprocess.DEVNULL, start_new_session=True))
        poll_until(lambda: any(p.info["name"] == name and p.info["uids"].real == uid
                               for p in psutil.process_iter(["name", "uids"])), 10,
                   "the login user's process never started")
        healthy = summary(rss)
        assert healthy.startswith(f"hog {name} at ") and healthy.endswith(f" MB; {note}"), \
            healthy
        assert summary(count) == f"svc {name} at 1 process; {note}"  # the same for process

        real.kill()
        real.wait()
        assert summary(rss) == (f"hog {name}: no value: no process named {name!r} of the "
                                f"service's users; {note}")
        owned = DetectorConfig(name="hog", kind="process_rss", process=name, user="root")
        assert summary(owned) == (f"hog {name}: no value: no process named {name!r} of user "
                                  f"root; 1 more named so, not of user root, not counted")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        if len(procs) > 1:  # runuser's child, the login user's process, with it
            try:
                os.killpg(procs[1].pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(where, ignore_errors=True)
