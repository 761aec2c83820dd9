"""Unix users and groups the tests need (created as root, removed when the run ends).

Every user or group this run creates is written to the file named by
``GRACE_TEST_CREATED`` (set by tests/conftest.py for the whole run, background children
included), and the run removes exactly those at its end: a root test run leaves the
host's accounts as it found them.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers.locks import run_lock

CREATED_ENV = "GRACE_TEST_CREATED"


def _note(kind: str, name: str) -> None:
    path = os.environ.get(CREATED_ENV)
    if path:
        with open(path, "a") as fh:
            fh.write(f"{kind} {name}\n")


def ensure_group(name: str) -> str:
    with run_lock("users"):
        return _ensure_group(name)


def _ensure_group(name: str) -> str:
    try:
        grp.getgrnam(name)
    except KeyError:
        subprocess.run(["groupadd", name], check=True, capture_output=True)
        _note("group", name)
    return name


def ensure_user(name: str, groups: tuple[str, ...] = ()) -> str:
    """A system-less login-less user ``name``, member of ``groups`` (created if needed;
    one process of the run at a time)."""
    with run_lock("users"):
        return _ensure_user(name, groups)


def _ensure_user(name: str, groups: tuple[str, ...], *flags: str) -> str:
    for group in groups:
        _ensure_group(group)
    try:
        pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", *flags, "--no-create-home", "--shell", "/usr/sbin/nologin",
                        "--comment", "grace test suite", name], check=True,
                       capture_output=True)
        _note("user", name)
    for group in groups:
        subprocess.run(["usermod", "-a", "-G", group, name], check=True, capture_output=True)
    return name


def login_user(name: str = "grace-decoy") -> str:
    """A second, login account ``name`` whose processes a test runs with runuser (a
    decoy of a service's name, say); the test skips, saying why, where it cannot be."""
    if os.geteuid() != 0:
        pytest.skip("a second Unix user can only be created (and run) as root")
    if not shutil.which("useradd") or not shutil.which("runuser"):
        pytest.skip("useradd/runuser not installed: cannot create a second Unix user")
    try:
        return ensure_user(name)
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"useradd failed: {exc.stderr.strip()}")


def remove_created(record: Path) -> None:
    """Remove the users, then the groups, that the run created (as ``record`` lists)."""
    try:
        lines = record.read_text().split()
    except OSError:
        return
    pairs = list(zip(lines[::2], lines[1::2], strict=False))
    for kind, name in [p for p in pairs if p[0] == "user"] + [
            p for p in pairs if p[0] == "group"]:
        subprocess.run(["userdel" if kind == "user" else "groupdel", name],
                       check=False, capture_output=True)
    record.unlink(missing_ok=True)


def user_named_like_a_uid() -> tuple[str, int]:
    """An account whose name is the uid of another (the login user's): ("1001", its own
    uid), made with useradd --badname; the test skips, saying why, where it cannot be."""
    number = str(pwd.getpwnam(login_user()).pw_uid)
    try:
        with run_lock("users"):
            _ensure_user(number, (), "--badname")
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"useradd --badname {number} failed: {exc.stderr.strip()}")
    return number, pwd.getpwnam(number).pw_uid
