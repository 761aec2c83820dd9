"""Playbooks for humans against a real graced: ``playbooks ls``, a dry run that prints
exactly what would run, a manual run journaled like any other, and approvals of what
the approver saw (the plan and its hash; a changed plan needs a new approval)."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import re
import select
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Graced
from tests.helpers.procs import LineCollector
from tests.test_learning_e2e import FAULT, NORMAL, SETTINGS, value_detector
from tests.test_missions_e2e import Watch


def inspect_playbook(marker: str) -> str:
    """Never automatic (critical): three actions, with placeholders."""
    return ('[[playbook]]\nname = "inspect"\ndetector = "backlog"\nrisk = "critical"\n'
            'budget = 5\n'
            '[[playbook.step]]\naction = "run"\n'
            'argv = ["/bin/echo", "{detector}", "{subject}", "value={value}", "m{mission}"]\n'
            'env = ["WHERE={subject}"]\ntimeout = 5.0\n'
            '[[playbook.step]]\naction = "restart_unit"\nunit = "{subject}-worker.service"\n'
            '[[playbook.step]]\naction = "signal"\nsignal = "HUP"\n'
            f'process = "{marker}"\nmatch_cmdline = true\n\n')


def drain_playbook(queue: Path, echo: str = "drained") -> str:
    """The fix, waiting for approval (high)."""
    return ('[[playbook]]\nname = "drain"\ndetector = "backlog"\nrisk = "high"\n'
            'budget = 4\nverify_timeout = 10.0\n'
            '[[playbook.step]]\naction = "run"\nshell = true\n'
            f'argv = ["echo {NORMAL} > {queue}; echo {echo}"]\ntimeout = 10.0\n')


def show(g: Graced, mid: int) -> dict[str, Any]:
    return json.loads(g.ctl("missions", "show", str(mid), "--json", check=True).stdout)


@pytest.fixture
def sleeper() -> Any:
    marker = f"grace-target-{uuid.uuid4().hex[:8]}"
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", marker],
                            stdin=subprocess.DEVNULL)
    yield marker, proc
    proc.kill()
    proc.wait(10)


@pytest.mark.slow
def test_playbooks_ls_dry_run_and_a_manual_run(make_graced, shortdir: Path, sleeper) -> None:
    marker, target = sleeper
    queue = shortdir / "queue"
    queue.write_text(NORMAL)
    g = make_graced(detectors=value_detector("backlog", queue, "high")
                    + inspect_playbook(marker) + drain_playbook(queue)
                    + SETTINGS.format(approval=300.0))
    w = Watch(g)
    try:
        listed = json.loads(g.ctl("playbooks", "ls", "--json", check=True).stdout)
        by_name = {p["name"]: p for p in listed["playbooks"]}
        assert set(by_name) == {"inspect", "drain"}
        drain = by_name["drain"]
        assert drain["match"] == {"detector": "backlog", "kind": None, "subject": "*",
                                  "severities": []}
        assert (drain["risk"], drain["auto"], drain["budget"], drain["budget_left"]) == (
            "high", False, 4, 4)
        assert drain["learned"] == {"runs": 0, "successes": 0, "success_rate": None,
                                    "last_run": None, "demoted": []}
        assert by_name["inspect"]["steps"] == ["run", "restart_unit", "signal"]
        text = g.ctl("playbooks", "ls", check=True).stdout
        assert text.split("\n")[0].split() == ["PLAYBOOK", "MATCH", "RISK", "STEPS",
                                               "BUDGET", "LEFT", "SUCCESS", "RUNS", "LAST",
                                               "RUN"]
        row = next(line for line in text.splitlines() if line.startswith("drain"))
        assert row.split()[:6] == ["drain", "detector=backlog", "high", "(approval)", "run",
                                   "4/4"]

        queue.write_text(FAULT)
        waiting = w.wait("mission.awaiting_approval", "backlog", 15)["payload"]
        mid = waiting["id"]

        # The dry run prints exactly what would run, with the mission's values put in,
        # and runs nothing.
        dry = g.ctl("playbooks", "run", "inspect", "--mission", str(mid), "--dry-run",
                    check=True).stdout
        assert f"dry run for mission {mid} (backlog:queue, awaiting_approval)" in dry
        assert (f'1. run: argv ["/bin/echo", "backlog", "queue", "value=99", "m{mid}"]'
                in dry)
        assert 'env WHERE (value hidden, sha256:' in dry
        assert ('2. restart_unit: unit queue-worker.service (argv ["/usr/bin/systemctl", '
                '"restart", "--", "queue-worker.service"])') in dry
        assert (f'3. signal: signal SIGHUP to processes named "{marker}" or with it anywhere '
                "in their command line (a wrapper's too)") in dry
        assert f"targets now: {target.pid}" in dry
        assert target.poll() is None and queue.read_text() == FAULT
        as_json = json.loads(g.ctl("playbooks", "run", "inspect", "--mission", str(mid),
                                   "--dry-run", "--json", check=True).stdout)
        plan = as_json["plan"]
        assert [s["action"] for s in plan["steps"]] == ["run", "restart_unit", "signal"]
        assert plan["values"] == {"subject": "queue", "value": "99", "detector": "backlog",
                                  "mission": str(mid)}
        assert plan["steps"][2]["matching_pids"] == [target.pid]

        # The waiting mission carries the plan it would run; missions show prints it.
        m = show(g, mid)
        assert m["plan"]["playbook"] == m["playbook"] and len(m["plan"]["sha256"]) == 64
        assert waiting["plan_sha256"] == m["plan"]["sha256"]
        shown = g.ctl("missions", "show", str(mid), check=True).stdout
        assert f"awaiting approval of this plan (gracectl missions approve {mid}):" in shown
        assert f"sha256 {m['plan']['sha256']}" in shown

        # Unknown playbook, a playbook that does not match, a bad mission: one line each.
        nope = g.ctl("playbooks", "run", "nope", "--mission", str(mid), "--dry-run")
        assert nope.returncode == 5 and nope.stderr.count("\n") == 1
        assert "no playbook 'nope'" in nope.stderr
        missing = g.ctl("playbooks", "run", "drain", "--mission", "9999", "--dry-run")
        assert missing.returncode == 5 and "no mission 9999" in missing.stderr

        if os.geteuid() == 0:
            # Without control rights a real run is refused (a dry run is fine).
            os.chmod(g.socket, 0o666)
            os.chmod(g.base, 0o755)
            os.chmod(g.home, 0o777)
            nobody = ["setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups",
                      g.ctl_argv0(), "playbooks", "run", "drain", "--mission", str(mid),
                      "--yes"]
            refused = subprocess.run(nobody, env=g.env, capture_output=True, text=True,
                                     stdin=subprocess.DEVNULL, timeout=60)
            assert refused.returncode == 4, refused.stderr
            assert "needs control rights" in refused.stderr
            allowed = subprocess.run([*nobody, "--dry-run"], env=g.env, capture_output=True,
                                     text=True, stdin=subprocess.DEVNULL, timeout=60)
            assert allowed.returncode == 0 and "1. run: argv" in allowed.stdout, allowed.stderr
            assert show(g, mid)["state"] == "awaiting_approval"

        # A manual run is a run like any other: journaled, verified, learned from.
        # drain is high risk: without a terminal, a real run names the plan (or --yes).
        blind = g.ctl("playbooks", "run", "drain", "--mission", str(mid))
        assert blind.returncode == 2 and "--plan SHA256" in blind.stderr, blind.stderr
        drain_plan = json.loads(g.ctl("playbooks", "run", "drain", "--mission", str(mid),
                                      "--dry-run", "--json", check=True).stdout)["plan"]
        stale = g.ctl("playbooks", "run", "drain", "--mission", str(mid), "--plan", "0" * 64)
        assert stale.returncode == 1 and "would run plan" in stale.stderr, stale.stderr
        run = g.ctl("playbooks", "run", "drain", "--mission", str(mid), "--json",
                    "--plan", drain_plan["sha256"], check=True)
        assert json.loads(run.stdout)["mission"]["state"] in ("approved", "executing",
                                                             "verifying", "resolved")
        w.wait("mission.resolved", "backlog", 20)
        assert queue.read_text().strip() == NORMAL
        m = show(g, mid)
        assert [t["to"] for t in m["timeline"]][-4:] == ["approved", "executing", "verifying",
                                                        "resolved"]
        assert m["approvals"][0]["decision"] == "run by hand"
        assert m["approvals"][0]["uid"] == os.geteuid()
        assert m["steps"][0]["ok"] and m["steps"][0]["output"] == "drained\n"
        assert m["plan"]["playbook"] == "drain"
        assert m["steps"][0]["argv"] == m["plan"]["steps"][0]["argv"]
        events = [json.loads(line) for line in g.ctl(
            "tail", "--json", "--since", "1", "--no-follow", "executor.*",
            check=True).stdout.splitlines()]
        manual = [e["payload"] for e in events if e["topic"] == "executor.manual_run"]
        assert manual == [{"mission": mid, "playbook": "drain", "by": m["approvals"][0]["user"],
                           "uid": os.geteuid(), "plan_sha256": m["plan"]["sha256"]}]
        after = {p["name"]: p for p in json.loads(g.ctl("playbooks", "ls", "--json",
                                                        check=True).stdout)["playbooks"]}
        # Run by a person: the budget rations automatic runs only.
        assert after["drain"]["budget_left"] == 4
        assert after["drain"]["budget_used"] == {}
        assert after["drain"]["learned"]["runs"] == 1
        assert after["drain"]["learned"]["successes"] == 1
        # A closed mission cannot be run again.
        again = g.ctl("playbooks", "run", "drain", "--mission", str(mid), "--yes")
        assert again.returncode == 9 and "not waiting for a decision" in again.stderr, \
            again.stderr
    finally:
        w.close()


@pytest.mark.slow
def test_an_approval_for_a_plan_changed_since_is_refused(make_graced, shortdir: Path) -> None:
    queue = shortdir / "queue"
    queue.write_text(NORMAL)
    settings = SETTINGS.format(approval=300.0)
    g = make_graced(detectors=value_detector("backlog", queue, "high")
                    + drain_playbook(queue, echo="first") + settings)
    w = Watch(g)
    try:
        queue.write_text(FAULT)
        waiting = w.wait("mission.awaiting_approval", "backlog", 15)["payload"]
        mid = waiting["id"]
        before = show(g, mid)["plan"]
        assert before["playbook"] == waiting["playbook"]
        # A wrong hash is refused and changes nothing; nothing changed, and it says so: the
        # hash is not the plan's, which it names.
        for bad in ("0" * 64, "0" * 12):
            wrong = g.ctl("missions", "approve", str(mid), "--plan", bad)
            assert wrong.returncode == 1 and "changed since" not in wrong.stderr
            assert "does not match" in wrong.stderr and before["sha256"][:16] in wrong.stderr
            assert wrong.stderr.count("\n") == 1
        # missions show prints 16 hex digits: a prefix of at least 12 names the plan.
        short = g.ctl("missions", "approve", str(mid), "--plan", before["sha256"][:11])
        assert short.returncode == 2 and "--plan" in short.stderr
        assert show(g, mid)["state"] == "awaiting_approval"

        # The playbook changes under the waiting mission: a config reload. The mission
        # shows the plan it would run now at once (mission.plan_changed).
        head = json.loads(g.ctl("status", "--json", check=True).stdout)["head_seq"]
        changes = LineCollector(g.ctl_popen("tail", "--json", "--since", str(head),
                                            "mission.plan_changed"))
        g.config.write_text(g.config.read_text().replace("echo first", "echo second"))
        g.ctl("reload", check=True)
        assert changes.wait_for(lambda lines: bool(lines), 15), "no mission.plan_changed"
        event = changes.events()[0]["payload"]
        changes.proc.terminate()
        changes.wait_exit(10)
        now = show(g, mid)
        assert now["state"] == "awaiting_approval" and not now["approvals"]
        changed = now["plan"]
        assert changed["sha256"] != before["sha256"]
        assert "echo second" in changed["steps"][0]["argv"][2]
        assert changed["values"] == before["values"]  # the values it was shown with
        assert (event["id"], event["was"], event["plan_sha256"]) == (
            mid, before["sha256"], changed["sha256"])
        # The reason names the plan it waits with now, in the event, show and ls --json
        # (it named the replaced one, and approving that hash is refused).
        listed = json.loads(g.ctl("missions", "ls", "--json", check=True).stdout)
        row = next(r for r in listed if r["id"] == mid)
        shown_text = g.ctl("missions", "show", str(mid), check=True).stdout
        reason_line = next(x for x in shown_text.splitlines() if "needs approval" in x)
        for reason in (event["reason"], now["reason"], row["reason"], reason_line):
            assert f"plan sha256 {changed['sha256'][:16]}" in reason, reason
            assert f"plan sha256 {before['sha256'][:16]}" not in reason, reason
        # An approval of the plan shown before the reload is refused.
        # explain shows the plan it waits with now, and the replaced one only as replaced.
        explain = g.ctl("missions", "explain", str(mid), check=True).stdout.splitlines()
        assert f"plan      drain sha256 {changed['sha256'][:16]}" in explain, explain
        assert all(f"replaced by {changed['sha256'][:16]}" in x
                   for x in explain if before["sha256"][:16] in x), explain
        for stale_hash in (before["sha256"], before["sha256"][:12]):
            stale = g.ctl("missions", "approve", str(mid), "--plan", stale_hash)
            assert stale.returncode == 1, stale.stderr
            assert "changed since" in stale.stderr and stale.stderr.count("\n") == 1
        assert show(g, mid)["state"] == "awaiting_approval"

        # Approving what is shown now works; the approval names that plan.
        forged = "  2026-01-01 00:00:00  approved by root (unix peer credentials)"
        ok = g.ctl("missions", "approve", str(mid), "--plan", changed["sha256"][:16],
                   "--comment", f"read the new plan\n{forged}")
        assert ok.returncode == 0, ok.stderr
        assert f"sha256 {changed['sha256']}" in ok.stderr  # the plan approved, shown
        final = g.ctl("wait", str(mid), "--state", "resolved", "--state", "failed",
                      "--timeout", "30", "--json")
        m = json.loads(final.stdout)
        assert m["approvals"][-1]["plan_sha256"] == changed["sha256"]
        # The comment keeps its newline in JSON; missions show escapes it in its field, so
        # it cannot forge a line of its own.
        assert m["approvals"][-1]["comment"] == f"read the new plan\n{forged}"
        text = g.ctl("missions", "show", str(mid), check=True).stdout
        assert forged not in text.splitlines()
        assert f"read the new plan\\n{forged}" in text
        assert m["plan"]["sha256"] == changed["sha256"]
        # explain says who approved, how and when, on one line the comment cannot break.
        explain = g.ctl("missions", "explain", str(mid), check=True).stdout.splitlines()
        approval = [x for x in explain if x.startswith("approval")]
        who = pwd.getpwuid(os.getuid()).pw_name
        assert len(approval) == 1 and approval[0].startswith(
            f"approval  approved by {who} (unix peer credentials) at "), explain
        assert f"plan {changed['sha256'][:16]}" in approval[0]
        assert forged not in explain
    finally:
        w.close()


@pytest.mark.slow
def test_step_secrets_never_reach_a_reader(make_graced, shortdir: Path) -> None:
    """A step's env values, a password and token in its argv's URL and those secrets in its
    output reach the step, and no reader: not a plan, an event, a mission, the journal."""
    queue, seen = shortdir / "queue", shortdir / "seen"
    queue.write_text(NORMAL)
    token, password, query = (f"{word}-{uuid.uuid4().hex}" for word in ("tok", "pw", "q"))
    url = f"https://ops:{password}@api.example.invalid/drain?key={query}"
    script = f'echo "token=$TOKEN url=$1"; echo "$TOKEN $1" > {seen}; echo {NORMAL} > {queue}'
    g = make_graced(detectors=value_detector("backlog", queue, "high")
                    + '[[playbook]]\nname = "drain"\ndetector = "backlog"\nrisk = "high"\n'
                    'verify_timeout = 10.0\n[[playbook.step]]\naction = "run"\n'
                    f'argv = {json.dumps(["/bin/sh", "-c", script, "sh", url])}\n'
                    f'env = ["TOKEN={token}"]\ntimeout = 10.0\n'
                    + SETTINGS.format(approval=300.0))
    w = Watch(g)
    try:
        queue.write_text(FAULT)
        mid = w.wait("mission.awaiting_approval", "backlog", 15)["payload"]["id"]
        dry = g.ctl("playbooks", "run", "drain", "--mission", str(mid), "--dry-run", "--json",
                    check=True).stdout
        step = json.loads(dry)["plan"]["steps"][0]
        assert step["env"]["TOKEN"].startswith("sha256:") and "argv_sha256" in step
        assert step["argv"][-1] == ("https://REDACTED@api.example.invalid/drain?"
                                    "key=REDACTED")
        shown = g.ctl("missions", "show", str(mid), check=True).stdout
        assert "TOKEN (value hidden, sha256:" in shown
        plan = show(g, mid)["plan"]["sha256"]
        g.ctl("missions", "approve", str(mid), "--plan", plan, check=True)
        done = json.loads(g.ctl("wait", str(mid), "--state", "resolved", "--timeout", "30",
                                "--json", check=True).stdout)
        # The step got the real values ...
        assert seen.read_text().split() == [token, url]
        # ... and shows its output with them hidden.
        assert done["steps"][0]["output"] == (
            "token=REDACTED url=https://REDACTED@api.example.invalid/drain?key=REDACTED\n")
        readers = [dry, shown, g.ctl("missions", "show", str(mid), "--json", check=True).stdout,
                   g.ctl("missions", "ls", "--all", "--json", check=True).stdout,
                   g.ctl("tail", "--json", "--since", "1", "--no-follow", check=True).stdout]
        files = [p.read_bytes() for p in g.state.glob("journal.db*")]
        for secret in (token, password, query):
            assert not [r for r in readers if secret in r], secret
            assert not [f for f in files if secret.encode() in f], secret
    finally:
        w.close()


class OnTerminal:
    """A gracectl on a real pseudo-terminal (stdin, stdout and stderr), as a person runs it."""

    def __init__(self, g: Graced, *args: str) -> None:
        self.master, slave = os.openpty()
        self.proc = subprocess.Popen([g.ctl_argv0(), *args], env=g.env, stdin=slave,
                                     stdout=slave, stderr=slave, close_fds=True)
        os.close(slave)
        self.screen = ""

    def read_until(self, text: str, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while text not in self.screen:
            left = deadline - time.monotonic()
            assert left > 0, f"no {text!r} on the terminal: {self.screen!r}"
            if select.select([self.master], [], [], left)[0]:
                try:
                    self.screen += os.read(self.master, 65536).decode(errors="replace")
                except OSError:  # the process closed the terminal
                    break
        assert text in self.screen, self.screen
        return self.screen

    def answer(self, line: str) -> int:
        os.write(self.master, line.encode() + b"\n")
        code = self.proc.wait(60)
        with contextlib.suppress(OSError):
            while select.select([self.master], [], [], 0.5)[0]:
                chunk = os.read(self.master, 65536)
                if not chunk:
                    break
                self.screen += chunk.decode(errors="replace")
        os.close(self.master)
        return code


@pytest.mark.slow
def test_approve_shows_the_plan_and_sends_only_the_plan_seen(make_graced,
                                                             shortdir: Path) -> None:
    queue = shortdir / "queue"
    queue.write_text(NORMAL)
    g = make_graced(detectors=value_detector("backlog", queue, "high")
                    + drain_playbook(queue, echo="first") + SETTINGS.format(approval=300.0))
    w = Watch(g)
    try:
        queue.write_text(FAULT)
        mid = w.wait("mission.awaiting_approval", "backlog", 15)["payload"]["id"]
        first = show(g, mid)["plan"]
        # Without a terminal an approval names the plan (or says --yes): nothing is sent.
        blind = g.ctl("missions", "approve", str(mid))
        assert blind.returncode == 2 and "--plan SHA256" in blind.stderr and "--yes" in \
            blind.stderr, blind.stderr
        assert show(g, mid)["state"] == "awaiting_approval"

        # On a terminal: the plan line by line, then y/N; "n" sends nothing.
        no = OnTerminal(g, "missions", "approve", str(mid))
        screen = no.read_until("[y/N]")
        assert f"sha256 {first['sha256']}" in screen
        assert "\n  1. run: argv" in screen and "\\n" not in screen
        assert no.answer("n") == 1 and "not approved" in no.screen
        assert show(g, mid)["state"] == "awaiting_approval"

        # The approver reads the plan; the config is reloaded before they answer y: the
        # approval names the plan they read, and graced refuses it.
        yes = OnTerminal(g, "missions", "approve", str(mid), "--comment", "read it")
        yes.read_until("[y/N]")
        g.config.write_text(g.config.read_text().replace("echo first", "echo second"))
        g.ctl("reload", check=True)
        assert show(g, mid)["plan"]["sha256"] != first["sha256"]
        assert yes.answer("y") == 1 and "changed since" in yes.screen, yes.screen
        m = show(g, mid)
        assert m["state"] == "awaiting_approval" and not m["approvals"]

        # Read again, approved with y: the plan seen runs.
        again = OnTerminal(g, "missions", "approve", str(mid))
        assert "echo second" in again.read_until("[y/N]")
        assert again.answer("y") == 0, again.screen
        done = json.loads(g.ctl("wait", str(mid), "--state", "resolved", "--timeout", "30",
                                "--json", check=True).stdout)
        assert done["approvals"][-1]["plan_sha256"] == done["plan"]["sha256"] != first["sha256"]
    finally:
        w.close()


def test_ids_beyond_sqlite_are_bad_requests(make_graced, shortdir: Path) -> None:
    """An id SQLite cannot hold is the client's error (bad_request), never graced's
    (internal, with a traceback in its log)."""
    import trio

    from gracectl.client import Endpoint, connect
    from gracectl.errors import CtlError

    queue = shortdir / "queue"
    queue.write_text(NORMAL)
    g = make_graced(detectors=value_detector("backlog", queue, "high")
                    + drain_playbook(queue) + SETTINGS.format(approval=300.0))
    huge = 2**70
    asks = [("missions.get", {"id": huge}), ("missions.get", {"id": -(2**64)}),
            ("missions.similar", {"id": huge}),
            ("missions.approve", {"id": huge, "comment": ""}),
            ("missions.reject", {"id": huge, "comment": ""}),
            ("playbooks.run", {"name": "drain", "mission": huge, "dry_run": True}),
            ("silence.remove", {"id": huge})]

    async def ask_all() -> list[tuple[str, str]]:
        codes = []
        async with connect(Endpoint(socket=str(g.socket))) as conn:
            for method, params in asks:
                try:
                    await conn.request(method, params)
                    codes.append((method, "ok"))
                except CtlError as exc:  # bad_request is a RemoteError; not_found, ...
                    codes.append((method, getattr(exc, "code_name", type(exc).__name__)))
        return codes

    assert trio.run(ask_all) == [(method, "bad_request") for method, _ in asks]
    assert "Traceback" not in g.stderr()
    assert json.loads(g.ctl("status", "--json", check=True).stdout)["pid"] == g.proc.pid


@pytest.mark.slow
def test_a_step_that_starts_a_background_process_ends_when_its_process_exits(
        make_graced, shortdir: Path) -> None:
    """``nohup worker &`` keeps the step's output pipe open in the worker: the step still
    ends when its own process exits, not at its timeout. A step that does time out says so
    in human output (never Python's None) and has a null exit code in JSON."""
    queue, stuck, pid_file = shortdir / "queue", shortdir / "stuck", shortdir / "worker.pid"
    queue.write_text(NORMAL)
    stuck.write_text(NORMAL)
    script = (f"nohup sleep 120 & echo $! > {pid_file}; echo started; "
              f"echo {NORMAL} > {queue}")
    g = make_graced(detectors=value_detector("backlog", queue, "high")
                    + '[[playbook]]\nname = "restart-worker"\ndetector = "backlog"\n'
                    'risk = "low"\nverify_timeout = 10.0\n[[playbook.step]]\naction = "run"\n'
                    f'argv = {json.dumps(["/bin/sh", "-c", script])}\ntimeout = 8.0\n'
                    + value_detector("stuck", stuck, "high")
                    + '[[playbook]]\nname = "slow"\ndetector = "stuck"\nrisk = "low"\n'
                    '[[playbook.step]]\naction = "run"\nargv = ["/bin/sleep", "30"]\n'
                    'timeout = 1.0\n' + SETTINGS.format(approval=300.0))
    w = Watch(g)
    try:
        queue.write_text(FAULT)
        mid = w.wait("mission.opened", "backlog", 15)["payload"]["id"]
        g.ctl("wait", str(mid), "--state", "resolved", "--timeout", "30", check=True)
        step = show(g, mid)["steps"][0]
        assert (step["ok"], step["exit_code"], step["output"]) == (True, 0, "started\n")
        assert step["duration_s"] < 5.0, step
        worker = int(pid_file.read_text())
        os.kill(worker, 0)  # the worker it started still runs
        os.kill(worker, 9)

        stuck.write_text(FAULT)
        again = w.wait("mission.opened", "stuck", 15)["payload"]["id"]
        g.ctl("wait", str(again), "--state", "failed", "--timeout", "30", check=True)
        slow = show(g, again)["steps"][0]
        assert (slow["ok"], slow["exit_code"]) == (False, None)
        assert '"exit_code": null' in g.ctl("missions", "show", str(again), "--json",
                                            check=True).stdout
        human = g.ctl("missions", "show", str(again), check=True).stdout
        line = next(x for x in human.splitlines() if "/bin/sleep 30" in x)
        assert "timed out" in line and "None" not in line, line
    finally:
        w.close()
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(pid_file.read_text()), 9)


