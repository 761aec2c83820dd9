"""A pid file is trusted by the way to it too, as OpenSSH's StrictModes trusts an
authorized_keys file: every directory from / down to it and every symlink on the way
owned by root or the named process's user, no directory writable by group or others
unless sticky (/tmp). A user who may write a directory on the way (or owns a symlink in
it) could otherwise swap the file for one naming another service's process."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from graced.targets import pid_from_file
from graced.trustpath import MAX_LINKS
from tests.helpers.users import login_user
from tests.test_hostile_data_e2e import graced_signalling
from tests.test_missions_e2e import Watch


@contextmanager
def _sleepers(count: int) -> Iterator[list[subprocess.Popen[bytes]]]:
    """``count`` sleep(1) processes of this user, killed at the end."""
    procs = [subprocess.Popen([shutil.which("sleep") or "/bin/sleep", "600"],
                              stdin=subprocess.DEVNULL) for _ in range(count)]
    try:
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()


def _pid_file(directory: Path, name: str, pid: int) -> Path:
    """A pid file as a service writes it: this user's, mode 0644, in ``directory``."""
    directory.mkdir(mode=0o755, exist_ok=True)
    path = directory / name
    path.write_text(f"{pid}\n")
    path.chmod(0o644)
    return path


def _error(reason: str) -> str:
    """A refusal as a step's error and a dry run print it."""
    return f"{reason}; not trusted"


def test_a_pid_file_is_trusted_only_if_the_way_to_it_is(make_graced, shortdir: Path) -> None:
    """A real graced runs one signal step per pid file, each naming a process of root's:
    in a root-owned directory, and through a root-owned symlink to one (as /var/run ->
    /run), and in a sticky world-writable one, it is signalled; in a directory a second
    Unix user owns, or one anybody may write, or through a symlink that user owns, or
    through a root-owned symlink to that user's directory, the step fails naming the
    directory or symlink and why, the process is not signalled, and a dry run says the
    same."""
    other = login_user()
    uid = pwd.getpwnam(other).pw_uid
    shortdir.chmod(0o755)
    cases = ["rootdir", "rootlink", "sticky", "userdir", "opendir", "userlink", "linkeduser"]
    with _sleepers(len(cases)) as procs:
        pid = {c: p.pid for c, p in zip(cases, procs, strict=True)}
        run = shortdir / "run"
        files = {"rootdir": _pid_file(run, "a.pid", pid["rootdir"])}
        _pid_file(run, "b.pid", pid["rootlink"])
        (shortdir / "varrun").symlink_to(run)  # root's, as Debian's /var/run
        files["rootlink"] = shortdir / "varrun" / "b.pid"
        files["sticky"] = _pid_file(shortdir / "tmp", "c.pid", pid["sticky"])
        (shortdir / "tmp").chmod(0o1777)
        files["userdir"] = _pid_file(shortdir / "users", "d.pid", pid["userdir"])
        os.chown(shortdir / "users", uid, -1)
        files["opendir"] = _pid_file(shortdir / "open", "e.pid", pid["opendir"])
        (shortdir / "open").chmod(0o777)  # a second user may write it too
        _pid_file(shortdir / "run2", "f.pid", pid["userlink"])
        (shortdir / "hop").symlink_to(shortdir / "run2")
        os.lchown(shortdir / "hop", uid, -1)  # the link is the other user's
        files["userlink"] = shortdir / "hop" / "f.pid"
        _pid_file(shortdir / "theirs", "g.pid", pid["linkeduser"])
        os.chown(shortdir / "theirs", uid, -1)
        (shortdir / "hop2").symlink_to("theirs")  # root's link, to the other user's dir
        files["linkeduser"] = shortdir / "hop2" / "g.pid"
        refused = {
            "userdir": f"directory {shortdir}/users is owned by uid {uid}, neither root nor "
                       f"the user of process {pid['userdir']} (uid 0)",
            "opendir": f"directory {shortdir}/open is writable by group or others (mode "
                       "0777) and not sticky",
            "userlink": f"symlink {shortdir}/hop is owned by uid {uid}, neither root nor "
                        f"the user of process {pid['userlink']} (uid 0)",
            "linkeduser": f"directory {shortdir}/theirs is owned by uid {uid}, neither root "
                          f"nor the user of process {pid['linkeduser']} (uid 0)",
        }
        g, values = graced_signalling(make_graced, shortdir, {
            case: f'pid_file = "{files[case]}"' for case in cases})
        w = Watch(g)
        try:
            for value in values.values():
                value.write_text("99")
            for case, proc in zip(cases, procs, strict=True):
                if case not in refused:
                    assert proc.wait(30) == -signal.SIGTERM, case
            for case, why in refused.items():
                mid = w.wait("mission.failed", case, 30)["payload"]["id"]
                shown = json.loads(g.ctl("missions", "show", str(mid), "--json",
                                         check=True).stdout)
                step = shown["steps"][0]
                assert not step["ok"] and step.get("pids") is None, step
                assert step["error"] == _error(f"pid file {files[case]}: {why}"), step
                dry = g.ctl("playbooks", "run", f"sig-{case}", "--mission", str(mid),
                            "--dry-run", check=True).stdout
                assert (f"targets now: none (pid file {files[case]}: {_error(why)})"
                        in " ".join(dry.split())), dry
            for case, proc in zip(cases, procs, strict=True):
                if case in refused:
                    assert proc.poll() is None, f"{case}: the process was signalled"
        finally:
            w.close()


