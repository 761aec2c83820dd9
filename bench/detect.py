#!/usr/bin/env python3
"""Detection benchmark: graced against Monit on the same real faults, idle cost, the baseline.

    python bench/detect.py [--runs 10] [--idle-seconds 300] [--memory-margin 1.0]

Prints:
  * for each fault, the time to graced's mission.opened (the event's own timestamp) and to
    Monit's action (a timestamp its `exec` writes), both watching the same fault in the
    same run, median over --runs runs, and their ratio: a memory hog (a runaway process
    the kernel fills as fast as it hands out pages, crossing a threshold --memory-margin
    points above the host's use; also, without a target, the same hog leaking at 256 MB/s,
    row memory~), memory pressure (PSI; a reader thrashing its page cache in a small
    memory cgroup), a watched process killed (SIGKILL), a burst of 1,000 error lines in a
    log, a disk (an 8 MB tmpfs at 45 %) filling past its 50 % threshold. Process, log and
    PSI are timed from injecting the fault. Memory and disk are timed from the moment the
    filler saw the threshold crossed (rows memory* and disk*: when the fault became
    detectable, so each tool's own delay): the target is judged on these. They are also
    printed timed from the fault's start (rows memory and disk, not judged): those times
    include the fault's own ramp to the threshold (the hog's allocation: ~1.2 GB/s of
    page provisioning on this VM), paid by both tools alike, so their ratio mostly
    measures where Monit's cycle happened to be; each is printed with that ramp and its
    floor, the ratio a graced with no delay at all would have. How each of graced's
    detectors listened (pidfd, inotify, psi-trigger or poll). graced runs at interval
    1 s, Monit at `set daemon 1`. Where Monit cannot detect a fault, the table says so.
    Monit (Debian's `monit`) is installed with apt-get when run as root and missing.
    This VM hands a hog's freed memory back to MemAvailable late, over seconds to a
    minute (free page reporting: tests/helpers/memory.py): before each hog run the host's
    level is taken once it has stopped falling, and both tools' line is set --memory-margin
    above it when it has moved; after each hog the bench waits for the kernel to show the
    memory as available again (and says so when others' work holds the host above the
    line: the next run's line is then set where the host is). A run others' work spoils
    (the host past the line before the hog, or falling so far that the hog never reaches
    it) is said and tried again, never counted;
  * CPU % (of one core) and RSS of an idle graced with the default detectors as shipped,
    the same at 1 s, and Monit at 1 s on the same checks, over --idle-seconds, measured at
    once on the same host, the load average over that window, whether the host was idle,
    and the missions graced opened meanwhile (judged against "zero" only on an idle host:
    on one overloaded for the last 15 minutes, a load mission is the right answer);
  * the baseline detector's recall and false alarms on the labelled corpus, and the
    time to backtest 100,000 points.
Targets: ratio <= 0.5 on every fault Monit detects (memory and disk: rows memory* and
disk*); process death and log burst to mission <= 100 ms (median); idle CPU < 0.5 %;
RSS < 50 MB; zero idle missions.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import datetime
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
BIN = Path(sys.executable).parent

from corpus import corpus, evaluate, make_series  # noqa: E402

from bench.served import wait_serving  # noqa: E402
from bench.stats import cores  # noqa: E402
from graced.config import default_detectors  # noqa: E402
from graced.detectors.baseline import Baseline  # noqa: E402
from tests.helpers import pressure  # noqa: E402
from tests.helpers.memory import BACK_S, settled_percent, wait_below  # noqa: E402
from tests.helpers.procs import poll_until  # noqa: E402


class Daemon:
    def __init__(self, base: Path, body: str) -> None:
        self.base = base
        self.sock = base / "g.sock"
        self.config = cfg = base / "graced.toml"
        self._write(body)
        self.proc = subprocess.Popen([str(BIN / "graced"), "run", "--config", str(cfg)],
                                     stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                     text=True)
        # Its first lines may be others (learning's, warnings); the rest is drained: a
        # full pipe would stall graced's logging.
        wait_serving(self.proc)
        self.env = dict(os.environ, GRACE_SOCKET=str(self.sock),
                        XDG_CONFIG_HOME=str(base / "cfg"))
        self.tail = subprocess.Popen([str(BIN / "gracectl"), "tail", "--json", "--since", "1",
                                      "mission.*"], env=self.env, stdout=subprocess.PIPE,
                                     text=True)
        # Read in a thread, so that a wait for an event that never comes ends at its
        # timeout (a readline on a silent pipe never returns: a run once hung 443 s on it).
        self.events: queue.Queue[dict | None] = queue.Queue()
        threading.Thread(target=self._read_tail, daemon=True).start()

    def _read_tail(self) -> None:
        assert self.tail.stdout is not None
        for line in self.tail.stdout:
            self.events.put(json.loads(line))
        self.events.put(None)

    def _write(self, body: str) -> None:
        text = f'version = 1\n{body}\n'.replace(
            "[daemon]", f'[daemon]\nstate_dir = "{self.base}/state"\nsocket = "{self.sock}"',
            1)
        if "[daemon]" not in text:
            text += f'\n[daemon]\nstate_dir = "{self.base}/state"\nsocket = "{self.sock}"\n'
        self.config.write_text(text)

    def reload(self, body: str) -> None:
        """Run on this config from now on (``gracectl reload`` answers once it applies)."""
        self._write(body)
        self.ctl("reload")

    def opened_after(self, detector: str, t0: float, timeout: float = 30) -> float:
        """Seconds from wall-clock ``t0`` to the next mission.opened of ``detector``."""
        return stamp(self.next_event("mission.opened", detector, timeout)) - t0

    def next_event(self, topic: str, detector: str, timeout: float = 30,
                   since: float = 0.0) -> dict:
        """The next ``topic`` event of ``detector`` stamped at or after ``since`` (wall
        clock), within ``timeout`` seconds; SystemExit if none comes."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                ev = self.events.get(timeout=left)
            except queue.Empty:
                break
            if ev is None:  # gracectl tail ended: nothing more will come
                self.events.put(None)
                break
            if (ev["topic"] == topic and ev["payload"]["detector"] == detector
                    and stamp(ev) >= since):
                return ev
        raise SystemExit(f"no {topic} for {detector} within {timeout:g} s")

    def active(self, detector: str) -> bool:
        """Whether graced has a mission open for ``detector`` now."""
        return any(m["detector"] == detector
                   for m in json.loads(self.ctl("missions", "ls", "--json")))

    def ctl(self, *args: str) -> str:
        return subprocess.run([str(BIN / "gracectl"), *args], env=self.env,
                              capture_output=True, text=True, check=True).stdout

    def wait_sampled(self, timeout: float = 30) -> None:
        """Until every detector has taken its first sample (no event says so: ask graced)."""
        poll_until(lambda: all(d["subjects"] for d in json.loads(
            self.ctl("detectors", "--json")).values()), timeout, "every detector sampled")

    def stop(self) -> None:
        self.tail.terminate()
        self.proc.terminate()
        self.proc.wait(10)