@pytest.mark.slow
def test_an_approval_as_the_symptom_clears_is_refused_naming_the_normal_sample(
        make_graced, shortdir: Path) -> None:
    """Approved after the detector saw the symptom clear but before the mission resolved
    as cleared: refused (exit 1, nothing runs), naming the normal sample; with
    --even-if-clearing the plan runs and the reply still says the latest sample was
    normal. Approved while the symptom is there: no warning."""
    queue = shortdir / "queue"
    queue.write_text(NORMAL)
    g = make_graced(detectors=value_detector("backlog", queue, "high")
                    + drain_playbook(queue)
                    + SETTINGS.format(approval=300.0).replace("resolve_after = 2",
                                                               "resolve_after = 40"))
    w = Watch(g)
    recovered = LineCollector(g.ctl_popen("tail", "--json", "--since", "1",
                                          "detector.recovered"))
    try:
        queue.write_text(FAULT)
        first = w.wait("mission.awaiting_approval", "backlog", 15)["payload"]["id"]
        res = g.ctl("missions", "approve", str(first), "--yes", check=True)
        assert "warning" not in res.stderr, res.stderr
        g.ctl("wait", str(first), "--state", "resolved", "--timeout", "30", check=True)

        queue.write_text(FAULT)
        mid = w.wait("mission.awaiting_approval", "backlog", 15, count=2)["payload"]["id"]
        queue.write_text(NORMAL)
        assert recovered.wait_for(lambda ls: len(ls) >= 2, 15)
        res = g.ctl("missions", "approve", str(mid), "--yes")
        assert res.returncode == 1 and res.stderr.count("\n") == 1, res
        assert "symptom is clearing" in res.stderr and re.search(
            r"backlog queue (was|were) normal \(value 0\)", res.stderr) \
            and "nothing run" in res.stderr, res.stderr
        assert not [e for e in w.events("mission.executing", "backlog")
                    if e["payload"]["id"] == mid]  # nothing ran for it
        res = g.ctl("missions", "approve", str(mid), "--yes", "--even-if-clearing",
                    check=True)
        warning = [x for x in res.stderr.splitlines() if "warning" in x]
        assert len(warning) == 1 and "latest sample" in warning[0], res.stderr
        assert "backlog queue was normal (value 0)" in warning[0], warning
    finally:
        recovered.proc.terminate()
        w.close()


