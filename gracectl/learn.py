"""gracectl's learning commands: ``missions similar``, ``missions explain``, ``knowledge``.

Put on gracectl's command groups by :mod:`gracectl.cli`.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import click

from graced.protocol import ExitCode, key_id
from graced.protocol import knowledge as pk
from graced.protocol.text import count

from . import out, trust
from .command import (
    HelpGroup,
    call,
    endpoint_of,
    json_option,
    perform,
    print_json,
    read_key_file,
    trusted_key,
    wide_option,
)
from .errors import CtlError
from .out import stderr_note

CHUNK_BYTES = 36_000  # 48,000 in base64: below the default max_request_bytes (65536)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:.0f}%"


def _secs(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}s"


def _similar_rows(similar: list[dict[str, Any]]) -> list[list[Any]]:
    return [[s["id"], s["match"], f"{s['detector']}:{s['subject']}", s["playbook"] or "-",
             s["outcome"], _secs(s["ttr"]), s["summary"] or ""] for s in similar]


# Fitted to the terminal (cut with …), whole when piped or --wide.
SIMILAR_HEADERS: list[str | out.Column] = [out.Column("ID", right=True), out.Column("MATCH", 2, 8),
                   out.Column("SYMPTOM", 3, 10, keep_end=True), out.Column("PLAYBOOK", 2, 8),
                   out.Column("OUTCOME", 1, 8), "TTR", out.Column("SUMMARY", 4, 10)]


@click.command("similar")
@click.argument("mission_id", metavar="ID", type=int)
@wide_option
@click.option("--limit", type=click.IntRange(1, 1000), default=10, show_default=True,
              help="At most this many past missions.")
@json_option
@click.pass_context
def missions_similar(ctx: click.Context, mission_id: int, limit: int, as_json: bool) -> None:
    """Past missions like this one: same detector and subject first, then by symptom text."""
    result = perform(lambda: call(endpoint_of(ctx), "missions.similar",
                                {"id": mission_id, "limit": limit}))
    if as_json:
        print_json(result)
        return
    m = result["mission"]
    stderr_note(f"mission {m['id']} ({m['detector']}:{m['subject']}): "
                f"{count(len(result['similar']), 'similar past mission')} "
                f"(lookup {result['lookup_ms']:.1f} ms)")
    if result["similar"]:
        out.write(out.table(_similar_rows(result["similar"]), headers=SIMILAR_HEADERS))


def explain_lines(m: dict[str, Any], now: float, width: int | None = -1) -> list[str]:
    """The decision behind a mission, short enough to read in ten seconds; the ranking
    table fits ``width`` columns (-1: the terminal's; None: whole)."""
    flap = ", flapping" if m["flapping"] else ""
    lines = [f"mission {m['id']}  {m['detector']}:{m['subject']}  {m['severity']}{flap}  "
             f"{m['state']}"]
    values = [s["value"] for s in m["samples"] if s.get("value") is not None]
    peak = f", peak {max(values):g}" if values else ""
    lines.append(f"evidence  {m['summary']} ({count(m['occurrences'], 'sample')}{peak}; opened "
                 f"{out.age(now - m['opened_at'])} ago)")
    d = m.get("decision")
    if d is None:
        lines.append("memory    not consulted (no playbook decision was needed for it)")
    else:
        sim = d["similar"]
        lines.append(f"memory    {count(sim['found'], 'similar past mission')} "
                     f"({sim['same_key']} same "
                     f"detector and subject, {sim['text']} by symptom text), {sim['resolved']} "
                     f"resolved; lookup {d['lookup_ms']:.1f} ms")
        for s in m.get("similar", [])[:3]:
            lines.append(f"          #{s['id']} {s['playbook'] or '-'} -> {s['outcome']}"
                         f" ({s['match']})")
        if d["candidates"]:
            lines.append(f"ranking   {d['strategy']} (OK/RUNS: evidence weight, local and "
                         "imported together):")
            rows = []
            for c in d["candidates"]:
                blocked = c.get("blocked") or ("demoted" if c["demoted"] else "")
                mark = "chosen" if c.get("chosen") else (
                    "DEMOTED" if blocked.startswith("demoted") else "SKIPPED" if blocked
                    else "")
                prior = c.get("prior") or [0, 0]
                budget = c.get("budget")
                rows.append([c["playbook"], c["risk"], f"{c['successes']:g}/{c['runs']:g}",
                             f"{prior[0]:g}/{prior[0] + prior[1]:g}" if sum(prior) else "-",
                             _pct(c["ratio"]), f"{c['mean']:.2f}",
                             "-" if c["score"] is None else f"{c['score']:.2f}",
                             _secs(c["mttr_s"]),
                             f"{budget[0]}/{budget[1]}" if budget else "-", mark])
            if width == -1:
                width = out.terminal_width()
            table = out.table(rows, headers=[
                out.Column("PLAYBOOK", 2, 8), "RISK", "OK/RUNS", out.Column("IMPORTED", 1, 8),
                "RATE", "MEAN", "SCORE", "MTTR", "BUDGET", "PICK"],
                width=None if width is None else width - 2)
            lines.extend("  " + row for row in table.splitlines())
            for c in d["candidates"]:
                if c.get("imported_from"):
                    weight = count(sum(c.get("prior") or [0, 0]), "run")
                    lines.append(f"imported  {c['playbook']}: a prior weighing as much as "
                                 f"{weight} here, from {', '.join(c['imported_from'])} "
                                 "(bounded, fading)")
        lines.append(f"choice    {d['reason']}")
        explore = _exploration(d)
        if explore:
            lines.append(f"explore   {explore}")
        # Why a poor record did not demote a playbook (or why a demoted one may run):
        # "held back" is for learning held back (below), not for demotion.
        for note in d.get("held_back") or []:
            lines.append(f"demotion  {note}")
    policy = next((t["reason"] for t in m["timeline"]
                   if t["to"] in ("approved", "awaiting_approval", "escalated")), None)
    if policy is None and m.get("reason") and m["state"] == "open":
        policy = m["reason"]
    plan = (m.get("plan") or {}).get("sha256")
    replaced = {was: f"{was} (replaced by {plan[:16]})" for was in (
        str(t.get("reason") or "").partition("plan sha256 ")[2][:16] for t in m["timeline"])
        if plan and was and not plan.startswith(was)}

    def current(text: str) -> str:
        """A reason naming a plan a reload replaced: say so, with the current one."""
        for was, now_ in replaced.items():
            text = text.replace(was, now_)
        return text

    lines.append(f"policy    {current(policy) if policy else 'no action taken'}")
    kept = next((t for t in m["timeline"] if t.get("note") == "kept open"), None)
    if kept is not None:
        lines.append(f"waiting   kept open for a person since {out.when(kept['ts'])}: "
                     f"{kept.get('reason')}")
        if m["state"] == "awaiting_approval":
            lines.append(f"          to do: reject it if the fault is gone (gracectl missions "
                         f"reject {m['id']}), or approve it, with --even-if-clearing if its "
                         "latest samples are normal")
    if plan:
        lines.append(f"plan      {m['plan'].get('playbook') or '-'} sha256 {plan[:16]}")
    for a in m.get("approvals") or []:
        # Who decided, how (peer credentials or a key) and when, on one line each.
        what = f", plan {str(a['plan_sha256'])[:16]}" if a.get("plan_sha256") else ""
        note = f": {out.safe(a['comment'])}" if a.get("comment") else ""
        lines.append(f"approval  {out.safe(a.get('decision') or '?')} by "
                     f"{out.safe(a.get('user') or '?')} ({out.safe(a.get('auth') or '?')}) "
                     f"at {out.when(a['at'])}{what}{note}")
    outcome = m["reason"] or m["state"]
    if m["state"] == "resolved" and m["closed_at"]:
        # From opening (approval waits included) and, when a playbook ran, from its
        # start: the time learning's MTTR counts.
        started = next((t["ts"] for t in m["timeline"] if t.get("to") == "executing"), None)
        took = "" if started is None else (
            f", {_secs(m['closed_at'] - started)} after the playbook started (learning's "
            "time to resolve)")
        outcome = (f"resolved {_secs(m['closed_at'] - m['opened_at'])} after it opened{took}: "
                   f"{m['reason']}")
    lines.append(f"outcome   {current(outcome)}")
    v = m.get("verification") or {}
    if v.get("result") == "passed" and v.get("detail"):
        lines.append(f"verified  {v['detail']}")
    held = m.get("held_back")
    if held:
        setting = held.get("setting", "")
        where = "" if setting in ("credit", "paused") else f" (setting {setting})"
        lines.append(f"learning  held back: {held.get('reason')}{where}")
    elif m["state"] in ("resolved", "failed") and m.get("playbook") and m.get("steps"):
        verdict = "success" if m["state"] == "resolved" else "failure"
        lines.append(f"learning  counted as a {verdict} of {m['playbook']} for "
                     f"{m['detector']}:{m['subject']}")
    elif m["state"] in ("rejected", "expired", "escalated") and not m.get("steps"):
        what = f"{m['playbook']} did not run" if m.get("playbook") else "no playbook ran"
        lines.append(f"learning  nothing learned: {what} ({m['state']}); no playbook's "
                     "record changed")
    # Names came from the monitored world, a config or an imported file: one line each.
    return [out.safe(line) for line in lines]


EXPLORES = {"thompson": "Thompson sampling drew it from its wider posterior: a playbook "
                        "with less evidence is tried now and then",
            "ucb": "ucb's bonus for the less-tried playbook outweighed the record"}


def _exploration(d: dict[str, Any]) -> str | None:
    """Whether the choice explored or took the best known record, in words (None when
    the decision predates the mark, chose nothing or learning is off)."""
    if d.get("explored") is None or not d.get("chosen") or d.get("strategy") not in EXPLORES:
        return None
    if d["explored"]:
        means = {c["playbook"]: c["mean"] for c in d["candidates"]}
        return (f"yes: tried {d['chosen']} although {d['best_known']} has the better record "
                f"(mean {means.get(d['best_known'], 0):.2f} vs "
                f"{means.get(d['chosen'], 0):.2f}); {EXPLORES[d['strategy']]}")
    return f"no: no playbook it could run has a better record than {d['chosen']}"


@click.command("explain")
@click.argument("mission_id", metavar="ID", type=int)
@wide_option
@json_option
@click.pass_context
def missions_explain(ctx: click.Context, mission_id: int, as_json: bool) -> None:
    """Why graced did what it did: evidence, similar missions, ranking, policy."""
    result = perform(lambda: call(endpoint_of(ctx), "missions.get", {"id": mission_id}))
    m = result["mission"]
    if as_json:
        print_json({**{k: m.get(k) for k in (
            "id", "detector", "subject", "severity", "state", "summary", "samples", "similar",
            "decision", "playbook", "risk", "reason", "timeline", "held_back", "incident",
            "symptom_at_start", "approvals")},
            "plan_sha256": (m.get("plan") or {}).get("sha256"),
            # true: learning tried a playbook although best_known has the better record
            "explored": (m.get("decision") or {}).get("explored"),
            "best_known": (m.get("decision") or {}).get("best_known")})
        return
    out.write(out.fold("\n".join(explain_lines(m, result["now"]))))


@click.group(cls=HelpGroup)
def knowledge() -> None:
    """What graced has learned: symptom patterns and the playbooks that fix them."""


@knowledge.command("ls")
@wide_option
@click.option("--limit", type=click.IntRange(1, 1000), default=1000, show_default=True,
              help="At most this many patterns, the most recently seen (fewer when "
                   "they hold many records: graced bounds a page).")
@click.option("--offset", type=click.IntRange(0, pk.MAX_TOTAL_RECORDS), default=0,
              show_default=True, help="Skip this many (the next page).")
@json_option
@click.pass_context
def knowledge_ls(ctx: click.Context, limit: int, offset: int, as_json: bool) -> None:
    """List learned patterns with their best playbook, most recently seen first."""
    result = perform(lambda: call(endpoint_of(ctx), "knowledge.list",
                                {"limit": limit, "offset": offset}))
    if as_json:
        print_json(result["patterns"])
        return
    rows = [[p["pattern"], p["best_playbook"] or "-", _pct(p["best_success_rate"]),
             _pct(p["success_rate"]), f"{p['count']:g}" + (" (imported only)"
                                                          if p.get("imported_only") else ""),
             _secs(p["mttr_s"]), out.age(result["now"] - p["last_seen"]) + " ago",
             _held(p.get("held_back") or {})] for p in result["patterns"]]
    if not rows:
        stderr_note("no patterns learned yet")
        return
    out.write(out.table(rows, headers=[
        out.Column("PATTERN", 3, 10, keep_end=True), out.Column("BEST PLAYBOOK", 2, 13),
        "ITS RATE", "ALL RATE", out.Column("LOCAL RUNS", 1, 10), "MTTR", "LAST SEEN",
        out.Column("HELD BACK", 1, 9, spill=True)]))
    if result.get("total", len(rows)) > len(rows):
        nxt = result.get("next_offset")
        stderr_note(f"patterns {offset + 1}-{offset + len(rows)} of {result['total']} shown "
                    "(the most recently seen first; --limit, --offset"
                    + (f"; the next page: --offset {nxt})" if isinstance(nxt, int) else ")"))


# Outcomes learning left out for a reason that is no setting: named as what happened.
HELD_REASONS = {"credit": "not credited", "paused": "paused"}


def _held(held: dict[str, int]) -> str:
    """Outcomes learning left out, by setting: 'missions.flap_window 3, not credited 1'."""
    return ", ".join(f"{HELD_REASONS.get(k, k)} {n}" for k, n in sorted(held.items())) or "-"


@knowledge.command("show")
@click.argument("pattern")
@wide_option
@click.option("--limit", type=click.IntRange(1, pk.MAX_PLAYBOOKS), default=pk.MAX_PLAYBOOKS,
              show_default=True, help="At most this many playbooks, best first.")
@click.option("--offset", type=click.IntRange(0, pk.MAX_PLAYBOOKS), default=0,
              show_default=True, help="Skip this many playbooks (the next page).")
@json_option
@click.pass_context
def knowledge_show(ctx: click.Context, pattern: str, limit: int, offset: int,
                   as_json: bool) -> None:
    """Show one pattern (DETECTOR:SUBJECT): every playbook's record and recent missions."""
    result = perform(lambda: call(endpoint_of(ctx), "knowledge.show",
                                {"pattern": pattern, "limit": limit, "offset": offset}))
    if as_json:
        print_json(result)
        return
    p = result["pattern"]
    prose: list[str] = []  # folded to the terminal
    out.write(out.fold(out.safe(
        f"pattern {p['pattern']}: best {p['best_playbook']}, "
        f"{count(p['count'], 'local run')}, success {_pct(p['success_rate'])}, "
        f"MTTR {_secs(p['mttr_s'])} (every local fix), last seen "
        f"{out.when(p['last_seen'])}")))
    rows = []
    for b in p["playbooks"]:
        imported = "; ".join(f"{i['successes']}/{i['successes'] + i['failures']} from "
                             f"{i['host'] or '?'} (daemon {str(i['source'])[:8]}, key "
                             f"{i['kid'] or '?'})"
                             for i in b.get("imported", [])) or "-"
        w = b.get("weight") or {}
        prior = (w.get("prior_successes", 0), w.get("prior_failures", 0))
        rows.append([b["playbook"], f"{b['successes']:g}/{b['runs']:g}", _pct(b["success_rate"]),
                     f"{prior[0]:g}/{prior[0] + prior[1]:g}" if sum(prior) else "-",
                     f"{b['posterior_mean']:.2f}", _secs(b["mttr_s"]),
                     "yes" if b["demoted"] else "", imported])
    # The imported figures (who, which key) go under their row when they do not fit.
    out.write(out.table(rows, headers=[
        out.Column("PLAYBOOK", 2, 8), "LOCAL OK/RUNS", "RATE", "PRIOR WEIGHT", "MEAN", "MTTR",
        "DEMOTED", out.Column("IMPORTED OK/RUNS", 1, 16, spill=True)]))
    prose.append("MTTR: time from a playbook's start to the resolution; a row's is its own "
                 "weighted record (older runs weigh less, an import is a prior), the header's "
                 "the plain mean of every local fix")
    for b in p["playbooks"]:
        if b.get("held_back"):
            prose.append(out.safe(f"{b['playbook']} not demoted: {b['held_back']}"))
    if p.get("playbooks_total", len(rows)) > len(rows):
        stderr_note(f"playbooks {p['offset'] + 1}-{p['offset'] + len(rows)} of "
                    f"{p['playbooks_total']} shown (--limit, --offset)")
    if p.get("held_back"):
        held_on = count(sum(p["held_back"].values()), "mission")
        prose.append(out.safe(f"learning held back on {held_on}: {_held(p['held_back'])}"))
    if result["recent"]:
        prose.append("recent missions:")
        for r in result["recent"][:10]:
            held = (f" (held back: {HELD_REASONS.get(r['held_back'], r['held_back'])})"
                    if r.get("held_back") else "")
            name = r["playbook"] or (f"{r['not_run']} (not run)" if r.get("not_run") else "-")
            prose.append(out.safe(f"  #{r['id']} {out.when(r['closed_at'])} {name} "
                                  f"-> {r['outcome']}{held}"))
    out.write(out.fold("\n".join(prose)))


@knowledge.command("export")
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True))
@click.pass_context
def knowledge_export(ctx: click.Context, file: str) -> None:
    """Write this host's patterns to FILE ('-' for stdout), signed by the daemon's key."""
    data = perform(lambda: call(endpoint_of(ctx), "knowledge.export", {}))["export"]
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    if file == "-":
        out.echo(text, nl=False)
        return
    path = Path(file)
    try:
        import tempfile

        fd, tmp = tempfile.mkstemp(dir=path.parent or ".", prefix=f".{path.name}.")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as exc:
        raise CtlError(f"{file}: cannot write: {exc.strerror}") from None
    stderr_note(f"exported {len(data['patterns'])} playbook records to {file} (signed by "
                f"key {data['kid']})")


