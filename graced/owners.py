"""Whose process may be the service a config names (process detectors, signal steps).

Any user can start a process under any name. So a process found by name is taken for
the service only if its real user is the one the config's ``user`` key names, or, with
no ``user``, one a login account cannot be: root, a system account (below UID_MIN of
/etc/login.defs), one of systemd's dynamic users, nobody, or graced's own user. A login
account's process (and one of the subordinate uids its user namespaces map, past
UID_MAX) is a decoy until ``user`` names that account (review of #19, attacker 3; #15).
"""

from __future__ import annotations

import os
import pwd

import psutil

DYNAMIC_USERS = range(61184, 65520)
"""systemd's DynamicUser= uids: services, never a login account."""
NOBODY = 65534
MAX_UID = 4294967294  # (uid_t) -1 means "no user"


def uid_of(user: str) -> int:
    """``user`` (a name or a uid) as a uid; raises LookupError for a name this host does
    not know, ValueError for a uid out of range."""
    if len(user) > 256:
        raise ValueError(f"user name too long ({len(user)} characters)")
    if user.isascii() and user.isdigit():  # not "\u0661" (an Arabic-Indic one)
        uid = int(user)
        if uid > MAX_UID:
            raise ValueError(f"uid {user} is out of range (0 to {MAX_UID})")
        return uid
    try:
        return pwd.getpwnam(user).pw_uid
    except (KeyError, ValueError):  # ValueError: a NUL in the name
        raise LookupError(f"no user {user!r} on this host") from None


def uid_name(user: str) -> str | None:
    """The name of the user ``user`` is, if it is a uid this host knows, else None."""
    if user.isascii() and user.isdigit():
        try:
            return pwd.getpwuid(int(user)).pw_name
        except (KeyError, OverflowError):
            return None
    return None


def user_label(user: str) -> str:
    """``user`` as a message names it: a uid this host knows with its name, "root (0)";
    anything else as written."""
    name = uid_name(user)
    return f"{name} ({user})" if name is not None else user


def check_user(user: str) -> str | None:
    """A config check (graced/config/schema.py): None if ``user`` names a user here (a
    name, or a uid the host's user database knows)."""
    try:
        uid = uid_of(user)
    except (LookupError, ValueError) as exc:
        return str(exc.args[0]) if exc.args else "not a user"
    if (clash := _named_like_a_uid(user)) is not None and clash != uid:
        # uid_of reads digits as a uid: the account NAMED so would never be the one hit
        name = uid_name(user)
        return (f'"{user}" is both uid {user}' + (f" ({name})" if name else "")
                + f" and the name of the user with uid {clash}: write "
                + (f'"{name}" for the first or ' if name else "") + f"{clash} for the second")
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return f"no user with uid {uid} on this host"
    return None


def _named_like_a_uid(user: str) -> int | None:
    """The uid of the account whose name is ``user``, if ``user`` is all digits and one
    is (useradd --badname makes them), else None."""
    if not (user.isascii() and user.isdigit()):
        return None
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        return None


def login_uids(defs: str = "/etc/login.defs") -> range:
    """The uids of login accounts: UID_MIN to UID_MAX of login.defs (1000 to 60000 where it
    says nothing, as useradd)."""
    bounds = {"UID_MIN": 1000, "UID_MAX": 60000}
    try:
        with open(defs, encoding="utf-8", errors="replace") as fh:
            for line in fh.read(1 << 16).splitlines():
                parts = line.split()
                if len(parts) >= 2 and parts[0] in bounds and parts[1].isascii() \
                        and parts[1].isdigit():
                    bounds[parts[0]] = int(parts[1])
    except OSError:
        pass
    return range(bounds["UID_MIN"], max(bounds["UID_MIN"], bounds["UID_MAX"]) + 1)


def service_owner(uid: int, login_min: int, me: int) -> bool:
    """Without ``user``, may a process of ``uid`` be the service? Root, the system accounts
    (below ``login_min``), systemd's dynamic users, nobody and graced's own user (``me``)
    cannot be taken by a login account; anyone else can."""
    return uid == me or uid < login_min or uid in DYNAMIC_USERS or uid == NOBODY


def foreign(owner: int | None, wanted: int | None, login_min: int, me: int) -> str | None:
    """Why a process of real user ``owner`` found by name is not the service's, or None if
    it may be: ``wanted`` is the uid the config's ``user`` names (None without ``user``).
    The reason is ``"user unknown"``, ``"another user"`` (not ``wanted``) or ``"login
    user"`` (no ``user``, and ``owner`` is a login account or one it maps)."""
    if owner is None:
        return "user unknown"
    if wanted is not None:
        return None if owner == wanted else "another user"
    return None if service_owner(owner, login_min, me) else "login user"


COMM_LEN = 15
"""The bytes of a process name the kernel keeps (its comm); psutil completes a name this
long from argv[0], which means reading the whole command line."""


def named(proc: psutil.Process, name: str) -> bool:
    """Whether ``proc``'s name (psutil's) is exactly ``name``, reading its command line
    only when its comm already matches ``name``'s first COMM_LEN bytes: anyone may
    give thousands of processes megabytes of command line (session 9, attacker)."""
    want = os.fsencode(name)
    try:
        with open(f"/proc/{proc.pid}/comm", "rb") as fh:
            comm = fh.read(64).rstrip(b"\n")
    except OSError:  # gone, or no /proc: psutil's answer alone
        comm = want[:COMM_LEN]
    if comm != want[:COMM_LEN]:
        return False
    try:
        return proc.name() == name
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


CMDLINE_PREFIX = 4096
"""Bytes of a process's command line that ``match_cmdline`` sees, at most: its start
(argv[0] and the first arguments). psutil reads a command line whole, and anyone may give
hundreds of processes megabytes of it (review s10: 150 processes of 1.8 MB cost a third
of a core and two seconds a sample)."""


def cmdline_prefix(pid: int) -> str | None:
    """The first CMDLINE_PREFIX bytes of process ``pid``'s command line, its arguments
    joined by spaces (as psutil's, joined); None for a process gone or hidden. One
    bounded read of /proc/PID/cmdline: the kernel copies only what is asked for."""
    try:
        fd = os.open(f"/proc/{pid}/cmdline", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        data = os.read(fd, CMDLINE_PREFIX)
    except OSError:
        return None
    finally:
        os.close(fd)
    return os.fsdecode(data.rstrip(b"\0").replace(b"\0", b" "))


def in_cmdline(pid: int, text: str) -> bool:
    """Whether ``text`` is in the first CMDLINE_PREFIX bytes of process ``pid``'s command
    line (its arguments joined by spaces); a process gone or hidden does not match."""
    line = cmdline_prefix(pid)
    return line is not None and text in line
