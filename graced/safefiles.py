"""Files graced trusts, checked as sshd's StrictModes checks them.

- The state dir must be a real directory (not a symlink) owned by the daemon's user
  and writable by nobody else: whoever can write there could plant symlinks that
  graced, possibly root, would follow.
- Files graced writes there are created afresh, never through a symlink: a temporary
  file made with ``O_CREAT | O_EXCL | O_NOFOLLOW``, synced, then renamed over the
  target (a rename replaces a planted symlink itself, not what it points to).
- A config file writable by group or others, or owned by a user other than root or
  the daemon's, is refused: its commands would run as graced.
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
