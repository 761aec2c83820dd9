"""One time format in JSON: every --json command of gracectl, run against a real graced
with missions, a silence and learned knowledge, prints every time field as an event's
signed ts is written (ISO 8601 UTC to the microsecond, 'Z'), and no epoch number
anywhere; new events carry their times in that form too (gracectl(1) OUTPUT)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import click
import pytest

from gracectl.cli import cli
from graced.protocol import parse_ts
from tests.conftest import Graced
from tests.helpers.nats import NatsServer
from tests.test_fleet_e2e import Operator, fleet_section, wait_caught_up
from tests.test_learning_e2e import FAULT, NORMAL, SETTINGS, fix, playbook, value_detector
from tests.test_learning_hostile_e2e import Exporter, record
from tests.test_missions_e2e import MISSIONS, Watch

ISO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")
# The test's own idea of a time field's name (not graced's list): a point in time.
TIME_NAME = re.compile(r"(_at|_seen|_since|_started|_heartbeat)$|^(ts|at|now|until|last_run)$")
YEAR = 366 * 86400.0


def json_commands() -> set[str]:
    """Every gracectl command with a --json option."""
    found: set[str] = set()

    def walk(cmd: click.Command, path: list[str]) -> None:
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                walk(sub, [*path, name])
        elif any(p.name == "as_json" for p in cmd.params):
            found.add(" ".join(path))

    walk(cli.load_all(), [])
    return found


def check(where: str, data: Any, now: float) -> int:
    """Assert the one form over ``data``: a time field is ISO or null, and no number
    anywhere could be an epoch time (within a year of now). The time fields seen."""
    seen = 0

    def walk(x: Any, path: str) -> None:
        nonlocal seen
        if isinstance(x, dict):
            for k, v in x.items():
                if TIME_NAME.search(str(k)) and v is not None:
                    assert isinstance(v, str) and ISO.fullmatch(v), (where, f"{path}.{k}", v)
                    seen += 1
                walk(v, f"{path}.{k}")
        elif isinstance(x, list):
            for i, v in enumerate(x):
                walk(v, f"{path}[{i}]")
        elif isinstance(x, (int, float)) and not isinstance(x, bool):
            assert abs(x - now) > YEAR, (where, path, x, "an epoch time left as a number")

    walk(data, "")
    return seen


@pytest.mark.slow
def test_every_json_output_writes_every_time_one_way(make_graced, shortdir: Path) -> None:
    q, h, r = shortdir / "q", shortdir / "h", shortdir / "r"
    for f in (q, h, r):
        f.write_text(NORMAL)
    g: Graced = make_graced(detectors=(
        value_detector("fixable", q) + playbook("fix-q", "fixable", "low", fix(q))
        + value_detector("risky", h, "high") + playbook("fix-h", "risky", "high", fix(h))
        + value_detector("refused", r, "high") + playbook("fix-r", "refused", "high", fix(r))
        + SETTINGS.format(approval=60.0)))
    w = Watch(g)
    q.write_text(FAULT)
    resolved = w.wait("mission.resolved", "fixable", 20)["payload"]
    h.write_text(FAULT)
    r.write_text(FAULT)
    waiting = w.wait("mission.awaiting_approval", "risky", 20)["payload"]
    refused = w.wait("mission.awaiting_approval", "refused", 20)["payload"]
    w.close()
    done, mid = str(resolved["id"]), str(waiting["id"])
    exporter = Exporter(shortdir)
    export = exporter.write(shortdir / "knowledge.json", [record(
        signature="fixable:queue", detector="fixable", subject="queue", playbook="fix-q",
        first_seen=time.time() - 86400, last_seen=time.time() - 60)])

    ran: dict[str, list[Any]] = {}

    def run(*args: str) -> Any:
        res = g.ctl(*args, "--json")
        assert res.returncode in (0, 7), (args, res.stderr)  # 7: degraded, still JSON
        words = [a for a in args if not a.startswith("-")]
        name = next(c for c in sorted(json_commands(), key=len, reverse=True)
                    if words[:len(c.split())] == c.split())
        data = json.loads(res.stdout)
        ran.setdefault(name, []).append(data)
        return data

    run("status")
    run("detectors")
    listed = run("missions", "ls", "--all")
    shown = run("missions", "show", done)
    run("missions", "show", mid)
    run("missions", "explain", done)
    run("missions", "similar", done)
    run("knowledge", "ls")
    run("knowledge", "show", "fixable:queue")
    run("knowledge", "stats")
    run("knowledge", "sources")
    run("playbooks", "ls")
    run("playbooks", "run", "fix-h", "--mission", mid, "--dry-run")
    sid = run("silence", "add", "nothing-here", "--for", "1h", "--comment", "quiet")
    run("silence", "ls")
    run("silence", "rm", str(sid["id"]) if isinstance(sid, dict) else str(sid))
    run("emit", "user.note")
    run("pause")
    run("resume")
    run("reload")
    run("checkpoint")
    run("keys", "show")
    run("knowledge", "import", str(export), "--key", str(exporter.key), "--dry-run")
    run("knowledge", "reset", "fix-q")
    approved = run("missions", "approve", mid, "--yes")
    run("missions", "reject", str(refused["id"]), "--comment", "not now")
    run("wait", mid, "--state", "final", "--timeout", "20")
    stream = shortdir / "stream.jsonl"
    stream.write_text(g.ctl("tail", "--json", "--since", "1", "--no-follow",
                            check=True).stdout)
    run("verify", "--partial", str(stream))

    now = time.time()
    times = {name: sum(check(name, d, now) for d in datas) for name, datas in ran.items()}
    # Every --json command was walked but tail (each event as signed: checked below) and
    # the fleet's (test_fleet_json_times, on NATS).
    assert set(ran) | {"tail"} >= {
        c for c in json_commands() if not c.startswith("fleet ")}, sorted(ran)
    # The figures a script reads are there, in the one form, and right.
    assert times["missions show"] >= 6 and times["status"] >= 1, times
    assert abs(parse_ts(shown["opened_at"]) - parse_ts(opened_ts(g, resolved["id"]))) < 5
    assert parse_ts(shown["opened_at"]) <= parse_ts(shown["closed_at"]) <= now
    assert approved["id"] == int(mid)
    # The same instant, written alike wherever it is shown.
    assert next(m for m in listed if m["id"] == int(done))["opened_at"] == shown["opened_at"]

    # The events themselves: their signed ts, and the times in new payloads, one form.
    events = [json.loads(line) for line in stream.read_text().splitlines()]
    for e in events:
        assert ISO.fullmatch(e["ts"]), e
        check(e["topic"], e["payload"], now)


def opened_ts(g: Graced, mission_id: int) -> str:
    """The signed ts of the mission.opened event of ``mission_id``."""
    out = g.ctl("tail", "--json", "--since", "1", "--no-follow", "mission.opened",
                check=True).stdout
    return next(e["ts"] for e in map(json.loads, out.splitlines())
                if e["payload"]["id"] == mission_id)


@pytest.mark.slow
def test_fleet_json_writes_every_time_one_way(shortdir: Path) -> None:
    """The fleet's --json commands, on real NATS JetStream, print times in the one form
    too: a host's view, its missions (from their signed events) and an approval."""
    server = NatsServer(shortdir)
    server.start()
    op = Operator(shortdir, server.url)
    operator_key = op.signing_key()
    h = shortdir / "h"
    h.write_text(NORMAL)
    (shortdir / "host").mkdir()
    g = Graced(shortdir / "host", detectors=(
        value_detector("risky", h, "high") + playbook("fix-h", "risky", "high", fix(h))
        + MISSIONS.format(flap=0) + f'\n[remediation]\ncontrol_keys = ["{operator_key}"]\n'
        + fleet_section(server.url)))
    try:
        g.start()
        w = Watch(g)
        h.write_text(FAULT)
        mid = w.wait("mission.awaiting_approval", "risky", 20)["payload"]["id"]
        w.close()
        daemon_id = op.pin(g)
        wait_caught_up(g)
        ran = {
            "fleet ls": op.fleet_json("ls"),
            "fleet missions ls": op.fleet_json("missions", "ls"),
            "fleet missions show": op.fleet_json("missions", "show", daemon_id, str(mid)),
            "fleet approve": op.fleet_json("approve", daemon_id, str(mid), "--yes"),
        }
        events = [json.loads(line) for line in op.fleet(
            "tail", "--no-follow", "--json").stdout.splitlines()]
    finally:
        g.close()
        server.stop()
    now = time.time()
    times = {name: check(name, data, now) for name, data in ran.items()}
    assert set(ran) | {"fleet tail"} >= {c for c in json_commands()
                                          if c.startswith("fleet ")}, sorted(ran)
    assert all(times.values()), times  # each of them shows a time, in the one form
    (listed,) = ran["fleet missions ls"]
    assert ISO.fullmatch(listed["opened_at"]) and ISO.fullmatch(listed["updated_at"])
    assert listed["opened_at"] == ran["fleet missions show"]["opened_at"]
    opened = [e for e in events if e["topic"] == "mission.opened"]
    assert opened and all(ISO.fullmatch(e["payload"]["opened_at"]) for e in opened)
