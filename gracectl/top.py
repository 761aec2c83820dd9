"""``gracectl top``: Mission Control, a live dashboard in the terminal.

The screen is computed by :func:`render` from a :class:`Model` (pure: no I/O, no
curses), so ``--once`` prints exactly what the live screen shows. The live loop
(:func:`run_top`) is a trio program with three tasks: the event reader (every frame is
verified by the same :class:`~graced.protocol.ChainVerifier` as ``tail --verify``), a
poller (status, missions, detectors with their recent values, once a second and at
once after a ``mission.*`` event), and the keyboard. The screen is redrawn when
something changed, at most ten times a second, and once a second for the clocks.
"""

from __future__ import annotations

import contextlib
import curses
import locale
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import trio

from graced.protocol import ChainVerifier, ExitCode, Violation, key_id
from graced.protocol.verify import announced_interval, stale_limit

from .client import Connection, Endpoint, connect, decide
from .errors import CtlError, Unreachable
from .out import age, fit, kv, quantity_in, reason, safe, use_colour, value, when
from .plan_text import render_plan, step_result

Segment = tuple[str, str]  # text, style
Line = list[Segment]

SEVERITY_STYLE = {"low": "cyan", "medium": "yellow", "high": "red", "critical": "magenta"}
VIOLATION_KIND = {ExitCode.BAD_SIGNATURE: "bad signature", ExitCode.CHAIN_BROKEN:
                  "chain broken", ExitCode.REPLAYED: "replayed",
                  ExitCode.STALE: "stale stream"}
SPARK_UTF8 = "▁▂▃▄▅▆▇█"
SPARK_ASCII = "_.-~=+*#"
MESSAGE_SECONDS = 5.0
FEED_TOPICS = ("mission.", "executor.", "learning.", "detector.", "daemon.started",
               "daemon.stopping", "crypto.", "integration.")


def scale(unit: str, values: list[float], threshold: float | None) -> tuple[float, float]:
    """The range a sparkline draws on, from what the metric means: 0-100 for a
    percentage; else from 0 (or the lowest value, if below 0) to the highest of the
    values and 1.25 times the threshold, so a series far under its threshold stays low."""
    if unit.strip() == "%":
        return 0.0, 100.0
    vals = [v for v in values if v is not None]
    lo = min([0.0, *vals])
    hi = max([*vals, *([threshold * 1.25] if threshold else []), lo + 1e-9])
    return lo, hi


def sparkline(values: list[float], width: int, chars: str, lo: float | None = None,
              hi: float | None = None) -> str:
    """The last ``width`` values as bars on the scale ``lo``..``hi`` (default: their own
    range)."""
    vals = [v for v in values if v is not None][-width:]
    if not vals:
        return ""
    lo = min(vals) if lo is None else lo
    hi = max(vals) if hi is None else hi
    span = hi - lo
    top = len(chars) - 1
    return "".join(chars[0 if span <= 0 else max(0, min(top, round((v - lo) / span * top)))]
                   for v in vals)


def _spark_segments(values: list[float], width: int, chars: str, unit: str,
                    threshold: float | None, below: bool) -> Line:
    """A sparkline on the metric's scale: bars past the threshold in red, then the
    threshold itself."""
    vals = [v for v in values if v is not None][-width:]
    lo, hi = scale(unit, vals, threshold)
    bars = sparkline(vals, width, chars, lo, hi)
    segs: Line = []
    for v, ch in zip(vals, bars, strict=False):
        past = threshold is not None and (v < threshold if below else v > threshold)
        style = "red" if past else "cyan"
        if segs and segs[-1][1] == style:
            segs[-1] = (segs[-1][0] + ch, style)
        else:
            segs.append((ch, style))
    segs.append((" " * (width - len(bars)), "cyan"))
    mark = "" if threshold is None else f"{'<' if below else '>'}{threshold:g}"
    segs.append((f" {mark:<7}", "dim"))
    return segs


def _t(v: Any) -> str:
    """A payload field in a feed line: '-' where it is missing (never 'None')."""
    return "-" if v is None else str(v)


