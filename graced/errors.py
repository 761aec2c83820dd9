"""graced's process exit codes and the exceptions that carry them."""

from __future__ import annotations

import enum


class DaemonExit(enum.IntEnum):
    """Exit codes of ``graced`` (documented in graced(8))."""

    OK = 0
    ERROR = 1
    USAGE = 2
    CONFIG = 3
    STATE = 4
    SOCKET = 5


def install_extra(extra: str, program: str = "graced") -> str:
    """How to install one of grace's optional extras (``fleet``, ``postgres``): from the
    checkout grace was installed from, never by name from PyPI, whose "grace" is an
    unrelated project (a supply-chain trap)."""
    return (f"pip install '.[{extra}]' in the grace checkout, with the pip of the venv "
            f"{program} runs from")


class StartupError(Exception):
    """graced cannot start; the message is one line for stderr."""

    exit_code = DaemonExit.ERROR

    def __init__(self, message: str, exit_code: DaemonExit | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class StateError(StartupError):
    """The state dir, key or database cannot be used as it is; nothing is overwritten."""

    exit_code = DaemonExit.STATE
