"""Where graced keeps its state and socket, and where gracectl looks for them.

Under systemd the unit's ``StateDirectory=``/``RuntimeDirectory=`` (exported as
``STATE_DIRECTORY``/``RUNTIME_DIRECTORY``) win; a system service without them uses
``/var/lib/graced`` and ``/run/graced``. Otherwise user-mode XDG paths are used.

Root takes an XDG (or ``$HOME``) base only if root owns it and nobody else may write it
(nor any directory above it): ``sudo`` may keep a user's variables, and a state dir or
socket under a directory that user controls could be swapped for a symlink under root's
feet. Otherwise root uses the system paths (``/var/lib/graced``, ``/run/graced``,
``/etc/graced/graced.toml``); paths in the config or on the command line always win.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

SYSTEM_CONFIG = Path("/etc/graced/graced.toml")
SYSTEM_STATE = Path("/var/lib/graced")
SYSTEM_RUNTIME = Path("/run/graced")
SOCKET_NAME = "graced.sock"


def under_systemd() -> bool:
    """True when started as a systemd service (systemd sets INVOCATION_ID)."""
    return bool(os.environ.get("INVOCATION_ID")) and (
        os.geteuid() == 0 or bool(os.environ.get("STATE_DIRECTORY"))
    )


def _root_may_use(base: Path) -> bool:
    """For root: ``base`` (or, while it does not exist, the first ancestor that does) and
    every directory above it belong to root and are writable by no one else (sticky
    directories such as /tmp aside). Always True for other users."""
    if os.geteuid() != 0:
        return True
    path = base if base.is_absolute() else Path("/") / base
    for part in [path, *path.parents]:
        try:
            st = os.stat(part)
        except FileNotFoundError:
            continue
        except OSError:
            return False
        sticky = st.st_mode & stat.S_ISVTX and part != path
        if st.st_uid != 0 or (st.st_mode & 0o022 and not sticky):
            return False
    return True


def _user_base(env: str, fallback: Path) -> Path | None:
    """``$env`` (else ``fallback``) if this user may use it (see :func:`_root_may_use`)."""
    base = Path(os.environ.get(env) or fallback)
    return base if _root_may_use(base) else None


def _first(env: str) -> Path | None:
    value = os.environ.get(env)
    return Path(value.split(":")[0]) if value else None


def user_state_dir() -> Path:
    base = _user_base("XDG_STATE_HOME", Path.home() / ".local" / "state")
    return base / "graced" if base is not None else SYSTEM_STATE


def user_socket() -> Path:
    if os.environ.get("XDG_RUNTIME_DIR"):
        runtime = _user_base("XDG_RUNTIME_DIR", Path("/"))
        return runtime / "graced" / SOCKET_NAME if runtime else SYSTEM_RUNTIME / SOCKET_NAME
    state = user_state_dir()
    return state / SOCKET_NAME if state != SYSTEM_STATE else SYSTEM_RUNTIME / SOCKET_NAME


def default_state_dir() -> Path:
    explicit = _first("STATE_DIRECTORY")
    if explicit:
        return explicit
    return SYSTEM_STATE if under_systemd() else user_state_dir()


def default_socket() -> Path:
    explicit = _first("RUNTIME_DIRECTORY")
    if explicit:
        return explicit / SOCKET_NAME
    return SYSTEM_RUNTIME / SOCKET_NAME if under_systemd() else user_socket()


def _present(path: Path) -> bool:
    """True if ``path`` exists, or cannot be looked at (reading it then says why)."""
    try:
        return path.exists()
    except PermissionError:
        return True


def default_config_file() -> Path | None:
    """The config file graced reads when none is given, or None for the embedded one.

    Under systemd: the unit's configuration directory, else /etc/graced/graced.toml.
    Otherwise the user's ``$XDG_CONFIG_HOME/graced/graced.toml``; for root without one,
    the system file (so `graced config check` in root's shell checks what the service
    loads).
    """
    explicit = _first("CONFIGURATION_DIRECTORY")
    if explicit and _present(explicit / "graced.toml"):
        return explicit / "graced.toml"
    if under_systemd() and _present(SYSTEM_CONFIG):
        return SYSTEM_CONFIG
    xdg = _user_base("XDG_CONFIG_HOME", Path.home() / ".config")
    user = xdg / "graced" / "graced.toml" if xdg is not None else None
    if user is not None and _present(user):
        return user
    if os.geteuid() == 0 and _present(SYSTEM_CONFIG):
        return SYSTEM_CONFIG
    return None


def client_socket() -> Path:
    """The socket gracectl tries when neither --socket nor GRACE_SOCKET is given."""
    user = user_socket()
    try:
        if user.exists():
            return user
    except OSError:  # a directory this user cannot enter: connecting will say so
        return user
    system = SYSTEM_RUNTIME / SOCKET_NAME
    try:
        if system.exists():
            return system
    except OSError:
        return system
    return user


def client_config_dir() -> Path:
    xdg = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(xdg) / "grace"