def test_the_way_is_resolved_as_the_kernel_does(tmp_path: Path) -> None:
    """A symlink on the way is followed (absolute or relative, and ".." after it is the
    parent of where it led, as the kernel has it); the pid file itself never is; a
    symlink loop ends; a path naming a directory or a missing file is one line."""
    where = tmp_path.resolve()
    where.chmod(0o755)
    with _sleepers(1) as (proc,):
        real = where / "a" / "b"
        real.mkdir(parents=True)
        pid_file = _pid_file(where / "a", "svc.pid", proc.pid)
        (where / "rel").symlink_to("a/b")
        (where / "abs").symlink_to(real)
        for path in (where / "rel" / ".." / "svc.pid", where / "abs" / ".." / "svc.pid",
                     where / "a" / "." / "svc.pid"):
            assert pid_from_file(str(path))[0] == proc.pid, path
        (where / "link.pid").symlink_to(pid_file)
        with pytest.raises(PermissionError, match=r"link.pid: a symlink \(not followed\); "
                                                  "not trusted$"):
            pid_from_file(str(where / "link.pid"))
        (where / "loop").symlink_to("loop")
        with pytest.raises(PermissionError,
                           match=f"more than {MAX_LINKS} symlinks on the way; not trusted$"):
            pid_from_file(str(where / "loop" / "svc.pid"))
        with pytest.raises(PermissionError, match="a/b: not a regular file$"):
            pid_from_file(str(real))
        with pytest.raises(PermissionError, match=f"pid file {where}/a/nothing.pid: No such "
                                                  "file or directory$"):
            pid_from_file(str(where / "a" / "nothing.pid"))
        with pytest.raises(PermissionError, match=f"pid file {where}/none/svc.pid: "
                                                  f"{where}/none: No such file or directory$"):
            pid_from_file(str(where / "none" / "svc.pid"))
        with pytest.raises(PermissionError, match="names a directory, not a file$"):
            pid_from_file(str(where / "a" / ".."))


def test_an_untrusted_way_is_refused_before_anything_is_read_through_it(
        tmp_path: Path) -> None:
    """What is refused whatever the file would name is refused before the file is opened:
    two users besides root on the way (one of them cannot be the process's), or one
    that is not the step's ``user``; the file there need not even exist."""
    other = pwd.getpwnam(login_user()).pw_uid
    nobody = 65534  # any other uid: it need not have an account
    where = tmp_path.resolve()
    where.chmod(0o755)
    (where / "theirs" / "nested").mkdir(parents=True)
    os.chown(where / "theirs", other, -1)
    os.chown(where / "theirs" / "nested", nobody, -1)
    with pytest.raises(PermissionError, match=(
            f"directory {where}/theirs/nested is owned by uid {nobody} and directory "
            f"{where}/theirs by uid {other}: only root and the named process's user may own "
            "the way to it; not trusted$")):
        pid_from_file(str(where / "theirs" / "nested" / "missing.pid"))
    with pytest.raises(PermissionError, match=(
            f"directory {where}/theirs is owned by uid {other}, neither root nor the step's "
            f"user \\(uid 0\\); not trusted$")):
        pid_from_file(str(where / "theirs" / "missing.pid"), wanted=0)
