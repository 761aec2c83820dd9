#!/usr/bin/env python3
"""Remediation that can act, under a real systemd (issue 23): a scenario for the nspawn check.

With graced running under the shipped, hardened unit in a booted container, prove:

  * graced's own unit stays at an exposure of 2.0 or better (``systemd-analyze security``),
    and graced itself cannot write the log directory (read-only in its sandbox);
  * a playbook frees that directory, which filled its disk, through an installed privileged
    action (``grace-action@clean-logs.service``, started through the polkit rule) and the
    mission resolves;
  * a unit that fails is seen by the ``systemd`` detector and restarted by a playbook
    (``unit = "{subject}"``), and its mission resolves;
  * a silence keeps that playbook from running while it lasts, then expires by itself,
    and the held mission is fixed.

Hook it into tests/systemd/nspawn_check.py after graced is active (the container object
needs ``sh(script, timeout=...)`` and ``pid``, the container's PID 1 on the host):

    from tests.systemd import remediation_scenario
    remediation_scenario.run(c, say, check)

It installs what it needs inside the running container itself (action template and
drop-in, a polkit rule of its own, a unit that fails, its detectors and playbooks appended
to /etc/graced/graced.toml) and restarts graced once. Run alone (``python3 -m
tests.systemd.remediation_scenario``, as root) it boots its own tree
(``$GRACE_NSPAWN_CACHE``, default /var/tmp/grace-nspawn-23) with the check's own helpers,
installs Grace by the README's install block, runs the scenario and exits 0, 77 (cannot
run here) or 1.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol


def _secs(value: Any) -> float:
    """A time from an event's payload: ISO 8601 UTC (graced 0.2 on) or epoch seconds."""
    if isinstance(value, str):
        from datetime import datetime

        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    return float(value)


def _span(silence: dict[str, Any]) -> float:
    """How long a silence was set for, from its event's payload."""
    return _secs(silence["expires_at"]) - _secs(silence["created_at"])


ROOT = Path(__file__).resolve().parents[2]
CTL = "gracectl --socket /run/graced/graced.sock"
LOGS = "/srv/applogs"

# Appended to /etc/graced/graced.toml.
CONFIG = f'''
[[detector]]
name = "failed-units"
kind = "systemd"
units = ["app-*.service"]
interval = 1.0
severity = "high"

[[playbook]]
name = "restart-failed-unit"
detector = "failed-units"
risk = "low"
budget = 10
verify_timeout = 30.0

[[playbook.step]]
action = "restart_unit"
unit = "{{subject}}"

[[detector]]
name = "applogs"
kind = "disk"
path = "{LOGS}"
threshold = 50.0
interval = 1.0
severity = "high"

[[playbook]]
name = "clean-app-logs"
detector = "applogs"
risk = "low"
budget = 5
verify_timeout = 60.0

[[playbook.step]]
action = "start_action"
unit = "clean-logs"
timeout = 60.0
'''

# Fails when /run/NAME-break exists (and removes it), so a restart fixes it. Two of them:
# the second, broken during a silence, is a symptom of its own (not a flapping repeat).
FAILING_UNITS = ("app-once.service", "app-later.service")
FAILING_UNIT = """[Unit]
Description=a service that fails once
[Service]
ExecStart=/bin/sh -c 'if [ -e /run/%N-break ]; then rm -f /run/%N-break; exit 3; fi; \\
    exec sleep infinity'
"""


class Container(Protocol):
    pid: int

    def sh(self, script: str, timeout: float = ...) -> subprocess.CompletedProcess[str]: ...


Say = Callable[[str], None]
Check = Callable[..., None]


def _write(c: Container, path: str, text: str) -> None:
    res = c.sh(f"mkdir -p {shlex.quote(os.path.dirname(path))} && "
               f"cat > {shlex.quote(path)} <<'GRACE_SCENARIO_EOF'\n{text}\nGRACE_SCENARIO_EOF\n")
    if res.returncode != 0:
        raise SystemExit(f"writing {path} in the container failed: {res.stderr}")


