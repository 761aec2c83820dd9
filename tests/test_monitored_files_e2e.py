"""A file a detector reads is another user's data, and the way to it may be theirs too,
against a real graced (root) and a real second Unix user (review s10).

The attack: a user who owns the directory of a watched value file swapped in a symlink
to graced's private key, and read it back from the "not a number: '...'" of
`gracectl detectors`. Now graced reads a monitored file only if every non-root user who
controls the way to it could read that file themselves, and never echoes what a file
holds in an error."""

from __future__ import annotations

import json
import os
import pwd
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Graced
from tests.helpers.procs import LineCollector, poll_until
from tests.helpers.users import login_user
from tests.test_missions_e2e import Watch


def _as(user: str, script: str) -> None:
    subprocess.run(["runuser", "-u", user, "--", "sh", "-c", script], check=True,
                   stdin=subprocess.DEVNULL, timeout=30)


def _detector(g: Graced, name: str) -> dict[str, Any]:
    return dict(json.loads(g.ctl("detectors", "--json", check=True).stdout)[name])


def _users_dir(base: Path, user: str) -> Path:
    """A directory ``user`` owns, under a root-owned 0755 ``base``."""
    base.chmod(0o755)
    d = base / "q"
    d.mkdir(mode=0o755)
    os.chown(d, pwd.getpwnam(user).pw_uid, -1)
    return d


def _users_value(make_graced: Any, shortdir: Path) -> tuple[str, int, Path, Path, Graced]:
    """A second user, the directory they own (``q``), a value file of theirs in it
    holding 5, and a real graced whose detector "queue" has read that 5."""
    other = login_user()
    uid = pwd.getpwnam(other).pw_uid
    q = _users_dir(shortdir, other)
    value = q / "queue_depth"
    value.write_text("5\n")
    os.chown(value, uid, -1)
    g = make_graced(detectors=f'[[detector]]\nname = "queue"\nkind = "value"\n'
                              f'file = "{value}"\ninterval = 0.2\nthreshold = 1e9\n')
    poll_until(lambda: _detector(g, "queue")["subjects"].get(str(value), {}).get(
        "value") == 5, 20, "the value read")
    return other, uid, q, value, g


def _pieces(secret: str, width: int = 8) -> list[str]:
    return [secret[i:i + width] for i in range(0, len(secret) - width + 1)]


@pytest.mark.slow
def test_a_value_file_swapped_for_a_link_to_graceds_key_is_not_read(
        make_graced, shortdir: Path) -> None:
    """The reviewer's attack, replayed: the user who owns the value file's directory
    renames a symlink to graced's signing key over it. The detector fails with one line
    naming the file and that user; no piece of the key is in `gracectl detectors` (text
    or JSON), the missions, the journal or graced's log. The user puts a number back:
    the detector is up again with it."""
    other, uid, q, value, g = _users_value(make_graced, shortdir)
    every = LineCollector(g.ctl_popen("tail", "--json", "--since", "1"))
    w = Watch(g)
    try:
        key = g.state / "key"
        secret = key.read_text().strip()
        assert len(secret) >= 40, "graced's key file is not the base64 text expected"
        _as(other, f"ln -sf {key} {q}/queue_depth.new && mv -f {q}/queue_depth.new {value}")

        why = (f"{value}: directory {q} is owned by user {other} ({uid}), who may not "
               "read the file it leads to; not read")
        poll_until(lambda: _detector(g, "queue").get("last_error") == why, 20,
                   "the refusal")
        shown = g.ctl("detectors", check=True).stdout
        assert why in shown, shown
        # Back: a number the user wrote, through their own directory (a file they own).
        _as(other, f"echo 7 > {q}/new && mv -f {q}/new {value}")
        poll_until(lambda: (d := _detector(g, "queue"))["state"] == "up"
                   and d["subjects"][str(value)]["value"] == 7, 40, "the detector back")

        said = "\n".join([json.dumps(_detector(g, "queue")), shown,
                          g.ctl("missions", "ls", "--all", "--json", check=True).stdout,
                          *every.lines, g.stderr_path.read_text(errors="replace")])
        assert why in said  # the journal holds the refusal (detector.error)...
        leaked = [p for p in _pieces(secret) if p in said]
        assert not leaked, leaked  # ...and no 8 characters of the key anywhere
    finally:
        every.proc.terminate()
        w.close()


