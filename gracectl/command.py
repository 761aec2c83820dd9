"""What every gracectl command shares: where graced is (the endpoint), one call to it
(over the Unix socket on a plain blocking socket, over TCP with trio), the key every answer
must be signed by, the common options and JSON on stdout.

The command modules (cli, missions, learn, playbooks, silence, top, fleet, web) import from
here, never from each other's insides; :mod:`gracectl.cli` puts them together.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar, overload

import click

from graced.paths import client_socket
from graced.protocol import ExitCode, key_id

from . import out, trust
from .endpoint import ANSWER_TIMEOUT, Endpoint
from .errors import CtlError
from .out import stderr_note


def _started() -> float:
    """When this process started, on the monotonic clock (from /proc/self/stat, to the
    kernel's tick), so that wait's --timeout counts Python's own start too."""
    now = time.monotonic()
    try:
        with open("/proc/self/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
        since_boot = int(fields[19]) / os.sysconf("SC_CLK_TCK")
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - since_boot
    except (OSError, ValueError, IndexError):
        return now
    return now - age if 0 <= age < 60 else now


STARTED = _started()
"""When gracectl started: wait's --timeout counts from here."""
CONTEXT = {"help_option_names": ["-h", "--help"], "auto_envvar_prefix": "GRACE"}
"""click settings of every gracectl command group."""
T = TypeVar("T")
STATES = ("detected", "open", "awaiting_approval", "approved", "executing", "verifying",
          "resolved", "failed", "escalated", "rejected", "expired", "interrupted")
"""Every state a mission can be in (missions ls --state, wait --state)."""


def endpoint_of(ctx: click.Context) -> Endpoint:
    """The endpoint the root options (--socket, --url, --key, --cacert) name."""
    obj = ctx.find_root().obj or {}
    answer = obj.get("answer_timeout") or ANSWER_TIMEOUT
    if obj.get("url"):
        return Endpoint(url=obj["url"], key_file=obj.get("key"), cacert=obj.get("cacert"),
                        answer_timeout=answer)
    return Endpoint(socket=obj.get("socket") or str(client_socket()), key_file=obj.get("key"),
                    answer_timeout=answer)


class OneCall:
    """One request and its answer (what :func:`call` makes and :func:`perform` runs):
    over a Unix socket on a plain blocking socket (no event loop to import or start),
    over TCP with trio. Both check every frame against the trusted key alike.


    ``timeout``: give up by then (exit 6, ``too_slow``); else the answer is waited for
    ``answer_timeout`` seconds (the endpoint's --answer-timeout by default; exit 3).
    """

    def __init__(self, endpoint: Endpoint, method: str, params: dict[str, Any],
                 timeout: float | None = None, too_slow: str = "",
                 trusted: bool = True, answer_timeout: float | None = None) -> None:
        self.endpoint, self.method, self.params = endpoint, method, params
        self.timeout, self.too_slow, self.trusted = timeout, too_slow, trusted
        self.answer_timeout = (endpoint.answer_timeout if answer_timeout is None
                               else answer_timeout)

    def run(self) -> Any:
        # Untrusted: only for what pins or shows a key (keys show), whose answer is
        # compared with the pinned key by the caller.
        key = trusted_key(self.endpoint) if self.trusted else None
        if self.endpoint.url:
            return perform(lambda: self._over_tcp(key))
        from .wsclient import SyncConnection, TooSlow

        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        try:
            with SyncConnection(self.endpoint.socket or "", key, self.answer_timeout,
                                deadline=deadline) as conn:
                return conn.request(self.method, self.params, self.answer_timeout)
        except TooSlow:
            raise CtlError(self.too_slow, ExitCode.TIMEOUT) from None

    async def _over_tcp(self, key: bytes | None) -> Any:
        import trio

        from .client import connect

        if self.timeout is None:
            async with connect(self.endpoint, key) as conn:
                return await conn.request(self.method, self.params, self.answer_timeout)
        with trio.move_on_after(self.timeout):
            async with connect(self.endpoint, key) as conn:
                return await conn.request(self.method, self.params, math.inf)
        raise CtlError(self.too_slow, ExitCode.TIMEOUT)


@overload
def perform(fn: Callable[[], OneCall]) -> Any: ...


@overload
def perform(fn: Callable[[], Awaitable[T]]) -> T: ...


def perform(fn: Callable[[], Awaitable[T] | OneCall]) -> Any:
    """Run ``fn``: a :class:`OneCall` by itself, a coroutine under trio (unwrapping
    single-error exception groups from nurseries)."""
    made = fn()
    if isinstance(made, OneCall):
        return made.run()
    import trio

    from .client import sole_exception

    async def main() -> T:
        return await made

    try:
        return trio.run(main)
    except BaseExceptionGroup as group:
        raise sole_exception(group) from None


YEAR = 365 * 86400.0


class Finite(click.ParamType):
    """A finite number from ``low`` to ``high``: nan, inf and absurdly large values are
    usage errors (exit 2), as any other bad value is."""

    name = "seconds"

    def __init__(self, low: float = 0.0, high: float = YEAR, name: str = "seconds") -> None:
        self.low, self.high, self.name = low, high, name

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{out.safe(str(value), 40)!r} is not a number", param, ctx)
        if not (math.isfinite(number) and self.low <= number <= self.high):
            what = "a number of seconds" if self.name == "seconds" else "a number"
            self.fail(f"{out.safe(str(value), 40)} is not {what} from {self.low:.10g} to "
                      f"{self.high:.10g}", param, ctx)
        return number


def json_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--json", "as_json", is_flag=True,
                        help="Print JSON on stdout (for scripts).")(f)


def set_wide(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    out.SETTINGS.wide = out.SETTINGS.wide or value


def _set_utc(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    out.SETTINGS.utc = out.SETTINGS.utc or value


def wide_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--wide", "-w", is_flag=True, expose_value=False, callback=set_wide,
                        help="Do not cut columns to the terminal's width (nothing is cut "
                             "when stdout is not a terminal).")(f)


def utc_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--utc", is_flag=True, expose_value=False, callback=_set_utc,
                        help="Show times in UTC (default: local time with its offset).")(f)


def print_json(data: Any) -> None:
    """``--json`` output: every time field in the one documented form (ISO 8601 UTC, as
    an event's ts; gracectl(1) OUTPUT)."""
    from graced.protocol.times import iso_times

    click.echo(json.dumps(iso_times(data), indent=2, sort_keys=True, ensure_ascii=False))


MAX_KEY_FILE = 4096
"""Bytes a key file may hold, at most: a key.pub is under 200 (--key /dev/zero is refused,
not read until memory runs out)."""


def read_key_text(path: str | Path) -> str:
    """The text of a key file, read only if it is a regular file of at most
    :data:`MAX_KEY_FILE` bytes of UTF-8; raises ValueError naming ``path`` otherwise (a
    FIFO is not waited on)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ValueError(f"{path}: cannot read key: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise ValueError(f"{path}: not a key file (not a regular file)")
        data = fh.read(MAX_KEY_FILE + 1)
    if len(data) > MAX_KEY_FILE:
        raise ValueError(f"{path}: not a key file (over {MAX_KEY_FILE} bytes; a key.pub "
                         "is one line under 200)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a key file (not UTF-8 text)") from None


def read_key_file(path: str) -> bytes:
    """The public key in the file at ``path`` (--key), or CtlError (exit 1, one line)."""
    from graced.keys import parse_public_key  # here: only --key reads a key file

    try:
        text = read_key_text(path)
        key = parse_public_key(text)
    except ValueError as exc:
        raise CtlError(str(exc) if str(exc).startswith(f"{path}: ") else f"{path}: {exc}"
                       ) from None
    public = _public_beside(Path(path)) if "ed25519" not in text else None
    if public is not None and _derived(key) == public:
        # The daemon's key (a bare seed) next to its key.pub: an easy slip, and one that
        # would chase a key change that never happened.
        raise CtlError(f"{path}: this is a private key (its public key is in "
                       f"{path}.pub): give --key the .pub file, and keep this one on the host")
    return key


def _public_beside(path: Path) -> bytes | None:
    from graced.keys import parse_public_key

    for pub in (path.with_name(path.name + ".pub"), path.with_suffix(".pub")):
        try:
            return parse_public_key(read_key_text(pub))
        except ValueError:
            continue
    return None


def _derived(seed: bytes) -> bytes:
    """The public key of a private key's 32-byte seed."""
    from nacl.signing import SigningKey

    return bytes(SigningKey(seed).verify_key)


def trusted_key(endpoint: Endpoint, key_file: str | None = None) -> bytes:
    """The key every answer must be signed by: --key, else the one pinned for the
    endpoint, else (Unix socket only) the daemon's, pinned on first use."""
    key_file = key_file or endpoint.key_file
    if key_file:
        return read_key_file(key_file)
    try:
        known = trust.pinned(endpoint.name)
    except trust.BadPin:
        raise  # exit 10: never trusted on first use instead
    except ValueError as exc:
        raise CtlError(str(exc)) from None
    if known is not None:
        return known
    if endpoint.url:
        from graced.protocol.redact import redact_url

        raise CtlError(f"no trusted key for {redact_url(endpoint.url)}: pass --key FILE "
                       "(the daemon's "
                       "key.pub) or pin it with 'gracectl keys trust'", ExitCode.BAD_SIGNATURE)
    offered, daemon_id = hello_key(endpoint)
    trust.pin(endpoint.name, offered, daemon_id)
    stderr_note(f"trusting key {key_id(offered)} for {endpoint.name} on first use "
                f"(pinned in {trust.store_path()})")
    return offered


def hello_key(endpoint: Endpoint) -> tuple[bytes, str]:
    """The key the daemon offers in ``hello`` (not verified: for pinning)."""
    from .wsclient import SyncConnection, check_hello

    if endpoint.url:
        return check_hello(perform(lambda: _hello_tcp(endpoint)))
    with SyncConnection(endpoint.socket or "", None, endpoint.answer_timeout) as conn:
        return check_hello(conn.request("hello"))


async def _hello_tcp(endpoint: Endpoint) -> Any:
    from .client import connect

    async with connect(endpoint) as conn:
        return await conn.request("hello")



def call(endpoint: Endpoint, method: str, params: dict[str, Any],
         answer_timeout: float | None = None) -> OneCall:
    """One request to run with :func:`perform` (``perform(lambda: call(...))``);
    ``answer_timeout`` for a request that takes longer than most (emit --count)."""
    return OneCall(endpoint, method, params, answer_timeout=answer_timeout)


_SENTENCE_END = re.compile(r"(?<!e\.g)(?<!i\.e)(?<!etc)\.(?=\s|$)")


def summary(cmd: click.Command) -> str:
    """A command's summary for the list in --help: its first sentence, whole."""
    if cmd.short_help:
        return cmd.short_help
    text = " ".join((cmd.help or "").split("\n\n", 1)[0].split())
    end = _SENTENCE_END.search(text)
    return text[:end.start() + 1] if end else text


class HelpGroup(click.Group):
    """A group whose --help lists each command with its first sentence whole (wrapped),
    never cut mid-phrase."""

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = []
        for name in self.list_commands(ctx):
            cmd = self.get_command(ctx, name)
            if cmd is not None and not cmd.hidden:
                rows.append((name, summary(cmd)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


class LazyGroup(HelpGroup):
    """A group some of whose commands live in modules imported only when one is asked for
    (click's documented LazyGroup pattern), so a one-shot command imports only its own:
    ``lazy`` maps a command's name to ``"module:attribute"``. Listings (--help, shell
    completion) name every command, lazy ones included, exactly as if all were loaded."""

    def __init__(self, *args: Any, lazy: dict[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = dict(lazy or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy and cmd_name not in self.commands:
            import importlib

            module, attr = self.lazy[cmd_name].split(":")
            self.add_command(getattr(importlib.import_module(module), attr), cmd_name)
        return super().get_command(ctx, cmd_name)

    def load_all(self) -> LazyGroup:
        """Every command, lazy ones included, in this group and the groups under it (for
        the docs and the tests that walk them)."""
        ctx = click.Context(self)
        for name in self.list_commands(ctx):
            cmd = self.get_command(ctx, name)
            if isinstance(cmd, LazyGroup):
                cmd.load_all()
        return self