@pytest.mark.slow
def test_playbooks_run_takes_a_plan_prefix_and_n_exits_1(make_graced, shortdir: Path) -> None:
    """``playbooks run --plan`` takes the prefix ``missions approve --plan`` takes (>= 12
    hex digits); answering n at its prompt runs nothing and exits 1."""
    queue = shortdir / "queue"
    queue.write_text(NORMAL)
    g = make_graced(detectors=value_detector("backlog", queue, "high")
                    + drain_playbook(queue) + SETTINGS.format(approval=300.0))
    w = Watch(g)
    try:
        queue.write_text(FAULT)
        mid = w.wait("mission.awaiting_approval", "backlog", 15)["payload"]["id"]
        sha = show(g, mid)["plan"]["sha256"]

        no = OnTerminal(g, "playbooks", "run", "drain", "--mission", str(mid))
        assert f"sha256 {sha}" in no.read_until("[y/N]")
        assert no.answer("n") == 1 and "not run: nothing was sent" in no.screen, no.screen
        assert show(g, mid)["state"] == "awaiting_approval"

        short = g.ctl("playbooks", "run", "drain", "--mission", str(mid), "--plan", sha[:11])
        assert short.returncode == 2 and "--plan" in short.stderr, short.stderr
        wrong = g.ctl("playbooks", "run", "drain", "--mission", str(mid), "--plan", "0" * 12)
        assert wrong.returncode == 1 and sha[:16] in wrong.stderr, wrong.stderr
        assert show(g, mid)["state"] == "awaiting_approval"

        ran = g.ctl("playbooks", "run", "drain", "--mission", str(mid), "--plan", sha[:16])
        assert ran.returncode == 0, ran.stderr
        done = json.loads(g.ctl("wait", str(mid), "--state", "resolved", "--timeout", "30",
                                "--json", check=True).stdout)
        assert done["approvals"][-1]["plan_sha256"] == sha
    finally:
        w.close()


