"""Signal steps hit only the users' processes they should (#15 item 7, #19 leftover): a
login user can start a process under the service's name, and graced must not kill it
(nor take it for the service) unless the step's ``user`` names that user."""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import uuid
from pathlib import Path

import psutil
import pytest

from graced.owners import foreign, login_uids, uid_of
from graced.targets import MAX_SKIPPED, Selection, find
from tests.conftest import Graced
from tests.helpers.procs import poll_until
from tests.helpers.users import login_user
from tests.test_config_keys import graced_cmd
from tests.test_hostile_data_e2e import graced_signalling
from tests.test_missions_e2e import Watch


def test_whose_process_a_step_may_hit() -> None:
    """The one rule of graced.owners, as the process detectors and signal steps use it."""
    me = 4242
    assert foreign(0, None, 1000, me) is None  # root
    assert foreign(999, None, 1000, me) is None  # a system account
    assert foreign(61184, None, 1000, me) is None  # a dynamic user
    assert foreign(65534, None, 1000, me) is None  # nobody
    assert foreign(me, None, 1000, me) is None  # graced's own user
    assert foreign(1000, None, 1000, me) == "login user"
    assert foreign(165536, None, 1000, me) == "login user"  # a subordinate uid
    assert foreign(None, None, 1000, me) == "user unknown"
    assert foreign(1000, 1000, 1000, me) is None  # user names the login account
    assert foreign(0, 1000, 1000, me) == "another user"  # ... and then only it
    assert uid_of("0") == 0 and uid_of("root") == 0
    for bad in ("\u0661", "no-such-user-x", "a\0b", "x" * 300, "4294967295"):
        with pytest.raises((LookupError, ValueError)):
            uid_of(bad)


def test_a_steps_record_of_skipped_processes_is_bounded() -> None:
    sel = Selection()
    for pid in range(100, 100 + 3 * MAX_SKIPPED):
        sel.skip(pid, "svcd", 1000, "of a login user, not signalled without the step's user key")
    sel.skip(7, "svcd", 0, "pid 7, never signalled")
    assert len(sel.skipped) == MAX_SKIPPED and sel.skipped_count == 3 * MAX_SKIPPED + 1
    assert sel.summary() == (f"{MAX_SKIPPED} of a login user, not signalled without the step's "
                             f"user key; {2 * MAX_SKIPPED + 1} more")


def test_a_step_naming_an_unknown_user_fails_at_run_time_not_graced() -> None:
    with pytest.raises(ValueError, match="no user 'no-such-user-x' on this host"):
        find(process="svcd", user="no-such-user-x")


USER_TABLES = {
    # where a ``user`` key is, the table it is in, and the line its key is on
    "signal step": ('[[playbook]]\nname = "kick"\nrisk = "low"\n[[playbook.step]]\n'
                    'action = "signal"\nprocess = "svcd"\nuser = {value}\n',
                    "7: [[playbook]] #1 (kick) step 1"),
    "process detector": ('[[detector]]\nname = "svc"\nkind = "process"\nprocess = "svcd"\n'
                         'user = {value}\n', "5: [[detector]] #1 (svc)"),
    "process_rss detector": ('[[detector]]\nname = "rss"\nkind = "process_rss"\n'
                             'threshold = 100.0\nprocess = "svcd"\nuser = {value}\n',
                             "6: [[detector]] #1 (rss)"),
}


@pytest.mark.parametrize("table", list(USER_TABLES))
@pytest.mark.parametrize("value, reason", [
    ('"no-such-user-x"', "user: no user 'no-such-user-x' on this host"),
    ('""', "user: must not be empty"),
    ('"99999999999"', "user: uid 99999999999 is out of range"),
    ("99999999999", "user: uid 99999999999 is out of range"),
    ("-1", "user: uid -1 is out of range"),
    ("true", "user: expected a name or a uid, got boolean"),
    ("1.5", "user: expected a name or a uid, got number"),
    # graced.toml(5): a user this host does not know is refused when the config is loaded
    ('"424242"', "user: no user with uid 424242 on this host"),
    ("424242", "user: no user with uid 424242 on this host"),
])
def test_a_user_key_is_checked_when_the_config_is_loaded(
        tmp_path: Path, table: str, value: str, reason: str) -> None:
    """Signal steps and process detectors check ``user`` alike, when the config is
    loaded: one line naming the table and the key, exit 3."""
    text, where = USER_TABLES[table]
    path = tmp_path / "graced.toml"
    path.write_text(text.format(value=value))
    res = graced_cmd("config", "check", str(path))
    assert res.returncode == 3 and res.stdout == ""
    assert res.stderr.count("\n") == 1, res.stderr
    assert f"{path}:{where} {reason}" in res.stderr, res.stderr


