"""Opening a file through a way that can be trusted, one entry at a time (blocking).

A path is resolved as the kernel would resolve it, but by hand: from ``/`` down, each
directory opened (O_PATH, O_NOFOLLOW) relative to the one before, each symlink read and
its target walked in turn, and every directory and symlink on the way shown to a
:class:`Way` *before* anything is opened through it. The file itself is opened relative
to its directory's fd, O_NOFOLLOW and O_NONBLOCK: no path is resolved twice, a symlink
swapped in meanwhile is ELOOP, and a FIFO never holds the caller in open().

Two ways use it: a pid file a signal step trusts (graced.targets: sshd's StrictModes),
and a file a detector reads (:func:`open_monitored`): graced reads a monitored file only
if every non-root user who controls the way to it, as resolved (owns a directory or a
symlink on it, or may write a directory on it that is not sticky), could read that file
themselves by its mode bits; else a user who owns a directory next to graced's key could
swap a symlink to the key in for a metric and read graced's secrets in its errors
(review s10). Each such user must also be able to pass (search) every directory from /
down to the file as resolved: a file in another's private directory is not theirs to
read, whatever its own bits say. Symlinks owned by root are fine (Debian's /var/run ->
/run). POSIX ACLs are not parsed: a non-sticky directory on the way whose ACL may let
some user write it (its mask, the group bits, has write), or any ACL on the file or on a
directory it is resolved through while a non-root user controls the way, is refused.
"""

from __future__ import annotations

import collections
import errno
import grp
import os
import pwd
import stat
from collections.abc import Callable
from typing import Any, Protocol

from .owners import user_label

MAX_LINKS = 40
"""Symlinks followed on the way to a file, at most (the kernel's own limit: ELOOP)."""


class Way(Protocol):
    def entry(self, what: str, info: os.stat_result, fd: int) -> None:
        """Check a directory or symlink on the way (``what``: "directory /run"; ``fd``:
        the directory's O_PATH fd, -1 for a symlink); raise to refuse it before anything
        is opened through it."""


ACL_XATTR = "system.posix_acl_access"


def has_acl(fd: int) -> bool:
    """Whether the file or directory open as ``fd`` (O_PATH too) carries a POSIX access
    ACL; one that cannot be asked (no /proc to reach an O_PATH fd) counts as one."""
    try:
        os.getxattr(fd, ACL_XATTR)
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
            return False
        if exc.errno != errno.EBADF:  # O_PATH: fgetxattr() refuses; through /proc
            return True
        try:
            os.getxattr(f"/proc/self/fd/{fd}", ACL_XATTR)
        except OSError as again:
            return again.errno not in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP)
    return True