def describe_event(ev: dict[str, Any]) -> str:
    """A short line for the activity feed: a missing field of a sentence shows as '-', a
    value of a payload written out as JSON (null); never Python's None."""
    p = ev.get("payload")
    p = p if isinstance(p, dict) else {}
    topic = str(ev.get("topic", ""))
    if topic.startswith("mission."):
        what = (f"#{_t(p.get('id'))} {_t(p.get('detector'))}:{_t(p.get('subject'))} "
                f"{_t(p.get('state'))}")
        why = reason(str(p.get("reason") or ""), str(p.get("detector")), str(p.get("subject")))
        return what + (f" - {why}" if why else "")
    if topic == "integration.changed":
        was = p.get("was")  # null: the component appeared
        return (f"{_t(p.get('component'))} "
                + (f"{was} -> " if was is not None else "new, ") + _t(p.get("state"))
                + (f" ({p['last_error']})" if p.get("last_error") else ""))
    if topic == "integration.summary":
        got = p.get("components")
        comps: dict[str, Any] = got if isinstance(got, dict) else {}
        up = sum(1 for c in comps.values() if isinstance(c, dict) and c.get("state") == "up")
        return f"{len(comps)} components, {up} up"
    if topic.startswith("executor.step"):
        ok = "" if "ok" not in p else (" ok" if p["ok"] else f" FAILED {value(p.get('error'))}")
        return f"#{_t(p.get('mission'))} {_t(p.get('playbook'))} step {_t(p.get('step'))}{ok}"
    if topic.startswith("learning."):
        bits = [str(p[k]) for k in ("mission", "pattern", "playbook", "chosen") if p.get(k)]
        return " ".join(bits)
    if topic.startswith("detector."):
        subject = p.get("subject")
        return (f"{_t(p.get('detector'))}" + (f":{subject}" if subject else "") + " "
                + _t(p.get("summary") or p.get("error")))
    return kv(dict(list(p.items())[:4]))  # values as JSON writes them: null, not None


@dataclass
class Model:
    """Everything the dashboard shows."""

    hello: dict[str, Any] = field(default_factory=dict)
    status: dict[str, Any] = field(default_factory=dict)
    missions: list[dict[str, Any]] = field(default_factory=list)
    detectors: dict[str, Any] = field(default_factory=dict)
    feed: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=200))
    verified: int = 0
    last_seq: int | None = None
    violation: str | None = None
    connection: str | None = None  # why we are not connected, if we are not
    selected: int = 0
    detail: dict[str, Any] | None = None
    # (verb, mission id, the plan's hash for an approval) awaiting y/n
    prompt: tuple[str, int, str | None] | None = None
    back_after_prompt: bool = False  # the prompt opened the detail view: close it after
    message: tuple[str, str] | None = None  # (text, style), shown for MESSAGE_SECONDS
    message_at: float = 0.0
    utf8: bool = True
    help: bool = False  # the key help is shown
    scroll: int = 0  # the detail view's first line
    page: int = 10  # the detail view's lines a page
    plan_focus: bool = False  # scroll the detail view to its plan (an approval asks)

    def add_event(self, ev: dict[str, Any]) -> None:
        self.verified += 1
        seq = ev.get("seq")
        if isinstance(seq, int):
            self.last_seq = seq
        topic = str(ev.get("topic", ""))
        if topic.startswith(FEED_TOPICS):
            self.feed.append(ev)

    def say(self, text: str, style: str) -> None:
        self.message = (text, style)
        self.message_at = time.time()

    def selected_mission(self) -> dict[str, Any] | None:
        if not self.missions:
            return None
        self.selected = max(0, min(self.selected, len(self.missions) - 1))
        return self.missions[self.selected]


def _header(model: Model, now: float, width: int = 10**6) -> list[Line]:
    st = model.status or {}
    ex = st.get("executor") or {}
    mode = str(ex.get("mode", "?"))
    if ex.get("paused"):
        mode = "PAUSED"
    host = st.get("host") or model.hello.get("host", "?")
    version = st.get("version") or model.hello.get("version", "?")
    kid = model.hello.get("kid", "?")
    up = age(st["uptime"]) if "uptime" in st else "?"
    line1: Line = [(" Grace ", "title"), (f" graced {version} on {host}  up {up}  mode ",
                                         "header"),
                   (mode, "header_alert" if mode != "act" else "header"),
                   (f"  key {kid}", "header")]
    if model.violation:
        # Wrapped, never cut: the reason is what the operator must read.
        return [line1, *_wrap([(f" SIGNATURE FAILED: {model.violation} ", "alarm")], width)]
    elif model.connection:
        # Why graced cannot be reached (its path, the error) is read whole: wrapped.
        lead = f" signature: verified up to seq {model.last_seq}; "
        wrapped = _wrap([(lead + model.connection, "yellow")], width)
        first = wrapped[0][0][0]
        return [line1, [(first[:len(lead)], "green"), (first[len(lead):], "yellow")],
                *wrapped[1:]]
    else:
        line2 = [(" signature: ", "normal"), ("verified", "green"),
                 (f"  {model.verified} frames checked, head seq {model.last_seq}", "dim")]
    return [line1, line2]


def _section(title: str, width: int) -> Line:
    text = f"-- {title} "
    return [(text + "-" * max(0, width - len(text)), "section")]