@pytest.mark.parametrize("table", list(USER_TABLES))
@pytest.mark.parametrize("value", ["0", '"0"', '"root"'])
def test_a_user_key_may_be_a_uid_as_a_toml_integer(
        tmp_path: Path, table: str, value: str) -> None:
    """graced.toml(5): ``user`` is a name or a uid; a uid may be written as a number."""
    path = tmp_path / "graced.toml"
    path.write_text(USER_TABLES[table][0].format(value=value))
    res = graced_cmd("config", "check", str(path))
    assert res.returncode == 0, res.stderr


def test_a_reload_naming_an_unknown_user_in_a_process_detector_keeps_the_running_config(
        graced: Graced) -> None:
    """Before, a process detector's unknown user was found only when it sampled: now a
    reload (gracectl reload, as SIGHUP) refuses the file with one line naming the
    detector and the key, and the running detector keeps its user."""
    good = graced.config.read_text().replace("detector = []\n", "") + (
        '[[detector]]\nname = "svc"\nkind = "process"\nprocess = "svcd"\nuser = "root"\n')
    graced.config.write_text(good)
    graced.ctl("status", check=True)  # the key pinned first: reload's stderr is its own
    res = graced.ctl("reload")
    assert res.returncode == 0, res.stderr
    line = good.count("\n")  # the user key is the file's last line
    graced.config.write_text(good.replace('user = "root"', 'user = "no-such-user-x"'))
    res = graced.ctl("reload")
    assert res.returncode == 1 and res.stdout == ""
    assert res.stderr.count("\n") == 1, res.stderr
    assert res.stderr.startswith("gracectl: config rejected, the running one kept: "), res.stderr
    assert (f"{graced.config}:{line}: [[detector]] #1 (svc) user: no user 'no-such-user-x' "
            "on this host") in res.stderr, res.stderr
    rejected = json.loads(graced.ctl("tail", "--json", "--since", "1", "--no-follow",
                                     "daemon.config_rejected", check=True).stdout.splitlines()[-1])
    assert "[[detector]] #1 (svc) user: no user 'no-such-user-x'" in \
        rejected["payload"]["reason"], rejected
    assert rejected["payload"]["running_sha256"] == hashlib.sha256(good.encode()).hexdigest()
    shown = json.loads(graced.ctl("detectors", "--json", check=True).stdout)
    assert list(shown) == ["svc"] and shown["svc"]["errors"] == 0, shown
    assert graced.proc.poll() is None


def test_a_signal_step_naming_pid_1_is_refused_when_the_config_is_loaded(
        tmp_path: Path) -> None:
    """graced never signals pid 1: a step naming it is a config error, not a step that
    fails when it runs."""
    path = tmp_path / "graced.toml"
    path.write_text('[[playbook]]\nname = "kick"\nrisk = "low"\n[[playbook.step]]\n'
                    'action = "signal"\n\npid = 1\n')
    res = graced_cmd("config", "check", str(path))
    assert res.returncode == 3 and res.stdout == ""
    assert res.stderr.count("\n") == 1, res.stderr
    assert f"{path}:7: [[playbook]] #1 (kick) step 1 pid: graced never signals pid 1" in \
        res.stderr, res.stderr


def sleep_named(where: Path, name: str) -> Path:
    """A copy of sleep(1) named ``name`` in ``where``, which any user may run."""
    where.chmod(0o755)
    exe = where / name
    shutil.copy(shutil.which("sleep") or "/bin/sleep", exe)
    exe.chmod(0o755)
    return exe