def _os(prefix: str, entry: str, op: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``op(*args, **kwargs)``, an OSError from it one line starting with ``prefix`` ("pid
    file /run/x.pid") and naming the ``entry`` on the way that failed ("" for the file
    itself); with no ``prefix`` word before the path ("/srv/q"), the kernel's own error
    for the path (FileNotFoundError...), as open() would have raised it."""
    try:
        return op(*args, **kwargs)
    except OSError as exc:
        at = f"{entry}: " if entry else ""
        if exc.errno == errno.ELOOP:  # O_NOFOLLOW met a symlink
            raise PermissionError(f"{prefix}: {at}a symlink (not followed); not "
                                  "trusted") from None
        if prefix.startswith("/"):
            raise OSError(exc.errno, exc.strerror, prefix) from None
        failed = PermissionError(f"{prefix}: {at}{exc.strerror}")
        failed.errno = exc.errno  # graced's own exhaustion (EMFILE) stays known as such
        raise failed from None


def open_way(path: str, way: Way, *, prefix: str, flags: int = os.O_RDONLY,
             follow_last: bool = False) -> int:
    """The file at absolute ``path``, opened with ``flags`` (plus O_NOFOLLOW, O_NONBLOCK,
    O_CLOEXEC) relative to its directory's fd, after every directory from / down to it and
    every symlink on the way was checked by ``way`` as it was resolved, one entry at a
    time: nothing is opened through an entry refused, and no path is resolved again. With
    ``follow_last``, a symlink that is the last component is followed too (checked like
    any other); without, it is refused. Errors are PermissionError, one line starting
    with ``prefix``."""
    todo = collections.deque(part for part in path.split("/") if part)
    where: list[str] = []  # the entries of the directory ``fd`` is
    links = 0
    fd = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        way.entry("directory /", os.fstat(fd), fd)
        while todo:
            name = todo.popleft()
            if name == "." or name == ".." and not where:
                continue
            up = name == ".."
            shown = "/" + "/".join(where[:-1] if up else [*where, name])
            if not todo and not up and not follow_last:  # the file itself
                return int(_os(prefix, "", os.open, name, flags | os.O_NOFOLLOW
                               | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY, dir_fd=fd))
            info = _os(prefix, shown, os.stat, name, dir_fd=fd, follow_symlinks=False)
            if stat.S_ISLNK(info.st_mode):
                links += 1
                if links > MAX_LINKS:
                    raise PermissionError(f"{prefix}: more than {MAX_LINKS} symlinks on "
                                          "the way; not trusted")
                way.entry(f"symlink {shown}", info, -1)
                target = _os(prefix, shown, os.readlink, name, dir_fd=fd)
                todo.extendleft(reversed([p for p in target.split("/") if p]))
                if target.startswith("/"):
                    os.close(fd)
                    fd = -1
                    fd = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
                    way.entry("directory /", os.fstat(fd), fd)  # resolved from / again
                    where = []
                continue
            if not todo and not up and not stat.S_ISDIR(info.st_mode):  # the file itself
                return int(_os(prefix, "", os.open, name, flags | os.O_NOFOLLOW
                               | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY, dir_fd=fd))
            inner = _os(prefix, shown, os.open, name,
                        os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = inner
            way.entry(f"directory {shown}", os.fstat(fd), fd)
            where = where[:-1] if up else [*where, name]
        raise PermissionError(f"{prefix}: names a directory, not a file")
    finally:
        if fd >= 0:
            os.close(fd)


def may_access(uid: int, info: os.stat_result, write: bool = False, *,
               search: bool = False) -> bool:
    """Whether user ``uid`` (not root) may read (or ``write``, or ``search`` a directory:
    pass it) a file of ``info`` by its mode bits, as the kernel checks them: the owner's
    bit for its owner, else the group's for a member of its group (primary or
    supplementary), else the others' bit. ACLs are not read."""
    mode = info.st_mode
    bits = ((stat.S_IXUSR, stat.S_IXGRP, stat.S_IXOTH) if search else
            (stat.S_IWUSR, stat.S_IWGRP, stat.S_IWOTH) if write else
            (stat.S_IRUSR, stat.S_IRGRP, stat.S_IROTH))
    if info.st_uid == uid:
        return bool(mode & bits[0])
    try:
        account = pwd.getpwuid(uid)
        groups = set(os.getgrouplist(account.pw_name, account.pw_gid))
    except (KeyError, OSError):
        groups = set()  # a uid with no account is in no group
    if info.st_gid in groups:
        return bool(mode & bits[1])
    return bool(mode & bits[2])


def group_members(gid: int) -> set[int]:
    """The uids of group ``gid``'s members: those it lists and those whose primary group
    it is."""
    uids = {p.pw_uid for p in pwd.getpwall() if p.pw_gid == gid}
    try:
        for name in grp.getgrgid(gid).gr_mem:
            try:
                uids.add(pwd.getpwnam(name).pw_uid)
            except KeyError:
                pass
    except KeyError:
        pass
    return uids


