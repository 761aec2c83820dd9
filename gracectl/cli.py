"""The ``gracectl`` command line: talks to graced only through graced.protocol.

Output: data on stdout (``--json`` for scripts), messages and errors on stderr.
Exit codes are :class:`graced.protocol.ExitCode`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import sys
import time
from typing import TYPE_CHECKING, Any

import click
from click.core import ParameterSource

from graced import __version__
from graced.protocol import (
    ExitCode,
    Violation,
    key_id,
    parse_anchor,
    parse_event_line,
    verify_detached,
)
from graced.protocol.text import count
from graced.protocol.topics import user_topic_error

from . import out, trust
from .command import (
    CONTEXT,
    STARTED,
    STATES,
    Finite,
    HelpGroup,
    LazyGroup,
    OneCall,
    call,
    endpoint_of,
    hello_key,
    json_option,
    perform,
    print_json,
    read_key_file,
    set_wide,
    trusted_key,
    utc_option,
    wide_option,
)
from .endpoint import ANSWER_TIMEOUT, Endpoint, url_problem
from .errors import CtlError, ProtocolViolation, RemoteError
from .out import stderr_note

if TYPE_CHECKING:
    from .timespec import Point


class Root(LazyGroup):
    """gracectl's command group: the commands that live in modules of their own (missions,
    knowledge, playbooks, silence; fleet: NATS, asyncio; web: trio and a server) are
    imported only when one is asked for, so each one-shot command starts fast."""

    group_class = HelpGroup

    GLOBAL_FLAGS = ("--utc",)
    GLOBAL_VALUED = ("--color", "--colour")

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        """--utc and --color are global: given after the command too (``missions ls
        --color=always``, ``status --utc``), they are taken as if given before it."""
        front: list[str] = []
        rest: list[str] = []
        i = 0
        while i < len(args):
            arg = args[i]
            if arg == "--":
                rest.extend(args[i:])
                break
            if arg in self.GLOBAL_FLAGS or arg.startswith(
                    tuple(f"{name}=" for name in self.GLOBAL_VALUED)):
                front.append(arg)
            elif arg in self.GLOBAL_VALUED and i + 1 < len(args):
                front.extend(args[i:i + 2])
                i += 1
            else:
                rest.append(arg)
            i += 1
        return super().parse_args(ctx, front + rest)


@click.group(cls=Root, context_settings=CONTEXT, lazy={
    "missions": "gracectl.missions:missions", "knowledge": "gracectl.learn:knowledge",
    "playbooks": "gracectl.playbooks:playbooks", "silence": "gracectl.silence:silence",
    "fleet": "gracectl.fleet:fleet", "web": "gracectl.web:web"})
@click.version_option(__version__, "--version", "-V", prog_name="gracectl")
@click.option("--socket", "socket_path", metavar="PATH", envvar="GRACE_SOCKET",
              help="graced's Unix socket (env GRACE_SOCKET).")
@click.option("--url", metavar="wss://HOST:PORT", envvar="GRACE_URL",
              help="graced's TCP WebSocket URL instead of the socket (env GRACE_URL); "
                   "ws:// only to a loopback address.")
@click.option("--cacert", metavar="FILE", envvar="GRACE_CACERT",
              type=click.Path(dir_okay=False),
              help="CA or self-signed certificate (PEM) to trust for wss:// (env GRACE_CACERT).")
@click.option("--key", "key_file", metavar="KEYFILE", envvar="GRACE_KEY",
              type=click.Path(dir_okay=False),
              help="Trust this public key (the daemon's key.pub) instead of the one pinned "
                   "for the endpoint (env GRACE_KEY).")
@click.option("--answer-timeout", type=Finite(0.1), default=ANSWER_TIMEOUT, show_default=True,
              metavar="SECONDS", envvar="GRACE_ANSWER_TIMEOUT",
              help="Give up on graced (exit 3) when a request is not answered within this "
                   "(env GRACE_ANSWER_TIMEOUT). Before the command, as --socket.")
@click.option("--color", "--colour", "colour", type=click.Choice(["auto", "always", "never"]),
              default="auto", show_default=True, envvar="GRACE_COLOR",
              help="Colour: on a terminal only (auto), always or never (env GRACE_COLOR); "
                   "with auto, NO_COLOR set and not empty means never. Also after the "
                   "command.")
@utc_option
@click.pass_context
def cli(ctx: click.Context, socket_path: str | None, url: str | None, cacert: str | None,
        key_file: str | None, answer_timeout: float, colour: str) -> None:
    """gracectl: watch and steer graced, the host's self-healing daemon.

    Every answer and event is checked against a trusted key: the one given with --key,
    else the one pinned for the endpoint, else (over the Unix socket) the daemon's,
    pinned on first use. Anything unsigned or unverifiable is refused (exit 10).

    The options below go before the command (gracectl --answer-timeout 3 status);
    --color and --utc may also follow it. A command's own options, --json among them,
    go after it (gracectl status --json).
    """
    if socket_path and url:
        # A flag overrides the other endpoint's environment variable.
        from_env = {name for name in ("socket_path", "url")
                    if ctx.get_parameter_source(name) == ParameterSource.ENVIRONMENT}
        if from_env == {"socket_path"}:
            socket_path = None
        elif from_env == {"url"}:
            url = None
        else:
            raise click.UsageError("give --socket or --url, not both" if not from_env else
                                   "GRACE_SOCKET and GRACE_URL are both set: unset one, "
                                   "or give --socket or --url")
    if url and not url.startswith(("ws://", "wss://")):
        raise click.UsageError(f"--url must start ws:// or wss://, not {url[:40]!r}")
    problem = url_problem(url) if url else None
    if problem:
        raise click.UsageError(problem)
    out.SETTINGS.colour = colour
    ctx.obj = {"socket": socket_path, "url": url, "key": key_file, "cacert": cacert,
               "answer_timeout": answer_timeout}


# -- status ---------------------------------------------------------------------

def _human_duration(seconds: float) -> str:
    s = int(seconds)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return (f"{d}d " if d else "") + (f"{h}h " if h or d else "") + f"{m}m {s}s"


@cli.command()
@json_option
@wide_option
@click.option("--quiet", "-q", is_flag=True,
              help="Print nothing, not even errors: the exit status alone (0 ok, 7 degraded, "
                   "3 unreachable ...), like 'systemctl is-active -q'.")
@click.pass_context
def status(ctx: click.Context, as_json: bool, quiet: bool) -> None:
    """Show the daemon's state: identity, health, execution, missions, journal, clients.

    Exits 7 when graced is degraded (journal commits or a detector failing, or a mission
    escalated, or expired with nobody deciding, whose symptom was not seen normal since:
    it needs a person; or fleet forwarding behind, its oldest unacknowledged event
    waiting longer than [fleet] degraded_after, 60 s, connected or not: disconnected,
    or publishes refused), so that
    `gracectl status && ...` works in scripts and health checks; a pause is shown but is
    not degraded, nor is a probe whose target fails (refused, timed out: shown, and a
    mission of its own).
    """
    if quiet:  # the exit status is the answer; nothing at all goes to the terminal
        sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - until exit
    endpoint = endpoint_of(ctx)
    st = _checked_status(perform(lambda: call(endpoint, "status", {})))
    if as_json:
        print_json(st)
    else:
        try:
            _print_status(st)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            # Signed by the trusted key, and still not what a status answer holds.
            raise ProtocolViolation(f"a status answer with a malformed field "
                                    f"({type(exc).__name__}: {exc})") from None
    if st.get("degraded"):
        raise SystemExit(ExitCode.DEGRADED)


STATUS_KEYS: dict[str, tuple[str, ...]] = {
    "": ("version", "host", "pid", "daemon_id", "uptime", "kid", "config", "state_dir",
         "head_seq", "executor", "missions", "failing_detectors", "detectors_total",
         "degraded", "journal", "wire"),
    "executor": ("paused", "mode", "actions_last_hour", "max_actions_per_hour"),
    "journal": ("size_bytes", "commit_latency_ms", "commit_errors", "last_error"),
    "wire": ("clients", "subscribers", "dropped_total", "refused_total", "socket",
             "tcp_ports"),
}
"""What a status answer holds, at the top and in its parts (what status shows)."""


def _checked_status(st: Any) -> dict[str, Any]:
    """graced's status answer, if it holds what status shows; else exit 14 (the answer is
    malformed: an impostor's, or a graced that breaks the protocol), naming what lacks."""
    if not isinstance(st, dict):
        raise ProtocolViolation("a status answer that is not an object")
    missing = [key for key in STATUS_KEYS[""] if key not in st]
    for part in ("executor", "journal", "wire"):
        if part in st and not isinstance(st[part], dict):
            missing.append(f"{part} (not an object)")
        elif part in st:
            missing += [f"{part}.{key}" for key in STATUS_KEYS[part] if key not in st[part]]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ProtocolViolation(f"a status answer without {', '.join(missing[:5])}{more}")
    from .statuscheck import check_status

    check_status(st)  # each field of the kind status shows it as, before any is shown
    return st


