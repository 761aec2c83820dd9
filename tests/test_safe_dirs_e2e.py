"""The socket's directory and the directories above it and above the state dir: graced
uses them only when nobody but its own user and root could swap what is in them.

The attack (review of #14): root's graced was told to put its socket in a directory
another user made (or under one); that user swapped the socket for a symlink to a
root-only file between bind() and the chmod() graced did by path, and the file became
mode 0666. Or the user renamed root's socket away and served a graced of their own
there. Or renamed the state dir away and put their own in its place.
"""

from __future__ import annotations

import os
import pwd
import re
import stat
import subprocess
from pathlib import Path

import pytest

from tests.helpers.users import ensure_user

ATTACKER = "grace-outsider"

# Swaps the socket for a symlink to the victim as fast as it can, as the review did.
SWAPPER = r"""
import os, sys, time
d, victim, secs = sys.argv[1], sys.argv[2], float(sys.argv[3])
end = time.monotonic() + secs
print("ready", flush=True)
while time.monotonic() < end:
    try:
        os.rename(d + "/graced.sock", d + "/real.sock")
    except OSError:
        pass
    try:
        os.symlink(victim, d + "/graced.sock")
    except OSError:
        pass
"""


def _place(g, *, socket: Path | None = None, state: Path | None = None) -> None:  # type: ignore[no-untyped-def]
    text = g.config.read_text()
    if socket is not None:
        text = re.sub(r'^socket = ".*"$', f'socket = "{socket}"', text, flags=re.M)
        g.socket = socket
    if state is not None:
        text = re.sub(r'^state_dir = ".*"$', f'state_dir = "{state}"', text, flags=re.M)
        g.state = state
    g.config.write_text(text)


def _start_fails(g) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(RuntimeError) as failed:
        g.start()
    return str(failed.value)


def _attacker() -> int:
    if os.geteuid() != 0:
        pytest.skip("needs root to create a second local user (the attacker)")
    return pwd.getpwnam(ensure_user(ATTACKER)).pw_uid


@pytest.mark.slow
def test_a_socket_dir_another_user_owns_is_refused_and_no_file_changes_mode(
        make_graced, shortdir) -> None:
    """The review's attack, as root: a directory the attacker made, socket_mode 0666, a
    root-only victim, and the attacker swapping the socket for a symlink to it while
    graced starts. graced refuses the directory, naming it and its owner; the victim
    keeps its mode and the attacker cannot write to it."""
    uid = _attacker()
    shortdir.chmod(0o755)  # the attacker may enter it, not write in it
    evil = shortdir / "evil"
    evil.mkdir(mode=0o755)
    os.chown(evil, uid, uid)
    victim = shortdir / "victim"
    victim.write_text("root only\n")
    victim.chmod(0o600)
    g = make_graced('socket_mode = "0666"', start=False)
    _place(g, socket=evil / "graced.sock")
    swapper = subprocess.Popen(
        ["runuser", "-u", ATTACKER, "--", "python3", "-c", SWAPPER, str(evil),
         str(victim), "60"], stdout=subprocess.PIPE, text=True)
    try:
        assert swapper.stdout is not None and swapper.stdout.readline() == "ready\n"
        for _ in range(3):  # the review won on its second or third restart
            failed = _start_fails(g)
            assert "graced exited 5" in failed, failed
            assert (f"socket {evil}/graced.sock: {evil} is owned by uid {uid}, not uid 0: "
                    "refusing it") in failed, failed
    finally:
        swapper.kill()
        swapper.wait()
    assert stat.S_IMODE(victim.stat().st_mode) == 0o600
    appended = subprocess.run(["runuser", "-u", ATTACKER, "--", "sh", "-c",
                               f"echo owned >> {victim}"], capture_output=True, text=True)
    assert appended.returncode != 0 and "Permission denied" in appended.stderr
    assert victim.read_text() == "root only\n"
    # The same under a directory the attacker owns higher up: it could rename the
    # socket's directory itself away.
    os.chown(evil, 0, 0)
    (evil / "graced.sock").unlink(missing_ok=True)
    (evil / "real.sock").unlink(missing_ok=True)
    mine = evil / "root-made"
    mine.mkdir(mode=0o755)
    os.chown(evil, uid, uid)
    _place(g, socket=mine / "graced.sock")
    failed = _start_fails(g)
    assert f"socket {mine}/graced.sock: {evil} is owned by uid {uid}" in failed, failed
    # And the state dir: under the attacker's directory it is refused before anything
    # is made there (exit 4, the state dir's code).
    _place(g, socket=shortdir / "g.sock", state=evil / "state")
    failed = _start_fails(g)
    assert "graced exited 4" in failed, failed
    assert (f"state dir {evil}/state: {evil} is owned by uid {uid}, not uid 0: "
            "refusing it") in failed, failed
    assert not (evil / "state").exists()


