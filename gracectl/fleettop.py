"""``gracectl top --fleet``: the fleet's Mission Control, from NATS JetStream.

The frame is computed by :func:`render` from a :class:`~gracectl.fleetview.FleetView`
(pure: no I/O, no curses), so ``--once`` prints exactly what the live screen shows: a
header counting the hosts by state and the open missions, then the hosts (as ``fleet
ls``) and the open missions of the hosts whose key is pinned, those awaiting approval
first (as ``fleet missions ls``). Every host's events are verified against its pinned
key, as everywhere in the fleet view.

Live, one ordered consumer follows the stream in a thread of its own (the NATS loop's
caller) and feeds the view; the main thread draws with curses when the view caught up
with the stream, and once every ``--interval`` for the ages, and quits on ``q``.
"""

from __future__ import annotations

import re
import select
import sys
import threading
import time
from collections import Counter
from typing import Any

from graced.protocol import fleet as names

from .fleet import Nats, _exit_for, _Keys, _load_from, hosts_table, missions_table
from .fleetview import SEVERITY_RANK, FleetView, HostView, in_view
from .out import fit
from .top import Line, _safe, _section, full_screen, plain

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def open_missions(hosts: list[HostView]) -> list[dict[str, Any]]:
    """The open missions of the hosts whose key is pinned: awaiting approval first, then
    by severity, host and id."""
    rows = [{**m, "host": h.host, "daemon_id": h.daemon_id, "verified": True}
            for h in hosts if h.key is not None for m in h.missions.values()
            if in_view(m)]
    rows.sort(key=lambda r: (r.get("state") != "awaiting_approval",
                             SEVERITY_RANK.get(str(r.get("severity")), 9),
                             r["host"], r["daemon_id"], r["id"]))
    return rows


def _table_lines(text: str) -> list[Line]:
    return [[(_ANSI.sub("", line), "normal")] for line in text.splitlines()]


def render(view: FleetView, width: int, height: int, now: float,
           note: str = "") -> list[Line]:
    """The frame: header, hosts, open missions, and the key help on the last line."""
    hosts = sorted(view.hosts.values(), key=lambda h: (h.host, h.daemon_id))
    states = Counter(h.state(now) for h in hosts)
    rows = open_missions(hosts)
    waiting = sum(1 for r in rows if r.get("state") == "awaiting_approval")
    pinned = [h for h in hosts if h.key is not None]
    style = ("alarm" if any(h.violation or h.rejection for h in pinned)
             else "header_alert" if any(h.state(now) in ("STALE", "unknown") for h in pinned)
             else "header")
    counts = ", ".join(f"{n} {state}" for state, n in sorted(states.items()))
    head = (f" {len(hosts)} host{'s' if len(hosts) != 1 else ''}"
            f"{': ' + counts if counts else ''}  ·  {len(rows)} open mission"
            f"{'s' if len(rows) != 1 else ''}, {waiting} awaiting approval ")
    lines: list[Line] = [[(" Grace fleet ", "title"), (fit(head, max(1, width - 13)), style)]]
    if note:
        lines.append([(fit(f" {note}", width), "red")])
    lines.append(_section("hosts", width))
    lines += _table_lines(hosts_table(hosts, now, width)) if hosts else [[("  none", "dim")]]
    lines.append(_section("missions open (hosts with a pinned key)", width))
    lines += _table_lines(missions_table(rows, now, width)) if rows else [[("  none", "dim")]]
    unpinned = len(hosts) - len(pinned)
    if unpinned:
        lines.append([(f"  {unpinned} host{'s' if unpinned != 1 else ''} with no key "
                       "pinned: their missions are not shown (gracectl fleet trust HOST)",
                       "dim")])
    body = lines[:max(0, height - 1)]
    body.append([(fit(" q quit  ·  every host checked against its pinned key", width),
                  "dim")])
    return _safe(body)


def run_once(obj: dict[str, Any], width: int, height: int) -> None:
    """One frame of the whole stream as plain text; raises CtlError (exit 10 to 13) after
    printing it when a host whose key is pinned fails verification."""
    view, nats = _load_from(obj, names.host_filter())
    nats.close()
    now = time.time()
    frame = render(view, width, height, now)[:-1]  # no key help: not live
    print(plain(frame, width))
    sys.stdout.flush()
    _exit_for(sorted(view.hosts.values(), key=lambda h: (h.host, h.daemon_id)),
              pinned_only=True)


def run_live(obj: dict[str, Any], interval: float) -> None:
    """The full-screen fleet dashboard; returns when the user quits (q, or Ctrl-C)."""
    nats = Nats(obj["nats"], obj.get("creds"), obj["timeout"])
    nats.connect()
    view = FleetView(_Keys())
    lock = threading.Lock()
    dirty = threading.Event()
    failed: list[str] = []

    def take(subject: str, data: bytes) -> None:
        with lock:
            view.add(subject, data)

    def follow() -> None:
        try:
            nats.read(obj["stream"], names.host_filter(), take, True, dirty.set)
        except Exception as exc:  # noqa: BLE001 - shown on the screen; the user quits
            failed.append(str(exc))
            dirty.set()

    threading.Thread(target=follow, name="fleet-follow", daemon=True).start()
    try:
        with full_screen() as (stdscr, screen):
            drawn = 0.0
            while True:
                if select.select([sys.stdin], [], [], 0.2)[0] and \
                        stdscr.getch() in (ord("q"), ord("Q"), 27):
                    return
                now = time.time()
                if dirty.is_set() or now - drawn >= interval:
                    dirty.clear()
                    screen.fit()
                    height, width = stdscr.getmaxyx()
                    with lock:
                        view.settle(hold=2.0)
                        lines = render(view, width, height, now,
                                       f"NATS: {failed[0]}" if failed else "")
                    screen.draw(lines)
                    drawn = now
    except KeyboardInterrupt:
        return
    finally:
        nats.close()
