"""``gracectl missions``: list, show, approve and reject missions (``missions explain``
and ``similar`` are the learning's, in :mod:`gracectl.learn`)."""

from __future__ import annotations

import re
import sys
from typing import Any

import click

from graced.protocol import ExitCode

from . import out
from .command import (
    STATES,
    LazyGroup,
    call,
    endpoint_of,
    json_option,
    perform,
    print_json,
    trusted_key,
    utc_option,
    wide_option,
)
from .errors import CtlError
from .out import stderr_note
from .plan_text import no_value, render_plan, signal_target, skipped_lines, step_result

SEVERITIES = ("low", "medium", "high", "critical")
WHY_STATES = ("escalated", "failed", "expired")
"""States whose reason missions ls adds to the symptom (why it escalated, failed or
expired)."""
SEVERITY_COLOUR = {"low": "cyan", "medium": "yellow", "high": "red", "critical": "magenta"}




@click.group(cls=LazyGroup, lazy={"similar": "gracectl.learn:missions_similar",
                                 "explain": "gracectl.learn:missions_explain"})
def missions() -> None:
    """Missions: what graced noticed and what it is doing about it."""


@missions.command("ls")
@wide_option
@click.option("--state", "states", multiple=True, type=click.Choice(STATES),
              help="Only missions in this state (repeatable).")
@click.option("--severity", "severities", multiple=True, type=click.Choice(SEVERITIES),
              help="Only missions of this severity (repeatable).")
@click.option("--all", "show_all", is_flag=True, help="Include closed missions.")
@click.option("--limit", type=click.IntRange(1, 10000), default=200, show_default=True,
              help="At most this many, newest first.")
@json_option
@click.pass_context
def missions_ls(ctx: click.Context, states: tuple[str, ...], severities: tuple[str, ...],
                show_all: bool, limit: int, as_json: bool) -> None:
    """List missions: by default the active ones and the escalated or expired (nobody
    decided) ones that need a person (symptom not seen normal since)."""
    result = perform(lambda: call(endpoint_of(ctx), "missions.list", {
        "states": list(states) or None, "severities": list(severities) or None,
        "all": show_all, "limit": limit}))
    rows = result["missions"]
    if as_json:
        print_json(rows)
        return
    if not rows:
        stderr_note("no missions" + ("" if show_all or states else " open (--all for closed)"))
        return
    table = []
    for m in rows:
        sev = out.Cell(m["severity"] + ("!" if m["flapping"] else ""),
                       SEVERITY_COLOUR.get(m["severity"]))
        held = m.get("silenced") or {}
        state = m["state"] + ("" if not held else f", was silenced #{held['id']}"
                               if held.get("ended_at") else f", silenced #{held['id']}")
        why = out.reason(m["summary"], m["detector"], m["subject"])
        if m["state"] in WHY_STATES and m.get("reason"):
            why += f"; {m['state']}: {m['reason']}"  # why a person has it now
        table.append([str(m["id"]), sev, state, m["detector"], m["subject"],
                      m["playbook"] or "-", out.age(result["now"] - m["opened_at"]), why])
    out.write(out.table(table, MISSION_COLUMNS))


MISSION_COLUMNS = [
    out.Column("ID", right=True), out.Column("SEVERITY"), out.Column("STATE", 1, 9),
    out.Column("DETECTOR", 2, 6), out.Column("SUBJECT", 3, 6, keep_end=True),
    out.Column("PLAYBOOK", 2, 6), out.Column("AGE"), out.Column("REASON", 1, 24, spill=True),
]



@missions.command("show")
@click.argument("mission_id", metavar="ID", type=int)
@utc_option
@wide_option
@json_option
@click.pass_context
def missions_show(ctx: click.Context, mission_id: int, as_json: bool) -> None:
    """Show one mission: symptoms, the samples that triggered it, its timeline."""
    result = perform(lambda: call(endpoint_of(ctx), "missions.get", {"id": mission_id}))
    if as_json:
        print_json(result["mission"])
        return
    # Each field escaped, then long lines folded to the terminal (whole when piped).
    out.write(out.fold(out.safe_text(mission_text(result))))