@pytest.mark.slow
def test_writable_dirs_above_the_socket_or_state_are_refused(make_graced, shortdir) -> None:
    """A socket's own directory that others may write (even sticky, as /tmp) is refused,
    and so is a directory above the socket or the state dir that others may write
    unless it is sticky; graced then starts where it is safe, and the socket gets
    socket_mode as bind made it."""
    g = make_graced('socket_mode = "0640"', start=False)
    open_dir = shortdir / "open"
    open_dir.mkdir()
    open_dir.chmod(0o1777)
    _place(g, socket=open_dir / "graced.sock")
    failed = _start_fails(g)
    assert "graced exited 5" in failed, failed
    assert f"{open_dir} is writable by group or others (mode 1777): refusing it" in failed
    # Sticky above the socket's own (private) directory: as /tmp, allowed.
    run = open_dir / "run"
    _place(g, socket=run / "graced.sock")
    g.start()
    assert stat.S_IMODE(run.stat().st_mode) & 0o022 == 0
    st = os.lstat(g.socket)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640
    assert g.ctl("status").returncode == 0
    assert g.stop() == 0
    # Writable without the sticky bit, above the socket's directory: anyone may
    # rename `run` away.
    open_dir.chmod(0o777)
    failed = _start_fails(g)
    assert f"socket {run}/graced.sock: {open_dir} is writable by group or others (mode 0777)" \
        in failed, failed
    # Above the state dir too.
    _place(g, socket=shortdir / "g.sock", state=open_dir / "state")
    failed = _start_fails(g)
    assert "graced exited 4" in failed, failed
    assert f"state dir {open_dir}/state: {open_dir} is writable by group or others" in failed
    open_dir.chmod(0o755)
    g.start()
    assert g.ctl("status").returncode == 0


@pytest.mark.slow
def test_a_detector_sees_again_within_seconds_after_descriptors_come_back(
        make_graced, shortdir) -> None:
    """A real fault: graced's descriptor limit lowered under what it holds (prlimit), so
    a file detector's open() fails with EMFILE for 8 s, then raised back. The detector
    says so once (not every retry) and samples again within 3 s of the descriptors
    coming back (its backoff once doubled to a minute while graced itself was out)."""
    import json
    import shutil
    import time

    import psutil

    from tests.helpers.procs import poll_until

    if not shutil.which("prlimit"):
        pytest.skip("prlimit (util-linux) not installed")
    value = shortdir / "v"
    value.write_text("1")
    g = make_graced(detectors=f'[[detector]]\nname = "v"\nkind = "value"\ninterval = 0.5\n'
                              f'file = "{value}"\nthreshold = 50.0\n')

    def state() -> str:
        return str(json.loads(g.ctl("detectors", "--json", check=True).stdout)["v"]["state"])

    poll_until(lambda: state() == "up", 10, "the detector up")
    assert g.proc is not None
    pid = g.proc.pid
    soft, hard = psutil.Process(pid).rlimit(psutil.RLIMIT_NOFILE)
    held = psutil.Process(pid).num_fds()
    subprocess.run(["prlimit", f"--pid={pid}", f"--nofile={held}:{hard}"], check=True)
    try:
        poll_until(lambda: "Too many open files" in g.stderr(), 10, "EMFILE in the log")
        time.sleep(8)  # the fault's duration, not a wait for an event
    finally:
        subprocess.run(["prlimit", f"--pid={pid}", f"--nofile={soft}:{hard}"], check=True)
    back = time.monotonic()
    poll_until(lambda: state() == "up", 30, "the detector up again")
    assert time.monotonic() - back < 3.0 + 1.5, time.monotonic() - back  # + gracectl's run
    failed = [line for line in g.stderr().splitlines() if "detector v failed" in line]
    assert len(failed) == 1, failed