def _health_rows(st: dict[str, Any]) -> list[tuple[str, str]]:
    ex = st["executor"]
    if ex["paused"]:
        execution = "PAUSED: nothing runs by itself (gracectl resume)"
    elif ex["mode"] == "observe":
        execution = "observe only ([remediation] mode): journals what would run"
    else:
        execution = (f"automatic; {ex['actions_last_hour']} of {ex['max_actions_per_hour']} "
                     "actions this hour")
    counts = st["missions"]
    active = sum(counts.values())
    missions = f"{active} active" + (": " + ", ".join(
        f"{n} {sev}" for sev, n in reversed(list(counts.items())) if n) if active else "")
    if st.get("awaiting_approval"):
        missions += (f"; {st['awaiting_approval']} awaiting approval (gracectl missions "
                     "approve ID)")
    if st.get("escalated"):
        missions += f"; {len(st['escalated'])} escalated (needs a person)"
    if st.get("expired"):
        missions += f"; {len(st['expired'])} expired, nobody decided (needs a person)"
    if st.get("held"):
        held = st["held"]
        missions += (f"; {len(held)} rejected, symptom still there (no new "
                     "mission while it lasts): " + ", ".join(f"#{i}" for i in held))
    failing = st["failing_detectors"]
    probes = st.get("failing_probes") or {}
    # A failing detector is not running: "15 running, 2 failing" (review of #19, newcomer 7).
    detectors = f"{st['detectors_total'] - len(failing)} running" + (
        f", {len(failing)} failing; FAILING: "
        + "; ".join(f"{name} ({d['last_error']})" for name, d in failing.items())
        if failing else "") + (
        "; probe target failing: " + "; ".join(f"{name} ({d['last_error']})"
                                               for name, d in probes.items())
        if probes else "")
    health = "DEGRADED: " + "; ".join(st["degraded"]) if st["degraded"] else "ok"
    silenced = ex.get("silences") or 0
    return [("health", health), ("execution", execution), ("missions", missions),
            ("detectors", detectors),
            *([("silences", f"{silenced} in force (gracectl silence ls)")] if silenced else [])]


def _retention(j: dict[str, Any]) -> str:
    """The journal's retention limits and the oldest event it keeps, for status."""
    r = j["retention"]
    size = f"{r['max_size'] / 1e6:.0f} MB" if r.get("max_size") else "no size limit"
    age = "no age limit"
    if r.get("max_age"):
        parts = _human_duration(r["max_age"]).split()
        age = " ".join(p for p in parts if not p.startswith("0")) or parts[-1]
    first = j.get("first_seq") or r.get("first_seq") or 1
    pruned = f"; {r['pruned']} events pruned" if r.get("pruned") else ""
    limits = (f"at most {size}, {age}" if r.get("max_size") or r.get("max_age")
              else "keeps everything (no max_size, no max_age)")
    return f"{limits}; oldest kept seq {first}{pruned}"