def mission_text(result: dict[str, Any], approve: str = "gracectl missions approve") -> str:
    """missions.get's answer for a human (missions show, fleet missions show); ``approve``
    is the command that approves it from where it is shown, before its id."""
    m = result["mission"]
    # Each field is escaped on its own (newlines too): a comment, a unit's description or
    # a step's output cannot forge a line of its own ("approved by root").
    f = out.safe
    flap = " (flapping)" if m["flapping"] else ""
    lines = [
        f"mission {m['id']}: {f(m['summary'])}",
        f"  state       {f(m['state'])}",
        f"  severity    {f(m['severity'])}{flap}",
        f"  detector    {f(m['detector'])} ({f(m['kind'])})",
        f"  subject     {f(m['subject'])}",
        f"  opened      {out.when(m['opened_at'])} ({out.age(result['now'] - m['opened_at'])} ago)",
        f"  occurrences {f(m['occurrences'])}, " + (
            "the last sample had no value" if m["last_value"] is None
            else f"last value {f(out.value(m['last_value']))}"),
    ]
    if m["closed_at"]:
        lines.append(f"  closed      {out.when(m['closed_at'])}")
    if m["playbook"]:
        lines.append(f"  playbook    {f(m['playbook'])} (risk {f(m['risk'])})")
    if m["reason"]:
        lines.append(f"  reason      {f(m['reason'])}")
    if m["expires_at"] and m["state"] == "awaiting_approval":
        lines.append(f"  expires     {out.when(m['expires_at'])}")
    if m.get("plan"):
        if m["state"] == "awaiting_approval":
            lines.append(f"awaiting approval of this plan ({approve} {m['id']}):")
        lines.extend(render_plan(m["plan"]))
    if m["steps"]:
        lines.append("steps:")
        for st in m["steps"]:
            what = signal_target(st) if st.get("action") == "signal" else (
                " ".join(st.get("argv") or []) or st.get("unit") or "")
            lines.append(f"  {f(st['step'])}. {f(st['action'])} {f(what)}: "
                         f"{step_result(st)}")
            if st.get("pids"):
                count = st.get("pids_count")  # graced lists at most 100 of them
                more = count - len(st["pids"]) if isinstance(count, int) else 0
                lines.append("       signalled pids " + ", ".join(f(p) for p in st["pids"])
                             + (f" and {more} more" if more > 0 else ""))
            lines.extend(skipped_lines(st))
            for out_line in out.safe_lines(st.get("output") or "")[-5:]:
                lines.append(f"       | {out_line}")
    if m["verification"]:
        v = m["verification"]
        lines.append(f"verification: {f(v['result'])} ({f(v.get('detail', ''))})")
    if m["approvals"]:
        lines.append("approvals:")
        for a in m["approvals"]:
            note = f": {f(a['comment'])}" if a.get("comment") else ""
            lines.append(f"  {out.when(a['at'])}  {f(a['decision'])} by "
                         f"{f(a.get('user') or '?')} ({f(a.get('auth') or '?')}){note}")
    lines.append("samples:")
    for smp in m["samples"]:
        lines.append(f"  {out.when(smp['ts'])}  {f(no_value(smp['value']))}  "
                     f"{f(smp['summary'])}")
    lines.append("timeline:")
    for t in m["timeline"]:
        lines.append(f"  {out.when(t['ts'])}  {f(t['from'] or '-')} -> {f(t['to'])}  "
                     f"{f(t['reason'])}")
    return "\n".join(lines)


def _decide(ctx: click.Context, mission_id: int, comment: str, approve: bool,
            as_json: bool, plan: str | None = None, show_plan: bool = False,
            clearing: bool = False) -> None:
    async def run() -> Any:
        from .client import connect, decide

        endpoint = endpoint_of(ctx)
        async with connect(endpoint, trusted_key(endpoint)) as conn:
            return await decide(conn, mission_id, approve, comment, plan, clearing)

    result = perform(run)
    m = result["mission"]
    if as_json:
        # A warning (the latest sample was normal) rides along with the mission.
        print_json({**m, "warning": result["warning"]} if result.get("warning") else m)
        return
    if approve and m.get("plan"):
        if show_plan:  # --yes: what was approved, line by line
            print_plan_lines(["approved:", *render_plan(m["plan"])])
        else:
            stderr_note(f"approved plan sha256 {m['plan']['sha256']}")
    stderr_note(f"mission {m['id']}: {m['state']} ({m['reason']})")
    if result.get("warning"):
        stderr_note(f"warning: {result['warning']}")


def print_plan_lines(lines: list[str], err: bool = True) -> None:
    """A rendered plan on stderr (stdout: ``err`` false; render_plan escaped its fields),
    its long lines folded to that terminal's width as ``missions show`` folds them, each
    continuation indented under its text (whole when not a terminal)."""
    stream = sys.stderr if err else sys.stdout
    print(out.fold("\n".join(lines), stream=stream), file=stream, flush=True)


