"""gracectl's ``silence add|ls|rm``: maintenance that pauses remediation and notification.

Put on gracectl's root group by :mod:`gracectl.cli`.
"""

from __future__ import annotations

import re
from typing import Any

import click

from . import out
from .command import HelpGroup, call, endpoint_of, json_option, perform, print_json
from .out import safe, stderr_note

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")


def parse_duration(text: str) -> float:
    """``90s``, ``15m``, ``2h``, ``1h30m``, ``1d`` or plain seconds -> seconds."""
    t = text.strip().lower()
    try:
        return float(t)
    except ValueError:
        pass
    parts = _PART.findall(t)
    if not parts or "".join(a + b for a, b in parts) != t:
        raise click.BadParameter(f"{text!r} is not a duration (e.g. 90s, 15m, 2h, 1h30m, 1d)",
                                 param_hint="--for")
    return sum(float(n) * UNITS[u] for n, u in parts)


def _until(epoch: float, now: float) -> str:
    return f"{out.when(epoch)} (in {out.age(epoch - now)})"


@click.group(cls=HelpGroup)
def silence() -> None:
    """Silences: while one covers a mission, nothing runs for it and no one is told."""


@silence.command("add")
@click.argument("target", required=False, metavar="DETECTOR[:SUBJECT]")
@click.option("--all", "everything", is_flag=True, help="Silence every detector.")
@click.option("--for", "duration", required=True, metavar="DURATION",
              help="How long: 90s, 15m, 2h, 1h30m, 1d (at most 90 days).")
@click.option("--comment", required=True, metavar="TEXT", help="Why (recorded, shown).")
@click.option("--until-resolved", is_flag=True,
              help="End it early, once the missions it holds back have all closed.")
@json_option
@click.pass_context
def silence_add(ctx: click.Context, target: str | None, everything: bool, duration: str,
                comment: str, until_resolved: bool, as_json: bool) -> None:
    """Silence DETECTOR (or one SUBJECT of it, a glob) or --all for a while.

    Anomalies are still detected and recorded, missions still open, but no playbook runs
    for a silenced mission and no notifier is told. Needs control rights.
    """
    if bool(target) == everything:
        raise click.UsageError("give DETECTOR[:SUBJECT] or --all (one of them)")
    seconds = parse_duration(duration)
    result = perform(lambda: call(endpoint_of(ctx), "silence.add", {
        "target": None if everything else target, "duration": seconds, "comment": comment,
        "until_resolved": until_resolved}))
    s = result["silence"]
    if result.get("warning"):
        stderr_note(f"warning: {result['warning']}")
    if as_json:
        print_json(s)
        return
    out.echo(s["id"])
    stderr_note(f"silence {s['id']}: {safe(s['target'])} until "
                f"{_until(s['expires_at'], s['created_at'])}"
                + (" or until its missions close" if s["until_resolved"] else ""))


@silence.command("ls")
@json_option
@click.pass_context
def silence_ls(ctx: click.Context, as_json: bool) -> None:
    """List the silences in force: target, until when, who, why, missions held."""
    result = perform(lambda: call(endpoint_of(ctx), "silence.list", {}))
    rows: list[dict[str, Any]] = result["silences"]
    if as_json:
        print_json(rows)
        return
    if not rows:
        stderr_note("no silences")
        return
    now = result["now"]
    table = [[s["id"], safe(s["target"]), _until(s["expires_at"], now)
              + (" or resolved" if s["until_resolved"] else ""), safe(s["by"]),
              ",".join(str(m) for m in s["missions"]) or "-", safe(s["comment"])[:60]]
             for s in rows]
    out.write(out.table(table, ["ID", "TARGET", "UNTIL", "BY", "MISSIONS",
                                        "COMMENT"]))


@silence.command("rm")
@click.argument("silence_id", metavar="ID", type=int)
@json_option
@click.pass_context
def silence_rm(ctx: click.Context, silence_id: int, as_json: bool) -> None:
    """Remove silence ID now; missions it held back are considered again. Control rights."""
    result = perform(lambda: call(endpoint_of(ctx), "silence.remove", {"id": silence_id}))
    if as_json:
        print_json(result["silence"])
    else:
        stderr_note(f"silence {silence_id} removed")
