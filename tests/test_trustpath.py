"""Who controls the way to a monitored file, and whether they could read it (by value)."""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from graced.trustpath import ReaderWay, may_access, open_monitored
from tests.helpers.locks import apt_install
from tests.helpers.users import ensure_user, login_user

NOBODY = 2**31 - 7  # a uid with no account: in no group


def _st(mode: int, uid: int = 0, gid: int = 0) -> os.stat_result:
    return os.stat_result((mode, 1, 1, 1, uid, gid, 0, 0, 0, 0))


def test_a_users_right_is_read_from_the_bits_of_their_class() -> None:
    assert may_access(NOBODY, _st(stat.S_IFREG | 0o400, uid=NOBODY))
    assert not may_access(NOBODY, _st(stat.S_IFREG | 0o077, uid=NOBODY))  # owner: no read
    assert may_access(NOBODY, _st(stat.S_IFREG | 0o004))
    assert not may_access(NOBODY, _st(stat.S_IFREG | 0o640))  # root's 0640: not theirs
    assert may_access(NOBODY, _st(stat.S_IFREG | 0o002), write=True)
    assert not may_access(NOBODY, _st(stat.S_IFREG | 0o644), write=True)


def test_root_entries_and_sticky_directories_give_nobody_the_way() -> None:
    way = ReaderWay("/run/x")
    way.note("directory /", _st(stat.S_IFDIR | 0o755), False)
    way.note("symlink /var/run", _st(stat.S_IFLNK | 0o777), False)
    way.note("directory /tmp", _st(stat.S_IFDIR | 0o1777), False)
    way.check(_st(stat.S_IFREG | 0o600))  # root's private file: nobody else on the way


def test_an_owner_or_a_writable_directory_must_be_able_to_read_the_file() -> None:
    way = ReaderWay("/srv/q/depth")
    way.note("directory /srv/q", _st(stat.S_IFDIR | 0o755, uid=NOBODY), False)
    way.check(_st(stat.S_IFREG | 0o644))  # they could read it anyway
    with pytest.raises(PermissionError, match=rf"^/srv/q/depth: directory /srv/q is owned "
                       rf"by user {NOBODY}, who may not read the file it leads to; not "
                       "read$"):
        way.check(_st(stat.S_IFREG | 0o600))
    way = ReaderWay("/srv/open/depth")
    way.note("directory /srv/open", _st(stat.S_IFDIR | 0o777), False)
    with pytest.raises(PermissionError, match="directory /srv/open is writable by anyone"):
        way.check(_st(stat.S_IFREG | 0o640))
    way = ReaderWay("/sys/x/cpu.pressure", write=True)
    way.note("symlink /sys/x", _st(stat.S_IFLNK | 0o777, uid=NOBODY), False)
    with pytest.raises(PermissionError, match="who may not write the file it leads to; "
                       "not written$"):
        way.check(_st(stat.S_IFREG | 0o644))


def _dir(mode: int, uid: int = 0, gid: int = 0) -> os.stat_result:
    return _st(stat.S_IFDIR | mode, uid, gid)


def test_who_controls_the_way_must_be_able_to_pass_every_directory_to_the_file() -> None:
    """Review s10, finding 1: a user's link out of their directory to a 0644 file in
    root's private 0700 directory leads to nothing they could read (`cat`: Permission
    denied): refused, naming the user and the directory they cannot pass. Only the way
    as resolved counts: a directory the link left behind is not on it."""
    def linked(private: int, srv: int = 0o755) -> ReaderWay:
        way = ReaderWay("/srv/q/depth")
        way.note("directory /", _dir(0o755), False)
        way.note("directory /srv", _dir(srv), False)
        way.note("directory /srv/q", _dir(0o755, uid=NOBODY), False)
        way.note("symlink /srv/q/depth", _st(stat.S_IFLNK | 0o777, uid=NOBODY), False)
        way.note("directory /", _dir(0o755), False)  # the link's target: /private/f
        way.note("directory /private", _dir(private), False)
        return way

    with pytest.raises(PermissionError, match=rf"^/srv/q/depth: directory /srv/q is owned "
                       rf"by user {NOBODY}, who may not pass directory /private on the "
                       "way to the file it leads to; not read$"):
        linked(0o700).check(_st(stat.S_IFREG | 0o644))
    linked(0o711).check(_st(stat.S_IFREG | 0o644))  # others may pass: theirs to read
    linked(0o711, srv=0o700).check(_st(stat.S_IFREG | 0o644))  # /srv: left behind
    way = ReaderWay("/srv/open/sub/depth")
    way.note("directory /", _dir(0o755), False)
    way.note("directory /srv", _dir(0o750), False)
    way.note("directory /srv/open", _dir(0o777), False)
    way.note("directory /srv/open/sub", _dir(0o755), False)
    way.note("directory /srv/open", _dir(0o777), False)  # "..": back up
    with pytest.raises(PermissionError, match="^/srv/open/sub/depth: directory /srv/open "
                       "is writable by anyone, who may not pass directory /srv on the way"):
        way.check(_st(stat.S_IFREG | 0o644))


