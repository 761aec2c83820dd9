"""Signal steps against an attacker's processes (session 9): what a step record keeps of
process data is bounded, a pid or pid file target obeys the login-user rule, an exact
name never costs a read of every command line, and the plan says whose processes it
hits."""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest

from gracectl.plan_text import render_plan
from graced import owners
from graced.config import DetectorConfig
from graced.detectors.process import _matching
from graced.executor import MAX_STEP_RECORD
from graced.owners import login_uids
from graced.targets import CUT, MAX_NAME, MAX_SKIPPED, find
from tests.conftest import Graced
from tests.helpers.procs import poll_until
from tests.helpers.users import login_user, user_named_like_a_uid
from tests.test_config_keys import graced_cmd
from tests.test_hostile_data_e2e import value_detector
from tests.test_missions_e2e import Watch
from tests.test_signal_users_e2e import _as, _step, sleep_named


@contextmanager
def _processes(argvs: list[list[str]], exe: str) -> Iterator[list[psutil.Process]]:
    """``exe`` run once per argv (argv[0] as given), killed at the end."""
    procs = [subprocess.Popen(argv, executable=exe, stdin=subprocess.DEVNULL)
             for argv in argvs]
    try:
        yield [psutil.Process(p.pid) for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()


def _graced_with_step(make_graced, shortdir: Path, how: str):  # type: ignore[no-untyped-def]
    """graced with a value detector (its file, "0": normal) whose playbook "kick" is one
    signal step with the keys ``how``: (graced, the file; write 99 for an anomaly)."""
    value = shortdir / "value"
    value.write_text("0")
    g = make_graced(detectors=value_detector("v", value) + (
        '[[playbook]]\nname = "kick"\ndetector = "v"\nrisk = "low"\n'
        f'[[playbook.step]]\naction = "signal"\n{how}'))
    return g, value


def _other_user() -> str:
    """An account that is not the one running the tests (whose processes are then
    another user's to a step naming it)."""
    if os.geteuid() != 0:
        return "root"
    for name in ("daemon", "bin", "sys", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    pytest.skip("no account besides root (daemon, bin, sys, nobody) to name in a step")


@contextmanager
def _decoys_skipped(make_graced, shortdir: Path,  # type: ignore[no-untyped-def]
                    name: str) -> Iterator[tuple[Path, Graced, Path, Watch]]:
    """A copy of sleep(1) called ``name`` (in a fresh directory), and a watched graced
    whose step signals processes with ``name`` in their command line of another user
    than this one: this user's decoys are found, skipped and recorded.
    (the executable, graced, its value file: write 99 for an anomaly, the watch)."""
    with tempfile.TemporaryDirectory(prefix="grace-s9-") as where:
        exe = sleep_named(Path(where), name)
        other = _other_user()
        g, value = _graced_with_step(
            make_graced, shortdir,
            f'process = "{name}"\nmatch_cmdline = true\nuser = "{other}"\n')
        w = Watch(g)
        try:
            yield exe, g, value, w
        finally:
            w.close()


@pytest.mark.slow
def test_processes_with_huge_escaped_names_leave_a_small_step_record(
        make_graced, shortdir: Path) -> None:
    """psutil extends a 15-character comm with argv[0]'s basename (up to 128 KiB), and a
    control character is a 6-byte JSON escape: 22 such decoys made one step record 15.7
    MB and missions ls failed for everyone. Names are cut at MAX_NAME, the record stays
    under MAX_STEP_RECORD, and every view keeps working."""
    name = "s9" + uuid.uuid4().hex[:13]  # 15 characters: the kernel's comm, whole
    huge = name + "\x01" * 131040
    with _decoys_skipped(make_graced, shortdir, name) as (exe, g, value, w):
        with _processes([[huge, "600"]] * (MAX_SKIPPED + 2), str(exe)) as decoys:
            poll_until(lambda: all(len(d.name()) > 100_000 for d in decoys), 10,
                       "psutil never saw the decoys' long names")
            value.write_text("99")
            mid = w.wait("mission.failed", "v", 30)["payload"]["id"]
        listed = g.ctl("missions", "ls", "--all", "--json")
        assert listed.returncode == 0, listed.stderr
        step = _step(g, mid)
        assert not step["ok"] and step["skipped_count"] == MAX_SKIPPED + 2, step
        names = {s["name"] for s in step["skipped"]}
        assert names == {huge[:MAX_NAME] + CUT}, names
        assert len(json.dumps(step)) < MAX_STEP_RECORD, len(json.dumps(step))
        shown = g.ctl("missions", "show", str(mid))
        assert shown.returncode == 0 and "[cut]" in shown.stdout, shown.stderr


def test_a_process_started_after_its_pid_file_was_written_is_left_alone(
        tmp_path: Path) -> None:
    """The service died and its stale pid file names a pid another process got since:
    that process started after the file was written, and is not signalled."""
    with _processes([["sleep", "600"]], shutil.which("sleep") or "/bin/sleep") as (proc,):
        pid_file = tmp_path / "svc.pid"
        pid_file.write_text(f"{proc.pid}\n")
        pid_file.chmod(0o644)
        assert [t.pid for t in find(pid_file=str(pid_file)).targets] == [proc.pid]
        then = time.time() - 60  # written a minute before the process started
        os.utime(pid_file, (then, then))
        sel = find(pid_file=str(pid_file))
        assert sel.targets == [] and sel.skipped_count == 1
        assert "after pid file" in sel.skipped[0]["reason"] and \
            "stale" in sel.skipped[0]["reason"], sel.skipped


def test_an_exact_name_never_reads_a_command_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """A step or a detector naming a process exactly reads no process's command line
    (anyone may give thousands of them a megabyte each); with match_cmdline, a step
    reads it only of processes its name does not already match."""
    read: list[int] = []
    real = psutil.Process.cmdline

    def spy(self: psutil.Process) -> list[str]:
        read.append(self.pid)
        return real(self)

    prefix = owners.cmdline_prefix

    def spy_prefix(pid: int) -> str | None:
        read.append(pid)
        return prefix(pid)

    monkeypatch.setattr(psutil.Process, "cmdline", spy)
    monkeypatch.setattr(owners, "cmdline_prefix", spy_prefix)  # match_cmdline's reader
    name = "s9" + uuid.uuid4().hex[:8]
    where = tempfile.mkdtemp(prefix="grace-s9-")
    try:
        exe = sleep_named(Path(where), name)
        with _processes([[name, "600"]], str(exe)) as (proc,):
            assert [t.pid for t in find(process=name).targets] == [proc.pid]
            found, _ = _matching(DetectorConfig(name="p", kind="process", process=name),
                                 login_uids().start)
            assert [p.pid for p in found] == [proc.pid]
            assert read == []
            assert [t.pid for t in find(process=name, match_cmdline=True).targets] == \
                [proc.pid]
            assert read and proc.pid not in read  # others' command lines, never its own
    finally:
        shutil.rmtree(where, ignore_errors=True)


def test_a_pid_file_naming_a_login_users_process_is_a_decoy_without_user(
        make_graced, shortdir: Path) -> None:
    """The service died; a login user got its pid and exec'd a process of its name. A
    pid file target without ``user`` follows the login-user rule: the step signals
    nothing, says why, and the plan said whose process it would hit."""
    decoy_user = login_user()
    name = "s9" + uuid.uuid4().hex[:8]
    where = Path(tempfile.mkdtemp(prefix="grace-s9-"))
    runner = None
    try:
        exe = sleep_named(where, name)
        runner, decoy = _as(decoy_user, exe)
        pid_file = where / "svc.pid"  # root's, as the dead service left it
        pid_file.write_text(f"{decoy.pid}\n")
        pid_file.chmod(0o644)
        g, value = _graced_with_step(make_graced, shortdir, f'pid_file = "{pid_file}"\n')
        w = Watch(g)
        try:
            value.write_text("99")
            mid = w.wait("mission.failed", "v", 30)["payload"]["id"]
            step = _step(g, mid)
            assert not step["ok"] and step.get("pids") is None, step
            assert step["skipped"] == [{
                "pid": decoy.pid, "name": name, "uid": pwd.getpwnam(decoy_user).pw_uid,
                "reason": "of a login user, not signalled without the step's user key"}]
            assert decoy.is_running() and decoy.status() != psutil.STATUS_ZOMBIE
            dry = g.ctl("playbooks", "run", "kick", "--mission", str(mid), "--dry-run",
                        check=True).stdout
            assert (f"signal SIGTERM to the pid in {pid_file} of root, a system or "
                    "service user or graced's (never a login user's)") in " ".join(dry.split())
            assert "targets now: none" in dry
        finally:
            w.close()
    finally:
        if runner is not None:
            if runner.poll() is None:
                os.killpg(runner.pid, signal.SIGKILL)
            runner.wait()
        shutil.rmtree(where, ignore_errors=True)


def _plan_line(**step: object) -> str:
    st = {"step": 1, "action": "signal", "signal": "TERM", "process": "svcd", "pid": 0,
          "pid_file": "", "match_cmdline": False, "user": "", "timeout": 30.0, **step}
    return render_plan({"playbook": "kick", "risk": "low", "sha256": "0" * 64,
                        "steps": [st]})[1]


def test_the_plan_says_whose_processes_a_signal_step_hits() -> None:
    """match_cmdline hits any command line of the service's users containing the
    string (root's runuser wrapper included): the plan says so, promising no more; a
    numeric user is a uid (graced refuses a number that is also a user's name)."""
    assert _plan_line(match_cmdline=True) == (
        '  1. signal: signal SIGTERM to processes named "svcd" or with it anywhere in '
        "their command line (a wrapper's too) of root, a system or service user or "
        "graced's (never a login user)")
    assert _plan_line(user="1011").endswith('processes named "svcd" of uid 1011')
    assert _plan_line(user="postgres").endswith('processes named "svcd" of user postgres')
    assert _plan_line(pid=4242, user="postgres").endswith("pid 4242 of user postgres")
    assert _plan_line(pid=4242).endswith(
        "pid 4242 of root, a system or service user or graced's (never a login user's)")


@pytest.mark.parametrize("quoted", [True, False])
def test_a_number_that_is_also_a_user_name_is_refused_at_load(
        tmp_path: Path, quoted: bool) -> None:
    """``user = "1001"`` is uid 1001, even where an account is NAMED "1001" (uid 1002):
    graced would hit the other account's processes. Refused in one line saying what to
    write instead."""
    number, its_uid = user_named_like_a_uid()
    first = pwd.getpwuid(int(number)).pw_name
    path = tmp_path / "graced.toml"
    value = f'"{number}"' if quoted else number
    path.write_text('[[playbook]]\nname = "kick"\nrisk = "low"\n[[playbook.step]]\n'
                    f'action = "signal"\nprocess = "svcd"\nuser = {value}\n')
    res = graced_cmd("config", "check", str(path))
    assert res.returncode == 3 and res.stdout == "" and res.stderr.count("\n") == 1, res
    assert (f'user: "{number}" is both uid {number} ({first}) and the name of the user '
            f'with uid {its_uid}: write "{first}" for the first or {its_uid} for the '
            "second") in res.stderr, res.stderr


def test_the_docs_state_the_limits_of_the_rule_and_the_record() -> None:
    """graced.toml(5) says that the rule goes by uid (an account made with useradd -r
    counts as a service's), what match_cmdline hits, that a stale pid file's reused pid
    is left alone, and the bounds of a step record, as the code has them."""
    from graced.executor import MAX_STEP_ERROR
    from graced.targets import MAX_PIDS
    from tests.test_docs import MAN, ROOT, _roff_text

    toml5 = " ".join(_roff_text(MAN / "graced.toml.5").split())
    step = toml5[toml5.index('.BR signal ", " process ", " match_cmdline'):][:4000]
    detector = toml5[toml5.index(".B user process, process_rss"):][:1600]
    for text in (step, detector):
        assert "system uid range (useradd -r) counts as a system account" in text
    assert "a wrapper such as root's runuser, sudo, unshare" in step
    assert "not the one the file names" in step
    assert (f"cut at {MAX_NAME} characters" in step and f"pids at {MAX_PIDS}" in step
            and f"error at {MAX_STEP_ERROR} characters" in step
            and f"at {MAX_STEP_RECORD // 1024} KiB" in step), step
    assert "a number that is also an account's name" in step
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert "`useradd -r` counts" in readme and "a `runuser` or `sudo` wrapper too" in readme


def test_a_step_lists_at_most_max_pids_signalled_pids_and_counts_them_all(
        make_graced, shortdir: Path) -> None:
    """A step that signals MAX_PIDS + 1 processes (graced's own user's: the service's)
    lists MAX_PIDS of them, counts all, and missions show says how many more."""
    from graced.targets import MAX_PIDS

    name = "s9" + uuid.uuid4().hex[:8]
    where = Path(tempfile.mkdtemp(prefix="grace-s9-"))
    try:
        exe = sleep_named(where, name)
        g, value = _graced_with_step(make_graced, shortdir, f'process = "{name}"\n')
        w = Watch(g)
        try:
            with _processes([[name, "600"]] * (MAX_PIDS + 1), str(exe)) as procs:
                value.write_text("99")
                mid = w.wait("mission.verifying", "v", 30)["payload"]["id"]
                step = _step(g, mid)
                assert step["ok"] and step["pids_count"] == MAX_PIDS + 1, step
                assert len(step["pids"]) == MAX_PIDS
                assert set(step["pids"]) < {p.pid for p in procs}
                shown = g.ctl("missions", "show", str(mid), check=True).stdout
                assert re.search(r"signalled pids [\d, ]+ and 1 more", " ".join(shown.split())), \
                    shown
        finally:
            w.close()
    finally:
        shutil.rmtree(where, ignore_errors=True)


def test_a_run_is_a_persons_only_if_a_person_approved_that_run() -> None:
    """Budgets ration automatic runs only: whether a run is a person's is decided by the
    move to "approved" that starts it, not by any approval in the mission's history
    (review s9b: after a restart, the policy's own re-run of a mission a person had run
    by hand spent no budget, and a crash loop never ended)."""
    from graced.executor import approved_by_person
    from graced.missions.engine import MissionEngine

    e = MissionEngine()
    (opened,) = e.observe(detector="v", kind="value", subject="s", severity="medium",
                          anomalous=True, score=1.0, summary="v at 99", value=99.0, now=100.0)
    m = e.active[("v", "s")]
    assert not approved_by_person(m)  # nothing approved yet
    e.transition(m, "approved", 101.0, "risk low: approved automatically")
    assert not approved_by_person(m)
    e.transition(m, "executing", 101.0, "running")
    e.transition(m, "interrupted", 102.0, "graced stopped")
    m.approvals.append({"user": "root", "decision": "run by hand", "at": 103.0})
    e.transition(m, "approved", 103.0, "run by hand by root: playbook p")
    assert approved_by_person(m)
    e.transition(m, "executing", 103.0, "running")
    e.transition(m, "interrupted", 104.0, "graced stopped")
    e.transition(m, "approved", 105.0, "risk low: approved automatically")
    assert not approved_by_person(m)  # the person's approval was for the run before


@pytest.mark.slow
def test_a_process_name_that_is_not_utf8_is_recorded_and_graced_lives(
        make_graced, shortdir: Path) -> None:
    """Any user can give a process a name that is not UTF-8 (the executable's file name,
    or prctl); psutil returns it with lone surrogates, which have no UTF-8 form. A step
    that skipped such a process killed graced as it published executor.step_finished
    (review s9b, again at every restart). Now the record and the signed event show
    U+FFFD, graced runs on, and every view works."""
    marker = "s9u" + uuid.uuid4().hex[:8]
    # A file name that is not UTF-8 (str with the bytes escaped, as os.fsdecode gives).
    name = os.fsdecode(b"\xff\xfe" + marker.encode()[:9] + b"\x1b")
    with _decoys_skipped(make_graced, shortdir, marker) as (exe, g, value, w):
        decoy_exe = exe.rename(exe.with_name(name))
        decoy = subprocess.Popen([marker, "600"], executable=decoy_exe,
                                 stdin=subprocess.DEVNULL)
        try:
            poll_until(lambda: "\udcff" in psutil.Process(decoy.pid).name(), 10,
                       "psutil never saw the decoy's name")
            value.write_text("99")
            mid = w.wait("mission.failed", "v", 30)["payload"]["id"]
        finally:
            decoy.kill()
            decoy.wait()
        assert g.proc.poll() is None, "graced died"
        step = _step(g, mid)
        assert not step["ok"] and step["skipped_count"] == 1, step
        assert step["skipped"][0]["name"].startswith("\ufffd\ufffd"), step
        events = g.ctl("tail", "--json", "--since", "1", "--no-follow",
                       "executor.step_finished")
        assert events.returncode == 0, events.stderr
        ev = next(e for e in map(json.loads, events.stdout.splitlines())
                  if e["payload"]["mission"] == mid)
        assert ev["payload"]["skipped"][0]["name"].startswith("\ufffd\ufffd"), ev
        shown = g.ctl("missions", "show", str(mid))
        assert shown.returncode == 0 and "\\e" in shown.stdout, shown.stderr
        # 7: degraded once the failing step's next missions escalate (its budget).
        assert g.ctl("status").returncode in (0, 7)
        assert g.proc.poll() is None, "graced died"
