"""gracectl's learning commands: ``missions similar``, ``missions explain``, ``knowledge``.

Registered on the groups of :mod:`gracectl.cli` when that module is imported.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import click
from tabulate import tabulate

from graced.protocol import ExitCode

from .cli import _age, _call, _endpoint, _print_json, _run, _ts, cli, json_option, missions
from .errors import CtlError
from .tail import stderr_note

EXPORT_FORMAT = "grace-knowledge"
CHUNK_BYTES = 48_000  # below the daemon's default max_request_bytes (65536)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:.0f}%"


def _secs(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}s"


def _similar_rows(similar: list[dict[str, Any]]) -> list[list[Any]]:
    return [[s["id"], s["match"], f"{s['detector']}:{s['subject']}", s["playbook"] or "-",
             s["outcome"], _secs(s["ttr"]), (s["summary"] or "")[:48]] for s in similar]


SIMILAR_HEADERS = ["ID", "MATCH", "SYMPTOM", "PLAYBOOK", "OUTCOME", "TTR", "SUMMARY"]


@missions.command("similar")
@click.argument("mission_id", metavar="ID", type=int)
@click.option("--limit", type=click.IntRange(1, 1000), default=10, show_default=True,
              help="At most this many past missions.")
@json_option
@click.pass_context
def missions_similar(ctx: click.Context, mission_id: int, limit: int, as_json: bool) -> None:
    """Past missions like this one: same detector and subject first, then by symptom text."""
    result = _run(lambda: _call(_endpoint(ctx), "missions.similar",
                                {"id": mission_id, "limit": limit}))
    if as_json:
        _print_json(result)
        return
    m = result["mission"]
    stderr_note(f"mission {m['id']} ({m['detector']}:{m['subject']}): "
                f"{len(result['similar'])} similar past missions "
                f"(lookup {result['lookup_ms']:.1f} ms)")
    if result["similar"]:
        click.echo(tabulate(_similar_rows(result["similar"]), headers=SIMILAR_HEADERS))


def explain_lines(m: dict[str, Any], now: float) -> list[str]:
    """The decision behind a mission, short enough to read in ten seconds."""
    flap = ", flapping" if m["flapping"] else ""
    lines = [f"mission {m['id']}  {m['detector']}:{m['subject']}  {m['severity']}{flap}  "
             f"{m['state']}"]
    values = [s["value"] for s in m["samples"] if s.get("value") is not None]
    peak = f", peak {max(values):g}" if values else ""
    lines.append(f"evidence  {m['summary']} ({m['occurrences']} samples{peak}; opened "
                 f"{_age(now - m['opened_at'])} ago)")
    d = m.get("decision")
    if d is None:
        lines.append("memory    not consulted (no playbook decision was needed for it)")
    else:
        sim = d["similar"]
        lines.append(f"memory    {sim['found']} similar past missions ({sim['same_key']} same "
                     f"detector and subject, {sim['text']} by symptom text), {sim['resolved']} "
                     f"resolved; lookup {d['lookup_ms']:.1f} ms")
        for s in m.get("similar", [])[:3]:
            lines.append(f"          #{s['id']} {s['playbook'] or '-'} -> {s['outcome']}"
                         f" ({s['match']})")
        if d["candidates"]:
            lines.append(f"ranking   {d['strategy']}:")
            rows = []
            for c in d["candidates"]:
                mark = "chosen" if c.get("chosen") else ("DEMOTED" if c["demoted"] else "")
                rows.append([c["playbook"], c["risk"], f"{c['successes']:g}/{c['runs']:g}",
                             _pct(c["ratio"]), f"{c['mean']:.2f}",
                             "-" if c["score"] is None else f"{c['score']:.2f}",
                             _secs(c["mttr_s"]), mark])
            table = tabulate(rows, headers=["PLAYBOOK", "RISK", "OK/RUNS", "RATE", "MEAN",
                                            "SCORE", "MTTR", ""])
            lines.extend("  " + row for row in table.splitlines())
        lines.append(f"choice    {d['reason']}")
    policy = next((t["reason"] for t in m["timeline"]
                   if t["to"] in ("approved", "awaiting_approval", "escalated")), None)
    if policy is None and m.get("reason") and m["state"] == "open":
        policy = m["reason"]
    lines.append(f"policy    {policy or 'no action taken'}")
    outcome = m["reason"] or m["state"]
    if m["state"] == "resolved" and m["closed_at"]:
        outcome = f"resolved in {_secs(m['closed_at'] - m['opened_at'])}: {m['reason']}"
    lines.append(f"outcome   {outcome}")
    return lines


@missions.command("explain")
@click.argument("mission_id", metavar="ID", type=int)
@json_option
@click.pass_context
def missions_explain(ctx: click.Context, mission_id: int, as_json: bool) -> None:
    """Why graced did what it did: evidence, similar missions, ranking, policy."""
    result = _run(lambda: _call(_endpoint(ctx), "missions.get", {"id": mission_id}))
    m = result["mission"]
    if as_json:
        _print_json({k: m.get(k) for k in ("id", "detector", "subject", "severity", "state",
                                           "summary", "samples", "similar", "decision",
                                           "playbook", "risk", "reason", "timeline")})
        return
    click.echo("\n".join(explain_lines(m, result["now"])))


@cli.group()
def knowledge() -> None:
    """What graced has learned: symptom patterns and the playbooks that fix them."""


@knowledge.command("ls")
@json_option
@click.pass_context
def knowledge_ls(ctx: click.Context, as_json: bool) -> None:
    """List learned patterns with their best playbook."""
    result = _run(lambda: _call(_endpoint(ctx), "knowledge.list", {}))
    if as_json:
        _print_json(result["patterns"])
        return
    rows = [[p["pattern"], p["best_playbook"] or "-", _pct(p["best_success_rate"]),
             _pct(p["success_rate"]), f"{p['count']:g}", _secs(p["mttr_s"]),
             _age(result["now"] - p["last_seen"]) + " ago"] for p in result["patterns"]]
    if not rows:
        stderr_note("no patterns learned yet")
        return
    click.echo(tabulate(rows, headers=["PATTERN", "BEST PLAYBOOK", "ITS RATE", "ALL RATE",
                                       "RUNS", "MTTR", "LAST SEEN"]))


@knowledge.command("show")
@click.argument("pattern")
@json_option
@click.pass_context
def knowledge_show(ctx: click.Context, pattern: str, as_json: bool) -> None:
    """Show one pattern (DETECTOR:SUBJECT): every playbook's record and recent missions."""
    result = _run(lambda: _call(_endpoint(ctx), "knowledge.show", {"pattern": pattern}))
    if as_json:
        _print_json(result)
        return
    p = result["pattern"]
    click.echo(f"pattern {p['pattern']}: best {p['best_playbook']}, {p['count']:g} runs, "
               f"success {_pct(p['success_rate'])}, MTTR {_secs(p['mttr_s'])}, last seen "
               f"{_ts(p['last_seen'])}")
    rows = [[b["playbook"], f"{b['successes']:g}", f"{b['failures']:g}",
             _pct(b["success_rate"]), f"{b['posterior_mean']:.2f}", _secs(b["mttr_s"]),
             "yes" if b["demoted"] else "", ",".join(b["sources"])] for b in p["playbooks"]]
    click.echo(tabulate(rows, headers=["PLAYBOOK", "OK", "FAILED", "RATE", "MEAN", "MTTR",
                                       "DEMOTED", "SOURCES"]))
    if result["recent"]:
        click.echo("recent missions:")
        for r in result["recent"][:10]:
            click.echo(f"  #{r['id']} {_ts(r['closed_at'])} {r['playbook'] or '-'} -> "
                       f"{r['outcome']}")