def put(file: Path, text: str) -> None:
    """Replace the file whole (a reader never sees it empty, as it may mid write_text)."""
    new = file.with_name(file.name + ".new")
    new.write_text(text)
    os.replace(new, file)


@pytest.mark.slow
def test_a_waiting_plan_keeps_its_hash_while_the_detector_samples_on(
        make_graced, shortdir: Path) -> None:
    """The plan ``missions show`` prints is the plan ``playbooks run`` shows, accepts by
    its hash and runs, however the value moves after the plan was made (its values are
    frozen): a sample of 98 after a plan made at 99 changes neither the hash nor what
    runs. (The flake: a dry run put in the latest sample's value, so its hash differed
    from the one missions show had just printed.)"""
    queue = shortdir / "queue"
    put(queue, NORMAL)
    g = make_graced(detectors=value_detector("backlog", queue, "high")
                    + drain_playbook(queue, echo="value=$GRACE_VALUE")
                    + SETTINGS.format(approval=300.0).replace("update_interval = 60",
                                                               "update_interval = 0.1"))
    w = Watch(g)
    try:
        put(queue, FAULT)
        mid = w.wait("mission.awaiting_approval", "backlog", 15)["payload"]["id"]
        plan = show(g, mid)["plan"]
        sha = plan["sha256"]
        assert plan["values"]["value"] == FAULT, plan

        put(queue, "98")  # still anomalous: the mission waits on, its last value moves
        assert w.tail.wait_for(lambda _: any(
            e["payload"]["last_value"] == 98 for e in w.events("mission.updated", "backlog")),
            15), w.tail.lines[-3:]
        now = show(g, mid)
        assert now["last_value"] == 98 and now["plan"]["sha256"] == sha, now

        dry = json.loads(g.ctl("playbooks", "run", "drain", "--mission", str(mid),
                               "--dry-run", "--json", check=True).stdout)["plan"]
        assert dry["sha256"] == sha and dry["values"]["value"] == FAULT, dry

        ran = g.ctl("playbooks", "run", "drain", "--mission", str(mid), "--plan", sha[:16])
        assert ran.returncode == 0, ran.stderr
        done = json.loads(g.ctl("wait", str(mid), "--state", "resolved", "--timeout", "30",
                                "--json", check=True).stdout)
        assert done["approvals"][-1]["plan_sha256"] == sha
        assert done["steps"][0]["output"].strip().endswith(f"value={FAULT}"), done["steps"]
    finally:
        w.close()