def _print_status(st: dict[str, Any]) -> None:
    j, w = st["journal"], st["wire"]
    rows = [
        ("daemon", f"graced {st['version']} on {st['host']} (pid {st['pid']})"),
        ("daemon id", st["daemon_id"]),
        ("uptime", _human_duration(st["uptime"])),
        ("key", st["kid"]),
        ("config", st["config"]),
        ("state", st["state_dir"]),
        ("head seq", str(st["head_seq"])),
        *_health_rows(st),
        ("journal", f"{j['size_bytes'] / 1e6:.1f} MB, last commit {j['commit_latency_ms']} ms, "
                    f"{j['commit_errors']} errors" + (f" ({j['last_error']})" if j["last_error"]
                                                     else "")),
        *([("retention", _retention(j))] if j.get("retention") else []),
        *([("JOURNAL", f"COMMITS FAILING for "
                       f"{_human_duration(max(0.0, time.time() - j['failing_since']))}"
                       f", {j['pending']} events queued: {j['last_error']}")]
          if j.get("failing_since") else []),
        ("clients", f"{w['clients']} connected, {w['subscribers']} subscribed, "
                    f"{w['dropped_total']} dropped, {w['refused_total']} refused"),
        ("socket", w["socket"] + (f"; tcp ports {w['tcp_ports']}" if w["tcp_ports"] else "")),
    ]
    fl = st.get("fleet")
    if fl:
        state = "connected" if fl["connected"] else "DISCONNECTED"
        lag = (f"{fl['lag_events']} events behind ({fl['lag_seconds']:.1f} s)"
               if fl["lag_events"] else "caught up")
        rows.append(("fleet", f"{state} to {fl['url']} stream {fl['stream']}; forwarded up to "
                              f"seq {fl['acked_seq']}, {lag}" + (
                                  f"; last error: {fl['last_error']}"
                                  if fl["last_error"] and fl["lag_events"] else "")))
    lr = st.get("learning")
    if lr:
        rate = "-" if lr["success_rate_7d"] is None else f"{lr['success_rate_7d'] * 100:.0f}%"
        share = "-" if lr["consulted_share"] is None else f"{lr['consulted_share'] * 100:.0f}%"
        rows.append(("learning", f"{lr['strategy']}; {count(lr['patterns'], 'pattern')}, "
                                 f"{count(lr['outcomes'], 'outcome')}; success {rate} "
                                 f"(7 days); memory consulted for {share} of missions"
                                 + (f"; imported from {count(lr['sources'], 'daemon')}, "
                                    f"{count(lr['pinned'], 'key')} pinned (knowledge sources)"
                                    if lr.get("pinned") else "")
                                 + ("; imported records still loading"
                                    if lr.get("loading") else "")))
        q = lr.get("quarantined") or {}
        if q.get("rows"):
            rows.append(("quarantine", f"{q['rows']} stored learning records out of bounds, "
                                       "set aside and never used (see the log)"))
    width = max(len(k) for k, _ in rows)
    # Long values fold under their column on a terminal (whole when piped or --wide).
    out.write(out.fold("\n".join(f"{k:<{width}}  {out.safe(v)}" for k, v in rows)))


# -- tail / verify ----------------------------------------------------------------

def _point(value: str | None, name: str) -> Point | None:
    if value is None:
        return None
    from . import timespec

    try:
        return timespec.parse(value, time.time())
    except ValueError as exc:
        raise click.BadParameter(f"{value[:40]!r}: {exc}", param_hint=name) from None


class Lines(click.ParamType):
    """-n: a count of events (0 or more), or 'all' (None), as journalctl's -n."""

    name = "lines"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> int | None:
        text = str(value).strip().lower()
        if text == "all":
            return None
        if text.isdigit() and len(text) <= 18:
            return int(text)
        self.fail(f"{str(value)[:40]!r} is not a count of events (0 or more) or 'all'",
                  param, ctx)


LINES = Lines()


@cli.command()
@click.argument("patterns", nargs=-1, metavar="[PATTERN]...")
@click.option("--follow/--no-follow", "-f", "follow", default=True, show_default=True,
              help="Keep printing new events as they come (--no-follow: stop at the head).")
@click.option("-n", "--lines", type=LINES, default="10", show_default=True,
              metavar="N|all",
              help="Start with this many of the latest matching events ('all': every one "
                   "kept); with --since, the last this many of its window (--since alone "
                   "shows it all).")
@click.option("--since", "-S", metavar="SEQ|TIME",
              help="Start at this seq, or at the first event at or after this time: "
                   "'-10min', '22:31', 'yesterday 22:00', '2026-11-24 10:00', ISO 8601, "
                   "'@EPOCH', 'today' (as journalctl).")
@click.option("--until", "-U", metavar="SEQ|TIME",
              help="Stop after this seq, or before the first event after this time "
                   "(before --since: exit 2, as journalctl; a seq and a time are compared "
                   "by the time the seq's event was published).")
@click.option("-o", "--output", type=click.Choice(out.TAIL_OUTPUTS), default="short",
              show_default=True,
              help="short: time, seq, topic, payload; json and jsonl: each event in its "
                   "exact signed form, one a line; cat: the payload alone.")
@json_option
@click.option("--verify", is_flag=True,
              help="Check every event's signature, the chain, seq continuity and heartbeat "
                   "freshness; stop at the first violation.")
@click.option("--key", "key_file", metavar="KEYFILE", type=click.Path(dir_okay=False),
              help="Trust this public key (key.pub) instead of the pinned one; implies "
                   "--verify.")
@click.option("--stale-after", type=Finite(0.1), metavar="SECONDS",
              help="Silence that counts as a stale stream (default 3 heartbeats + 1 s).")
@click.option("--reconnect-timeout", type=Finite(0), default=60.0,
              show_default=True, metavar="SECONDS",
              help="How long to wait for graced to come back after it stops.")
@click.option("--wide", "-w", "--full", "-l", is_flag=True, expose_value=False,
              callback=set_wide,
              help="Print each event whole on a terminal too (short lines are cut to its "
                   "width with …; never when piped), as journalctl's --full.")