def test_a_directory_whose_acl_may_let_someone_write_it_or_a_file_with_an_acl_is_refused(
        ) -> None:
    """Review s10, finding 2: an ACL's users are not in the mode bits (the group bits
    are its mask), so a non-sticky directory with an ACL whose mask has write is
    refused, and an ACL on the file or on a directory it is reached through is refused
    while a non-root user controls the way."""
    way = ReaderWay("/srv/acl/depth")
    way.note("directory /srv/acl", _dir(0o775), True)  # root:root, setfacl u:X:rwx
    with pytest.raises(PermissionError, match="^/srv/acl/depth: directory /srv/acl has an "
                       "ACL that may let users it names write it; not read$"):
        way.check(_st(stat.S_IFREG | 0o600))
    way = ReaderWay("/srv/acl/depth")
    way.note("directory /srv/acl", _dir(0o755), True)  # mask r-x: nobody named writes
    way.check(_st(stat.S_IFREG | 0o600), acl=True)  # and nobody but root controls it
    way = ReaderWay("/srv/q/depth")
    way.note("directory /srv/q", _dir(0o755, uid=NOBODY), False)
    with pytest.raises(PermissionError, match=rf"^/srv/q/depth: the file has an ACL, and "
                       rf"directory /srv/q is owned by user {NOBODY}, whose right to read "
                       "it is not known; not read$"):
        way.check(_st(stat.S_IFREG | 0o644), acl=True)
    way.note("directory /srv/q/in", _dir(0o755), True)
    with pytest.raises(PermissionError, match="directory /srv/q/in on the way has an ACL, "
                       rf"and directory /srv/q is owned by user {NOBODY}, whose right to "
                       "pass it is not known; not read$"):
        way.check(_st(stat.S_IFREG | 0o644))


def test_members_of_group_root_who_may_write_its_directory_are_checked_too() -> None:
    """Review s10, finding 3: a directory root:root 0775 is its group's to change, and a
    non-root member of group root is checked like any group's member."""
    if os.geteuid() != 0:
        pytest.skip("a member of group root can only be made as root")
    member = ensure_user("grace-rootgrp", ("root",))
    uid = pwd.getpwnam(member).pw_uid
    way = ReaderWay("/srv/g/depth")
    way.note("directory /srv/g", _dir(0o775), False)
    with pytest.raises(PermissionError, match=rf"^/srv/g/depth: directory /srv/g is "
                       rf"writable by group root \(0\) \(its member {member} \({uid}\)\), "
                       "who may not read the file it leads to; not read$"):
        way.check(_st(stat.S_IFREG | 0o600))
    way.check(_st(stat.S_IFREG | 0o640))  # the group may read it: theirs anyway


def _setfacl(*args: str) -> None:
    apt_install(["acl"], lambda: shutil.which("setfacl") is not None)
    if not shutil.which("setfacl"):
        pytest.skip("setfacl not installed (Debian's acl package; installed only as root)")
    subprocess.run(["setfacl", *args], check=True, capture_output=True)


def test_real_acls_on_the_way_are_seen(shortdir: Path) -> None:
    """The reviewer's directory, for real: root's 0755 directory given `setfacl -m
    u:X:rwx`, X could rename anything over the watched name: the file, root's 0600, is
    not opened. With the ACL gone it is. A file with an ACL, reached through X's own
    directory, is refused too."""
    other = login_user()
    shortdir.chmod(0o755)
    d = shortdir / "acl"
    d.mkdir(mode=0o755)
    watched = d / "depth"
    watched.write_text("5\n")
    watched.chmod(0o600)
    _setfacl("-m", f"u:{other}:rwx", str(d))
    with pytest.raises(PermissionError, match=f"^{watched}: directory {d} has an ACL that "
                       "may let users it names write it; not read$"):
        open_monitored(str(watched))
    _setfacl("-b", str(d))
    os.close(open_monitored(str(watched)))
    q = shortdir / "q"
    q.mkdir(mode=0o755)
    os.chown(q, pwd.getpwnam(other).pw_uid, -1)
    mine = q / "depth"
    mine.write_text("5\n")
    mine.chmod(0o644)
    os.close(open_monitored(str(mine)))
    _setfacl("-m", f"u:{other}:---", str(mine))  # 0644 shown; they may not read it
    with pytest.raises(PermissionError, match=f"^{mine}: the file has an ACL, and "
                       f"directory {q} is owned by user {other} "):
        open_monitored(str(mine))