def check_plan_option(plan: str | None) -> str | None:
    """--plan names a plan by its SHA-256 or a prefix of at least 12 hex digits, in
    either case (usage error, exit 2, otherwise); graced checks it against the plan it
    would run. Returns it in lower case, as graced writes hashes."""
    if plan is None:
        return None
    if not re.fullmatch(r"[0-9a-fA-F]{12,64}", plan):
        raise click.BadParameter("not a SHA-256, or a prefix of at least 12 of its hex "
                                 "digits", param_hint="--plan")
    return plan.lower()


def _review(ctx: click.Context, mission_id: int) -> str | None:
    """On a terminal: the plan the mission waits with, then y/N; the hash approved."""
    return review_plan(perform(lambda: call(endpoint_of(ctx), "missions.get",
                                          {"id": mission_id}))["mission"])


def review_plan(m: dict[str, Any]) -> str | None:
    """The plan mission ``m`` waits with, then y/N on the terminal; the hash approved
    (CtlError, exit 1, when not; exit 9, nothing asked, when it waits for no decision)."""
    if m.get("state") != "awaiting_approval":
        raise CtlError(f"mission {m.get('id')} is {out.safe_text(str(m.get('state')))}, not "
                       "waiting for a decision: nothing was sent", ExitCode.NOT_WAITING)
    plan = m.get("plan")
    if plan:
        print_plan_lines([f"mission {m['id']} ({m['state']}) would run this plan:",
                          *render_plan(plan)])
    if not click.confirm(f"approve mission {m['id']}" + (" and run this plan" if plan else "")
                         + "?", default=False, err=True):
        raise CtlError("not approved: nothing was sent")
    return str(plan["sha256"]) if plan else None


@missions.command("approve")
@click.argument("mission_id", metavar="ID", type=int)
@click.option("--comment", default="", metavar="TEXT", help="Recorded with the approval.")
@click.option("--plan", "plan", metavar="SHA256",
              help="The hash of the plan you reviewed (missions show), or a prefix of at "
                   "least 12 hex digits; graced refuses the approval if the mission would "
                   "run another plan.")
@click.option("--yes", "-y", "yes", is_flag=True,
              help="Approve the plan the mission waits with now without reviewing it here "
                   "(printed on stderr afterwards).")
@click.option("--even-if-clearing", "clearing", is_flag=True,
              help="Run the plan even if the symptom's latest samples were normal "
                   "(otherwise such an approval is refused, exit 1).")
@json_option
@click.pass_context
def missions_approve(ctx: click.Context, mission_id: int, comment: str, plan: str | None,
                     yes: bool, clearing: bool, as_json: bool) -> None:
    """Approve a mission awaiting approval: its plan runs now (under a silence: when the
    silence ends; the approval is recorded now).

    On a terminal, without --plan or --yes, the plan is printed and you are asked y/N;
    the approval names the hash of the plan you saw. Without a terminal, --plan SHA256
    or --yes is required (exit 2); answering n sends nothing (exit 1). If the playbook
    changed since (a config reload),
    graced refuses an approval of the old plan and the mission waits with its new plan.
    An approval while the symptom is clearing (its latest samples normal) is refused
    with the reason, unless --even-if-clearing.

    Exit 5: no such mission; 9: the mission is not waiting for a decision (approved or
    rejected already, executing, resolved, failed, expired...), its state named.
    """
    plan = check_plan_option(plan)
    if plan is None and not yes:
        if not (sys.stdin.isatty() and sys.stderr.isatty()):
            raise click.UsageError("without a terminal to review the plan on, name it: "
                                   "--plan SHA256 (gracectl missions show ID) or --yes")
        plan = _review(ctx, mission_id)
    _decide(ctx, mission_id, comment, True, as_json, plan, show_plan=yes and plan is None,
            clearing=clearing)


@missions.command("reject")
@click.argument("mission_id", metavar="ID", type=int)
@click.option("--comment", default="", metavar="TEXT", help="Recorded with the rejection.")
@json_option
@click.pass_context
def missions_reject(ctx: click.Context, mission_id: int, comment: str, as_json: bool) -> None:
    """Reject a mission awaiting approval: nothing runs.

    Exit 5: no such mission; 9: the mission is not waiting for a decision (approved or
    rejected already, executing, resolved, failed, expired...), its state named.
    """
    _decide(ctx, mission_id, comment, False, as_json)