@pytest.mark.slow
def test_runs_a_person_approved_spend_no_budget(make_graced, shortdir: Path) -> None:
    """A playbook that waits for approval (high) with budget 1: a person approves it, it
    runs and resolves; the fault comes back within the hour and the mission waits for
    approval again, it is not escalated for a budget it was never rationed by (runs a
    person approved or started spend neither the playbook's budget nor the global cap)."""
    queue = shortdir / "queue"
    queue.write_text(NORMAL)
    g = make_graced(detectors=value_detector("backlog", queue, "high")
                    + drain_playbook(queue).replace("budget = 4", "budget = 1")
                    + SETTINGS.format(approval=300.0).replace(
                        "max_actions_per_hour = 10000", "max_actions_per_hour = 1"))
    w = Watch(g)
    try:
        for n in (1, 2):
            queue.write_text(FAULT)
            waiting = w.wait("mission.awaiting_approval", "backlog", 20, count=n)["payload"]
            ok = g.ctl("missions", "approve", str(waiting["id"]), "--plan",
                       waiting["plan_sha256"])
            assert ok.returncode == 0, ok.stderr
            w.wait("mission.resolved", "backlog", 30, count=n)
        assert not w.events("mission.escalated", "backlog")
        listed = json.loads(g.ctl("playbooks", "ls", "--json", check=True).stdout)
        drain = next(p for p in listed["playbooks"] if p["name"] == "drain")
        assert (drain["budget_left"], drain["budget_used"]) == (1, {})
        assert listed["global_left"] == 1
    finally:
        w.close()