def _events(c: Container, since: int, pattern: str) -> subprocess.Popen[str]:
    """gracectl tail inside the container, from seq ``since``, as a process to read."""
    return subprocess.Popen(
        ["nsenter", "-t", str(c.pid), "-a", "env", "-i", "HOME=/root", "LANG=C.UTF-8",
         "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "/bin/sh", "-c",
         f"exec {CTL} tail --json --since {since} {shlex.quote(pattern)}"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
        text=True)


def _wait_event(tail: subprocess.Popen[str], pred: Callable[[dict[str, Any]], bool],
                timeout: float) -> dict[str, Any] | None:
    """The first event from ``tail`` that ``pred`` accepts, within ``timeout`` seconds."""
    assert tail.stdout is not None
    deadline = time.monotonic() + timeout
    import select

    while time.monotonic() < deadline:
        ready, _, _ = select.select([tail.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        line = tail.stdout.readline()
        if not line:
            break
        event = json.loads(line)
        if pred(event):
            return dict(event)
    return None


def _head(c: Container) -> int:
    return int(json.loads(c.sh(f"{CTL} status --json").stdout)["head_seq"])


def _mission(c: Container, mid: int) -> dict[str, Any]:
    return dict(json.loads(c.sh(f"{CTL} missions show {mid} --json").stdout))


def install(c: Container, say: Say) -> None:
    """Install the action, the rule, the failing unit and the config; restart graced."""
    _write(c, "/etc/systemd/system/grace-action@.service",
           (ROOT / "systemd/grace-action@.service").read_text())
    clean = (ROOT / "systemd/actions/clean-logs.conf").read_text().replace(
        "/var/log/app", LOGS)
    _write(c, "/etc/systemd/system/grace-action@clean-logs.service.d/action.conf", clean)
    for unit in FAILING_UNITS:
        _write(c, f"/etc/systemd/system/{unit}", FAILING_UNIT)
    # The shipped rule, with the units already allowed there (polkit rules share one
    # JavaScript scope: one file holds the lists) plus the scenario's.
    rule_file = "/etc/polkit-1/rules.d/50-graced.rules"
    found = re.search(r"var GRACED_UNITS = (\[.*?\]);", c.sh(f"cat {rule_file}").stdout)
    units = [*(json.loads(found.group(1)) if found else []), *FAILING_UNITS]
    rules = re.sub(r"var GRACED_UNITS = \[.*?\];", f"var GRACED_UNITS = {json.dumps(units)};",
                   (ROOT / "systemd/graced.polkit.rules").read_text())
    rules = rules.replace("var GRACED_ACTIONS = [];",
                          'var GRACED_ACTIONS = ["grace-action@clean-logs.service"];')
    _write(c, rule_file, rules)
    _write(c, "/tmp/scenario.toml", CONFIG)
    # The log directory is a small file system of its own, mounted before graced starts.
    # Optional, as graced(8) says: lets graced read back the actions' journal lines.
    res = c.sh("usermod -a -G systemd-journal graced && "
               f"mkdir -p {LOGS} && mount -t tmpfs -o size=4m,mode=0755 tmpfs {LOGS} && "
               "cat /tmp/scenario.toml >> /etc/graced/graced.toml && "
               "graced config check /etc/graced/graced.toml && systemctl daemon-reload && "
               "systemctl restart graced && systemctl is-active graced")
    if res.returncode != 0:
        raise SystemExit(f"installing the scenario failed: {res.stdout}{res.stderr}")
    say("scenario installed: grace-action@.service + clean-logs drop-in, polkit rule "
        f"({', '.join(FAILING_UNITS)}, grace-action@clean-logs.service), {LOGS} "
        "(tmpfs, 4 MB), failed-units and applogs detectors; graced restarted")


def exposure(c: Container, check: Check) -> None:
    res = c.sh("systemd-analyze security graced.service --no-pager | tail -1")
    m = re.search(r"Overall exposure level for graced.service: ([0-9.]+)", res.stdout)
    check(m is not None and float(m.group(1)) <= 2.0,
          f"graced's unit keeps its exposure at 2.0 or better: {res.stdout.strip()}",
          res.stdout + res.stderr)
    pid = c.sh("systemctl show -p MainPID --value graced").stdout.strip()
    res = c.sh(f"nsenter -t {pid} -m setpriv --reuid graced --regid graced --clear-groups "
               f"touch {LOGS}/graced-was-here; echo rc=$?")
    check("rc=0" not in res.stdout and "Read-only file system" in res.stderr,
          f"graced itself cannot write {LOGS} (its sandbox): {res.stderr.strip()}",
          res.stdout + res.stderr)


def clean_logs(c: Container, say: Say, check: Check) -> None:
    since = _head(c)
    tail = _events(c, since, "mission.*")
    try:
        # Old rotated logs fill the disk past the threshold.
        c.sh(f"for i in 1 2 3; do head -c 1000000 /dev/urandom > {LOGS}/app.log.$i; done; "
             f"gzip -c {LOGS}/app.log.1 > {LOGS}/app.log.4.gz; "
             f"touch -d '2 days ago' {LOGS}/app.log.*; echo live > {LOGS}/app.log")
        say(f"filled {LOGS}: " + c.sh(f"df -h --output=pcent {LOGS} | tail -1").stdout.strip())
        done = _wait_event(tail, lambda e: e["topic"] in ("mission.resolved", "mission.failed")
                           and e["payload"].get("detector") == "applogs", 90)
    finally:
        tail.kill()
    mid = done["payload"]["id"] if done else None
    m = _mission(c, mid) if mid else {}
    step = (m.get("steps") or [{}])[0]
    left = c.sh(f"ls {LOGS}").stdout.split()
    check(done is not None and done["topic"] == "mission.resolved" and step.get("ok") is True
          and left == ["app.log"],
          f"the playbook freed {LOGS} through grace-action@clean-logs.service (exit "
          f"{step.get('exit_code')}; left: {' '.join(left)}) and mission {mid} resolved",
          json.dumps(m, indent=1)[-3000:])
    say("  plan: " + json.dumps(m["plan"]["steps"][0]["argv"]))
    for line in (step.get("output") or "").strip().splitlines()[-6:]:
        say(f"  | {line}")


def restart_failed_unit(c: Container, say: Say, check: Check, unit: str,
                        silence: bool) -> None:
    since = _head(c)
    tail = _events(c, since, "*")
    try:
        sid = None
        if silence:
            res = c.sh(f"{CTL} silence add failed-units --for 8s --comment 'maintenance'")
            sid = int(res.stdout.strip() or 0)
            check(res.returncode == 0, f"silence {sid} added on failed-units for 8 s",
                  res.stderr)
        name = unit.removesuffix(".service")
        c.sh(f"touch /run/{name}-break; systemctl start {unit}")
        before = c.sh(f"systemctl show -p InvocationID --value {unit}").stdout.strip()
        state = c.sh(f"systemctl is-failed {unit}").stdout.strip()
        say(f"{unit} broke: {state}")
        if silence:
            held = _wait_event(tail, lambda e: e["topic"] == "executor.silenced", 30)
            check(held is not None and held["payload"]["silence"] == sid
                  and c.sh(f"systemctl is-failed {unit}").stdout.strip() == "failed",
                  f"the mission was held by silence {sid}: recorded, no playbook ran, "
                  f"{unit} still failed", str(held))
            assert held is not None
            mid = held["payload"]["mission"]
            ended = _wait_event(tail, lambda e: e["topic"] == "silence.expired"
                                and e["payload"]["id"] == sid, 30)
            ran = _wait_event(tail, lambda e: e["topic"] == "mission.executing"
                              and e["payload"]["id"] == mid, 30)
            check(ended is not None and ran is not None and ran["seq"] > ended["seq"]
                  and ended["payload"]["reason"] == "expired",
                  f"silence {sid} expired by itself after "
                  f"{_span(ended['payload']):.0f} s "
                  f"(seq {ended['seq']}) and only then did the playbook run (seq {ran['seq']})"
                  if ended and ran else "the silence expired", json.dumps(
                      _mission(c, mid).get("timeline"), indent=1))
        done = _wait_event(tail, lambda e: e["topic"] in ("mission.resolved", "mission.failed")
                           and e["payload"].get("detector") == "failed-units", 60)
    finally:
        tail.kill()
    after = c.sh(f"systemctl show -p InvocationID --value {unit}").stdout.strip()
    active = c.sh(f"systemctl is-active {unit}").stdout.strip()
    mid = done["payload"]["id"] if done else None
    m = _mission(c, mid) if mid else {}
    check(done is not None and done["topic"] == "mission.resolved" and active == "active"
          and before != after and m.get("subject") == unit,
          f"the systemd detector saw {unit} fail, the playbook restarted it "
          f"(new InvocationID, {active}) and mission {mid} resolved"
          + (" after the silence" if silence else ""), json.dumps(m, indent=1)[-3000:])


def run(c: Container, say: Say, check: Check) -> None:
    """The whole scenario on a booted container whose graced is active."""
    install(c, say)
    exposure(c, check)
    clean_logs(c, say, check)
    restart_failed_unit(c, say, check, FAILING_UNITS[0], silence=False)
    restart_failed_unit(c, say, check, FAILING_UNITS[1], silence=True)


def main() -> int:
    """Boot a copy of the check's tree, install Grace by the README, run the scenario."""
    os.environ.setdefault("GRACE_NSPAWN_CACHE", "/var/tmp/grace-nspawn-23")
    from tests.systemd import nspawn_check as base

    base.MACHINE = "grace-remediation"
    why = base.ensure_tools() or base.build_tree()
    if why:
        return base.skip(why)
    blocks = base.readme_blocks()
    base.reset_tree()
    base.copy_checkout()
    c = base.Container()
    try:
        c.wait("the container booted", "systemctl is-system-running --wait | "
               "grep -Ex 'running|degraded'", timeout=120)
        if base.trust_local_cas():
            c.sh("update-ca-certificates --fresh")
        base.install_and_default(c, blocks)
        run(c, base.say, base.check)
    finally:
        c.stop()
    base.say("remediation scenario: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
