#!/usr/bin/env python3
"""Crash safety: SIGKILL graced at random moments under load, many times, and check that
nothing acknowledged or seen was lost. :func:`run` is used by bench/crash.py (200 kills)
and tests/test_crash_e2e.py (a few).

Each round starts graced on the same state dir and, while it runs:
  * events stream: ``gracectl emit --rate 300`` inside the daemon, and a subscriber
    (``gracectl tail --json``) records every event it receives;
  * missions execute: a fault injector keeps breaking a watched value; a low-risk
    playbook fixes it, appending its mission id to a ledger first;
  * approvals arrive: a high-risk fault waits for approval and an approver approves it
    with ``gracectl missions approve`` as soon as the subscriber sees it waiting (each
    acknowledged approval is recorded);
then SIGKILLs it after a random 0.5 to 3.0 s, or, in arranged rounds, the moment an
approved step has started (it says so on a FIFO and then takes a second), and runs
``PRAGMA integrity_check``.
At the end (after a clean start and stop) it checks:
  * zero integrity_check failures;
  * zero lost events: every event any subscriber received is in the journal, same hash;
  * zero lost approvals: every acknowledged approval is on its mission;
  * a valid chain across every restart (``gracectl tail --verify`` over the whole
    journal, signatures and hash chain);
  * no action run twice: a mission's playbook ran at most once per ``executing``
    transition journaled for it (a crash mid-step makes it ``interrupted``, re-verified,
    never blindly re-run).
"""

from __future__ import annotations

import json
import os
import queue
import random
import select
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
BIN = Path(sys.executable).parent
VERIFY_TIMEOUT = 5.0  # how long graced re-verifies an interrupted mission before a re-run
FAULT, NORMAL = "99", "0"

from graced.protocol import event_hash, parse_ts  # noqa: E402


def config(base: Path) -> str:
    def step(file: Path, ledger: Path, announce: bool) -> str:
        # The gated step announces itself on a FIFO opened read-write (which never blocks:
        # with no reader the line is simply dropped), then takes a second: the window in
        # which an arranged round kills graced mid-step.
        say = (f'exec 3<>{base / "started"}; echo "$GRACE_MISSION" >&3; exec 3>&-; sleep 1; '
               if announce else "")
        script = f'echo "$GRACE_MISSION" >> {ledger}; {say}echo {NORMAL} > {file}'
        return f'[[playbook.step]]\naction = "run"\nshell = true\nargv = [{json.dumps(script)}]\n'

    parts = [f'version = 1\n[daemon]\nstate_dir = "{base}/state"\nsocket = "{base}/g.sock"\n'
             "heartbeat_interval = 0.5\nshutdown_timeout = 5.0\n"
             "[missions]\nresolve_after = 1\nflap_window = 0\n"
             "[remediation]\nmax_actions_per_hour = 1000000\napproval_timeout = 3600.0\n"
             # Crash safety is the subject here, not ranking: no demotion.
             '[learning]\nstrategy = "first"\n']
    for name, risk in (("auto", "low"), ("gated", "high")):
        file = base / name
        file.write_text(NORMAL)
        parts.append(f'[[detector]]\nname = "{name}"\nkind = "value"\nfile = "{file}"\n'
                     f'subject = "svc"\ninterval = 0.1\nthreshold = 50.0\n'
                     f'[[playbook]]\nname = "fix-{name}"\ndetector = "{name}"\nrisk = "{risk}"\n'
                     f"budget = 1000000\nverify_timeout = {VERIFY_TIMEOUT}\n"
                     + step(file, base / "ledger", announce=risk == "high"))
    return "\n".join(parts)