@click.option("--reverse", "-r", is_flag=True,
              help="Newest first, as journalctl -r (implies --no-follow).")
@click.option("--no-pager", is_flag=True, expose_value=False,
              help="Accepted for journalctl's habit and ignored: gracectl never pages.")
@utc_option
@click.pass_context
def tail(ctx: click.Context, patterns: tuple[str, ...], follow: bool, lines: int | None,
         since: str | None, until: str | None, output: str, as_json: bool, verify: bool,
         key_file: str | None, stale_after: float | None, reconnect_timeout: float,
         reverse: bool) -> None:
    """Stream events matching topic globs (e.g. 'mission.*'); all events by default.

    Like journalctl: -n counts matching events, --since/--until take a seq or a time,
    -o json (or --json) prints each event in its exact signed form, one per line.
    """
    from .tail import TailOptions, run_tail

    endpoint = endpoint_of(ctx)
    start, end = _point(since, "--since"), _point(until, "--until")
    if start is not None and end is not None:
        from .timespec import after

        if after(start, end):  # journalctl: "--since= must be before --until="
            raise CtlError(f"--since {str(since)[:40]!r} is after --until "
                           f"{str(until)[:40]!r}: no event can be in that range",
                           ExitCode.USAGE)
    output = "json" if as_json else "short" if output == "short-iso" else output
    if reverse and follow and ctx.get_parameter_source("follow") != ParameterSource.DEFAULT:
        raise click.UsageError("--reverse and --follow cannot go together (as journalctl)")
    follow = follow and not reverse
    every = lines is None  # -n all: from the oldest event kept (or the whole --since window)
    if every and start is None:
        from .timespec import Point

        start = Point(ts=0.0)  # a time before the oldest event kept starts at it

    async def go() -> int:
        trusted = trusted_key(endpoint, key_file)
        opts = TailOptions(
            patterns=list(patterns) or ["*"], since=None, lines=lines or 0,
            as_json=output in ("json", "jsonl"), verify=verify or key_file is not None,
            follow=follow and end is None, trusted_key=trusted,
            stale_after=stale_after, reconnect_timeout=reconnect_timeout, output=output,
            since_at=start, until=end, reverse=reverse,
            lines_given=not every
            and ctx.get_parameter_source("lines") != ParameterSource.DEFAULT,
        )
        return await run_tail(endpoint, opts, sys.stdout, stderr_note)

    try:
        code = perform(go)
    except Violation as exc:
        raise CtlError(f"verification failed: {exc}", exc.code) from None
    except BrokenPipeError:
        code = 0
    sys.exit(code)


def _anchor(value: str | None) -> tuple[int, str] | None:
    if value is None:
        return None
    try:
        return parse_anchor(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--from") from None


@cli.command()
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--key", "key_file", metavar="KEYFILE", type=click.Path(dir_okay=False),
              help="The daemon's public key (key.pub); default: the key pinned for the "
                   "current endpoint.")
@click.option("--from", "anchor", metavar="SEQ:HASH",
              help="Start from this trusted event (from 'gracectl checkpoint' or a previous "
                   "verification) instead of genesis (seq 1).")
@click.option("--partial", is_flag=True,
              help="Accept a stream that ends without daemon.stopping (still running).")
@click.option("--stale-after", type=Finite(0.1), metavar="SECONDS",
              help="A gap between events that counts as stale (default 3 heartbeats + 1 s).")
@click.option("--jobs", type=click.IntRange(min=1), metavar="N",
              help="Verify with N processes (default and at most: the usable cores); "
                   "--jobs 1 verifies in one pass, as a stream read from stdin.")
@json_option
@click.pass_context
def verify(ctx: click.Context, file: str, key_file: str | None, anchor: str | None,
           partial: bool, stale_after: float | None, jobs: int | None, as_json: bool) -> None:
    """Prove a saved JSONL stream (from 'tail --json') offline, from genesis (or --from)
    to daemon.stopping (or, with --partial, to its last event: a stream saved from a
    running daemon needs it). The result is one line on stdout ending with the anchor
    SEQ:HASH of the last event (--json: "anchor"); errors go to stderr. Complete means up
    to a clean stop (any daemon.stopping, an earlier run's too), not up to the head:
    compare the anchor with one kept off the host to know it is the stop you expect.
    Offline, on a machine with no key pinned: --key with the daemon's key.pub, e.g.
    'gracectl verify --key key.pub stream.jsonl'."""
    start = _anchor(anchor)
    key_file = key_file or endpoint_of(ctx).key_file
    key: bytes | None = read_key_file(key_file) if key_file else trust.pinned(
        endpoint_of(ctx).name)
    if key is None:
        raise CtlError("no trusted key: pass --key FILE (the daemon's key.pub)",
                       ExitCode.BAD_SIGNATURE)
    from .verify import verify_file

    try:
        result = verify_file(file, key, anchor=start, partial=partial,
                             stale_after=stale_after, workers=jobs,
                             progress=out.progress("verifying"))
    except OSError as exc:
        raise CtlError(f"{file}: {exc.strerror or exc}") from None
    except Violation as exc:
        if as_json:
            print_json({"ok": False, "seq": exc.seq, "kind": exc.kind, "reason": exc.reason,
                         "exit_code": int(exc.code)})
        raise CtlError(f"verification failed: {exc}", exc.code) from None
    if as_json:
        print_json({"ok": True, "events": result.count, "first_seq": result.first,
                     "last_seq": result.last, "last_hash": result.last_hash,
                     "anchor": f"{result.last}:{result.last_hash}",
                     "complete": result.complete, "kid": key_id(key)})
    else:
        start_text = f"from anchor {start[0]}" if start else "from genesis"
        end_text = "to daemon.stopping" if result.complete else "partial: no daemon.stopping"
        # The result is the command's output (stdout, its last word the anchor), so a
        # script can keep it: a=$(gracectl verify ...); errors stay on stderr.
        click.echo(f"verified {result.count} events (seq {result.first}..{result.last}, "
                   f"{start_text}, {end_text}), key {key_id(key)}: signatures valid, chain "
                   f"intact; anchor of its last event: {result.last}:{result.last_hash}")


