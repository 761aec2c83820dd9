"""Where graced keeps its state and socket, and where gracectl looks for them.

Under systemd the unit's ``StateDirectory=``/``RuntimeDirectory=`` (exported as
``STATE_DIRECTORY``/``RUNTIME_DIRECTORY``) win; a system service without them uses
``/var/lib/graced`` and ``/run/graced``. Otherwise user-mode XDG paths are used.
"""

from __future__ import annotations

import os
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


def _first(env: str) -> Path | None:
    value = os.environ.get(env)
    return Path(value.split(":")[0]) if value else None


def user_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "graced"


def user_socket() -> Path:
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "graced" / SOCKET_NAME
    return user_state_dir() / SOCKET_NAME


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
    xdg = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    user = Path(xdg) / "graced" / "graced.toml"
    if _present(user):
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