class ReaderWay:
    """The way to a monitored file: who, besides root, controls it (:func:`open_monitored`).

    A directory or symlink a non-root user owns is theirs to change; a directory writable
    by its group (root's group too) or by others and not sticky is its group's members'
    or anyone's. The directories the file is finally resolved through, from / down, are
    kept: whoever controls the way must be able to pass each of them."""

    def __init__(self, path: str, write: bool = False) -> None:
        self.path, self.write = path, write
        self.users: dict[int, str] = {}  # uid -> the first entry of theirs on the way
        self.groups: dict[int, str] = {}  # gid -> a non-sticky directory it may write
        self.anyone = ""  # a non-sticky directory anyone may write
        self.acl_writable = ""  # a non-sticky directory whose ACL may let someone write
        self.resolved: list[tuple[str, os.stat_result, bool]] = []  # (path, info, ACL)

    def entry(self, what: str, info: os.stat_result, fd: int) -> None:
        self.note(what, info, fd >= 0 and has_acl(fd))

    def note(self, what: str, info: os.stat_result, acl: bool) -> None:
        """An entry on the way (``acl``: it carries an access ACL), as resolved."""
        if info.st_uid != 0:
            self.users.setdefault(info.st_uid, what)
        mode = stat.S_IMODE(info.st_mode)
        if not stat.S_ISDIR(info.st_mode):
            return
        where = what.removeprefix("directory ")
        self.resolved = [e for e in self.resolved if e[0] == "/" and where != "/"
                         or where.startswith(e[0] + "/")] + [(where, info, acl)]
        if mode & stat.S_ISVTX:
            return
        if mode & stat.S_IWOTH:
            self.anyone = self.anyone or what
        elif mode & stat.S_IWGRP:
            if acl:  # the group bits are the ACL's mask: named users may write
                self.acl_writable = self.acl_writable or what
            else:
                self.groups.setdefault(info.st_gid, what)

    def check(self, info: os.stat_result, acl: bool = False) -> None:
        """Refuse the file now open (``info``: its fstat; ``acl``: it carries an access
        ACL) if one who controls the way to it could not read it, or pass a directory
        on the way to it: one line naming the path, the entry and the user."""
        verb = "written" if self.write else "read"
        right = "write" if self.write else "read"
        if self.acl_writable:
            raise PermissionError(f"{self.path}: {self.acl_writable} has an ACL that may "
                                  f"let users it names write it; not {verb}")
        controllers = self._controllers()
        if not controllers:
            return
        entry, who, _ = controllers[0]
        if acl:
            raise PermissionError(f"{self.path}: the file has an ACL, and {entry} is {who}, "
                                  f"whose right to {right} it is not known; not {verb}")
        for where, _info, dir_acl in self.resolved:
            if dir_acl:
                raise PermissionError(
                    f"{self.path}: directory {where} on the way has an ACL, and {entry} "
                    f"is {who}, whose right to pass it is not known; not {verb}")
        for entry, who, uid in controllers:
            if not (may_access(uid, info, self.write) if uid >= 0 else info.st_mode & (
                    stat.S_IWOTH if self.write else stat.S_IROTH)):
                raise PermissionError(f"{self.path}: {entry} is {who}, who may not "
                                      f"{right} the file it leads to; not {verb}")
            for where, d, _acl in self.resolved:
                if not (may_access(uid, d, search=True) if uid >= 0
                        else d.st_mode & stat.S_IXOTH):
                    raise PermissionError(f"{self.path}: {entry} is {who}, who may not "
                                          f"pass directory {where} on the way to the "
                                          f"file it leads to; not {verb}")

    def _controllers(self) -> list[tuple[str, str, int]]:
        """(entry, who, uid) for each who controls the way, besides root; uid -1 for
        anyone (others' bits)."""
        found: list[tuple[str, str, int]] = []
        if self.anyone:
            found.append((self.anyone, "writable by anyone", -1))
        found += [(entry, f"owned by user {user_label(str(uid))}", uid)
                  for uid, entry in self.users.items()]
        for gid, entry in self.groups.items():
            try:
                group = f"{grp.getgrgid(gid).gr_name} ({gid})"
            except KeyError:
                group = str(gid)
            found += [(entry, f"writable by group {group} (its member "
                       f"{user_label(str(uid))})", uid)
                      for uid in sorted(group_members(gid)) if uid != 0]
        return found


def open_monitored(path: str, write: bool = False) -> int:
    """A file a detector reads, opened (non-blocking; read-write with ``write``) only if
    it is a regular file and every non-root user who controls the way to it could read
    (or ``write``) it themselves and pass every directory to it, and no ACL on the way
    hides who may (see the module): else PermissionError, or OSError for
    a file missing or not a regular one (a FIFO, a device such as /dev/zero, a socket),
    one line naming it."""
    if not path.startswith("/"):
        path = os.path.join(os.getcwd(), path)
    way = ReaderWay(path, write)
    flags = os.O_RDWR if write else os.O_RDONLY
    fd = open_way(path, way, prefix=path, flags=flags, follow_last=True)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(f"{path}: not a regular file")
        way.check(info, has_acl(fd))
    except BaseException:
        os.close(fd)
        raise
    return fd
