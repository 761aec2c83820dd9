"""Who controls the way to a monitored file, and whether they could read it (by value)."""

from __future__ import annotations

import os
import stat

import pytest

from graced.trustpath import ReaderWay, may_access

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
    way.entry("directory /", _st(stat.S_IFDIR | 0o755))
    way.entry("symlink /var/run", _st(stat.S_IFLNK | 0o777))
    way.entry("directory /tmp", _st(stat.S_IFDIR | 0o1777))
    way.check(_st(stat.S_IFREG | 0o600))  # root's private file: nobody else on the way


def test_an_owner_or_a_writable_directory_must_be_able_to_read_the_file() -> None:
    way = ReaderWay("/srv/q/depth")
    way.entry("directory /srv/q", _st(stat.S_IFDIR | 0o755, uid=NOBODY))
    way.check(_st(stat.S_IFREG | 0o644))  # they could read it anyway
    with pytest.raises(PermissionError, match=rf"^/srv/q/depth: directory /srv/q is owned "
                       rf"by user {NOBODY}, who may not read the file it leads to; not "
                       "read$"):
        way.check(_st(stat.S_IFREG | 0o600))
    way = ReaderWay("/srv/open/depth")
    way.entry("directory /srv/open", _st(stat.S_IFDIR | 0o777))
    with pytest.raises(PermissionError, match="directory /srv/open is writable by anyone"):
        way.check(_st(stat.S_IFREG | 0o640))
    way = ReaderWay("/sys/x/cpu.pressure", write=True)
    way.entry("symlink /sys/x", _st(stat.S_IFLNK | 0o777, uid=NOBODY))
    with pytest.raises(PermissionError, match="who may not write the file it leads to; "
                       "not written$"):
        way.check(_st(stat.S_IFREG | 0o644))