def _as(user: str, exe: Path) -> tuple[subprocess.Popen[bytes], psutil.Process]:
    """``exe`` run as ``user`` (runuser stays its parent): (runuser, the process)."""
    runner = subprocess.Popen(["runuser", "-u", user, "--", str(exe), "600"],
                              stdin=subprocess.DEVNULL, start_new_session=True)
    uid = pwd.getpwnam(user).pw_uid

    def started() -> psutil.Process | None:
        for child in psutil.Process(runner.pid).children():
            if child.name() == exe.name and child.uids().real == uid:
                return child
        return None

    poll_until(lambda: started() is not None, 15, f"{exe.name} never started as {user}")
    child = started()
    assert child is not None
    return runner, child


def _step(g, mid: int) -> dict:  # type: ignore[no-untyped-def]
    shown = json.loads(g.ctl("missions", "show", str(mid), "--json", check=True).stdout)
    assert shown["steps"], shown
    return dict(shown["steps"][0])


@pytest.mark.slow
def test_a_login_users_decoy_survives_a_signal_step_unless_its_user_is_named(
        make_graced) -> None:
    """A decoy of the service's exact name, owned by a login user, survives ``process =
    NAME``, which signals the service's processes (root's, graced's own user, and a system
    account's); ``user = "<login user>"`` signals the decoy and nothing else; a pid file
    naming the decoy with ``user = "root"`` leaves it alone. Each step's record says which
    processes it skipped and why, and missions show prints it."""
    decoy_user = login_user()
    decoy_uid = pwd.getpwnam(decoy_user).pw_uid
    assert decoy_uid in login_uids(), "the decoy's user is a login account"
    system = next((u for u in ("daemon", "bin", "sys") if _uid_or_none(u) is not None), None)
    if system is None:
        pytest.skip("no system account (daemon, bin, sys) to run a service as")
    assert (_uid_or_none(system) or 0) < login_uids().start
    name = f"s15{uuid.uuid4().hex[:8]}"
    where = Path(tempfile.mkdtemp(prefix="grace-sig-"))
    runners: list[subprocess.Popen[bytes]] = []
    service = None
    try:
        exe = sleep_named(where, name)
        service = subprocess.Popen([str(exe), "600"], stdin=subprocess.DEVNULL)  # graced's user
        sys_runner, sys_service = _as(system, exe)
        decoy_runner, decoy = _as(decoy_user, exe)
        runners += [sys_runner, decoy_runner]
        pid_file = where / "decoy.pid"
        pid_file.write_text(f"{decoy.pid}\n")
        pid_file.chmod(0o644)
        steps = {"byname": f'process = "{name}"',
                 "asuser": f'process = "{name}"\nuser = "{decoy_user}"',
                 "pidroot": f'pid_file = "{pid_file}"\nuser = 0'}
        g, files = graced_signalling(make_graced, where, steps)
        w = Watch(g)
        try:
            # By name, no user: the service's two processes, never the decoy.
            files["byname"].write_text("99")
            assert service.wait(30) == -signal.SIGTERM
            sys_runner.wait(30)
            assert not sys_service.is_running()
            mid = w.wait("mission.verifying", "byname", 30)["payload"]["id"]
            step = _step(g, mid)
            assert step["ok"] and sorted(step["pids"]) == sorted([service.pid, sys_service.pid])
            assert decoy.is_running() and decoy.status() != psutil.STATUS_ZOMBIE
            assert step["skipped_count"] == 1, step
            assert step["skipped"] == [{
                "pid": decoy.pid, "name": name, "uid": decoy_uid,
                "reason": "of a login user, not signalled without the step's user key"}]
            shown = g.ctl("missions", "show", str(mid), check=True).stdout
            assert (f"skipped pid {decoy.pid} ({name}, uid {decoy_uid}): of a login user, "
                    "not signalled without the step's user key") in shown, shown
            assert f"signalled pids {', '.join(str(p) for p in step['pids'])}" in shown
            # A signal has no exit code: the label names the signal and target, no "exit 0".
            assert step["exit_code"] is None, step
            steps = shown.split("\nsteps:\n")[1].splitlines()
            label = next(x for x in steps if x.strip().startswith("1. signal"))
            assert label.strip().startswith(f"1. signal SIGTERM {name}: ok, "), label
            assert "exit" not in label, label
            # The signed stream says who was signalled and who was left alone.
            finished = [json.loads(x)["payload"] for x in g.ctl(
                "tail", "--json", "--since", "1", "--no-follow", "executor.step_finished",
                check=True).stdout.splitlines()]
            event = next(e for e in finished if e["mission"] == mid)
            assert (event["pids"], event["skipped"], event["skipped_count"]) == (
                step["pids"], step["skipped"], 1), event
            assert event["exit_code"] is None
            # A dry run says the same before anything is signalled.
            dry = g.ctl("playbooks", "run", "sig-byname", "--mission", str(mid), "--dry-run",
                        check=True).stdout
            assert (f'signal SIGTERM to processes named "{name}" of root, a system or '
                    "service user or graced's (never a login user)") in dry, dry
            assert "targets now: none" in dry and f"skipped pid {decoy.pid} ({name}" in dry

            # A pid file naming the decoy, but user = 0 (root): left alone, the step fails.
            files["pidroot"].write_text("99")
            mid = w.wait("mission.failed", "pidroot", 30)["payload"]["id"]
            step = _step(g, mid)
            assert not step["ok"] and "not of user root (0)" in step["error"], step
            # The plan names the user the uid is, the step its pid file.
            shown = g.ctl("missions", "show", str(mid), check=True).stdout
            assert (f"1. signal: signal SIGTERM to the pid in {pid_file} of user root (0)"
                    in shown), shown
            steps = shown.split("\nsteps:\n")[1].splitlines()
            label = next(x for x in steps if x.strip().startswith("1. signal"))
            assert label.strip().startswith(f"1. signal SIGTERM pid file {pid_file}: FAILED"), \
                label
            assert step["skipped"][0]["pid"] == decoy.pid
            assert decoy.is_running()

            # user names the login account: the decoy is the one signalled.
            files["asuser"].write_text("99")
            decoy_runner.wait(30)  # it ends once the decoy it started is gone
            mid = w.wait("mission.verifying", "asuser", 30)["payload"]["id"]
            step = _step(g, mid)
            assert step["ok"] and step["pids"] == [decoy.pid], step
            assert not decoy.is_running()
        finally:
            w.close()
    finally:
        if service is not None and service.poll() is None:
            service.kill()
            service.wait()
        for runner in runners:
            if runner.poll() is None:
                os.killpg(runner.pid, signal.SIGKILL)  # runuser and what it started
            runner.wait()
        shutil.rmtree(where, ignore_errors=True)