class Round:
    def __init__(self, base: Path, env: dict[str, str]) -> None:
        self.base = base
        self.env = env

    def ctl(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run([str(BIN / "gracectl"), *args], env=self.env, text=True,
                                  capture_output=True, timeout=timeout,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            # Killed mid-handshake, gracectl waits out its 10 s connect timeout; a
            # request that never got its answer is not acknowledged.
            return subprocess.CompletedProcess(args, -1, "", "timed out")


def start(base: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen([str(BIN / "graced"), "run", "--config", str(base / "graced.toml")],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    assert proc.stderr is not None
    # Startup may log first (a mission interrupted by the last kill, at warning): read
    # up to the banner; EOF before it means graced did not start.
    seen = []
    for line in proc.stderr:
        if "serving on" in line:
            break
        seen.append(line)
    else:
        raise SystemExit(f"graced did not start: {''.join(seen)[-2000:]}")
    threading.Thread(target=proc.stderr.read, daemon=True).start()  # drain
    return proc


@dataclass
class Report:
    kills: int
    min_up: float
    max_up: float
    elapsed: float
    head: int
    received: int
    runs: int
    missions_run: int
    interrupted: int
    approved: int
    integrity_failures: int
    lost: list[int]
    lost_approvals: list[int]
    chain_error: str | None
    twice: dict[int, int]
    arranged: int = 0  # rounds that were to kill graced mid-step
    killed_mid_step: list[int] = field(default_factory=list)  # missions killed mid-step
    not_interrupted: list[int] = field(default_factory=list)  # ... and not interrupted
    # Interrupted missions that went through the policy again before re-verification
    # ended (blind re-runs) -> (mission, seconds after the interruption).
    blind_reruns: list[tuple[int, float]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (self.integrity_failures == 0 and not self.lost and not self.lost_approvals
                and self.chain_error is None and not self.twice and self.received > 0
                and len(self.killed_mid_step) == self.arranged and not self.not_interrupted
                and not self.blind_reruns)

    def lines(self) -> list[str]:
        return [
            f"journal head seq {self.head:,}; events received by subscribers "
            f"{self.received:,}; playbook runs {self.runs} for {self.missions_run} missions; "
            f"{self.interrupted} missions interrupted mid-step; approvals acknowledged "
            f"{self.approved}",
            f"kills arranged mid-step (once an approved step had started): "
            f"{len(self.killed_mid_step)} of {self.arranged}; of those missions not then "
            f"journaled as interrupted: {len(self.not_interrupted)}",
            f"PRAGMA integrity_check failures: {self.integrity_failures}",
            f"lost events (received by a client, missing or different in the journal): "
            f"{len(self.lost)}",
            f"lost approvals (acknowledged, not on the mission): {len(self.lost_approvals)}",
            "chain across every restart (tail --verify over the whole journal): "
            + ("valid" if self.chain_error is None else "INVALID: " + self.chain_error),
            f"actions run more than once per executing decision: {len(self.twice)}"
            + (f" {dict(list(self.twice.items())[:5])}" if self.twice else ""),
            f"interrupted missions run again before re-verification ended (blind re-runs): "
            f"{len(self.blind_reruns)}"
            + (f" {self.blind_reruns[:5]}" if self.blind_reruns else ""),
        ]


class Subscriber:
    """``gracectl tail --json`` for one round: records every event it receives and hands
    each mission awaiting approval to the approver as it arrives."""

    def __init__(self, env: dict[str, str], since: int) -> None:
        self.proc = subprocess.Popen([str(BIN / "gracectl"), "tail", "--json", "--since",
                                      str(since), "--reconnect-timeout", "0"], env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True, stdin=subprocess.DEVNULL)
        self.events: list[dict[str, Any]] = []
        self.awaiting: queue.Queue[int] = queue.Queue()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            ev = json.loads(line)
            self.events.append(ev)
            if ev["topic"] == "mission.awaiting_approval":
                self.awaiting.put(int(ev["payload"]["id"]))

    def finish(self) -> list[dict[str, Any]]:
        self.proc.wait(30)
        self.thread.join(30)
        return self.events


def run(kills: int, min_up: float = 0.5, max_up: float = 3.0,
        progress: Callable[[str], None] | None = None, arrange_every: int = 0) -> Report:
    """Start, load and SIGKILL graced ``kills`` times; then check what survived.

    Every ``arrange_every``-th round (0: none) does not kill at a random moment: it waits
    until an approved step has started (the step says so on a FIFO) and kills graced then,
    mid-step, so that path is exercised for certain, not by luck.
    """
    base = Path(tempfile.mkdtemp(prefix="gc", dir="/tmp"))
    (base / "graced.toml").write_text(config(base))
    env = dict(os.environ, GRACE_SOCKET=str(base / "g.sock"), HOME=str(base))
    r = Round(base, env)
    rng = random.Random(7)
    received: dict[int, str] = {}  # seq -> hash, as subscribers saw them
    approved: set[int] = set()
    integrity_failures = 0
    arranged = 0
    killed_mid_step: list[int] = []
    next_seq = 1
    t_start = time.monotonic()
    for n in range(kills):
        arrange = bool(arrange_every) and n % arrange_every == 0
        started_fd = None
        if arrange:
            # A fresh FIFO: a step left running by an earlier kill still writes to the old one.
            os.mkfifo(base / "started.new")
            os.replace(base / "started.new", base / "started")
            started_fd = os.open(base / "started", os.O_RDONLY | os.O_NONBLOCK)
        daemon = start(base)
        stop = threading.Event()
        sub = Subscriber(env, next_seq)
        r.ctl("emit", "user.load", "--count", "1000000", "--rate", "300", "--no-wait")

        def inject(stop: threading.Event = stop) -> None:
            # Break a value again once it has stayed fixed for a while (long enough for
            # the detector to see it normal and the mission to resolve).
            fixed_since: dict[str, float] = {}
            while not stop.is_set():
                now = time.monotonic()
                for name in ("auto", "gated"):
                    if (base / name).read_text().strip() != NORMAL:
                        fixed_since.pop(name, None)
                    elif now - fixed_since.setdefault(name, now - 1.0) > 0.4:
                        (base / name).write_text(FAULT)
                stop.wait(0.1)

        def approve(stop: threading.Event = stop, sub: Subscriber = sub) -> None:
            # What still waits from before the last kill (its event went to the last
            # round's subscriber), then each mission as the stream announces it.
            res = r.ctl("missions", "ls", "--state", "awaiting_approval", "--json")
            for m in json.loads(res.stdout) if res.returncode == 0 else []:
                sub.awaiting.put(int(m["id"]))
            while not stop.is_set():
                try:
                    mid = sub.awaiting.get(timeout=0.2)
                except queue.Empty:
                    continue
                if r.ctl("missions", "approve", str(mid), "--yes", "--json").returncode == 0:
                    approved.add(mid)

        threads = [threading.Thread(target=f, daemon=True) for f in (inject, approve)]
        for t in threads:
            t.start()
        if started_fd is not None:
            arranged += 1
            poller = select.poll()
            poller.register(started_fd, select.POLLIN)
            if poller.poll(30_000):  # the step is running now: kill graced under it
                killed_mid_step += [int(x) for x in os.read(started_fd, 4096).split()]
            os.close(started_fd)
        else:
            time.sleep(rng.uniform(min_up, max_up))  # a random moment to crash at
        daemon.send_signal(signal.SIGKILL)
        daemon.wait()
        stop.set()
        for t in threads:
            t.join(30)
        for ev in sub.finish():
            received[ev["seq"]] = event_hash(ev)
            next_seq = max(next_seq, ev["seq"] + 1)
        with sqlite3.connect(base / "state" / "journal.db") as db:
            if db.execute("PRAGMA integrity_check").fetchone()[0] != "ok":
                integrity_failures += 1
        if progress is not None and (n + 1) % 20 == 0:
            progress(f"... {n + 1} kills, {len(received):,} events received, "
                     f"{len(approved)} approvals acknowledged")
    # A last clean run: let interrupted missions settle, then stop cleanly.
    daemon = start(base)
    for name in ("auto", "gated"):
        (base / name).write_text(NORMAL)
    verify = r.ctl("tail", "--verify", "--since", "1", "--no-follow", "--stale-after",
                   "1000000", "--key", str(base / "state" / "key.pub"), timeout=600)
    daemon.send_signal(signal.SIGTERM)
    daemon.wait(30)
    elapsed = time.monotonic() - t_start

    db = sqlite3.connect(base / "state" / "journal.db")
    journal = {int(s): str(h) for s, h in db.execute("SELECT seq, hash FROM events")}
    lost = [s for s, h in received.items() if journal.get(s) != h]
    missions: dict[int, dict[str, Any]] = {}
    for mid, data in db.execute("SELECT id, data FROM missions"):
        missions[int(mid)] = json.loads(data)
    lost_approvals = [m for m in approved if not any(
        a.get("decision") == "approved" for a in missions.get(m, {}).get("approvals", []))]
    executing: dict[int, int] = {}
    for (body,) in db.execute("SELECT body FROM events WHERE topic = 'mission.executing'"):
        mid = json.loads(body)["payload"]["id"]
        executing[mid] = executing.get(mid, 0) + 1
    ran: dict[int, int] = {}
    ledger = base / "ledger"
    for line in (ledger.read_text().split() if ledger.exists() else []):
        ran[int(line)] = ran.get(int(line), 0) + 1
    twice = {m: c for m, c in ran.items() if c > executing.get(m, 0)}
    interrupted_ids = {json.loads(body)["payload"]["id"] for (body,) in db.execute(
        "SELECT body FROM events WHERE topic = 'mission.interrupted'")}
    blind = blind_reruns(db, VERIFY_TIMEOUT)
    head = max(journal)
    db.close()
    subprocess.run(["rm", "-rf", str(base)], check=False)
    return Report(kills, min_up, max_up, elapsed, head, len(received), sum(ran.values()),
                  len(ran), len(interrupted_ids), len(approved), integrity_failures, lost,
                  lost_approvals, None if verify.returncode == 0 else verify.stderr.strip(),
                  twice, arranged, killed_mid_step,
                  [m for m in killed_mid_step if m not in interrupted_ids], blind)


def blind_reruns(db: sqlite3.Connection, verify_timeout: float) -> list[tuple[int, float]]:
    """Each interrupted mission that went through the policy again (awaiting approval or
    executing) less than ``verify_timeout`` after it was interrupted: graced re-verifies
    an interrupted mission (it waits that long, across restarts, for the interrupted
    step to have its effect) before it may run it again. -> (mission, seconds waited)."""
    interrupted: dict[int, float] = {}
    found: list[tuple[int, float]] = []
    for topic, ts, body in db.execute(
            "SELECT topic, ts, body FROM events WHERE topic IN ('mission.interrupted', "
            "'mission.awaiting_approval', 'mission.executing') ORDER BY seq"):
        mid = json.loads(body)["payload"]["id"]
        when = parse_ts(ts)
        if topic == "mission.interrupted":
            interrupted[mid] = when
        elif mid in interrupted:
            waited = when - interrupted.pop(mid)
            if waited < verify_timeout - 0.5:
                found.append((mid, round(waited, 2)))
    return found