def _mission_lines(model: Model, now: float, rows: int, width: int) -> list[Line]:
    """One line a mission, or, when the reason would not fit beside it, two: the reason
    whole (to the screen's width) on the line under it."""
    out: list[Line] = []
    if not model.missions:
        return [[("  no active missions", "dim")]]
    parts = []
    for m in model.missions:
        lead = (f"{m['id']:>5} {m['severity']:<8} {m['state']:<17} "
                f"{age(now - m['opened_at']):>6} ")
        parts.append((lead, str(m["detector"]), str(m["subject"]),
                      reason(m["summary"], m["detector"], m["subject"])))
    spill = any(1 + len(lead) + len(det) + 1 + len(subj) + 2 + len(why) > width
                for lead, det, subj, why in parts)
    per = 2 if spill and rows >= 2 else 1
    # Two lines a mission: the first has the whole free width for detector and subject;
    # one line: they share it with the reason.
    room = (width - 1 - len(parts[0][0]) if per == 2 else max(16, (width - 42) // 2)
            ) if spill else 10**6
    heads = [(f"{lead}{_what(det, subj, room)}  ", why) for lead, det, subj, why in parts]
    visible = max(1, rows // per)
    start = max(0, model.selected - visible + 1)
    for i in range(start, min(len(heads), start + visible)):
        m, (head, why) = model.missions[i], heads[i]
        style = SEVERITY_STYLE.get(m["severity"], "normal")
        sel = i == model.selected
        text = ("> " if sel else "  ")[:1] + head
        if per == 1:
            out.append([(text, style + ("_sel" if sel else "")),
                        (fit(why, max(1, width - len(text))), "sel" if sel else "normal")])
        else:
            out.append([(text.rstrip(), style + ("_sel" if sel else ""))])
            out.append([("       " + fit(why, max(1, width - 7)), "normal")])
    return out


def _what(detector: str, subject: str, room: int) -> str:
    """'detector:subject' in ``room`` columns: the detector whole when it leaves a subject
    some room (cut from its start: a path's end tells it apart), each cut with …."""
    both = f"{detector}:{subject}"
    if len(both) <= room:
        return both
    if room - len(detector) - 1 >= 8:
        return f"{detector}:{fit(subject, room - len(detector) - 1, keep_end=True)}"
    det = max(4, room - 9)
    return f"{fit(detector, det)}:{fit(subject, max(1, room - det - 1), keep_end=True)}"


def _feed_lines(model: Model, rows: int, width: int = 10**6) -> list[Line]:
    events = list(model.feed)[-rows:] if rows > 0 else []
    out: list[Line] = []
    for ev in events:
        ts = _clock(ev.get("ts"))
        topic = str(ev.get("topic", ""))
        style = ("red" if topic.endswith(("failed", "escalated", "error", "demoted"))
                 else "green" if topic.endswith(("resolved", "approved")) else "normal")
        head = f" {ts} "
        topic_text = f"{topic:<26} "
        text = safe(describe_event(ev))  # measured as it is drawn: escaped
        out.append([(head, "dim"), (topic_text, style),
                    (fit(text, max(1, width - len(head) - len(topic_text))), "normal")])
    return out or [[("  (no activity yet)", "dim")]]


def _health_lines(model: Model, now: float, rows: int, width: int) -> list[Line]:
    chars = SPARK_UTF8 if model.utf8 else SPARK_ASCII
    out: list[Line] = []
    # The subject gets what the other columns leave (kept from its end: a path's last
    # part tells it apart), then the sparkline.
    subj_w = max(14, min(48, width - 77))
    spark_w = max(6, min(40, width - 60 - subj_w))
    components = (model.status or {}).get("integration") or {}
    for name, d in sorted(model.detectors.items()):
        subjects = d.get("subjects") or {}
        if not subjects:
            out.append([(f" {name:<16} {d.get('state', '?'):<7}", "dim"),
                        (f" {d.get('last_error') or 'no sample yet'}", "dim")])
        for subj, smp in subjects.items():
            # A probe whose target failed is "failing", as status and the components say;
            # any other detector that samples and sees its anomaly (no process running,
            # say) is up: the ANOMALY at the row's end says it.
            comp = components.get(f"detector:{name}") or {}
            state = "failing" if smp.get("failed") and comp.get("state") == "failing" else str(
                d.get("state", "?"))
            unit = str(smp.get("unit") or "")
            shown = ("-" if not isinstance(smp.get("value"), (int, float))
                     else quantity_in(smp["value"], unit, 10))
            hist = (d.get("history") or {}).get(subj) or []
            bad = smp.get("anomalous")
            out.append([
                (f" {name[:16]:<16} {state:<7}", "red" if state in ("error", "failing")
                 else "normal"),
                (f" {fit(subj, subj_w, keep_end=True):<{subj_w}} {shown:>10} ", "bold"),
                *_spark_segments(hist, spark_w, chars, str(smp.get("unit") or ""),
                                 d.get("threshold"), bool(d.get("below"))),
                (f"{age(now - smp.get('ts', now)):>5} ", "dim"),
                ("ANOMALY" if bad else "ok", "red" if bad else "green")])
    st = model.status or {}
    j, w, ex = st.get("journal") or {}, st.get("wire") or {}, st.get("executor") or {}
    lr = st.get("learning") or {}
    running = len(ex.get("running") or {})
    rate = lr.get("success_rate_7d")
    summary: list[Line] = [
        [(f" journal seq {st.get('head_seq', '?')}, {j.get('size_bytes', 0) / 1e6:.1f} MB, "
          f"commit {j.get('commit_latency_ms', '?')} ms", "normal"),
         (f" | wire {w.get('clients', '?')} clients", "normal")],
        [(f" executor {running} running, {ex.get('actions_last_hour', '?')}/"
          f"{ex.get('max_actions_per_hour', '?')} actions/h", "normal"),
         (f" | learning {lr.get('patterns', '?')} patterns"
          + (f", {rate * 100:.0f}% success 7d" if rate is not None else ""), "normal")]]
    health = st.get("integration") or {}
    bad = sorted((k, v) for k, v in health.items() if v.get("state") not in ("up", "observe"))
    if bad:  # a row only when a component is not up: small terminals keep the detectors
        text = f" components {len(health) - len(bad)}/{len(health)} up: " + ", ".join(
            f"{k} {v.get('state')}" + (f" ({v['last_error']})" if v.get("last_error") else "")
            for k, v in bad)
        summary.append([(text[:max(0, width - 1)], "red")])
    room = max(0, rows - len(summary))
    lines = out[:room]
    if len(out) > room:
        lines = out[:max(0, room - 1)] + [[(f"  ... {len(out) - room + 1} more", "dim")]]
    return [*lines, *summary]


def _clock(t: Any) -> str:
    """The time of day on the one clock (local, or UTC with --utc), as in tail."""
    return when(t)[11:19]


HELP_KEYS = [
    ("q", "quit (at once)"),
    ("?", "this help (any key closes it)"),
    ("j/k, arrows", "move between missions; in the detail view, scroll"),
    ("PgDn/PgUp", "in the detail view, a page down or up (also space and b)"),
    ("g/G", "in the detail view, the top or the end"),
    ("Enter", "the selected mission's detail: evidence, plan (every argument), steps, "
              "timeline"),
    ("Esc, Enter", "back from the detail view"),
    ("a", "approve the mission (its plan is shown first; y to confirm)"),
    ("r", "reject the mission (y to confirm)"),
]
HELP_NOTE = ("Health: each sparkline is on its metric's scale (0-100 for a percentage), bars "
             "past the threshold in red, the threshold after it (>90: anomalous above 90).")


def help_lines(width: int) -> list[str]:
    """The ? screen, wrapped at words to ``width`` (no word lost, none split unless it is
    longer than a line); a key's description continues under itself."""
    import textwrap

    lines = [" Keys"]
    for key, text in HELP_KEYS:
        head = f"   {key:<13}"
        lines += textwrap.wrap(text, max(20, width - 1), initial_indent=head,
                               subsequent_indent=" " * len(head), break_on_hyphens=False)
    return [*lines, "", *textwrap.wrap(HELP_NOTE, max(20, width - 1), initial_indent=" ",
                                      subsequent_indent=" ", break_on_hyphens=False)]


def _wrap(line: Line, width: int) -> list[Line]:
    """A line too long for the screen, wrapped at words (never clipped: an approver must
    read every argument of the plan; a word longer than a line is split); continuation
    lines are indented."""
    import textwrap

    text = "".join(t for t, _ in line)
    if width <= 12 or len(text) <= width:
        return [line]
    style = line[0][1] if line else "normal"
    lead = len(text) - len(text.lstrip(" "))
    indent = " " * min(width // 3, lead + 5)
    parts = textwrap.wrap(text, width, subsequent_indent=indent, break_on_hyphens=False,
                          break_long_words=True, drop_whitespace=True)
    return [[(part, style)] for part in parts] or [line]


def _scrolled(body: list[Line], model: Model, room: int) -> list[Line]:
    """The part of ``body`` the detail view shows at its scroll offset, with a marker
    where more is above or below."""
    model.page = max(1, room - 2)
    top = max(0, min(model.scroll, len(body) - room))
    model.scroll = top
    shown = body[top:top + room]
    if top > 0 and shown:
        shown[0] = [(f"   ^ {top} more line{'s' * (top != 1)} above (k, PgUp)", "dim")]
    below = len(body) - (top + room)
    if below > 0 and shown:
        shown[-1] = [(f"   v {below + 1} more lines below (j, PgDn)", "dim")]
    return shown


def _footer(model: Model, now: float) -> Line:
    if model.prompt:
        verb, mid, plan = model.prompt
        if plan:
            return [(f" approve mission {mid}, the plan shown (sha256 {plan[:16]})? [y/N] ",
                     "alarm")]
        return [(f" {verb} mission {mid}? [y/N] ", "alarm")]
    if model.message and now - model.message_at < MESSAGE_SECONDS:
        return [(f" {model.message[0]} ", model.message[1])]
    return [(" q quit  ? keys  j/k or arrows move  Enter detail  a approve  r reject ", "dim")]


def _detail_lines(model: Model, now: float, width: int) -> list[Line]:
    from .learn import explain_lines

    m = model.detail or {}
    out: list[Line] = [[(f" mission {m.get('id')}: {m.get('summary')}",
                         SEVERITY_STYLE.get(str(m.get("severity")), "bold"))]]
    # Fitted to the screen less the line's lead, as the table would be on a terminal
    # (top draws on one; --once may be piped): a row wrapped would read as two.
    out += [[(" " + line, "normal")] for line in explain_lines(m, now, max(20, width - 1))]
    if m.get("plan"):
        style = "alarm" if model.prompt and model.prompt[2] else "bold"
        out += [[(" " + line, style if i == 0 else "normal")]
                for i, line in enumerate(render_plan(m["plan"]))]
    if m.get("steps"):
        out.append([(" steps:", "bold")])
        for st in m["steps"]:
            out.append([(f"   {st.get('step')}. {st.get('action')}: {step_result(st)}",
                         "green" if st.get("ok") else "red")])
    out.append([(" timeline:", "bold")])
    for t in m.get("timeline") or []:
        out.append([(f"   {_clock(t['ts'])}  {t.get('from') or '-'} -> {t['to']}  {t['reason']}",
                     "normal")])
    return out


def render(model: Model, width: int, height: int, now: float) -> list[Line]:
    """The whole screen, at most ``height`` lines (each cut to ``width`` when drawn)."""
    lines = _header(model, now, width)
    room = height - len(lines) - 1
    if model.help:
        body = [[(text, "bold" if i == 0 else "normal")]
                for i, text in enumerate(help_lines(width))]
        return _safe([*lines, *body[:room], *([[]] * max(0, room - len(body))),
                      [(" any key: back ", "dim")]])
    if model.detail is not None:
        body = [w for line in _detail_lines(model, now, width) for w in _wrap(line, width)]
        if model.plan_focus:  # approve what you can see: the plan, from its first line
            model.plan_focus = False
            model.scroll = next((i for i, line in enumerate(body)
                                 if line and line[0][0].startswith(" plan: ")), 0)
        foot = _footer(model, now) if model.prompt else [
            (" Esc/Enter back  j/k PgDn/PgUp scroll  ? keys  q quit  a approve  r reject ",
             "dim")]
        shown = _scrolled(body, model, room)
        return _safe([*lines, *shown, *([[]] * max(0, room - len(shown))), foot])
    fixed = len(lines) + 3 + 1 + 1  # three section titles, the footer, a summary line
    room = max(3, height - fixed)
    # Each detector's subjects, then the summary: journal, executor, and the components'
    # health when graced reports it.
    n_det = (sum(max(1, len(d.get("subjects") or {})) for d in model.detectors.values()) + 2
             + (1 if (model.status or {}).get("integration") else 0))
    need = len(_mission_lines(model, now, 2 * len(model.missions) or 1, width))
    m_rows = max(1, min(need, room * 2 // 5))
    h_rows = max(3, min(n_det, room // 2))
    f_rows = max(1, room - m_rows - h_rows)
    lines.append(_section(f"Active missions ({len(model.missions)})", width))
    lines += _mission_lines(model, now, m_rows, width)[:m_rows]
    lines.append(_section("Activity", width))
    lines += _feed_lines(model, f_rows, width)[-f_rows:]
    lines.append(_section("Health", width))
    lines += _health_lines(model, now, h_rows, width)
    lines = lines[:height - 1]
    lines += [[]] * max(0, height - 1 - len(lines))
    lines.append(_footer(model, now))
    return _safe(lines)


def _safe(lines: list[Line]) -> list[Line]:
    # What the daemon and the monitored world sent is shown, never obeyed.
    return [[(safe(text), style) for text, style in line] for line in lines]


def plain(lines: list[Line], width: int) -> str:
    return "\n".join("".join(t for t, _ in line)[:width].rstrip() for line in lines)


def violation_text(exc: Violation) -> str:
    """The signature line's reason: where (seq) and what kind, then why."""
    seq = exc.seq if exc.seq is not None else "?"
    return f"seq {seq} {VIOLATION_KIND.get(exc.code, 'violation')}: {exc.reason}"


async def _trusted_hello(conn: Connection, key: bytes) -> dict[str, Any]:
    """``hello``, refused unless the daemon's key is the one we trust."""
    hello: dict[str, Any] = await conn.request("hello")
    if hello.get("kid") != key_id(key):
        raise Violation(ExitCode.BAD_SIGNATURE, None, f"daemon key {hello.get('kid')} is "
                        f"not the trusted key {key_id(key)}")
    return hello


# -- the live program --------------------------------------------------------------

@dataclass
class Options:
    trusted_key: bytes
    once: bool
    interval: float = 1.0


async def _poll(conn: Connection, model: Model) -> None:
    model.status = await conn.request("status")
    model.missions = (await conn.request("missions.list", {}))["missions"]
    model.detectors = (await conn.request("detectors", {"history": 120}))["detectors"]


class Top:
    """The live dashboard: owns the model, the connection and the screen."""

    def __init__(self, endpoint: Endpoint, opts: Options) -> None:
        self.endpoint = endpoint
        self.opts = opts
        self.model = Model(utf8="utf" in (locale.getpreferredencoding(False) or "").lower())
        self.verifier: ChainVerifier | None = None
        self.dirty = trio.Event()
        self.poll_now = trio.Event()
        self.conn: Connection | None = None
        self.quit = False
        self.next_seq: int | None = None

    def changed(self) -> None:
        self.dirty.set()

    async def connect_once(self, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
                           ) -> None:
        """Connect, subscribe and follow until the connection ends."""
        key = self.opts.trusted_key
        async with connect(self.endpoint, key, verify_events=False) as conn:
            hello = await _trusted_hello(conn, key)
            self.model.hello = hello
            head = int(hello.get("head_seq", 0))
            if self.next_seq is None:
                self.next_seq = max(1, head - 50)
            if self.verifier is None:
                stale = stale_limit(float(hello.get("heartbeat_interval", 5.0)))
                self.verifier = ChainVerifier(key, stale_after=stale, first_seq=self.next_seq)
            sub = await conn.request("subscribe", {"patterns": ["*"], "since": self.next_seq})
            await _poll(conn, self.model)
            self.conn = conn
            self.model.connection = None
            self.changed()
            task_status.started(int(sub["head_seq"]))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._poller, conn)
                await self._events(conn)
                nursery.cancel_scope.cancel()
        self.conn = None

    async def _events(self, conn: Connection) -> None:
        assert self.verifier is not None
        while True:
            with trio.move_on_after(self.verifier.stale_after or 3600) as cs:
                try:
                    line, ev = await conn.next_event()
                except trio.EndOfChannel:
                    return
            try:
                if cs.cancelled_caught:
                    self.verifier.flush()
                    self.verifier.check_fresh(trio.current_time())
                    continue
                if "_unparsable" in ev:
                    raise Violation(ExitCode.CHAIN_BROKEN, None, "unparsable frame")
                self.verifier.feed_line(line.encode("utf-8", "surrogatepass"),
                                        trio.current_time())
                interval = announced_interval(ev)
                if interval is not None:  # a reload may change the heartbeat's pace
                    self.verifier.stale_after = stale_limit(interval)
            except Violation as exc:
                self.model.violation = violation_text(exc)
                self.changed()
                return
            self.model.add_event(ev)
            seq = ev.get("seq")
            if isinstance(seq, int):
                self.next_seq = seq + 1
            if str(ev.get("topic", "")).startswith(("mission.", "executor.", "learning.")):
                self.poll_now.set()
            self.changed()

    async def _poller(self, conn: Connection) -> None:
        while True:
            with trio.move_on_after(self.opts.interval):
                await self.poll_now.wait()
            self.poll_now = trio.Event()
            await _poll(conn, self.model)
            self.changed()

    async def act(self, verb: str, mission_id: int, plan: str | None = None) -> None:
        if self.conn is None:
            self.model.say("not connected", "red")
            return
        try:
            res = await decide(self.conn, mission_id, verb == "approve", "from gracectl top",
                               plan)
            m = res["mission"]
            self.model.say(f"mission {m['id']}: {m['state']} ({m['reason']})", "green")
            if self.model.detail is not None and self.model.detail.get("id") == mission_id:
                self.model.detail = m
            self.poll_now.set()
        except CtlError as exc:
            self.model.say(f"{verb} mission {mission_id}: {exc}", "red")
        self.changed()

    async def show_detail(self, mission_id: int) -> None:
        if self.conn is None:
            return
        if (self.model.detail or {}).get("id") != mission_id:
            self.model.scroll = 0
        try:
            self.model.detail = (await self.conn.request("missions.get",
                                                         {"id": mission_id}))["mission"]
        except CtlError as exc:
            self.model.say(str(exc), "red")
        self.changed()


async def _once(endpoint: Endpoint, opts: Options, top: Top) -> ExitCode:
    """Fill ``top.model`` from the daemon, verifying the recent stream to the head; the
    exit code (a verification failure's, else OK)."""
    code = ExitCode.OK
    key = opts.trusted_key
    async with connect(endpoint, key, verify_events=False) as conn:
        hello = await _trusted_hello(conn, key)
        top.model.hello = hello
        head = int(hello.get("head_seq", 0))
        verifier = ChainVerifier(key, first_seq=max(1, head - 50))
        sub = await conn.request("subscribe", {"patterns": ["*"], "since": max(1, head - 50)})
        stop = int(sub["head_seq"])
        with trio.fail_after(10):
            while top.model.last_seq is None or top.model.last_seq < stop:
                try:
                    line, ev = await conn.next_event()
                except trio.EndOfChannel:
                    raise Unreachable("connection to graced lost") from None
                try:
                    verifier.feed_line(line.encode("utf-8", "surrogatepass"),
                                       trio.current_time())
                except Violation as exc:
                    top.model.violation = violation_text(exc)
                    code = exc.code
                    break
                top.model.add_event(ev)
        if top.model.violation is None:
            try:
                verifier.flush()
            except Violation as exc:
                top.model.violation = violation_text(exc)
                code = exc.code
        await _poll(conn, top.model)
    return code


async def run_once(endpoint: Endpoint, opts: Options, width: int,
                   height: int) -> tuple[str, ExitCode]:
    """Connect, verify the recent stream up to the head; one frame as text, and the exit
    code (a verification failure's, else OK)."""
    code = ExitCode.OK
    top = Top(endpoint, opts)
    try:
        code = await _once(endpoint, opts, top)
    except Violation as exc:  # the daemon is not who we trust: show why, nothing else
        top.model = Model(violation=violation_text(exc), utf8=top.model.utf8)
        code = exc.code
    except CtlError as exc:
        if exc.code not in VIOLATION_KIND:
            raise
        top.model = Model(violation=str(exc), utf8=top.model.utf8)
        code = exc.code
    frame = render(top.model, width, height, time.time())[:-1]  # no key help: not live
    while frame and not frame[-1]:
        frame.pop()
    return plain(frame, width), code


# -- curses ------------------------------------------------------------------------

STYLES = {"normal": (-1, -1, 0), "dim": (-1, -1, curses.A_DIM), "bold": (-1, -1, curses.A_BOLD),
          "red": (curses.COLOR_RED, -1, curses.A_BOLD), "green": (curses.COLOR_GREEN, -1, 0),
          "yellow": (curses.COLOR_YELLOW, -1, 0), "cyan": (curses.COLOR_CYAN, -1, 0),
          "magenta": (curses.COLOR_MAGENTA, -1, curses.A_BOLD),
          "alarm": (curses.COLOR_WHITE, curses.COLOR_RED, curses.A_BOLD),
          "title": (curses.COLOR_BLACK, curses.COLOR_CYAN, curses.A_BOLD),
          "header": (-1, -1, curses.A_REVERSE),
          "header_alert": (curses.COLOR_YELLOW, -1, curses.A_REVERSE | curses.A_BOLD),
          "section": (curses.COLOR_BLUE, -1, curses.A_BOLD), "sel": (-1, -1, curses.A_REVERSE)}


class Screen:
    def __init__(self, stdscr: Any) -> None:
        self.scr = stdscr
        self.attrs: dict[str, int] = {}
        # NO_COLOR and --color=never leave bold and reverse video, not colours.
        colour = use_colour(sys.stdout) and curses.has_colors()
        if colour:
            curses.start_color()
            curses.use_default_colors()
        for i, (name, (fg, bg, extra)) in enumerate(STYLES.items(), 1):
            if colour:
                curses.init_pair(i, fg, bg)
            self.attrs[name] = (curses.color_pair(i) if colour else 0) | extra

    def fit(self) -> None:
        """Follow the terminal's size (trio owns SIGWINCH, so tell curses ourselves)."""
        try:
            size = os.get_terminal_size(sys.stdout.fileno())
        except OSError:
            return
        if (size.lines, size.columns) != self.scr.getmaxyx():
            curses.resizeterm(size.lines, size.columns)
            self.scr.clear()

    def attr(self, style: str) -> int:
        if style.endswith("_sel"):
            return self.attrs.get(style[:-4], 0) | curses.A_REVERSE
        return self.attrs.get(style, 0)

    def draw(self, lines: list[Line]) -> None:
        height, width = self.scr.getmaxyx()
        self.scr.erase()
        for y, line in enumerate(lines[:height]):
            x = 0
            for text, style in line:
                if x >= width:
                    break
                try:
                    self.scr.addnstr(y, x, text, width - x, self.attr(style))
                except curses.error:
                    pass  # writing the bottom-right cell moves the cursor off screen
                x += len(text)
        self.scr.noutrefresh()
        curses.doupdate()


@contextlib.contextmanager
def full_screen() -> Iterator[tuple[Any, Screen]]:
    """curses set up for a dashboard (no echo, keys at once, no wait, no cursor), and
    the terminal put back as it was on the way out."""
    os.environ.setdefault("ESCDELAY", "25")
    locale.setlocale(locale.LC_ALL, "")
    stdscr = curses.initscr()
    try:
        curses.noecho()
        curses.cbreak()
        stdscr.keypad(True)
        stdscr.nodelay(True)
        try:
            curses.curs_set(0)
        except curses.error:
            pass
        yield stdscr, Screen(stdscr)
    finally:
        stdscr.keypad(False)
        curses.nocbreak()
        curses.echo()
        curses.endwin()


async def run_live(endpoint: Endpoint, opts: Options) -> int:
    """The full-screen dashboard; returns when the user quits."""
    top = Top(endpoint, opts)
    with full_screen() as (stdscr, screen):
        with trio.open_signal_receiver(signal.SIGWINCH) as winch:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_keep_connected, top)
                nursery.start_soon(_keyboard, top, stdscr, nursery.cancel_scope.cancel)
                nursery.start_soon(_on_resize, top, winch)
                while True:
                    with trio.move_on_after(1.0):
                        await top.dirty.wait()
                    top.dirty = trio.Event()
                    screen.fit()
                    height, width = stdscr.getmaxyx()
                    screen.draw(render(top.model, width, height, time.time()))
                    await trio.sleep(0.1)  # at most ten frames a second
    return 0


async def _on_resize(top: Top, winch: Any) -> None:
    async for _ in winch:
        top.changed()


async def _keep_connected(top: Top) -> None:
    while True:
        try:
            await top.connect_once()
            if top.model.violation:
                return  # stay on the red screen; the user decides
            top.model.connection = "connection closed; reconnecting"
        except Unreachable as exc:
            top.model.connection = f"{exc}; retrying"
        except Violation as exc:
            top.model.violation = f"{VIOLATION_KIND.get(exc.code)}: {exc.reason}"
            top.changed()
            return
        top.changed()
        await trio.sleep(1.0)


async def _keyboard(top: Top, stdscr: Any, quit_: Callable[[], None]) -> None:
    fd = sys.stdin.fileno()
    while True:
        await trio.lowlevel.wait_readable(fd)
        while True:
            key = stdscr.getch()
            if key == -1:
                break
            await _on_key(top, key, quit_)
            top.changed()


async def _on_key(top: Top, key: int, quit_: Callable[[], None]) -> None:
    model = top.model
    if model.prompt is not None:
        verb, mid, plan = model.prompt
        model.prompt = None
        if model.back_after_prompt:
            model.detail, model.back_after_prompt = None, False
        if key in (ord("y"), ord("Y")):
            await top.act(verb, mid, plan)
        else:
            model.say(f"{verb} cancelled", "dim")
        return
    if key == ord("q"):
        quit_()
        return
    model.message = None
    if key == curses.KEY_RESIZE:
        return
    if model.help:
        model.help = False
        return
    if key == ord("?"):
        model.help = True
        return
    m = model.selected_mission()
    if model.detail is not None and key in (27, curses.KEY_LEFT, curses.KEY_BACKSPACE, 10, 13,
                                            curses.KEY_ENTER):
        model.detail = None
        return
    if model.detail is not None:
        moves = {curses.KEY_DOWN: 1, ord("j"): 1, curses.KEY_UP: -1, ord("k"): -1,
                 curses.KEY_NPAGE: model.page, ord(" "): model.page,
                 curses.KEY_PPAGE: -model.page, ord("b"): -model.page,
                 ord("g"): -10**9, curses.KEY_HOME: -10**9, ord("G"): 10**9,
                 curses.KEY_END: 10**9}
        if key in moves:
            model.scroll = max(0, model.scroll + moves[key])  # render clamps the end
            return
    if key in (curses.KEY_DOWN, ord("j")):
        model.selected += 1
        model.selected_mission()
    elif key in (curses.KEY_UP, ord("k")):
        model.selected = max(0, model.selected - 1)
    elif key in (10, 13, curses.KEY_ENTER) and m is not None:
        await top.show_detail(int(m["id"]))
    elif key in (ord("a"), ord("r")):
        target = model.detail or m
        if target is None:
            model.say("no mission selected", "dim")
        elif target["state"] != "awaiting_approval":
            model.say(f"mission {target['id']} is {target['state']}, not awaiting approval",
                      "yellow")
        else:
            mid = int(target["id"])
            sha: str | None = None
            if key == ord("a"):
                # Approve what you can see: the detail view shows the plan it approves.
                model.back_after_prompt = model.detail is None
                await top.show_detail(mid)
                model.plan_focus = True
                sha = ((model.detail or {}).get("plan") or {}).get("sha256")
                if not sha:
                    model.say(f"mission {mid}: no plan to approve", "yellow")
                    return
            model.prompt = ("approve" if key == ord("a") else "reject", mid, sha)