@cli.command()
@json_option
@click.pass_context
def checkpoint(ctx: click.Context, as_json: bool) -> None:
    """Print the daemon's latest signed checkpoint, for keeping off the host.

    Its anchor (SEQ:HASH, the checkpoint event's own seq and hash) is what
    'gracectl verify --from' takes; --json adds the exact signed event.
    """
    endpoint = endpoint_of(ctx)
    key = trusted_key(endpoint)
    result = perform(lambda: call(endpoint, "checkpoint", {}))
    text = result.get("event") if isinstance(result, dict) else None
    if not isinstance(text, str):
        raise ProtocolViolation("a checkpoint answer without its event")
    event, signing = parse_event_line(text.encode("utf-8", "surrogatepass"))
    seq = event["seq"]
    if event["kid"] != key_id(key) or not verify_detached(event["sig"], signing, key):
        raise Violation(ExitCode.BAD_SIGNATURE, seq, "checkpoint with a bad signature")
    payload = event["payload"]
    if event["topic"] != "daemon.checkpoint" or not isinstance(payload, dict):
        raise ProtocolViolation("a checkpoint answer holding another event")
    digest = hashlib.sha256(signing).hexdigest()
    info = {"seq": seq, "hash": digest, "anchor": f"{seq}:{digest}", "ts": event["ts"],
            "kid": event["kid"], "head_seq": payload.get("head_seq"),
            "head_hash": payload.get("head_hash"), "first_seq": payload.get("first_seq"),
            "first_hash": payload.get("first_hash"), "event": text}
    if as_json:
        print_json(info)
        return
    oldest = ""
    if info["first_seq"] is not None:  # the oldest event kept (journal retention)
        first = f"{out.safe(info['first_seq'])}:{out.safe(info['first_hash'])}"
        oldest = f"oldest kept {first}  (what is kept verifies from it)\n"
    click.echo(f"checkpoint  seq {seq} at {out.when(event['ts'])}, key {event['kid']}\n"
               f"head        seq {out.safe(info['head_seq'])}: {out.safe(info['head_hash'])}\n"
               + oldest +
               f"anchor      {seq}:{digest}  (gracectl verify --from {seq}:{digest} FILE)")


# -- keys -------------------------------------------------------------------------

@cli.group()
def keys() -> None:
    """The daemon's signing key: show it, trust (pin) it."""


@keys.command("show")
@json_option
@click.pass_context
def keys_show(ctx: click.Context, as_json: bool) -> None:
    """Show the daemon's key id and public key, and whether it is pinned here."""
    from .wsclient import check_hello

    endpoint = endpoint_of(ctx)
    pinned = trust.pinned(endpoint.name)  # a pin that cannot be read: exit 10 at once
    info = perform(lambda: OneCall(endpoint, "keys", {}, trusted=False))
    pub, _ = check_hello(info)  # the same checks: 32 bytes, its kid
    info = {"kid": info["kid"], "public_key": info["public_key"],
            "algorithm": out.safe(str(info.get("algorithm", "ed25519")), 20)}
    state = "not pinned" if pinned is None else ("pinned" if pinned == pub else "MISMATCH")
    info = {**info, "endpoint": endpoint.name, "trust": state}
    if as_json:
        print_json(info)
    else:
        out.echo(f"key id      {info['kid']}\npublic key  ed25519 {info['public_key']}\n"
                   f"endpoint    {endpoint.name}\ntrust       {state}")


@keys.command("trust")
@click.option("--key", "key_file", metavar="KEYFILE", type=click.Path(dir_okay=False),
              help="Pin this key file instead of the key the daemon offers.")
@click.option("--replace", is_flag=True, help="Replace a different key pinned before.")
@click.pass_context
def keys_trust(ctx: click.Context, key_file: str | None, replace: bool) -> None:
    """Pin the daemon's key for this endpoint (trust on first use, like ssh).

    A different key for an endpoint already pinned is refused (exit 10) unless --replace.
    """
    endpoint = endpoint_of(ctx)
    offered, daemon_id = hello_key(endpoint)
    key = read_key_file(key_file) if key_file else offered
    if key != offered:
        raise CtlError(f"the daemon's key {key_id(offered)} is not {key_id(key)} from {key_file}",
                       ExitCode.BAD_SIGNATURE)
    try:
        known = trust.pinned(endpoint.name)
    except trust.BadPin:
        if not replace:
            raise
        known = None  # --replace mends a pin that cannot be read
    if known == key:
        stderr_note(f"key {key_id(key)} already trusted for {endpoint.name}")
        return
    if known is not None and not replace:
        raise CtlError(
            f"WARNING: the key of {endpoint.name} has CHANGED: pinned {key_id(known)}, now "
            f"offered {key_id(key)}; someone may be impersonating graced. If the change is "
            "expected, run 'gracectl keys trust --replace'", ExitCode.BAD_SIGNATURE)
    trust.pin(endpoint.name, key, daemon_id)
    stderr_note(f"trusted key {key_id(key)} for {endpoint.name}")


FINAL_STATES = ("resolved", "failed", "escalated", "rejected", "expired")


WAIT_TIMEOUT = 30.0
"""wait's --timeout when none is given (kubectl wait's default)."""


def _reached(m: dict[str, Any], wanted: set[str], mission_id: int) -> bool:
    """Whether mission ``m`` is in a wanted state; raises if it ended in another."""
    if m["state"] in wanted:
        return True
    if m["state"] in FINAL_STATES:
        raise CtlError(f"mission {mission_id} ended {m['state']}, not "
                       f"{' or '.join(sorted(wanted))} ({m.get('reason') or ''})")
    return False


def _update(m: dict[str, Any], event: dict[str, Any], mission_id: int) -> dict[str, Any]:
    payload = event.get("payload")
    if isinstance(payload, dict) and payload.get("id") == mission_id:
        return {**m, **payload}
    return m