def stamp(event: dict) -> float:
    """An event's own timestamp, as wall-clock seconds."""
    return datetime.fromisoformat(event["ts"].replace("Z", "+00:00")).timestamp()


def helper(*args: str) -> subprocess.Popen[str]:
    p = subprocess.Popen([sys.executable, "-m", "tests.helpers.faults", *args], cwd=ROOT,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    return p


def ensure_monit() -> str | None:
    """Monit's path, installing Debian's package when root and it is missing; or None."""
    found = shutil.which("monit")
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "install", "-y", "-q", "monit"], env=env,
                       capture_output=True, stdin=subprocess.DEVNULL, check=False)
        if shutil.which("monit") is None:
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True,
                           stdin=subprocess.DEVNULL, check=False)
            subprocess.run(["apt-get", "install", "-y", "-q", "monit"], env=env,
                           capture_output=True, stdin=subprocess.DEVNULL, check=False)
        found = shutil.which("monit")
    return found


class Monit:
    """A real Monit in the foreground (``-I``) on its own control file; each check's
    ``exec`` appends "NAME fail|ok TIMESTAMP" to a file when its state changes."""

    def __init__(self, binary: str, base: Path, checks: dict[str, str]) -> None:
        self.binary, self.base = binary, base
        self.events = base / "monit.events"
        self.events.write_text("")
        self.stamp = base / "stamp"
        self.stamp.write_text(f'#!/bin/sh\necho "$1 $2 $(date +%s.%N)" >> {self.events}\n')
        self.stamp.chmod(0o755)
        self.rc = base / "monitrc"
        self.epoch = 0.0  # when its last reload applied: state lines before it are void
        self._write(checks)
        self.proc = subprocess.Popen([binary, "-c", str(self.rc), "-I"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     stdin=subprocess.DEVNULL)
        def started() -> bool:
            if self.proc.poll() is not None:
                raise SystemExit(f"Monit exited: {_read(base / 'monit.log')[-500:]}")
            return "started" in _read(base / "monit.log")
        poll_until(started, 30, "Monit started")

    def _write(self, checks: dict[str, str]) -> None:
        base = self.base
        body = [f"set daemon 1\nset logfile {base}/monit.log\nset pidfile {base}/monit.pid\n"
                f"set idfile {base}/monit.id\nset statefile {base}/monit.state\n"]
        for name, check in checks.items():
            head, *conds = check.split("\n")
            # A content match has no "else": it is an event each cycle it matches.
            body.append(head + "".join(
                f"\n  {cond} then exec \"{self.stamp} {name} fail\""
                + ("" if "content" in cond else
                   f"\n    else if succeeded then exec \"{self.stamp} {name} ok\"")
                for cond in conds))
        self.rc.write_text("\n".join(body))
        self.rc.chmod(0o600)  # Monit refuses a control file others may read

    def reload(self, checks: dict[str, str]) -> None:
        """Run on these checks from now on: ``monit reload``, until its log says so."""
        log = self.base / "monit.log"
        before = _read(log).count("Monit reloaded")
        self._write(checks)
        subprocess.run([self.binary, "-c", str(self.rc), "reload"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        poll_until(lambda: _read(log).count("Monit reloaded") > before, 30, "Monit reloaded")
        # A reloaded Monit starts each check afresh, in the "succeeded" state, without
        # running its "else" exec: an alarm from before the reload has no "ok" to come.
        self.epoch = time.time()

    def wait(self, name: str, state: str, since: float, timeout: float = 30) -> float:
        """The timestamp of ``name``'s first ``state`` line stamped after ``since`` (Monit
        writes it through a program it starts: no event reaches us, so the file is read
        every 10 ms; the figure is the stamp, not when we read it)."""
        def first() -> float | None:
            for ln in _read(self.events).splitlines():
                parts = ln.split()
                if parts[:2] == [name, state] and float(parts[2]) > since:
                    return float(parts[2])
            return None
        poll_until(lambda: first() is not None, timeout, f"Monit {name} {state}", 0.01)
        stamp = first()
        assert stamp is not None
        return stamp

    def alarmed(self, name: str) -> bool:
        """Whether ``name``'s last state line since the last reload is an alarm."""
        lines = [ln.split() for ln in _read(self.events).splitlines()]
        found = [p[1] for p in lines
                 if len(p) == 3 and p[0] == name and float(p[2]) > self.epoch]
        return bool(found) and found[-1] == "fail"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


FAULTS = ("memory", "psi", "process", "log", "disk")
# memory* and disk*: the same alarms timed from when the fault crossed the threshold;
# memory~: the same hog leaking at LEAK_MB_S, which takes its time to reach the threshold
# (no target: its own ramp, the same for both tools, dominates both times).
ROWS = ("memory*", "memory", "memory~", "psi", "process", "log", "disk*", "disk")
RAMPED = ("memory", "disk")
"""Rows timed from the fault's start: printed with their floor, not judged."""
LEAK_MB_S = 256


HOG_ATTEMPTS = 3
"""A hog run others' work spoils (see ``hog``) is tried again, at most this often."""
SETTLE_LIMIT = 120.0
"""The longest wait for the host's memory use to stop falling before a hog run."""


def settled_level(what: str) -> float:
    """The host's memory use once it has stopped falling (this VM hands a hog's freed
    pages back over seconds to a minute: tests/helpers/memory.py), said when the wait was
    long; after SETTLE_LIMIT, where it is then (the run goes on: its line is set there)."""
    t = time.monotonic()
    level = settled_percent(steady=0.2, over=5.0, limit=SETTLE_LIMIT)
    took = time.monotonic() - t
    if took >= SETTLE_LIMIT:
        print(f"{what}: the host's memory use was still moving after {SETTLE_LIMIT:g} s: "
              f"taken at {level:.1f} %", file=sys.stderr)
    elif took > 15:
        print(f"{what}: waited {took:.0f} s for the host's memory use to stop falling "
              f"(freed pages handed back late): {level:.1f} %", file=sys.stderr)
    return level


def filler(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(ROOT / "bench" / "fill.py"), *args],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


Times = dict[str, list[float]]


def time_to_mission(runs: int, monit_bin: str | None,
                    margin: float) -> tuple[Times, Times, Times, dict[str, str]]:
    """(graced's times, Monit's times, the fault's own time to its crossing) per fault,
    each fault injected ``runs`` times, and how each of graced's detectors listened."""
    base = Path(tempfile.mkdtemp(prefix="gd", dir="/tmp"))
    log = base / "app.log"
    log.write_text("start\n")
    marker = f"grace-bench-{uuid.uuid4().hex[:8]}"

    def start_sleeper() -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)",
                                 marker], stdin=subprocess.DEVNULL)

    sleeper = start_sleeper()
    mnt = base / "mnt"
    mnt.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)]).returncode == 0
    psi = pressure.unavailable() is None
    vm = psutil.virtual_memory()
    # ``margin`` points above the host's use once it has stopped falling (this VM hands
    # freed memory back late: tests/helpers/memory.py), crossed by a hog that goes on to
    # 1.5 points past it (others' work moves the host's figure too: the hog must clear it
    # well); before each hog run the level is taken again, once settled, and both tools
    # get a line ``margin`` above it when it has moved.
    mem_threshold = settled_level("start") + margin
    hog_mb = int(vm.total / 2**20 * (margin + 4.5) / 100)  # room for the host's own drift
    memory = """
[[detector]]
name = "memory"
kind = "memory"
interval = 1.0
threshold = {:.2f}
"""
    dets = f"""
[missions]
resolve_after = 2
flap_window = 0

[[detector]]
name = "log"
kind = "log"
interval = 1.0
file = "{log}"
max_ratio = 0.5
window = 2.0

[[detector]]
name = "process"
kind = "process"
interval = 1.0
process = "{marker}"
match_cmdline = true
"""
    if psi:
        dets += ('\n[[detector]]\nname = "psi"\nkind = "psi_memory"\ninterval = 1.0\n'
                 "threshold = 1.0\nstall_window = 2.0\n")
    if mounted:
        dets += f'\n[[detector]]\nname = "disk"\nkind = "disk"\ninterval = 1.0\npath = "{mnt}"\n' \
                "threshold = 50.0\n"
    # Monit's "memory usage" is total - MemAvailable, as psutil's percent: the same line.
    monit_memory = "check system grace_bench\nif memory usage > {:.0f} MB"
    checks = {
        "memory": monit_memory.format(mem_threshold / 100 * vm.total / 2**20),
        "process": f'check process grace_sleeper matching "{marker}"\nif does not exist',
        "log": f'check file grace_log with path {log}\nif content = "ERROR"',
    }
    if mounted:
        checks["disk"] = f"check filesystem grace_fs with path {mnt}\nif space usage > 50 %"
    d = Daemon(base, memory.format(mem_threshold) + dets)
    try:
        monit = Monit(monit_bin, base, checks) if monit_bin else None
    except BaseException:
        d.stop()
        raise
    ours: Times = {k: [] for k in ROWS}
    theirs: Times = {k: [] for k in ROWS}
    crossing: Times = {k: [] for k in ROWS}  # the fault's own time to the threshold
    modes: dict[str, str] = {}
    big = base / "thrash.bin"
    if psi:
        pressure.make_file(big, 64)

    fired: dict[str, float] = {}

    def both(fault: str, t0: float, run: int, fill: subprocess.Popen[str] | None = None
             ) -> None:
        ours[fault].append(d.opened_after(fault, t0))
        if monit is not None and fault in checks:
            fired[fault] = monit.wait(fault, "fail", t0)
            theirs[fault].append(fired[fault] - t0)
        if fill is not None:  # the same two alarms, timed from the crossing
            assert fill.stdout is not None
            word, when = fill.stdout.readline().split()
            assert word == "crossed" and when != "never", (fault, word, when)
            crossing[fault].append(float(when) - t0)
            ours[f"{fault}*"].append(ours[fault][-1] + t0 - float(when))
            if monit is not None and fault in checks:
                theirs[f"{fault}*"].append(fired[fault] - float(when))
            assert fill.stdout.readline().strip() == "ready"

    def cleared(fault: str, run: int) -> None:
        # Generous: the host's own memory use moves with others' work on a shared host.
        d.next_event("mission.resolved", fault, timeout=120)
        if monit is not None and fault in checks and fault != "log":  # no "else" for it
            monit.wait(fault, "ok", fired[fault])

    def set_line(row: str, run: int) -> float:
        """The host's settled level; both tools' line moved ``margin`` above it when the
        level has moved (others' work, or the late return of a previous hog's pages)."""
        nonlocal mem_threshold
        level = settled_level(f"{row} run {run + 1}")
        if abs(mem_threshold - margin - level) > margin / 4:
            mem_threshold = level + margin
            print(f"{row} run {run + 1}: the host's use settled at {level:.1f} %: both "
                  f"tools' line is now {mem_threshold:.2f} %", file=sys.stderr)
            d.reload(memory.format(mem_threshold) + dets)
            if monit is not None:
                checks["memory"] = monit_memory.format(mem_threshold / 100 * vm.total / 2**20)
                monit.reload(checks)
            d.wait_sampled()
        return level

    def quiet() -> bool:
        """Neither tool holds a memory alarm (a state: asked, not announced)."""
        return not d.active("memory") and not (monit is not None and monit.alarmed("memory"))

    def memory_back(row: str, run: int) -> None:
        """After a hog: until the kernel shows its memory as available again (late, on
        this VM: up to BACK_S), then until graced resolved its mission and Monit said ok.
        Others' work may hold the host above the line longer: that is said, and the next
        run's line is set where the host then is (its ``quiet`` check comes first)."""
        t = time.monotonic()
        try:
            back = wait_below(mem_threshold, f"{row} run {run + 1}", BACK_S) - t
            poll_until(quiet, 120, "graced's mission resolved and Monit's ok", 0.5)
        except AssertionError as exc:
            print(f"{row} run {run + 1}: {exc}", file=sys.stderr)
            return
        if back > 15:
            print(f"{row} run {run + 1}: the kernel took {back:.0f} s to show the hog's "
                  "memory as available again", file=sys.stderr)

    def hog(row: str, rate: float, run: int) -> None:
        """One hog run, repeated (up to HOG_ATTEMPTS times, each said) when others' work
        spoils it: the host crossed the line before the hog did, or fell so far while it
        ran that the hog never reached it."""
        for attempt in range(HOG_ATTEMPTS):
            spoilt = hog_once(row, rate, run)
            if spoilt is None:
                return
            print(f"{row} run {run + 1}, attempt {attempt + 1}: not counted: {spoilt}",
                  file=sys.stderr)
        print(f"{row} run {run + 1}: skipped after {HOG_ATTEMPTS} spoilt attempts",
              file=sys.stderr)

    def hog_once(row: str, rate: float, run: int) -> str | None:
        """A hog run: the figures recorded, or why the run does not count."""
        level = set_line(row, run)
        try:  # a mission the line before opened resolves at the new one in two samples
            poll_until(quiet, 10, "no memory alarm", 0.5)
        except AssertionError:
            return "the host was above the line before the hog started (others' work)"
        checked = time.time()
        proc = filler("memory", str(hog_mb), f"{mem_threshold:.2f}", str(rate))
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline().strip() == "armed"
        time.sleep(random.random())
        proc.stdin.write("go\n")
        proc.stdin.flush()
        word, when = proc.stdout.readline().split()
        assert word == "start", word
        t0 = float(when)  # the fault's start: the hog's first allocation (its stamp)
        word, when = proc.stdout.readline().split()  # the crossing, or "never"
        assert word == "crossed", word
        assert proc.stdout.readline().strip() == "ready"
        if when == "never":
            now = psutil.virtual_memory().percent
            proc.stdin.close()
            proc.wait()
            memory_back(row, run)
            return (f"the hog ({hog_mb} MB) never took the host past {mem_threshold:.2f} % "
                    f"(it settled at {level:.1f} % before, {now:.1f} % with the hog: the "
                    "host's use fell meanwhile)")
        crossed = float(when)
        opened = stamp(d.next_event("mission.opened", "memory", 30, since=checked))
        failed = monit.wait("memory", "fail", checked) if monit is not None else None
        proc.stdin.close()
        proc.wait()
        memory_back(row, run)
        if opened < t0 or (failed is not None and failed < t0):
            return "the host crossed the line before the hog started (others' work)"
        ours[row].append(opened - t0)
        if failed is not None:
            theirs[row].append(failed - t0)
        if row == "memory":  # the same two alarms, timed from the crossing
            crossing[row].append(crossed - t0)
            ours["memory*"].append(opened - crossed)
            if failed is not None:
                theirs["memory*"].append(failed - crossed)
        return None

    if mounted:  # a disk that has been filling: 45 % used, its threshold 50 %
        (mnt / "before").write_bytes(b"x" * int(0.45 * 8 * 2**20))
    try:
        d.wait_sampled()
        for name, det in json.loads(d.ctl("detectors", "--json")).items():
            modes[name] = det["mode"] + (f" ({det['mode_note']})" if det["mode_note"] else "")
        for run in range(runs):
            # Inject each fault at a random phase of the 1 s cycles, so the figures are not
            # an artefact of injecting just before or after a sample (these random pauses
            # are the experiment's design, not waits for an event).
            # memory: a runaway (and, last, a leak: in between, the kernel hands the
            # runaway's pages back)
            hog("memory", 0.0, run)
            if psi:
                time.sleep(random.random())
                with pressure.memory_cgroup(f"grace-bench-{uuid.uuid4().hex[:8]}", 16) as cg:
                    t0 = time.time()
                    reader = pressure.start_thrash(cg, big)
                    both("psi", t0, run)
                    reader.stdin.close()  # type: ignore[union-attr]
                    reader.wait()
                cleared("psi", run)
            # process death
            time.sleep(random.random())
            t0 = time.time()
            sleeper.kill()
            sleeper.wait()  # reaped at once, as a service manager would (Monit skips zombies)
            both("process", t0, run)
            sleeper = start_sleeper()
            cleared("process", run)
            # a burst of error lines
            time.sleep(random.random())
            t0 = time.time()
            with log.open("a") as fh:
                fh.writelines(f"ERROR boom {i}\n" for i in range(1000))
            both("log", t0, run)
            with log.open("a") as fh:
                fh.writelines(f"INFO fine {i}\n" for i in range(200))
            cleared("log", run)
            if mounted:
                time.sleep(random.random())
                t0 = time.time()
                fill = filler("disk", str(mnt), "50")
                both("disk", t0, run, fill)
                fill.stdin.close()  # type: ignore[union-attr]
                fill.wait()
                (mnt / "fill").unlink()
                cleared("disk", run)
            hog("memory~", LEAK_MB_S, run)
    finally:
        d.stop()
        if monit is not None:
            monit.stop()
        sleeper.kill()
        if mounted:
            subprocess.run(["umount", "-l", str(mnt)])
    return ours, theirs, crossing, modes