def _load_export(file: str, key_file: str | None,
                 replace_key: bool) -> tuple[bytes, dict[str, Any], bytes, str, list[str]]:
    """Read, bound-check and verify an export; returns its bytes, the document, the key
    it verified with and how, and the warnings to print once the import is done (a
    pinned key replaced: said only when it happens). The daemon checks it all again:
    this is for a clear error before anything is sent, and to choose the key."""
    replacing: list[str] = []
    try:
        if file == "-":
            raw = sys.stdin.buffer.read(pk.MAX_FILE_BYTES + 1)
        else:
            with open(file, "rb") as fh:
                raw = fh.read(pk.MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise CtlError(f"{file}: cannot read: {exc.strerror}", ExitCode.USAGE) from None
    try:
        data, _ = pk.parse_export(raw)
    except ValueError as exc:
        raise CtlError(f"{file}: {exc}", ExitCode.USAGE) from None
    source = data["source"]
    try:
        pinned = trust.pinned_for_daemon(source)
    except ValueError as exc:  # endpoints disagree on that daemon's key
        if not (key_file and replace_key):
            raise CtlError(f"{file}: {exc}", ExitCode.BAD_SIGNATURE) from None
        replacing.append(f"{exc}; trusted --key {key_file} (--replace-key)")
        pinned = None
    if key_file:
        key, how = read_key_file(key_file), f"key {key_file}"
        if pinned is not None and pinned != key:
            if not replace_key:
                raise CtlError(
                    f"{file}: --key {key_file} ({key_id(key)}) is not the key pinned for "
                    f"daemon {source} ({key_id(pinned)}): refused; if that daemon's key "
                    "really changed, add --replace-key", ExitCode.BAD_SIGNATURE)
            replacing.append(f"the key pinned for daemon {source} is replaced: "
                             f"{key_id(pinned)} -> {key_id(key)} (--replace-key)")
    elif pinned is None:
        raise CtlError(f"{file}: no trusted key for daemon {source} "
                       f"({out.safe(data['host']) or 'unknown host'}): pass --key FILE (its "
                       "key.pub), or pin it with 'gracectl --socket ... keys trust'",
                       ExitCode.BAD_SIGNATURE)
    else:
        key, how = pinned, "its pinned key"
    try:
        pk.verify_export(data, key)
    except ValueError as exc:
        raise CtlError(f"{file}: {exc}", ExitCode.BAD_SIGNATURE) from None
    return raw, data, key, f"signature verified with {how} ({data['kid']})", replacing


@knowledge.command("import")
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True))
@wide_option
@click.option("--key", "key_file", metavar="KEYFILE", type=click.Path(dir_okay=False),
              help="The exporting daemon's public key (its key.pub); default: the key "
                   "pinned for that daemon id.")