@pytest.mark.slow
def test_a_link_into_a_directory_its_owner_cannot_pass_is_not_read(
        make_graced, shortdir: Path) -> None:
    """Review s10, finding 1, replayed: the user who owns the value file's directory
    renames a symlink to a 0644 file in root's private 0700 directory over it; `cat` as
    that user is denied, and graced neither: the detector fails with one line naming
    the user and the directory they cannot pass, the file's number is never reported.
    The directory opened to others (0711), the same link is read."""
    other, uid, q, value, g = _users_value(make_graced, shortdir)
    private = shortdir / "private"
    private.mkdir(mode=0o700)
    secret = private / "count"
    secret.write_text("4242\n")
    secret.chmod(0o644)
    denied = subprocess.run(["runuser", "-u", other, "--", "cat", str(secret)],
                            capture_output=True, text=True, stdin=subprocess.DEVNULL,
                            timeout=30)
    assert denied.returncode != 0 and "Permission denied" in denied.stderr, denied
    _as(other, f"ln -sf {secret} {q}/new && mv -f {q}/new {value}")
    why = (f"{value}: directory {q} is owned by user {other} ({uid}), who may not pass "
           f"directory {private} on the way to the file it leads to; not read")
    poll_until(lambda: _detector(g, "queue").get("last_error") == why, 20, "the refusal")
    assert why in g.ctl("detectors", check=True).stdout
    assert _detector(g, "queue")["subjects"][str(value)]["value"] == 5
    private.chmod(0o711)  # now theirs to reach: `cat` would read it
    poll_until(lambda: (d := _detector(g, "queue"))["state"] == "up"
               and d["subjects"][str(value)]["value"] == 4242, 20, "the link read")


def test_junk_in_a_value_file_is_said_by_its_size_never_by_what_it_holds(
        make_graced, shortdir: Path) -> None:
    """Text that is not a number is reported by its size: the file is the writer's data
    (and a way graced did not check before could lead anywhere)."""
    value = shortdir / "depth"
    value.write_text("hunter2-not-a-number\n")
    g = make_graced(detectors=f'[[detector]]\nname = "depth"\nkind = "value"\n'
                              f'file = "{value}"\ninterval = 0.2\nthreshold = 1e9\n')
    w = Watch(g)
    try:
        opened = w.wait("mission.opened", "depth", 20)["payload"]
        assert opened["summary"] == f"depth {value}: not a number (21 bytes)", opened
        shown = g.ctl("detectors", "--json", check=True).stdout
        assert "hunter2" not in shown and "hunter2" not in json.dumps(opened), shown
    finally:
        w.close()


def test_a_log_reached_through_a_users_link_is_read_only_if_that_user_could(
        make_graced, shortdir: Path) -> None:
    """A log detector on a path in a second user's directory, which they make a symlink
    to root's private log (mode 0600, errors in it): the detector fails naming the user,
    no line of that log is counted (no mission). The same log through a symlink root
    owns (as /var/run -> /run) is read: its errors open a mission."""
    other = login_user()
    uid = pwd.getpwnam(other).pw_uid
    q = _users_dir(shortdir, other)
    private = shortdir / "private.log"
    private.write_text("starting\n")
    private.chmod(0o600)
    (shortdir / "rootlink.log").symlink_to(private)  # root's own symlink: fine
    _as(other, f"ln -s {private} {q}/app.log")
    detectors = "".join(
        f'[[detector]]\nname = "{name}"\nkind = "log"\nfile = "{path}"\n'
        'interval = 0.2\npattern = "ERROR"\nmax_rate = 0.5\nwindow = 10.0\n'
        for name, path in (("users", q / "app.log"), ("roots", shortdir / "rootlink.log")))
    g = make_graced(detectors=detectors)
    w = Watch(g)
    try:
        why = (f"{q}/app.log: directory {q} is owned by user {other} ({uid}), who may "
               "not read the file it leads to; not read")
        poll_until(lambda: _detector(g, "users").get("last_error") == why, 20,
                   "the refusal")
        poll_until(lambda: _detector(g, "roots")["state"] == "up", 20, "root's link read")
        with private.open("a") as fh:
            fh.writelines(f"ERROR secret {i}\n" for i in range(50))
        w.wait("mission.opened", "roots", 20)
        users = _detector(g, "users")
        assert users["state"] == "error" and users["last_error"] == why, users
        assert w.missions("users") == [], w.missions("users")
    finally:
        w.close()


def test_a_fifo_at_a_value_path_is_a_failure_and_a_file_back_is_read_again(
        make_graced, shortdir: Path) -> None:
    """A FIFO renamed over a value file (no writer will ever open it) never holds the
    sample in open(): the detector fails, "not a regular file"; a regular file with a
    value back, the detector is up again with it within a few samples. A value path that
    leads to a device (/dev/zero) fails the same way."""
    value = shortdir / "depth"
    value.write_text("5\n")
    (shortdir / "zero").symlink_to("/dev/zero")
    g = make_graced(detectors="".join(
        f'[[detector]]\nname = "{name}"\nkind = "value"\nfile = "{path}"\n'
        'interval = 0.2\nthreshold = 1e9\n'
        for name, path in (("depth", value), ("zero", shortdir / "zero"))))
    poll_until(lambda: _detector(g, "depth")["subjects"].get(str(value), {}).get(
        "value") == 5, 20, "the value read")
    fifo = shortdir / "fifo"
    os.mkfifo(fifo)
    fifo.rename(value)
    why = f"{value}: not a regular file"
    poll_until(lambda: _detector(g, "depth").get("last_error") == why, 15,
               "the FIFO reported")
    assert _detector(g, "zero").get("last_error") == f"{shortdir}/zero: not a regular file"
    back = shortdir / "new"
    back.write_text("42\n")
    back.rename(value)
    poll_until(lambda: (d := _detector(g, "depth"))["state"] == "up"
               and d["subjects"][str(value)]["value"] == 42, 15, "the detector back")