@knowledge.command("export")
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True))
@click.pass_context
def knowledge_export(ctx: click.Context, file: str) -> None:
    """Write every pattern to FILE as JSON ('-' for stdout), to seed another host."""
    data = _run(lambda: _call(_endpoint(ctx), "knowledge.export", {}))
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    if file == "-":
        click.echo(text, nl=False)
        return
    path = Path(file)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent or ".", prefix=f".{path.name}.")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as exc:
        raise CtlError(f"{file}: cannot write: {exc.strerror}") from None
    stderr_note(f"exported {len(data['patterns'])} playbook records to {file}")


def _load_export(file: str) -> dict[str, Any]:
    try:
        text = sys.stdin.read() if file == "-" else Path(file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CtlError(f"{file}: cannot read: {exc}", ExitCode.USAGE) from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise CtlError(f"{file}: not JSON: {exc}", ExitCode.USAGE) from None
    if not isinstance(data, dict) or data.get("format") != EXPORT_FORMAT:
        raise CtlError(f"{file}: format: not a '{EXPORT_FORMAT}' export", ExitCode.USAGE)
    if data.get("version") != 1:
        raise CtlError(f"{file}: version: {data.get('version')!r} is not supported (1 is)",
                       ExitCode.USAGE)
    if not isinstance(data.get("source"), str) or not data["source"]:
        raise CtlError(f"{file}: source: must be the exporting daemon's id", ExitCode.USAGE)
    if not isinstance(data.get("patterns"), list):
        raise CtlError(f"{file}: patterns: must be a list", ExitCode.USAGE)
    from graced.learning.knowledge import check

    try:
        check(data["patterns"])
    except ValueError as exc:
        raise CtlError(f"{file}: {exc}", ExitCode.USAGE) from None
    return data


@knowledge.command("import")
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True))
@json_option
@click.pass_context
def knowledge_import(ctx: click.Context, file: str, as_json: bool) -> None:
    """Take patterns another host exported; importing the same host again replaces them."""
    data = _load_export(file)
    chunks: list[list[Any]] = [[]]
    size = 0
    for p in data["patterns"]:
        n = len(json.dumps(p))
        if chunks[-1] and size + n > CHUNK_BYTES:
            chunks.append([])
            size = 0
        chunks[-1].append(p)
        size += n
    endpoint = _endpoint(ctx)

    async def go() -> dict[str, Any]:
        out: dict[str, Any] = {}
        for i, chunk in enumerate(chunks):
            out = await _call(endpoint, "knowledge.import", {
                "source": data["source"], "host": str(data.get("host", "")),
                "patterns": chunk, "replace": i == 0})
        return out

    result = _run(go)
    result["imported"] = len(data["patterns"])
    if as_json:
        _print_json(result)
    else:
        stderr_note(f"imported {result['imported']} playbook records from "
                    f"{data.get('host') or data['source']}; {result['patterns']} patterns known")


@knowledge.command("stats")
@json_option
@click.pass_context
def knowledge_stats(ctx: click.Context, as_json: bool) -> None:
    """Learning metrics: success rate per week, patterns per day, memory consulted."""
    st = _run(lambda: _call(_endpoint(ctx), "knowledge.stats", {}))
    if as_json:
        _print_json(st)
        return
    click.echo(f"strategy {st['strategy']}; {st['outcomes']} outcomes stored, "
               f"{st['playbook_runs']} playbook runs, {st['patterns']} patterns; success "
               f"{_pct(st['success_rate'])} overall, {_pct(st['success_rate_7d'])} last 7 days; "
               f"memory consulted for {_pct(st['consulted_share'])} of missions")
    if st["success_rate_per_week"]:
        click.echo(tabulate([[w["week"], w["runs"], w["successes"], _pct(w["rate"])]
                             for w in st["success_rate_per_week"]],
                            headers=["WEEK", "RUNS", "OK", "SUCCESS"]))
    if st["patterns_added_per_day"]:
        click.echo(tabulate([[d["day"], d["patterns"]] for d in st["patterns_added_per_day"]],
                            headers=["DAY", "NEW PATTERNS"]))