@click.option("--replace-key", is_flag=True,
              help="Accept a --key that differs from the key pinned for that daemon id "
                   "(its key really changed); it is pinned instead, loudly.")
@click.option("--dry-run", is_flag=True, help="Show what would change; change nothing.")
@json_option
@click.pass_context
def knowledge_import(ctx: click.Context, file: str, key_file: str | None, replace_key: bool,
                     dry_run: bool, as_json: bool) -> None:
    """Take patterns another daemon exported, as a bounded prior.

    The file's signature must verify against the key trusted for the exporting daemon
    id (--key, or the key pinned for that id); graced verifies it again. An edited or
    unsigned file, or a --key other than the pinned one, is refused (exit 10). Importing
    the same daemon again replaces its earlier import (all or nothing); an export older
    than the one imported is refused."""
    raw, data, key, verified, replacing = _load_export(file, key_file, replace_key)
    endpoint = endpoint_of(ctx)

    async def go() -> dict[str, Any]:
        from .client import connect

        # One connection: the file is uploaded in parts, then imported in one request.
        async with connect(endpoint, trusted_key(endpoint)) as conn:
            for offset in range(0, len(raw), CHUNK_BYTES):
                await conn.request("knowledge.upload", {
                    "offset": offset, "dry_run": dry_run,
                    "data": base64.b64encode(raw[offset:offset + CHUNK_BYTES]).decode()})
            # graced verifies and stores every record before it answers: a large file
            # takes longer than one answer, so the wait grows by a second per MB.
            result: dict[str, Any] = await conn.request("knowledge.import", {
                "key": base64.b64encode(key).decode(), "replace_key": replace_key,
                "dry_run": dry_run}, endpoint.answer_timeout + len(raw) / 1e6)
            return result

    result = perform(go)
    if not dry_run:
        trust.pin_for_daemon(data["source"], key)
    # Now that it happened (or, in a dry run, would): not before a refusal.
    for note in replacing:
        stderr_note(f"WARNING: {'dry run: would be: ' if dry_run else ''}{note}")
    result.update(verified=verified)
    if as_json:
        print_json(result)
        return
    origin = out.safe(data["host"] or data["source"])
    stderr_note(f"{out.safe(file)}: {verified}")
    for note in result.get("notes", []):
        stderr_note(f"WARNING: {note}")
    rows = [[c["pattern"], c["playbook"], c["change"],
             "-" if c["before"] is None else f"{c['before'][0]}/{sum(c['before'])}",
             "-" if c["after"] is None else f"{c['after'][0]}/{sum(c['after'])}",
             "-" if c["prior"] is None else f"{c['prior'][0]:g}/{c['prior'][0] + c['prior'][1]:g}"]
            for c in result["changes"]]
    if rows:
        out.write(out.table(rows, headers=[
            out.Column("PATTERN", 3, 10, keep_end=True), out.Column("PLAYBOOK", 2, 8),
            "CHANGE", "BEFORE OK/RUNS", "FILE OK/RUNS", "PRIOR WEIGHT OK/RUNS"]))
    counts = result["counts"]
    if result["changes_total"] > len(result["changes"]):
        stderr_note(f"{len(result['changes'])} of {result['changes_total']} changes listed")
    for c in result["changes"]:
        if c.get("note"):  # it applies only where DETECTOR:SUBJECT match exactly
            stderr_note(out.safe(f"{c['pattern']} {c['playbook']}: {c['note']}"))
    summary = ", ".join(f"{n} {kind}" for kind, n in counts.items())
    if dry_run:
        stderr_note(f"dry run: {len(data['patterns'])} records from {origin} ({summary}); "
                    "nothing changed")
        return
    stderr_note(f"imported {result['imported']} playbook records from {origin} "
                f"({summary}); {result['patterns']} patterns known")


