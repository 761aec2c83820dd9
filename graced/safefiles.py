"""Files graced trusts, checked as sshd's StrictModes checks them.

- The state dir must be a real directory (not a symlink) owned by the daemon's user
  and writable by nobody else: whoever can write there could plant symlinks that
  graced, possibly root, would follow.
- Files graced writes there are created afresh, never through a symlink: a temporary
  file made with ``O_CREAT | O_EXCL | O_NOFOLLOW``, synced, then renamed over the
  target (a rename replaces a planted symlink itself, not what it points to).
- A config file writable by group or others, or owned by a user other than root or
  the daemon's, is refused: its commands would run as graced.
- The directories above the state dir, and the socket's directory and those above it,
  must belong to the daemon's user or root and be writable by nobody else (a sticky
  directory such as /tmp above them aside): whoever may rename an entry in one of them
  could swap the state dir or the socket for a symlink of their own.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


def foreign_or_writable(st: os.stat_result, *, allow_root: bool) -> str | None:
    """Why a file or dir with this stat cannot be trusted, or None."""
    me = os.geteuid()
    owners = {me, 0} if allow_root else {me}
    if st.st_uid not in owners:
        allowed = " or ".join(f"uid {u}" for u in sorted(owners))
        return f"is owned by uid {st.st_uid}, not {allowed}"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def check_private_dir(path: Path) -> str | None:
    """Why ``path`` is not a directory only the daemon's user controls, or None."""
    try:
        st = os.lstat(path)
    except OSError as exc:
        return f"cannot be checked: {exc.strerror}"
    if stat.S_ISLNK(st.st_mode):
        return "is a symbolic link"
    if not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    return foreign_or_writable(st, allow_root=False)


def _components(path: Path) -> list[Path]:
    """``path`` and every directory above it, deepest first, for a path made absolute
    and normalised, then for its real path (symlinks resolved) too."""
    literal = Path(os.path.normpath(os.path.abspath(path)))
    real = Path(os.path.realpath(literal))
    out = [literal, *literal.parents]
    out += [p for p in [real, *real.parents] if p not in out]
    return out


def check_dir_chain(path: Path) -> str | None:
    """Why someone other than this user and root could swap ``path`` or a directory
    above it, or None.

    Each directory on the way (as written and once symlinks are resolved) must belong
    to this user or root and be writable by nobody else; a sticky directory (as /tmp)
    above ``path`` may be, since nobody may rename another's entry in it. Components
    that do not exist yet are skipped: call it again once they are made.
    """
    me = os.geteuid()
    leaf = Path(os.path.normpath(os.path.abspath(path)))
    for part in _components(path):
        try:
            st = os.lstat(part)
        except FileNotFoundError:
            continue
        except OSError as exc:
            return f"{part} cannot be checked: {exc.strerror}"
        if stat.S_ISLNK(st.st_mode):
            continue  # a name in its directory (checked); its target is on the real path
        if st.st_uid not in (me, 0):
            owners = " or ".join(f"uid {u}" for u in sorted({me, 0}))
            return f"{part} is owned by uid {st.st_uid}, not {owners}"
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not (
                st.st_mode & stat.S_ISVTX and part != leaf):
            return (f"{part} is writable by group or others "
                    f"(mode {stat.S_IMODE(st.st_mode):04o})")
    return None


def make_dirs(path: Path, mode: int) -> None:
    """Create ``path`` and the directories above it that are missing, each with
    ``mode`` (less the umask); raises OSError. An existing ``path`` must be a
    directory (a symlink to one is checked by :func:`check_dir_chain`)."""
    missing: list[Path] = []
    for part in [path, *path.parents]:
        if os.path.lexists(part):
            break
        missing.append(part)
    for part in reversed(missing):
        try:
            os.mkdir(part, mode)
        except FileExistsError:
            pass
    if not os.path.isdir(path):
        raise NotADirectoryError(20, "Not a directory", str(path))


def write_new(path: Path, data: bytes, mode: int) -> None:
    """Write ``path`` atomically without ever following a symlink; raises OSError."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        os.unlink(tmp)  # a leftover, or a planted symlink: the link itself goes
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
