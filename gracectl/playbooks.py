"""gracectl's remediation commands: ``playbooks ls|run`` and the plan a mission carries.

Put on gracectl's command groups by :mod:`gracectl.cli`.
"""

from __future__ import annotations

import sys

import click

from . import out
from .command import (
    HelpGroup,
    call,
    endpoint_of,
    json_option,
    perform,
    print_json,
    wide_option,
)
from .errors import CtlError
from .missions import check_plan_option, print_plan_lines
from .out import safe, stderr_note
from .plan_text import render_plan


@click.group(cls=HelpGroup)
def playbooks() -> None:
    """Playbooks: what they match, their budget and record; run one by hand."""


@playbooks.command("ls")
@wide_option
@json_option
@click.pass_context
def playbooks_ls(ctx: click.Context, as_json: bool) -> None:
    """List the playbooks: match, risk, budget left, and learned success and runs.

    SUCCESS and RUNS are the credited runs knowledge counts (after any knowledge reset);
    "demoted (N)": demoted on N patterns (knowledge show PATTERN)."""
    result = perform(lambda: call(endpoint_of(ctx), "playbooks.list", {}))
    rows = result["playbooks"]
    if as_json:
        print_json(result)
        return
    if not rows:
        stderr_note("no playbooks configured (remediation is observe-only until one is)")
        return
    table = []
    for pb in rows:
        mt = pb["match"]
        match = " ".join(x for x in (
            f"detector={mt['detector']}" if mt["detector"] else "",
            f"kind={mt['kind']}" if mt["kind"] else "",
            f"subject={mt['subject']}" if mt["subject"] != "*" else "",
            f"severity={','.join(mt['severities'])}" if mt["severities"] else "") if x) or "any"
        lr = pb["learned"]
        success = "-" if lr["success_rate"] is None else f"{lr['success_rate'] * 100:.0f}%"
        if lr.get("demoted"):
            success += f" demoted ({len(lr['demoted'])})"
        last = "-" if lr["last_run"] is None else out.age(result["now"] - lr["last_run"]) + " ago"
        table.append([safe(pb["name"]), safe(match), pb["risk"] + ("" if pb["auto"] else
                                                                   " (approval)"),
                      ",".join(pb["steps"]),
                      f"{pb['budget_left']}/{pb['budget']} per {pb['budget_window']:g}s",
                      success, lr["runs"], last])
    dropped: list[str] = []
    out.write(out.table(table, PLAYBOOK_COLUMNS, dropped=dropped))
    mode = result["mode"] + (", paused" if result["paused"] else "")
    stderr_note(f"remediation: {mode}; {result['global_left']} automatic actions left this "
                "hour" + (f" ({', '.join(dropped)} left out to fit the terminal: --wide "
                          "shows them)" if dropped else ""))


PLAYBOOK_COLUMNS = [
    # The name is what 'playbooks run NAME' takes: never cut (kubectl never cuts NAME).
    # Too wide, the match goes whole under its row, the steps are cut; then RUNS, LAST
    # RUN, SUCCESS, STEPS, BUDGET LEFT and RISK are left out, in that order, as a long
    # name needs (the note on stderr names them).
    out.Column("PLAYBOOK"), out.Column("MATCH", 3, 24, spill=True), out.Column("RISK", drop=1),
    out.Column("STEPS", 2, 5, drop=3), out.Column("BUDGET LEFT", drop=2),
    out.Column("SUCCESS", 1, 7, drop=4), out.Column("RUNS", drop=6),
    out.Column("LAST RUN", drop=5)]


@playbooks.command("run")
@click.argument("name")
@click.option("--mission", "mission_id", required=True, type=int, metavar="ID",
              help="The mission to run it for (its values fill the placeholders).")
@click.option("--dry-run", is_flag=True,
              help="Print exactly what would run (argv, unit, signal, targets); run nothing.")
@click.option("--plan", "plan", metavar="SHA256",
              help="The hash of the plan you reviewed (--dry-run), or a prefix of at least "
                   "12 hex digits; graced refuses to run another one.")
@click.option("--yes", "-y", "yes", is_flag=True,
              help="Run a high or critical risk playbook's plan without reviewing it here.")
@json_option
@click.pass_context
def playbooks_run(ctx: click.Context, name: str, mission_id: int, dry_run: bool,
                  plan: str | None, yes: bool, as_json: bool) -> None:
    """Run playbook NAME for mission ID now (control rights), or show what would run.

    A real run is journaled like any other: the mission goes to approved (run by hand by
    you), executing, verifying; as a run a person approved, it spends no budget (budgets
    ration automatic runs). A high or critical risk
    playbook needs what an approval needs: on a terminal its plan is printed and you are
    asked y/N (n runs nothing, exit 1); without one, --plan SHA256 or --yes (exit 2
    otherwise). Exit 5: no such playbook or mission; 9: the mission is not open,
    interrupted or waiting for approval (closed, or already running a plan).
    """
    plan = check_plan_option(plan)
    dry = perform(lambda: call(endpoint_of(ctx), "playbooks.run", {
        "name": name, "mission": mission_id, "dry_run": True}))
    if dry_run:
        if as_json:
            print_json(dry)
            return
        m = dry["mission"]
        print_plan_lines([f"dry run for mission {m['id']} ({safe(m['detector'])}:"
                          f"{safe(m['subject'])}, {safe(m['state'])}): nothing was run",
                          *render_plan(dry["plan"])], err=False)
        return
    shown = dry["plan"]
    if plan is None and not yes and shown["risk"] not in ("low", "medium"):
        if not (sys.stdin.isatty() and sys.stderr.isatty()):
            raise click.UsageError(f"{name} is of risk {shown['risk']}: without a terminal to "
                                   "review its plan on, name it: --plan SHA256 (--dry-run) "
                                   "or --yes")
        print_plan_lines([f"mission {mission_id} would run this plan:", *render_plan(shown)])
        if not click.confirm("run this plan now?", default=False, err=True):
            raise CtlError("not run: nothing was sent")
    result = perform(lambda: call(endpoint_of(ctx), "playbooks.run", {
        "name": name, "mission": mission_id, "dry_run": False,
        "opened": dry["mission"]["opened_at"], "plan": plan or shown["sha256"]}))
    if as_json:
        print_json(result)
        return
    m = result["mission"]
    stderr_note(f"mission {m['id']}: {m['state']} ({safe(m['reason'])}); follow it with "
                f"'gracectl wait {m['id']} --state resolved'")