@knowledge.command("reset")
@click.argument("target", metavar="PLAYBOOK|PATTERN", required=False)
@click.option("--source", metavar="DAEMON_ID",
              help="Forget an imported source instead: its records, its pinned key and "
                   "its last export time (an approver, as for knowledge import).")
@json_option
@click.pass_context
def knowledge_reset(ctx: click.Context, target: str | None, source: str | None,
                    as_json: bool) -> None:
    """Forget what was learned about a playbook (everywhere) or a pattern (DETECTOR:SUBJECT).

    Undoes damage: a demoted playbook is tried again. Needs control rights; recorded as a
    signed learning.reset event. An imported source's pinned key and last export time
    are kept (an older export or another key is still refused); --source DAEMON_ID
    forgets them with its records and frees its place (knowledge sources lists them)."""
    if (target is None) == (source is None):
        raise click.UsageError("name a PLAYBOOK|PATTERN or --source DAEMON_ID (one of them)")
    params = {"target": target} if source is None else {"source": source}
    result = perform(lambda: call(endpoint_of(ctx), "knowledge.reset", params))
    if as_json:
        print_json(result)
    elif source is not None:
        stderr_note(f"forgot source {source}: {result['records']} records and its pinned "
                    f"key {result['kid']}")
    else:
        stderr_note(f"reset {target}: {result['records']} records forgotten")