@cli.command()
@click.argument("mission_id", metavar="ID", type=int)
@click.option("--state", "wanted", required=True, multiple=True,
              type=click.Choice((*STATES, "final")),
              help="The state to wait for (repeatable: any of them); 'final' is any final "
                   "state (resolved, failed, escalated, rejected, expired).")
@click.option("--timeout", type=Finite(0), default=WAIT_TIMEOUT,
              show_default=True, metavar="SECONDS",
              help="Give up after this long (exit 6), counted from the start; 0: never.")
@json_option
@click.pass_context
def wait(ctx: click.Context, mission_id: int, wanted: tuple[str, ...], timeout: float,
         as_json: bool) -> None:
    """Wait until mission ID reaches --state (for scripts).

    Exits 0 when it does, 6 on --timeout, 1 if the mission ends in another final state,
    5 if there is no such mission.
    """
    deadline = STARTED + timeout if timeout else None
    want = set(FINAL_STATES if "final" in wanted else ()) | (set(wanted) - {"final"})
    endpoint = endpoint_of(ctx)
    key = trusted_key(endpoint)
    too_slow = CtlError(f"mission {mission_id} did not reach {' or '.join(wanted)} within "
                        f"{timeout:g} s", ExitCode.TIMEOUT)
    if endpoint.url:
        m = perform(lambda: _wait_tcp(endpoint, key, mission_id, want, deadline, too_slow,
                                      as_json))
    else:
        from .wsclient import SyncConnection, TooSlow

        try:
            # --answer-timeout bounds the handshake and each answer (exit 3: graced
            # hung), --timeout the whole wait (exit 6: the mission is still on its way).
            with SyncConnection(endpoint.socket or "", key, endpoint.answer_timeout,
                                deadline=deadline, answer_too=True) as conn:
                # Subscribe first, then read the state: no transition can slip by.
                conn.request("subscribe", {"patterns": ["mission.*"], "since": None})
                m = conn.request("missions.get", {"id": mission_id})["mission"]
                moved = False
                while not _reached(m, want, mission_id):
                    m, moved = _update(m, conn.next_event()[1], mission_id), True
                if moved and as_json:  # the mission as it is now, not as the event had it
                    m = conn.request("missions.get", {"id": mission_id})["mission"]
        except TooSlow:
            raise too_slow from None
    if as_json:
        print_json(m)
    else:
        stderr_note(f"mission {mission_id} is {m['state']}")


async def _wait_tcp(endpoint: Endpoint, key: bytes, mission_id: int, want: set[str],
                    deadline: float | None, too_slow: CtlError,
                    fetch: bool) -> dict[str, Any]:
    import trio

    from .client import connect

    # The deadline is checked inside the connection, so it closes cleanly and at once.
    trio_deadline = (trio.current_time() + deadline - time.monotonic() if deadline
                     else float("inf"))
    async with connect(endpoint, key) as conn:
        with trio.move_on_at(trio_deadline):
            await conn.request("subscribe", {"patterns": ["mission.*"], "since": None})
            m = (await conn.request("missions.get", {"id": mission_id}))["mission"]
            moved = False
            while not _reached(m, want, mission_id):
                try:
                    _, event = await conn.next_event()
                except trio.EndOfChannel:
                    raise CtlError("graced closed the connection",
                                   ExitCode.UNREACHABLE) from None
                m, moved = _update(m, event, mission_id), True
            if moved and fetch:  # the mission as it is now, not as the event had it
                m = (await conn.request("missions.get", {"id": mission_id}))["mission"]
            return dict(m)
    raise too_slow


def _pause_or_resume(ctx: click.Context, method: str, done: str, already: str,
                     as_json: bool) -> None:
    result = perform(lambda: call(endpoint_of(ctx), method, {}))
    if as_json:
        print_json(result)
    else:
        stderr_note(done if result["changed"] else already)


@cli.command()
@json_option
@click.pass_context
def pause(ctx: click.Context, as_json: bool) -> None:
    """Stop all automatic execution (persisted across restarts)."""
    _pause_or_resume(ctx, "pause", "paused", "already paused", as_json)


@cli.command()
@json_option
@click.pass_context
def resume(ctx: click.Context, as_json: bool) -> None:
    """Resume automatic execution; missions deferred while paused are considered again."""
    _pause_or_resume(ctx, "resume", "resumed", "not paused", as_json)


@cli.command()
@click.option("--timeout", type=Finite(0.1), default=30.0, show_default=True,
              metavar="SECONDS", help="Give up (exit 6) if graced has not answered by then.")
@json_option
@click.pass_context
def reload(ctx: click.Context, timeout: float, as_json: bool) -> None:
    """Make graced re-read its config file and apply it; exit 1 if it refuses it.

    A refused config leaves the running one in place; the reason is printed. Exit 6 if
    graced has not answered within --timeout (whether it applied the file is unknown).
    A graced started with no config file reloads the embedded default; a file written
    since is named in a warning (restart graced to use it), exit 0.
    """
    try:
        result = perform(lambda: OneCall(
            endpoint_of(ctx), "reload", {}, timeout,
            f"graced did not answer the reload within {timeout:g} s (whether it applied the "
            "file is unknown: see gracectl status)"))
    except RemoteError as exc:
        if as_json and exc.code_name == "invalid":  # refused: scripts read why on stdout
            print_json({"applied": False, "error": {"code": exc.code_name,
                                                    "message": str(exc)}})
        raise
    if as_json:
        print_json(result)
        return
    # The daemon names every change (detectors, playbooks and the missions whose plan
    # changed, notifiers, each table's keys) in one line.
    stderr_note(f"reloaded {result['source']} (sha256 {result['sha256'][:12] or '-'}): "
                f"{result.get('summary') or 'nothing changed'}")
    for warning in result["warnings"]:
        stderr_note(f"warning: {warning}")


# -- detectors --------------------------------------------------------------------