def _uid_or_none(user: str) -> int | None:
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        return None


def test_the_docs_state_the_rule_and_the_bound_the_code_applies() -> None:
    """graced.toml.5 says the same rule for a process detector's and a signal step's
    ``user`` (one function decides both: graced.owners), with the code's dynamic-user
    range; the bound on skipped processes is the code's in every place that names it."""
    from graced.owners import DYNAMIC_USERS
    from tests.test_docs import MAN, ROOT, _roff_text

    toml5 = " ".join(_roff_text(MAN / "graced.toml.5").split())
    dynamic = f"({DYNAMIC_USERS.start}-{DYNAMIC_USERS.stop - 1})"
    detector = toml5[toml5.index(".B user process, process_rss"):]
    step = toml5[toml5.index('.BR signal ", " process ", " match_cmdline ", " pid ", " '
                             'pid_file ", " user'):]
    for text in (detector[:1200], step[:1600]):
        assert dynamic in text and "nobody" in text and "graced's own user" in text
        assert "UID_MIN of /etc/login.defs" in text
    assert f"at most {MAX_SKIPPED} (skipped)" in step
    ctl = " ".join(_roff_text(MAN / "gracectl.1").split())
    assert f"(at most {MAX_SKIPPED}, then how many more)" in ctl
    protocol = (ROOT / "docs" / "protocol.md").read_text()
    assert f"at most {MAX_SKIPPED} with `pid`, `name`, `uid`, `reason`" in protocol
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert "A `signal` step hits only processes" in readme and "step's `user`" in readme
