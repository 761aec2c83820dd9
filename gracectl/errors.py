"""gracectl's errors: each carries its one-line message and its exit code."""

from __future__ import annotations

from graced.protocol import ExitCode


class CtlError(Exception):
    """An error gracectl reports as one line on stderr, exiting with ``code``."""

    code: ExitCode = ExitCode.ERROR

    def __init__(self, message: str, code: ExitCode | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class Unreachable(CtlError):
    code = ExitCode.UNREACHABLE


class NotAuthorised(CtlError):
    code = ExitCode.NOT_AUTHORISED


class NotFound(CtlError):
    code = ExitCode.NOT_FOUND


class RemoteError(CtlError):
    """The daemon answered a request with an error."""

    def __init__(self, code_name: str, message: str, exit_code: ExitCode) -> None:
        super().__init__(message, exit_code)
        self.code_name = code_name


class ProtocolViolation(CtlError):
    """What answered broke the protocol: a frame unparsable, oversized, too deep, not
    canonical, of an unknown type, or a response to no request."""

    code = ExitCode.PROTOCOL

    def __init__(self, message: str) -> None:
        super().__init__(f"protocol violation: the daemon sent {message}")


def check_utf8(params: object) -> None:
    """Refuse (exit 2) to send a request holding a string with no UTF-8 form (a command
    line argument that was not UTF-8): graced would refuse it too."""
    from graced.protocol.wire import not_utf8

    bad = not_utf8(params)
    if bad:
        raise CtlError(f"{bad.removeprefix('params.')}; nothing was sent", ExitCode.USAGE)