@knowledge.command("sources")
@json_option
@click.pass_context
def knowledge_sources(ctx: click.Context, as_json: bool) -> None:
    """List the daemons whose knowledge was imported: pinned key, last export, records."""
    result = perform(lambda: call(endpoint_of(ctx), "knowledge.sources", {}))
    if as_json:
        print_json(result)
        return
    now = time.time()
    if result["loading"]:
        stderr_note("imported knowledge is still loading: records shown may grow")
    if not result["sources"]:
        stderr_note("no knowledge imported")
        return
    out.echo(out.table([[s["source"], s["host"] or "-", s["kid"], s["records"],
                         out.age(now - s["exported_at"]) + " ago"]
                        for s in result["sources"]],
                       headers=["SOURCE", "HOST", "KEY", "RECORDS", "EXPORTED"]))
    stderr_note(f"{result['held']} of at most {result['max_sources']} sources hold records; "
                f"{len(result['sources'])} of at most {result['max_pinned']} keys pinned")


@knowledge.command("stats")
@wide_option
@json_option
@click.pass_context
def knowledge_stats(ctx: click.Context, as_json: bool) -> None:
    """Learning metrics: success rate per week, patterns per day, memory consulted."""
    st = perform(lambda: call(endpoint_of(ctx), "knowledge.stats", {}))
    if as_json:
        print_json(st)
        return
    out.write(out.fold(out.safe(
        f"strategy {st['strategy']}; {count(st['outcomes'], 'outcome')} stored, "
        f"{count(st['playbook_runs'], 'playbook run')}, {count(st['patterns'], 'pattern')}; "
        f"success {_pct(st['success_rate'])} overall, {_pct(st['success_rate_7d'])} last 7 "
        f"days; memory consulted for {_pct(st['consulted_share'])} of missions")))
    if st["success_rate_per_week"]:
        out.echo(out.table([[w["week"], w["runs"], w["successes"], _pct(w["rate"])]
                             for w in st["success_rate_per_week"]],
                            headers=["WEEK", "RUNS", "OK", "SUCCESS"]))
    if st["patterns_added_per_day"]:
        out.echo(out.table([[d["day"], d["patterns"]] for d in st["patterns_added_per_day"]],
                            headers=["DAY", "NEW PATTERNS"]))