@cli.command()
@wide_option
@json_option
@click.pass_context
def detectors(ctx: click.Context, as_json: bool) -> None:
    """Each detector's state and last sample per subject."""
    result = perform(lambda: call(endpoint_of(ctx), "detectors", {}))
    if as_json:
        print_json(result["detectors"])
        return
    rows = []
    for name, d in result["detectors"].items():
        subjects = d["subjects"] or {"": None}
        mode = str(d.get("mode") or "poll")[:11]  # an older graced says nothing: it polls
        # Why a listening kind polls (or polls some): said after the reason, read whole.
        note = f"; mode: {d['mode_note']}" if d.get("mode_note") else ""
        if d.get("skipped"):  # samples not taken: a value file caught while rewritten
            note += f"; {d['skipped']} skipped (last: {d.get('last_skipped')})"
        for subject, smp in subjects.items():
            if smp is None:
                rows.append([name, d["kind"], d["state"], mode, "", "", "",
                             out.Cell(f"FAILING: {d['last_error']}", "red")
                             if d["last_error"] else ""])
                continue
            value = (out.quantity(smp["value"], str(smp["unit"] or ""))
                     if isinstance(smp["value"], (int, float)) else "")
            why: str | out.Cell = out.reason(smp["summary"], name, subject) + note
            if d["state"] == "error" and d.get("last_error"):
                # The sample is an old one: say why there is no newer one.
                why = out.Cell(f"FAILING: {d['last_error']} (last sample "
                               f"{out.age(result['now'] - smp['ts'])} ago)", "red")
            elif smp["anomalous"]:
                why = out.Cell(f"ANOMALY: {why}", "red")
            rows.append([name, d["kind"], d["state"], mode, subject, value,
                         out.age(result["now"] - smp["ts"]), why])
    out.write(out.table(rows, DETECTOR_COLUMNS))


DETECTOR_COLUMNS = [
    out.Column("DETECTOR", 2, 8), out.Column("KIND", 1, 6), out.Column("STATE", 1, 5),
    out.Column("MODE"), out.Column("SUBJECT", 3, 8, keep_end=True),
    out.Column("VALUE"), out.Column("SAMPLED"), out.Column("REASON", 1, 24, spill=True),
]


@keys.command("generate")
@click.option("--force", is_flag=True, help="Replace an existing client key.")
def keys_generate(force: bool) -> None:
    """Create this user's own signing key, for approvals over TCP.

    Prints the public key line to add to the daemon's [remediation] authorized_keys.
    """
    try:
        path, signer = trust.generate_client_key(force)
    except FileExistsError as exc:
        raise CtlError(f"{exc} exists; use --force to replace it") from None
    stderr_note(f"wrote {path} (mode 0600) and {path}.pub")
    click.echo(f"ed25519 {base64.b64encode(signer.public_key).decode()} {signer.kid}")


# -- emit -------------------------------------------------------------------------

@cli.command()
@click.argument("topic")
@click.option("--payload", default="{}", metavar="JSON",
              help="The event's payload: a JSON object.")
@click.option("--count", type=click.IntRange(1, 10_000_000), default=1, show_default=True,
              help="Publish this many events (for load tests).")
@click.option("--rate", type=Finite(0.001, 1e6, "rate"), metavar="PER_SECOND",
              help="Pace --count events at this rate.")
@click.option("--no-wait", is_flag=True,
              help="Return once queued instead of when the last event is journaled.")
@json_option
@click.pass_context
def emit(ctx: click.Context, topic: str, payload: str, count: int, rate: float | None,
         no_wait: bool, as_json: bool) -> None:
    """Publish a signed user event (TOPIC must start with 'user.'), e.g. an annotation."""
    bad = user_topic_error(topic)
    if bad:
        raise click.BadParameter(f"{out.safe(out.as_typed(topic), 60)}: {bad}",
                                 param_hint="TOPIC")
    try:
        data = json.loads(payload)
    except RecursionError:
        raise click.BadParameter("not JSON: nested too deep", param_hint="--payload") from None
    except ValueError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="--payload") from None
    if not isinstance(data, dict):
        raise click.BadParameter("must be a JSON object ({...}), as every event's payload "
                                 "is", param_hint="--payload")
    from graced.protocol.canonical import canonical_bytes

    try:  # what an event cannot carry (1e400, NaN, 2**64): refused here, as graced would
        canonical_bytes(data)
    except (ValueError, RecursionError) as exc:
        why = "nested too deep" if isinstance(exc, RecursionError) else out.safe(str(exc), 100)
        raise click.BadParameter(f"no canonical JSON form: {why}",
                                 param_hint="--payload") from None
    endpoint = endpoint_of(ctx)
    # Waiting for many events to be journaled takes longer than one answer: a second
    # more per 1000 events (graced journals tens of thousands a second), or the rate's.
    answer = endpoint.answer_timeout + (0.0 if no_wait or count == 1 else
                                        count / rate if rate else count / 1000)
    result = perform(lambda: call(endpoint, "emit", {
        "topic": topic, "payload": data, "count": count, "rate": rate, "wait": not no_wait},
        answer))
    if as_json:
        print_json(result)
    elif "first_seq" in result:
        click.echo(f"published seq {result['first_seq']}")
    elif "last_seq" in result:
        click.echo(f"published {result['count']} events, last seq {result['last_seq']}")
    else:
        stderr_note(f"queued {result['queued']} events")



def main() -> None:
    """Run gracectl; exit at once when done (a one-shot command's answer is printed:
    the interpreter's teardown would only add to a script's wait)."""
    code = _main()
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        pass  # a closed pipe: what was printed is all the reader wanted
    try:
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    os._exit(code)


def _name_the_place(exc: click.UsageError) -> click.UsageError:
    """An option of gracectl itself given after the command (``status --answer-timeout
    3``): say where it goes rather than only that the command has no such option; and
    the other way round, a command's option given before it (``gracectl --json status``)."""
    if not isinstance(exc, click.NoSuchOption) or exc.ctx is None:
        return exc
    if exc.ctx.command is cli:
        return _after_the_command(exc, exc.ctx)
    for param in cli.params:
        if isinstance(param, click.Option) and not param.is_eager and \
                exc.option_name in param.opts:
            value = f" {param.metavar}" if param.metavar and not param.is_flag else ""
            return click.UsageError(
                f"{exc.option_name} is an option of gracectl itself: give it before the "
                f"command (gracectl {exc.option_name}{value} "
                f"{exc.ctx.command_path.partition(' ')[2]} ...)", exc.ctx)
    return exc