IDLE_LOAD = 0.5
"""A host whose load per core stays under this is idle."""


def wait_for_quiet_host(limit: float = 300.0) -> float:
    """Wait (up to ``limit`` s) until the 1-minute load per core is under IDLE_LOAD."""
    n = cores()
    deadline = time.monotonic() + limit
    while os.getloadavg()[0] / n >= IDLE_LOAD and time.monotonic() < deadline:
        time.sleep(5)  # the load average is a state with no event: read it every 5 s
    return os.getloadavg()[0] / n


def _cpu(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system + t.children_user + t.children_system


def idle(seconds: float, monit_bin: str | None,
         quiet_wait: float) -> dict[str, dict[str, float]]:
    """Idle cost, measured at once over the same window: graced with the default detectors
    as shipped, the same detectors at 1 s, and Monit at 1 s on the same checks."""
    load = wait_for_quiet_host(quiet_wait)
    print(f"idle phase starts at load {load:.2f} per core", file=sys.stderr)
    shipped = Daemon(Path(tempfile.mkdtemp(prefix="gi", dir="/tmp")), "")
    procs = {"graced (defaults as shipped)": shipped}
    monit = None
    try:
        procs["graced (defaults at 1 s)"] = Daemon(Path(tempfile.mkdtemp(
            prefix="gi", dir="/tmp")), "\n".join(
            f'[[detector]]\nname = "{d.name}"\nkind = "{d.kind}"\ninterval = 1.0\n'
            + (f"window = {d.window}\n" if d.kind in ("cpu", "load") else "")
            + (f'path = "{d.path}"\n' if d.kind in ("disk", "inodes") else "")
            for d in default_detectors()))
        watched: dict[str, psutil.Process] = {k: psutil.Process(v.proc.pid)
                                              for k, v in procs.items()}
        if monit_bin:
            monit = Monit(monit_bin, Path(tempfile.mkdtemp(prefix="mi", dir="/tmp")), {
                "system": "check system grace_idle\nif cpu usage > 95 % for 60 cycles\n"
                          "if loadavg (15min) per core > 2\nif memory usage > 90 %\n"
                          "if swap usage > 80 %",
                "root": "check filesystem grace_root with path /\nif space usage > 90 %\n"
                        "if inode usage > 90 %"})
            watched["Monit 5.33 (same checks at 1 s)"] = psutil.Process(monit.proc.pid)
        for d in procs.values():
            d.wait_sampled()  # start-up is not idle: it ends when every detector sampled
        c0 = {k: _cpu(p) for k, p in watched.items()}
        rss = dict.fromkeys(watched, 0)
        loads = [os.getloadavg()]
        t0 = time.monotonic()
        while time.monotonic() - t0 < seconds:
            time.sleep(5)  # the measurement window, sampled every 5 s (not an event wait)
            for k, p in watched.items():
                rss[k] = max(rss[k], p.memory_info().rss)
            loads.append(os.getloadavg())
        wall = time.monotonic() - t0
        out: dict[str, dict[str, float]] = {}
        for k, p in watched.items():
            out[k] = {"cpu_pct": 100 * (_cpu(p) - c0[k]) / wall, "rss_mb": rss[k] / 2**20,
                      "missions": -1.0}
        for k, d in procs.items():
            missions = json.loads(d.ctl("missions", "ls", "--all", "--json"))
            for m in missions:
                print(f"idle mission ({k}): {m['detector']}: {m['summary']}", file=sys.stderr)
            out[k]["missions"] = float(len(missions))
            # Missions a busy host explains: the load or CPU detector on real overload.
            out[k]["overload_missions"] = float(sum(
                m["detector"] in ("load", "cpu") for m in missions))
    finally:
        for d in procs.values():
            d.stop()
        if monit is not None:
            monit.stop()
    n = cores()
    one = [la[0] / n for la in loads]
    out["_"] = {"seconds": wall, "start_load": load, "end_load": one[-1],
                "mean_load": statistics.fmean(one), "max_load": max(one),
                "load15_start": loads[0][2] / n, "load15_end": loads[-1][2] / n,
                # Idle: the 1-minute load per core under 0.5 all along (as the wait for a
                # quiet host), and the 15-minute one too when the window began.
                "idle": float(max(one) < IDLE_LOAD and loads[0][2] / n < IDLE_LOAD)}
    return out


def baseline_figures() -> dict[str, float]:
    def flags(ts: list[float], vs: list[float]) -> list[bool]:
        b = Baseline()
        return [b.score(t, v) >= 0.5 for t, v in zip(ts, vs, strict=True)]

    result = evaluate(corpus(60, 5000), flags)
    held_out = evaluate([make_series(s, 5000) for s in range(1000, 1060)], flags)
    base = Path(tempfile.mkdtemp(prefix="gb", dir="/tmp"))
    s = make_series(7, 100_000)
    src = base / "in.csv"
    with src.open("w") as fh:
        fh.write("timestamp,value\n")
        fh.writelines(f"{t:.0f},{v:.4f}\n" for t, v in zip(s.ts, s.values, strict=True))
    t0 = time.monotonic()
    c0 = os.times()
    subprocess.run([str(BIN / "graced"), "backtest", str(src), "--kind", "baseline", "-o",
                    str(base / "out.csv")], check=True, capture_output=True)
    result["backtest_100k_s"] = time.monotonic() - t0
    c1 = os.times()  # the child's CPU: the wall time above includes waiting for a core
    result["backtest_100k_cpu_s"] = (c1.children_user - c0.children_user
                                     + c1.children_system - c0.children_system)
    result["held_out_recall"] = held_out["recall"]
    result["held_out_false_per_10k"] = held_out["false_per_10k"]
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--idle-seconds", type=float, default=300.0)
    ap.add_argument("--quiet-wait", type=float, default=300.0, metavar="SECONDS",
                    help="wait at most this long for a quiet host before the idle phase")
    ap.add_argument("--memory-margin", type=float, default=1.0, metavar="POINTS",
                    help="the memory threshold, this many points above the host's use once it has "
                         "stopped falling")
    ap.add_argument("--no-baseline", action="store_true", help="skip the baseline figures")
    args = ap.parse_args()
    monit_bin = ensure_monit()
    if monit_bin is None:
        print("Monit is not installed and cannot be (needs root and apt-get): graced alone",
              file=sys.stderr)
    # Idle first: on a quiet host, before the faults raise the load average.
    idle_fig = idle(args.idle_seconds, monit_bin, args.quiet_wait)
    load0 = os.getloadavg()
    ours, theirs, crossing, modes = time_to_mission(args.runs, monit_bin, args.memory_margin)
    load1 = os.getloadavg()
    base = None if args.no_baseline else baseline_figures()
    info = idle_fig.pop("_")
    print(f"bench/detect.py  ({args.runs} runs per fault; graced interval 1 s, Monit "
          f"`set daemon 1`; {cores()} cores; load average "
          f"{load0[0]:.2f} at the start of the faults, {load1[0]:.2f} at the end)")
    print("time from injecting the fault to graced's mission.opened and to Monit's action, "
          "medians over the runs. The target is judged on the rows marked *: memory and "
          "disk timed from the moment the filler saw the host cross the threshold (the "
          "fault became detectable: each tool's own delay). The rows memory and disk are "
          "timed from the fault's start (memory: the hog's first allocation, a runaway the "
          f"kernel fills as fast as it hands out pages, to a line {args.memory_margin:.1f} "
          "points above the host's settled use; disk: starting the filler): they include "
          "the fault's own ramp to the threshold, paid by both tools alike, so their ratio "
          "is bounded below by the floor printed beside them (the ratio a graced with no "
          f"delay at all would have). memory~: the same hog leaking at {LEAK_MB_S} MB/s, no "
          "target: its own ramp dominates both times")
    print(f"{'fault':10} {'graced s':>9} {'(max)':>7} {'Monit s':>8} {'ratio':>6}  target")
    verdicts = []
    for fault in ROWS:
        ts, ms = ours[fault], theirs[fault]
        if not ts:
            why = {"psi": f"skipped: {pressure.unavailable()}",
                   "disk": "skipped: needs root for a tmpfs"}.get(
                fault.rstrip("*"), "no run counted (see the messages above)")
            print(f"{fault:10} {why}")
            continue
        g = statistics.median(ts)
        line = f"{fault:10} {g:>9.3f} {max(ts):>7.3f}"
        fast = fault in ("process", "log")
        if ms and fault == "memory~":
            m = statistics.median(ms)
            line += f" {m:>8.3f} {g / m:>6.2f}  (no target)"
        elif ms and fault in RAMPED:
            m, f = statistics.median(ms), statistics.median(crossing[fault])
            line += (f" {m:>8.3f} {g / m:>6.2f}  not judged: includes the fault's own "
                     f"{f:.3f} s ramp (max {max(crossing[fault]):.3f}), floor {f / m:.2f}")
        elif ms:
            m = statistics.median(ms)
            ok = g / m <= 0.5 and (not fast or g <= 0.1)
            verdicts.append(ok)
            line += f" {m:>8.3f} {g / m:>6.2f}  ratio <= 0.5" + (
                " and <= 0.100 s" if fast else "") + f": {'PASS' if ok else 'FAIL'}"
        elif fault == "psi" and monit_bin is not None:
            line += "  Monit cannot detect this (it has no PSI check)"
        else:
            line += "  (Monit not installed)"
        print(line)
    if verdicts:
        print(f"graced vs Monit: {sum(verdicts)} of {len(verdicts)} judged rows meet their "
              "target")
    print("graced's detectors listened by: " + "; ".join(f"{k} {v}" for k, v in modes.items()))
    idle_host = bool(info["idle"])
    print(f"idle, measured at once over {info['seconds']:.0f} s: load per core (1 min) "
          f"{info['start_load']:.2f} at the start, {info['end_load']:.2f} at the end, mean "
          f"{info['mean_load']:.2f}, max {info['max_load']:.2f}; 15 min {info['load15_start']:.2f}"
          f" at the start, {info['load15_end']:.2f} at the end: the host was "
          + ("idle" if idle_host else f"NOT idle (load per core {IDLE_LOAD} or more)"))
    for name, fig in idle_fig.items():
        line = f"  {name:34} CPU {fig['cpu_pct']:5.2f} % of one core, RSS max " \
               f"{fig['rss_mb']:5.1f} MB"
        if fig["missions"] >= 0:
            line += f", missions opened {fig['missions']:.0f}"
        print(line)
    shipped = idle_fig["graced (defaults as shipped)"]
    if shipped["missions"] == 0:
        missions = "PASS (0)"
    elif idle_host or shipped["overload_missions"] < shipped["missions"]:
        missions = "FAIL (0)"
    else:  # every one is the load or CPU detector on a host that was not idle
        missions = (f"not judged (0 on an idle host): the host was not idle, its "
                    f"{shipped['missions']:.0f} mission(s) report that overload")
    print(f"graced as shipped: CPU {'PASS' if shipped['cpu_pct'] < 0.5 else 'FAIL'} (< 0.5 %), "
          f"RSS {'PASS' if shipped['rss_mb'] < 50 else 'FAIL'} (< 50 MB), missions {missions}")
    if base is None:
        return
    print(f"baseline: {base['windows']} labelled windows in 60 series, recall "
          f"{100 * base['recall']:.1f} % (spikes {100 * base['recall_spike']:.0f} %, level "
          f"shifts {100 * base['recall_level shift']:.0f} %, variance changes "
          f"{100 * base['recall_variance change']:.0f} %), false alarms "
          f"{base['false_per_10k']:.2f} per 10,000 normal points "
          f"({base['false_alarms']} of {base['normal_points']})")
    print(f"baseline, held-out seeds: recall {100 * base['held_out_recall']:.1f} %, false "
          f"alarms {base['held_out_false_per_10k']:.2f} per 10,000")
    print(f"backtest of 100,000 points: {base['backtest_100k_s']:.2f} s (target < 5 s: "
          f"{'PASS' if base['backtest_100k_s'] < 5 else 'FAIL'})")


if __name__ == "__main__":
    main()
