"""The third attacker review of learning (issue #22), against a real graced and the
real gracectl (and, for the fleet, a real nats-server): each test failed on the code the
review broke, and holds now. (The pure-core halves are in tests/test_learning_review3.py.)"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import trio

from gracectl.client import Endpoint, connect
from graced.learning.knowledge import _upsert
from graced.protocol import canonical_text
from tests.conftest import Graced, bin_path
from tests.helpers.nats import NatsServer, knowledge_bucket
from tests.helpers.procs import poll_until
from tests.test_fleet_attacks import _nats
from tests.test_fleet_e2e import fleet_section
from tests.test_learning_hostile_e2e import SETTINGS
from tests.test_learning_review2_e2e import Daemon, rec
from tests.test_learning_review_e2e import refused

pytestmark = pytest.mark.slow


def status(g: Graced) -> dict[str, Any]:
    return json.loads(g.ctl("status", "--json", check=True).stdout)


def fresh_client(g: Graced, base: Path) -> dict[str, str]:
    """gracectl as run from another account's config: no key pinned on the client side,
    so what is refused is refused by graced."""
    home = base / f"client-{uuid.uuid4().hex[:8]}"
    home.mkdir()
    return {**g.env, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config")}


def reset_events(g: Graced) -> list[dict[str, Any]]:
    return [json.loads(line)["payload"] for line in g.ctl(
        "tail", "--json", "--since", "1", "--no-follow", "learning.reset",
        check=True).stdout.splitlines()]


# -- 1 ---------------------------------------------------------------------------------

def test_a_trusted_fleet_key_speaks_only_for_its_own_daemon_ids(shortdir: Path) -> None:
    """Finding 1: any key in knowledge_keys could sign for any daemon id: peer X put an
    export under Y's id (imported; Y's genuine export then refused as a key change) and
    100 empty exports under made-up ids (every other peer locked out). Now a key named
    with daemon ids speaks for those only, and a key named alone for the first id it
    was imported under; every other export it signs is refused and counted."""
    server = NatsServer(shortdir)
    server.start()
    x, y, w = (Daemon(shortdir, str(uuid.uuid4())) for _ in range(3))

    def line(d: Daemon, *ids: str) -> str:
        return " ".join([d.key.read_text().strip(), *ids])

    keys = [line(x, x.source), line(y, y.source), line(w)]
    (shortdir / "h").mkdir()
    g = Graced(shortdir / "h", fleet_section(server.url, "knowledge_interval = 1\n"
                                            f"knowledge_keys = {json.dumps(keys)}\n"))
    g.start()
    try:
        poll_until(lambda: status(g)["fleet"]["knowledge"] is not None
                   and status(g)["fleet"]["connected"], 20, "the fleet connected")

        def signed(d: Daemon, source: str, patterns: list[dict[str, Any]]) -> bytes:
            return canonical_text(d.signer.sign_frame({
                "format": "grace-knowledge", "version": 2, "source": source,
                "host": f"host-{d.source[:4]}", "exported_at": time.time(),
                "patterns": patterns})).encode()

        def put(*entries: tuple[str, bytes]) -> None:
            async def go(nc: Any, js: Any) -> None:
                kv = await knowledge_bucket(js)
                for key, value in entries:
                    await kv.put(key, value)

            _nats(server.url, go)

        def counts() -> tuple[int, int]:
            k = status(g)["fleet"]["knowledge"]
            return k["imports"], k["refused"]

        # X squats Y's id: refused, naming the ids X's key speaks for.
        put((y.source, signed(x, y.source, [rec("queue:queue", "fix-queue")])))
        poll_until(lambda: counts() == (0, 1), 20, "X's export under Y's id refused")
        last = status(g)["fleet"]["knowledge"]["last_error"]
        assert f"key {x.signer.kid} speaks for daemon {x.source}" in last, last
        # Y's own export is Y's: imported.
        put((y.source, signed(y, y.source, [rec("queue:queue", "fix-queue")])))
        poll_until(lambda: counts() == (1, 1), 20, "Y's genuine export imported")
        # X fills made-up ids with empty exports: each refused; its own id imports.
        put(*[(i, signed(x, i, [])) for i in (str(uuid.uuid4()) for _ in range(5))])
        poll_until(lambda: counts() == (1, 6), 20, "X's exports under made-up ids refused")
        put((x.source, signed(x, x.source, [rec("web:api", "p")])))
        poll_until(lambda: counts() == (2, 6), 20, "X's own export imported")
        # W, named without an id: the first id it is imported under is its own.
        put((w.source, signed(w, w.source, [])))
        poll_until(lambda: counts() == (3, 6), 20, "W's first export imported")
        other = str(uuid.uuid4())
        put((other, signed(w, other, [])))
        poll_until(lambda: counts() == (3, 7), 20, "W's export under another id refused")
        last = status(g)["fleet"]["knowledge"]["last_error"]
        assert f"speaks for daemon {w.source} (the first it was imported under" in last
        sources = json.loads(g.ctl("knowledge", "sources", "--json", check=True).stdout)
        assert {(s["source"], s["kid"], s["records"]) for s in sources["sources"]} == {
            (y.source, y.signer.kid, 1), (x.source, x.signer.kid, 1),
            (w.source, w.signer.kid, 0)}
        assert sources["held"] == 2
    finally:
        g.close()
        server.stop()


# -- 2, 3 ------------------------------------------------------------------------------

def test_a_reset_keeps_the_pinned_key_and_forgetting_a_source_is_explicit(
        make_graced, shortdir: Path) -> None:
    """Finding 2: once `knowledge reset` removed a source's last record, its pinned key
    and export time went too: an older export replayed, and another key took the id.
    Both stay now; `knowledge reset --source` forgets them (journaled, naming the key),
    and `knowledge sources` shows every source remembered, with its records. Finding 3:
    an empty export takes no place among the 100 source daemons (status counts)."""
    g = make_graced(extra_config=SETTINGS)
    x_id = str(uuid.uuid4())
    x = Daemon(shortdir, x_id)
    (shortdir / "m").mkdir()
    m = Daemon(shortdir / "m", x_id)  # another key claiming X's id
    old = x.export([rec("queue:queue", "noop-queue")], exported_at=time.time() - 1000,
                   name="-old")
    new = x.export([rec("queue:queue", "noop-queue")], name="-new")
    squat = m.export([rec("queue:queue", "noop-queue", successes=900)])
    assert x.load(g, new).returncode == 0
    res = x.load(g, old)
    assert res.returncode == 1 and "is older than the one imported already" in res.stderr
    g.ctl("knowledge", "reset", "noop-queue", check=True)
    # Still refused, after the reset: the replay, and (from a client with no pin of its
    # own) the other key.
    res = x.load(g, old)
    assert res.returncode == 1 and "is older than the one imported already" in res.stderr
    client = fresh_client(g, shortdir)
    res = g.ctl("knowledge", "import", "--key", str(m.key), str(squat), env=client)
    assert res.returncode == 10 and f"signed by key {x.signer.kid}" in res.stderr, res.stderr
    shown = json.loads(g.ctl("knowledge", "sources", "--json", check=True).stdout)
    assert [(s["source"], s["kid"], s["records"]) for s in shown["sources"]] == [
        (x_id, x.signer.kid, 0)]
    text = g.ctl("knowledge", "sources", check=True)
    assert x_id in text.stdout and x.signer.kid in text.stdout
    assert "0 of at most 100 sources hold records; 1 of at most 1000 keys pinned" \
        in text.stderr, text.stderr
    # An empty export: pinned, no place taken.
    e = Daemon(shortdir, str(uuid.uuid4()))
    assert e.load(g, e.export([])).returncode == 0
    learning = status(g)["learning"]
    assert (learning["sources"], learning["pinned"]) == (0, 2), learning
    assert "imported from 0 daemons, 2 keys pinned" in g.ctl("status", check=True).stdout
    # Forgetting the source is explicit, and journaled with the key it forgets.
    res = g.ctl("knowledge", "reset", "--source", x_id)
    assert res.returncode == 0 and f"pinned key {x.signer.kid}" in res.stderr, res.stderr
    assert reset_events(g)[-1] | {"by_uid": None} == {
        "target": x_id, "kind": "source", "records": 0, "host": f"host-{x_id}",
        "kid": x.signer.kid, "exported_at": pytest.approx(
            json.loads(new.read_text())["exported_at"]), "by_uid": None}
    res = g.ctl("knowledge", "import", "--key", str(m.key), str(squat), env=client)
    assert res.returncode == 0, res.stderr
    res = g.ctl("knowledge", "reset", "--source", str(uuid.uuid4()))
    assert res.returncode == 5 and "no imported source" in res.stderr, res.stderr
    res = g.ctl("knowledge", "reset")
    assert res.returncode == 2 and "PLAYBOOK|PATTERN or --source" in res.stderr
    # After a restart: the pins as they were.
    g.stop()
    g.start()
    poll_until(lambda: not status(g)["learning"]["loading"], 20, "imported records loaded")
    shown = json.loads(g.ctl("knowledge", "sources", "--json", check=True).stdout)
    assert sorted((s["source"], s["kid"], s["records"]) for s in shown["sources"]) == sorted(
        [(x_id, m.signer.kid, 1), (e.source, e.signer.kid, 0)])


# -- 4 ---------------------------------------------------------------------------------

def test_times_from_the_future_are_refused_and_quarantined(make_graced,
                                                           shortdir: Path) -> None:
    """Finding 4: a stored row with failures dated 2255 kept its playbook demoted for
    good; an import last seen in 2033 listed "0s ago" and sorted above local patterns;
    both passed every bound. An import holding such a time is refused (one line naming
    the field); a stored row with one is quarantined at start, and a source's export
    time from the future is set to the start time."""
    g = make_graced(extra_config=SETTINGS)
    g.ctl("status", check=True)  # the daemon's key pinned: no note on stderr below
    d = Daemon(shortdir, str(uuid.uuid4()))
    res = d.load(g, d.export([rec("queue:queue", "p", last_seen=2e9)]))
    assert res.returncode == 1 and res.stderr.count("\n") == 1, res.stderr
    assert "patterns[0].last_seen: 2000000000 is in the future" in res.stderr, res.stderr
    assert d.load(g, d.export([rec("queue:queue", "p")])).returncode == 0
    g.stop()
    now = time.time()
    db = sqlite3.connect(g.state / "journal.db")
    with db:
        fails = [[901, 9.0e9, 1], [902, 9.1e9, 1], [903, 9.2e9, 1]]
        sql, params = _upsert("queue:queue", "fix-queue", "local", _entry(now, fails))
        db.execute(sql, params)
        (raw,) = db.execute("SELECT value FROM meta WHERE key = 'knowledge_sources'"
                            ).fetchone()
        sources = json.loads(raw)
        sources[d.source]["exported_at"] = 9.0e9
        db.execute("UPDATE meta SET value = ? WHERE key = 'knowledge_sources'",
                   (json.dumps(sources),))
    db.close()
    g.start()
    poll_until(lambda: not status(g)["learning"]["loading"], 20, "imported records loaded")
    quarantined = status(g)["learning"]["quarantined"]
    assert quarantined["this_start"] == 2, quarantined
    assert any("row.data.fails: 9000000000 is in the future" in r
               for r in quarantined["reasons"]), quarantined
    res = g.ctl("knowledge", "show", "queue:queue", "--json", check=True)
    assert [p["playbook"] for p in json.loads(res.stdout)["pattern"]["playbooks"]] == ["p"]
    shown = json.loads(g.ctl("knowledge", "sources", "--json", check=True).stdout)
    # --json writes times in the one ISO 8601 UTC form (gracectl(1) OUTPUT).
    held = datetime.fromisoformat(shown["sources"][0]["exported_at"].replace("Z", "+00:00"))
    assert now <= held.timestamp() <= time.time()
    # An export made before this start is now older than the one held.
    res = d.load(g, d.export([rec("queue:queue", "p")], exported_at=now - 1, name="-b"))
    assert res.returncode == 1 and "older than the one imported already" in res.stderr


def _entry(now: float, fails: list[list[float]]) -> Any:
    from graced.learning.knowledge import Entry
    from graced.learning.ranking import Fail

    return Entry("queue", "queue", 0, 3, first_seen=now - 60, last_seen=now - 30,
                 w_f=3.0, w_at=now - 30, fails=[Fail(int(i), at, bool(o))
                                                for i, at, o in fails])


# -- 5 ---------------------------------------------------------------------------------

def test_format_and_zero_width_characters_in_imported_names_are_refused(
        make_graced, shortdir: Path) -> None:
    """Finding 5: "queue:queue" + U+061C and "fix-queue" + U+200B were imported and
    listed raw, reading as the genuine names. gracectl refuses them (exit 2, one line
    naming the field and the character), and so does graced for a file sent straight
    to its socket; nothing is imported."""
    g = make_graced(extra_config=SETTINGS)
    g.ctl("status", check=True)  # the daemon's key pinned: no note on stderr below
    d = Daemon(shortdir, str(uuid.uuid4()))
    bidi = {**rec("queue:queue", "fix-queue"), "subject": "queue\u061c",
            "signature": "queue:queue\u061c"}
    zero = rec("queue:queue", "fix-queue\u200b")
    for patterns, where in (([bidi], "patterns[0].signature: holds the control character "
                                     "U+061C"),
                            ([zero], "patterns[0].playbook: holds the control character "
                                     "U+200B")):
        path = d.export(patterns)
        res = d.load(g, path)
        assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
        assert where in res.stderr, res.stderr
        err = refused(g, path.read_bytes(), d.signer.public_key)
        assert err.code_name == "invalid" and where in str(err), err
    assert json.loads(g.ctl("knowledge", "ls", "--json", check=True).stdout) == []
    assert json.loads(g.ctl("knowledge", "sources", "--json",
                            check=True).stdout)["sources"] == []


# -- 6 ---------------------------------------------------------------------------------

async def _first_status(socket: Path, deadline: float) -> tuple[float, dict[str, Any]]:
    """Ask for status until graced answers (the socket not there yet: again)."""
    while True:
        try:
            async with connect(Endpoint(socket=str(socket))) as conn:
                got: dict[str, Any] = await conn.request("status")
                return time.monotonic(), got
        except Exception:  # noqa: BLE001 - not serving yet
            if time.monotonic() > deadline:
                raise
            await trio.sleep(0.01)


def start_to_status(g: Graced) -> tuple[float, dict[str, Any]]:
    """Seconds from starting graced to its first answer to status."""
    g.stderr_file = open(g.stderr_path, "a")  # noqa: SIM115
    started = time.monotonic()
    g.proc = subprocess.Popen(
        [bin_path("graced"), "run", "--config", str(g.config)], env=g.env,
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=g.stderr_file, text=True)
    answered, got = trio.run(_first_status, g.socket, started + 60)
    return answered - started, got


def test_status_answers_within_a_second_of_start_with_100k_imported_records(
        make_graced, shortdir: Path) -> None:
    """Finding 6: one export of 100,000 records made every later start take 7 s before
    the socket answered. graced now serves first and loads imported records after
    (status says `loading` meanwhile): status answers as soon after start as it does
    with nothing imported (within 1 s more), and the records are all there once
    loaded."""
    g = make_graced(extra_config=SETTINGS)
    g.stop()
    empty, _ = start_to_status(g)
    d = Daemon(shortdir, str(uuid.uuid4()))
    big = d.export([rec(f"queue:q{i:06}", "p", last_seen=2.0 + i) for i in range(100_000)])
    assert d.load(g, big).returncode == 0
    g.stop()
    took, got = start_to_status(g)
    assert took < empty + 1.0, (took, empty)
    poll_until(lambda: not status(g)["learning"]["loading"], 60, "loaded")
    listed = g.ctl("knowledge", "ls", "--limit", "2", "--json", check=True)
    assert [p["pattern"] for p in json.loads(listed.stdout)] == ["queue:q099999",
                                                                "queue:q099998"]
    shown = json.loads(g.ctl("knowledge", "sources", "--json", check=True).stdout)
    assert shown["sources"][0]["records"] == 100_000
    print(f"start-to-status: {took:.2f} s with 100,000 imported records, "
          f"{empty:.2f} s with none; loading reported: {got['learning']['loading']}")