def _after_the_command(exc: click.NoSuchOption, ctx: click.Context) -> click.UsageError:
    """A command's own option given before the command: say it goes after it, naming
    the command the line gives (its subcommand too) if that command has the option."""
    command: click.Command = cli
    path: list[str] = []
    for arg in sys.argv[1:]:
        if not isinstance(command, click.Group):
            break
        sub = None if arg.startswith("-") else command.get_command(ctx, arg)
        if sub is not None:
            command, path = sub, [*path, arg]
    name = exc.option_name.partition("=")[0]
    if command is cli or not any(isinstance(p, click.Option) and name in p.opts
                                 for p in command.params):
        return exc
    return click.UsageError(f"{name} goes after the command (gracectl {' '.join(path)} "
                            f"{name})", ctx)


def _main() -> int:
    """Run the command line; the exit status. Every error is one line on stderr (with
    GRACE_DEBUG=1 an unexpected one also shows its traceback)."""
    try:
        cli.main(standalone_mode=False)
        return 0
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            return int(exc.code or 0)
        click.echo(f"gracectl: {out.safe(exc.code)}", err=True)
        return int(ExitCode.ERROR)
    except CtlError as exc:
        if exc.code != ExitCode.OK:
            click.echo(f"gracectl: {out.safe(exc)}", err=True)
        return int(exc.code)
    except Violation as exc:
        click.echo(f"gracectl: verification failed: {out.safe(exc)}", err=True)
        return int(exc.code)
    except click.UsageError as exc:
        _name_the_place(exc).show()
        return int(ExitCode.USAGE)
    except click.ClickException as exc:
        exc.show()
        return int(ExitCode.ERROR)
    except click.exceptions.Abort as exc:
        # click turns SIGINT into Abort (from KeyboardInterrupt): gracectl.1 says 130.
        return 130 if isinstance(exc.__cause__, KeyboardInterrupt) else int(ExitCode.ERROR)
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - until exit
        return 0
    except OSError as exc:  # a file or socket the command touched, named by the OS
        where = f"{exc.filename}: " if exc.filename else ""
        click.echo(f"gracectl: {out.safe(where)}{out.safe(exc.strerror or exc)}", err=True)
        return int(ExitCode.ERROR)
    except Exception as exc:  # noqa: BLE001 - the promise: one line, never a traceback
        if os.environ.get("GRACE_DEBUG") == "1":
            import traceback

            traceback.print_exc()
        click.echo(f"gracectl: internal error: {type(exc).__name__}: {out.safe(exc)} "
                   "(GRACE_DEBUG=1 shows where; please report it)", err=True)
        return int(ExitCode.ERROR)


@cli.command()
@click.option("--once", is_flag=True, help="Print one frame as plain text and exit.")
@click.option("--key", "key_file", metavar="KEYFILE", type=click.Path(dir_okay=False),
              help="Trust this public key (key.pub) instead of the pinned one.")
@click.option("--interval", type=Finite(0.2, 3600), default=1.0, show_default=True,
              metavar="SECONDS", help="How often to refresh status, missions and detectors.")
@click.option("--fleet", "fleet_view", is_flag=True,
              help="The whole fleet instead, from NATS JetStream (env GRACE_NATS, and "
                   "GRACE_STREAM, GRACE_NATS_CREDS as for gracectl fleet): hosts and open "
                   "missions, every host verified against its pinned key.")
@click.pass_context
def top(ctx: click.Context, once: bool, key_file: str | None, interval: float,
        fleet_view: bool) -> None:
    """Mission Control: a live dashboard of missions, activity and health.

    Every frame is verified as 'tail --verify' does; the header turns red with the
    reason the moment one does not check out. Keys: q quit, j/k or arrows move, Enter
    detail, a approve, r reject (each asks to confirm). With --fleet: every host that
    forwards to NATS (as gracectl fleet ls and fleet missions ls); q quits.
    """
    if not once and not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise CtlError("gracectl top needs a terminal; use --once for one plain-text frame",
                       ExitCode.USAGE)
    if fleet_view:
        _fleet_top(once, key_file, interval)
        return
    from . import top as dashboard

    endpoint = endpoint_of(ctx)

    async def go() -> tuple[str, ExitCode] | None:
        opts = dashboard.Options(trusted_key(endpoint, key_file), once, interval)
        if once:
            import shutil

            size = shutil.get_terminal_size((100, 40))
            return await dashboard.run_once(endpoint, opts, size.columns, size.lines)
        await dashboard.run_live(endpoint, opts)
        return None

    try:
        result = perform(go)
    except Violation as exc:
        raise CtlError(f"verification failed: {exc}", exc.code) from None
    if result is not None:
        click.echo(result[0])
        if result[1] != ExitCode.OK:
            raise CtlError("verification failed (see the frame's signature line)", result[1])


def _fleet_top(once: bool, key_file: str | None, interval: float) -> None:
    """``top --fleet``: NATS from the environment, as gracectl fleet takes it."""
    import shutil

    from graced.protocol import fleet as names

    from . import fleettop

    url = os.environ.get("GRACE_NATS", "")
    if key_file:
        raise click.UsageError("--key is for one daemon; the fleet's keys are pinned per "
                               "host (gracectl fleet trust HOST)")
    if not url.startswith(("nats://", "tls://")):
        raise click.UsageError("top --fleet reads NATS at GRACE_NATS (nats://HOST:PORT or "
                               "tls://…, as gracectl fleet --nats)")
    obj = {"nats": url, "stream": os.environ.get("GRACE_STREAM") or names.DEFAULT_STREAM,
           "creds": os.environ.get("GRACE_NATS_CREDS") or None, "timeout": 5.0}
    if once:
        size = shutil.get_terminal_size((100, 40))
        fleettop.run_once(obj, size.columns, size.lines)
    else:
        fleettop.run_live(obj, interval)
