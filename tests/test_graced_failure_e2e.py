"""A step that fails inside graced, not by the playbook's fault: graced runs as its own
user under a process limit (RLIMIT_NPROC 64), and other processes of that user take
what is left, so the step's fork fails with EAGAIN. The step is recorded as graced's
failure, learning credits no outcome for it, and graced goes on answering."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import subprocess
from pathlib import Path

import psutil
import pytest

from tests.conftest import Graced
from tests.helpers.procs import LineCollector
from tests.helpers.users import ensure_user
from tests.test_missions_e2e import MISSIONS
from tests.test_remediation_e2e import kill_all, process_detector, restart_playbook, start_sleeper

pytestmark = pytest.mark.slow
USER = "grace-nproc"
LIMIT = 64


def as_user_argv(user: pwd.struct_passwd) -> list[str]:
    return ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups"]


def tasks_of(uid: int) -> int:
    """Tasks (threads count) of ``uid``: what RLIMIT_NPROC counts."""
    total = 0
    for p in psutil.process_iter():
        try:
            if p.uids().real == uid:
                total += p.num_threads()
        except psutil.Error:
            continue
    return total


@pytest.fixture
def as_user(shortdir: Path):
    if os.geteuid() != 0:
        pytest.skip("needs root: graced runs as a second user under a process limit")
    if not shutil.which("setpriv") or not shutil.which("prlimit"):
        pytest.skip("setpriv/prlimit (util-linux) not installed")
    try:
        name = ensure_user(USER)
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"useradd failed: {exc.stderr.strip()}")
    return pwd.getpwnam(name)


def test_a_step_graced_cannot_start_is_graceds_failure_not_the_playbooks(
        shortdir: Path, as_user) -> None:
    marker = f"grace-nproc-worker-{os.getpid()}"
    g = Graced(shortdir, detectors=process_detector(marker) + MISSIONS.format(flap=0.0)
               + restart_playbook(marker, "low"))
    user = as_user
    os.chown(shortdir, user.pw_uid, user.pw_gid)  # its socket and state dir live there
    g.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    g.notify.bind(str(g.notify_path))
    os.chmod(g.notify_path, 0o666)
    g.wrap = ["prlimit", f"--nproc={LIMIT}:{LIMIT}", "--", *as_user_argv(user)]
    g.env_extra["HOME"] = str(shortdir)
    worker = start_sleeper(marker)
    fillers: list[subprocess.Popen[bytes]] = []
    try:
        g.start()
        steps = LineCollector(g.ctl_popen("tail", "--json", "--since", "1",
                                          "executor.step_finished", "detector.*"))
        assert g.ctl("status").returncode == 0
        # The fault: the user's other processes take every task its limit leaves.
        while tasks_of(user.pw_uid) < LIMIT:
            fillers.append(subprocess.Popen([*as_user_argv(user), "sleep", "3600"],
                                            stdin=subprocess.DEVNULL))
        worker.kill()
        worker.wait()
        assert steps.wait_for(
            lambda ls: any('"executor.step_finished"' in x for x in ls), 60), \
            (steps.lines[-5:], g.stderr()[-3000:])
        finished = [json.loads(x) for x in steps.lines if '"executor.step_finished"' in x]
        step = finished[0]["payload"]
        assert step["ok"] is False and "Resource temporarily unavailable" in step["error"]
        assert step["graced_failure"] == ("graced could not run it: Resource temporarily "
                                          "unavailable"), step
        for f in fillers:
            f.kill()
            f.wait()
        fillers.clear()
        # The fault gone, graced answers, and the playbook's record holds no failure.
        mission = json.loads(g.ctl("missions", "show", str(step["mission"]), "--json",
                                   check=True).stdout)
        assert mission["steps"][0]["graced_failure"], mission["steps"]
        books = json.loads(g.ctl("playbooks", "ls", "--json", check=True).stdout)
        book = next(b for b in books["playbooks"] if b["name"] == "restart-worker")
        # (A later mission may run it again, now that graced can: a success, if anything.)
        learned = book["learned"]
        assert learned["runs"] == learned["successes"] and not learned["demoted"], book
    finally:
        for f in fillers:
            f.kill()
            f.wait()
        kill_all(marker)
        g.close()
