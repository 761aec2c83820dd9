"""Remediation against a real graced: playbooks that really fix real faults, approvals,
observe mode, pause, budgets, refusals, and a crash in the middle of a step."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Graced
from tests.helpers import memory
from tests.helpers.procs import LineCollector, read_fifo
from tests.test_missions_e2e import MISSIONS, Watch, _ready_tail


def sleeper_cmd(marker: str) -> list[str]:
    return [sys.executable, "-c", "import time; time.sleep(3600)", marker]


def start_sleeper(marker: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(sleeper_cmd(marker), stdin=subprocess.DEVNULL,
                            start_new_session=True)


def kill_all(marker: str) -> None:
    subprocess.run(["pkill", "-f", marker], check=False)


def process_detector(marker: str) -> str:
    return (f'[[detector]]\nname = "worker"\nkind = "process"\ninterval = 1.0\n'
            f'process = "{marker}"\nmatch_cmdline = true\nseverity = "high"\n')


def restart_playbook(marker: str, risk: str, extra: str = "", count_file: str = "",
                     prelude: str = "") -> str:
    """A playbook whose run step really restarts the worker (detached from graced).

    The marker reaches the step through its environment, so the step's own command line
    does not look like the worker to the process detector.
    """
    cmd = " ".join(sleeper_cmd(marker)[:2]) + ' "import time; time.sleep(3600)" "$WORKER"'
    script = (f"{prelude}setsid {cmd} </dev/null >/dev/null 2>&1 &"
              + (f" echo ran >> {count_file}" if count_file else ""))
    return (f'[[playbook]]\nname = "restart-worker"\ndetector = "worker"\nrisk = "{risk}"\n'
            f"verify_timeout = 20.0\n{extra}\n"
            f'[[playbook.step]]\naction = "run"\nshell = true\nargv = [{json.dumps(script)}]\n'
            f'env = ["WORKER={marker}"]\ntimeout = 30.0\n')


@pytest.fixture
def marker() -> Any:
    m = f"grace-worker-{uuid.uuid4().hex[:8]}"
    yield m
    kill_all(m)


def setup(make_graced, body: str, remediation: str = "", flap: float = 0.0) -> tuple[Graced,
                                                                                      Watch]:
    g = make_graced(detectors=body + MISSIONS.format(flap=flap)
                    + ("\n[remediation]\n" + remediation if remediation else ""))
    return g, Watch(g)


def mission(g: Graced, mid: int) -> dict[str, Any]:
    return json.loads(g.ctl("missions", "show", str(mid), "--json", check=True).stdout)


@pytest.mark.slow
def test_low_risk_playbook_restarts_the_process_and_is_verified(make_graced, marker) -> None:
    proc = start_sleeper(marker)
    g, w = setup(make_graced, process_detector(marker) + restart_playbook(marker, "low"))
    _ready_tail(w, g)
    proc.kill()
    opened = w.wait("mission.opened", "worker", 10)["payload"]
    w.wait("mission.executing", "worker", 10)
    w.wait("mission.verifying", "worker", 20)
    w.wait("mission.resolved", "worker", 20)
    m = mission(g, opened["id"])
    assert m["state"] == "resolved" and m["playbook"] == "restart-worker"
    assert m["steps"][0]["ok"] and m["steps"][0]["exit_code"] == 0
    assert m["verification"]["result"] == "passed"
    states = [t["to"] for t in m["timeline"]]
    assert states == ["detected", "open", "approved", "executing", "verifying", "resolved"]
    shown = g.ctl("missions", "show", str(m["id"]), check=True).stdout
    assert "steps:" in shown and "verification: passed" in shown


@pytest.mark.slow
@pytest.mark.host_wide
def test_low_risk_signal_step_kills_a_memory_hog(make_graced) -> None:
    import psutil

    hog_marker = f"grace-hog-{uuid.uuid4().hex[:8]}"
    vm = psutil.virtual_memory()
    threshold = memory.settled_percent() + 2.0
    mb = int(vm.total / 2**20 * 0.10)
    g, w = setup(make_graced,
                 f'[[detector]]\nname = "mem"\nkind = "memory"\ninterval = 1.0\n'
                 f"threshold = {threshold:.2f}\n\n"
                 f'[[playbook]]\nname = "kill-hog"\ndetector = "mem"\nrisk = "low"\n'
                 # The kernel may show a killed hog's memory as available only a minute
                 # later (tests/helpers/memory.py): the first normal sample within this.
                 f"verify_timeout = {memory.BACK_S:g}\n"
                 f'[[playbook.step]]\naction = "signal"\nsignal = "KILL"\n'
                 f'process = "{hog_marker}"\nmatch_cmdline = true\n')
    _ready_tail(w, g)
    hog = subprocess.Popen([sys.executable, "-c", "import sys, time; b = b'1' * "
                            f"({mb} * 2**20); time.sleep(600)", hog_marker])
    w.wait("mission.resolved", "mem", 30 + memory.BACK_S)
    assert hog.wait(10) == -signal.SIGKILL
    m = w.missions("mem")[0]
    assert m["steps"][0]["pids"] == [hog.pid] and m["verification"]["result"] == "passed"


@pytest.mark.slow
def test_high_risk_waits_notifies_and_runs_once_approved(make_graced, marker,
                                                         shortdir: Path) -> None:
    import http.server
    import threading

    posted: list[dict[str, Any]] = []

    class Hook(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            body = self.rfile.read(int(self.headers["Content-Length"]))
            posted.append({"type": self.headers["Content-Type"], **json.loads(body)})
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    hook = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    note = shortdir / "notified.json"
    proc = start_sleeper(marker)
    g, w = setup(make_graced, process_detector(marker) + restart_playbook(marker, "high")
                 + f'\n[[notifier]]\nname = "file"\nkind = "command"\n'
                   f'argv = ["sh", "-c", "cat > {note}"]\n'
                   f'\n[[notifier]]\nname = "hook"\nkind = "webhook"\n'
                   f'url = "http://127.0.0.1:{hook.server_address[1]}/grace"\n')
    _ready_tail(w, g)
    proc.kill()
    waiting = w.wait("mission.awaiting_approval", "worker", 10)["payload"]
    notified = LineCollector(g.ctl_popen("tail", "--json", "--since", "1", "executor.notified"))
    assert notified.wait_for(lambda ls: len(ls) >= 2, 10)
    notified.proc.terminate()
    assert all(e["payload"]["ok"] for e in notified.events())
    hook.shutdown()
    assert posted and posted[0]["type"] == "application/json"
    assert posted[0]["mission"]["id"] == waiting["id"]
    sent = json.loads(note.read_text())
    assert sent["mission"]["id"] == waiting["id"]
    assert sent["mission"]["state"] == "awaiting_approval"
    assert w.events("mission.executing", "worker") == []
    ls = g.ctl("missions", "ls", check=True).stdout
    assert "restart-worker" in ls and "awaiting_approval" in ls
    res = g.ctl("missions", "approve", str(waiting["id"]), "--yes",
                "--comment", "go ahead")
    assert res.returncode == 0, res.stderr
    w.wait("mission.resolved", "worker", 30)
    m = mission(g, waiting["id"])
    assert m["approvals"][0]["decision"] == "approved"
    assert m["approvals"][0]["comment"] == "go ahead"
    assert m["approvals"][0]["auth"] == "unix peer credentials"
    assert len(m["steps"]) == 1


@pytest.mark.slow
def test_rejected_and_expired_missions_never_execute(make_graced, marker, shortdir) -> None:
    count = shortdir / "ran"
    g, w = setup(make_graced, process_detector(marker)
                 + restart_playbook(marker, "critical", count_file=str(count)),
                 # Time for a person (here: gracectl on a loaded machine) to reject the
                 # first before it expires; the second is left to expire.
                 remediation="approval_timeout = 8.0\n")
    first = w.wait("mission.awaiting_approval", "worker", 10)["payload"]
    res = g.ctl("missions", "reject", str(first["id"]), "--comment", "not now")
    assert res.returncode == 0, res.stderr
    assert mission(g, first["id"])["state"] == "rejected"
    again = g.ctl("missions", "approve", str(first["id"]), "--yes")
    assert again.returncode == 9, again.stderr  # rejected: not waiting for a decision
    # The symptom is still there: status says so (not degraded: a person decided).
    st = g.ctl("status", "--json")
    assert st.returncode == 0, st.stderr
    assert json.loads(st.stdout)["held"] == [first["id"]]
    shown = g.ctl("status").stdout
    assert f"1 rejected, symptom still there (no new mission while it lasts): " \
           f"#{first['id']}" in " ".join(shown.split())
    # Rejected: the symptom is a person's now, so while the worker stays absent no new
    # mission opens. Once it has been back and goes missing again, graced asks again,
    # and that request, unanswered, expires.
    recovered = LineCollector(g.ctl_popen("tail", "--json", "detector.recovered"))
    proc = start_sleeper(marker)
    assert recovered.wait_for(lambda ls: len(ls) >= 1, 15)
    recovered.proc.terminate()
    assert len([m for m in w.missions("worker")]) == 1
    assert json.loads(g.ctl("status", "--json", check=True).stdout)["held"] == []
    proc.kill()
    proc.wait()
    second = w.wait("mission.awaiting_approval", "worker", 15, count=2)["payload"]
    w.wait("mission.expired", "worker", 20)
    assert mission(g, second["id"])["steps"] == []
    assert w.events("mission.executing", "worker") == [] and not count.exists()


@pytest.mark.slow
def test_observe_mode_runs_nothing_and_journals_what_it_would_run(make_graced, marker,
                                                                 shortdir) -> None:
    count = shortdir / "ran"
    g, w = setup(make_graced, process_detector(marker)
                 + restart_playbook(marker, "low", count_file=str(count)),
                 remediation='mode = "observe"\n')
    opened = w.wait("mission.opened", "worker", 10)["payload"]
    would = LineCollector(g.ctl_popen("tail", "--json", "--since", "1", "executor.would_run"))
    assert would.wait_for(lambda ls: len(ls) >= 1, 10)
    would.proc.terminate()
    ev = would.events()[0]["payload"]
    assert ev["mission"] == opened["id"] and ev["why"] == "observe mode"
    assert ev["steps"][0]["action"] == "run"
    st = json.loads(g.ctl("status", "--json", check=True).stdout)
    assert st["executor"]["mode"] == "observe"
    assert mission(g, opened["id"])["state"] == "open" and not count.exists()


@pytest.mark.slow
def test_pause_stops_execution_until_resume(make_graced, marker, shortdir) -> None:
    count = shortdir / "ran"
    proc = start_sleeper(marker)
    g, w = setup(make_graced, process_detector(marker)
                 + restart_playbook(marker, "low", count_file=str(count)))
    _ready_tail(w, g)
    assert g.ctl("pause").returncode == 0
    # Paused survives a restart.
    assert g.stop() == 0
    g.start()
    w.close()
    w = Watch(g)
    assert json.loads(g.ctl("status", "--json", check=True).stdout)["executor"]["paused"]
    proc.kill()
    opened = w.wait("mission.opened", "worker", 10)["payload"]
    would = LineCollector(g.ctl_popen("tail", "--json", "--since", "1", "executor.would_run"))
    assert would.wait_for(lambda ls: len(ls) >= 1, 10)
    would.proc.terminate()
    assert would.events()[0]["payload"]["why"] == "paused" and not count.exists()
    assert g.ctl("resume").returncode == 0
    w.wait("mission.resolved", "worker", 30)
    assert mission(g, opened["id"])["steps"] and count.read_text().count("ran") == 1
    w.close()


@pytest.mark.slow
def test_a_spent_budget_escalates(make_graced, marker, shortdir) -> None:
    count = shortdir / "ran"
    proc = start_sleeper(marker)
    g, w = setup(make_graced, process_detector(marker)
                 + restart_playbook(marker, "low", "budget = 1\n", str(count)))
    _ready_tail(w, g)
    proc.kill()
    w.wait("mission.resolved", "worker", 30)
    kill_all(marker)
    escalated = w.wait("mission.escalated", "worker", 15)["payload"]
    assert "budget spent" in escalated["reason"]
    assert count.read_text().count("ran") == 1


@pytest.mark.slow
def test_an_approval_from_a_uid_not_allowed_is_refused_and_journaled(make_graced,
                                                                    marker) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to act as another uid")
    g, w = setup(make_graced, process_detector(marker) + restart_playbook(marker, "high"),
                 remediation='approvers = ["root"]\n')
    os.chmod(g.socket, 0o666)
    os.chmod(g.base, 0o755)
    os.chmod(g.home, 0o777)
    waiting = w.wait("mission.awaiting_approval", "worker", 10)["payload"]
    res = subprocess.run(["setpriv", "--reuid", "nobody", "--regid", "nogroup",
                          "--clear-groups", g.ctl_argv0(), "missions", "approve",
                          str(waiting["id"]), "--yes"], env=g.env, capture_output=True, text=True,
                         stdin=subprocess.DEVNULL, timeout=30)
    assert res.returncode == 4, res.stderr
    assert "may not approve" in res.stderr and res.stderr.count("\n") == 1
    refused = json.loads(g.ctl("tail", "--json", "--since", "1", "--no-follow",
                               "mission.approval_refused", check=True).stdout.splitlines()[0])
    assert refused["payload"]["mission"] == waiting["id"]
    assert mission(g, waiting["id"])["state"] == "awaiting_approval"


def test_shell_metacharacters_in_a_subject_never_reach_a_shell(make_graced, shortdir) -> None:
    pwned = shortdir / "pwned"
    subject = f"x; touch {pwned} #$(touch {pwned})`touch {pwned}`"
    value = shortdir / "v"
    value.write_text("100")
    g, w = setup(make_graced,
                 f'[[detector]]\nname = "m"\nkind = "value"\ninterval = 1.0\n'
                 f'file = "{value}"\nthreshold = 50.0\nsubject = {json.dumps(subject)}\n\n'
                 f'[[playbook]]\nname = "echo"\ndetector = "m"\nrisk = "low"\n'
                 f"verify_timeout = 2.0\n"
                 f'[[playbook.step]]\naction = "run"\nargv = ["echo", "{{subject}}"]\n')
    w.wait("mission.executing", "m", 10)
    failed = w.wait("mission.failed", "m", 20)["payload"]
    step = mission(g, failed["id"])["steps"][0]
    assert step["argv"] == ["echo", subject]
    assert step["output"] == subject + "\n"
    assert not pwned.exists()


@pytest.mark.slow
def test_kill9_during_a_long_step_interrupts_and_does_not_run_it_twice(make_graced, marker,
                                                                      shortdir) -> None:
    count = shortdir / "ran"
    proc = start_sleeper(marker)
    started = shortdir / "started"
    os.mkfifo(started)
    g, w = setup(make_graced, process_detector(marker)
                 + restart_playbook(marker, "low", count_file=str(count),
                                    prelude=f"echo started > {started}; sleep 3; "))
    _ready_tail(w, g)
    proc.kill()
    w.wait("mission.executing", "worker", 10)
    steps = LineCollector(g.ctl_popen("tail", "--json", "--since", "1", "executor.step_started"))
    assert steps.wait_for(lambda ls: len(ls) >= 1, 10)
    steps.proc.terminate()
    # The step's own first action is to write to the `started` FIFO: read it, then SIGKILL
    # graced in the middle of the step's 3 s sleep.
    assert read_fifo(str(started), 10) == b"started\n"
    g.kill()
    w.close()
    g.start()
    w = Watch(g)
    interrupted = w.wait("mission.interrupted", "worker", 10)["payload"]
    w.wait("mission.resolved", "worker", 30)
    m = mission(g, interrupted["id"])
    assert m["state"] == "resolved", m["timeline"]
    assert m["verification"]["result"] == "passed"
    assert "interrupted" in [t["to"] for t in m["timeline"]]
    assert count.read_text().count("ran") == 1
    # Outcome memory kept it, interruption included.
    with sqlite3.connect(g.state / "journal.db") as db:
        row = db.execute("SELECT outcome, interrupted, ran, success FROM outcomes WHERE "
                         "mission_id = ?", (m["id"],)).fetchone()
    assert row == ("resolved", 1, 1, 1)
    w.close()


async def _send_raw(url: str, frame: dict[str, Any]) -> dict[str, Any]:
    import trio
    import trio_websocket

    async with trio.open_nursery() as nursery:
        ws = await trio_websocket.connect_websocket_url(nursery, url)
        await ws.send_message(json.dumps(frame))
        with trio.fail_after(15):
            while True:
                for line in str(await ws.get_message()).split("\n"):
                    reply = json.loads(line)
                    if reply.get("type") == "response" and reply.get("id") == frame["id"]:
                        await ws.aclose()
                        nursery.cancel_scope.cancel()
                        return reply
    raise AssertionError("unreachable")


def _signed(key: Any, mid: int, ts: float, daemon: str, opened: float,
            sign_with: Any = None, method: str = "missions.approve",
            plan: str | None = None) -> dict[str, Any]:
    """A signed approval as gracectl makes it: bound to the daemon, the mission and (an
    approval) the plan approved."""
    import secrets

    from graced.protocol.wire import request_signing_bytes

    nonce = secrets.token_hex(16)
    params: dict[str, Any] = {"id": mid, "comment": "over tcp", "opened": opened}
    if plan is not None:
        params["plan"] = plan
    data = request_signing_bytes(1, nonce, method, params, ts, key.kid, daemon)
    sig = (sign_with or key).sign_bytes(data)
    return {"id": 1, "nonce": nonce, "method": method, "params": params,
            "auth": {"kid": key.kid, "ts": ts, "daemon": daemon, "sig": sig}}


@pytest.mark.slow
async def test_tcp_approvals_must_be_signed_fresh_and_never_replayed(make_graced, marker,
                                                                    shortdir) -> None:
    import base64

    import nacl.signing
    import trio

    from graced.protocol import Signer

    key = Signer(nacl.signing.SigningKey.generate())
    other = Signer(nacl.signing.SigningKey.generate())
    key_file = shortdir / "client.key"
    key_file.write_bytes(base64.b64encode(other._key.encode()) + b"\n")
    key_file.chmod(0o600)
    pub = f"ed25519 {base64.b64encode(key.public_key).decode()} {key.kid}"
    g, w = setup(make_graced, process_detector(marker) + restart_playbook(marker, "high"),
                 remediation=f'authorized_keys = ["{pub}"]\nrequest_window = 30.0\n')
    # listen on TCP too: restart with a listener
    assert g.stop() == 0
    text = g.config.read_text().replace("[daemon]\n", '[daemon]\nlisten = ["127.0.0.1:0"]\n')
    g.config.write_text(text)
    g.start()
    w.close()
    w = Watch(g)
    port = json.loads(g.ctl("status", "--json", check=True).stdout)["wire"]["tcp_ports"][0]
    url = f"ws://127.0.0.1:{port}"
    waiting = w.wait("mission.awaiting_approval", "worker", 15)["payload"]
    mid, opened = waiting["id"], mission(g, waiting["id"])["opened_at"]
    daemon = json.loads(g.ctl("status", "--json", check=True).stdout)["daemon_id"]

    plan = mission(g, mid)["plan"]["sha256"]

    def signed(ts: float, sign_with: Any = None) -> dict[str, Any]:
        return _signed(key, mid, ts, daemon, opened, sign_with, plan=plan)

    async def ctl(*args: str, client_key: Path | None) -> Any:
        env = {k: v for k, v in g.env.items() if k != "GRACE_SOCKET"}
        env["GRACE_CLIENT_KEY"] = str(client_key or shortdir / "none.key")
        env["GRACE_KEY"] = str(g.state / "key.pub")  # over TCP a key must be pinned or given
        return await trio.run_process([g.ctl_argv0(), "--url", url, *args], env=env,
                                      capture_stdout=True, capture_stderr=True, check=False,
                                      stdin=b"")

    unsigned = await ctl("missions", "approve", str(mid), "--yes", client_key=None)
    assert unsigned.returncode == 4 and b"must be signed" in unsigned.stderr
    unknown = await ctl("missions", "approve", str(mid), "--yes", client_key=key_file)
    assert unknown.returncode == 4 and b"read_keys, control_keys or authorized_keys" \
        in unknown.stderr
    forged = await _send_raw(url, signed(time.time(), sign_with=other))
    assert forged["error"]["code"] == "not_authorised"
    assert "bad signature" in forged["error"]["message"]
    stale = await _send_raw(url, signed(time.time() - 3600))
    assert "stale request" in stale["error"]["message"]
    assert mission(g, mid)["state"] == "awaiting_approval"
    good = signed(time.time())
    ok = await _send_raw(url, good)
    assert ok["ok"], ok
    w.wait("mission.resolved", "worker", 30)
    m = mission(g, mid)
    assert m["approvals"][0]["auth"] == f"signed request (ed25519 {key.kid})"
    again = await _send_raw(url, good)
    assert "replayed request" in again["error"]["message"]
    assert g.stop() == 0
    g.start()
    port = json.loads(g.ctl("status", "--json", check=True).stdout)["wire"]["tcp_ports"][0]
    after_restart = await _send_raw(f"ws://127.0.0.1:{port}", good)
    assert "replayed request" in after_restart["error"]["message"]
    # Refusals of signed or unsigned network requests are counted, never journaled.
    refusals = g.ctl("tail", "--json", "--since", "1", "--no-follow",
                     "mission.approval_refused", check=True).stdout.splitlines()
    assert refusals == []
    status = json.loads(g.ctl("status", "--json", check=True).stdout)
    assert status["wire"]["refused_requests"] == 1  # the replay since the restart
    w.close()


@pytest.mark.slow
async def test_tcp_manual_runs_and_silences_are_never_replayed(make_graced, marker,
                                                               shortdir) -> None:
    """A control key runs a high-risk playbook by hand only with what an approval needs
    (the mission's opened time and the plan), and no signed run or silence change works
    twice, not even after a restart."""
    import base64
    import secrets

    import nacl.signing

    from graced.protocol import Signer
    from graced.protocol.wire import request_signing_bytes

    key = Signer(nacl.signing.SigningKey.generate())
    pub = f"ed25519 {base64.b64encode(key.public_key).decode()} {key.kid}"
    g, w = setup(make_graced, process_detector(marker) + restart_playbook(marker, "high"),
                 remediation=f'control_keys = ["{pub}"]\nrequest_window = 60.0\n')
    assert g.stop() == 0
    g.config.write_text(g.config.read_text().replace(
        "[daemon]\n", '[daemon]\nlisten = ["127.0.0.1:0"]\n'))
    g.start()
    w.close()
    w = Watch(g)
    daemon = json.loads(g.ctl("status", "--json", check=True).stdout)["daemon_id"]

    def port() -> int:
        return int(json.loads(g.ctl("status", "--json", check=True).stdout)["wire"][
            "tcp_ports"][0])

    def signed(method: str, params: dict[str, Any]) -> dict[str, Any]:
        nonce, ts = secrets.token_hex(16), time.time()
        sig = key.sign_bytes(request_signing_bytes(1, nonce, method, params, ts, key.kid,
                                                   daemon))
        return {"id": 1, "nonce": nonce, "method": method, "params": params,
                "auth": {"kid": key.kid, "ts": ts, "daemon": daemon, "sig": sig}}

    url = f"ws://127.0.0.1:{port()}"
    mid = w.wait("mission.awaiting_approval", "worker", 30)["payload"]["id"]
    m = mission(g, mid)
    run = {"name": "restart-worker", "mission": mid, "dry_run": False}
    # A key alone may not run a high-risk playbook by hand: no plan, no run.
    bare = await _send_raw(url, signed("playbooks.run", {**run, "opened": m["opened_at"]}))
    assert bare["error"]["code"] == "bad_request" and "params.plan" in \
        bare["error"]["message"], bare
    assert mission(g, mid)["state"] == "awaiting_approval" and not mission(g, mid)["steps"]

    added = signed("silence.add", {"target": "nothing-here", "duration": 3600,
                                   "comment": "over tcp"})
    sid = (await _send_raw(url, added))["result"]["silence"]["id"]
    removed = signed("silence.remove", {"id": sid})
    assert (await _send_raw(url, removed))["ok"]
    paused = signed("pause", {})
    assert (await _send_raw(url, paused))["ok"]
    assert (await _send_raw(url, signed("resume", {})))["ok"]
    good = signed("playbooks.run", {**run, "opened": m["opened_at"],
                                    "plan": m["plan"]["sha256"]})
    assert (await _send_raw(url, good))["ok"]
    w.wait("mission.resolved", "worker", 30)
    assert mission(g, mid)["approvals"][0]["auth"] == f"signed request (ed25519 {key.kid})"

    assert g.stop() == 0
    g.start()
    url = f"ws://127.0.0.1:{port()}"
    for frame in (added, removed, paused, good):
        again = await _send_raw(url, frame)
        assert "replayed request" in again.get("error", {}).get("message", ""), (frame, again)
    assert json.loads(g.ctl("silence", "ls", "--json", check=True).stdout) == []
    assert json.loads(g.ctl("status", "--json", check=True).stdout)["executor"][
        "paused"] is False
    w.close()


@pytest.mark.slow
def test_a_shell_script_waits_approves_and_checks_resolution(make_graced, marker) -> None:
    from tests.conftest import BIN, ROOT

    g, w = setup(make_graced, process_detector(marker) + restart_playbook(marker, "high"))
    env = dict(g.env, PATH=f"{BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}")
    res = subprocess.run(["sh", str(ROOT / "tests/scripts/approve_flow.sh")], env=env,
                         capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "awaits approval" in res.stdout and "resolved" in res.stdout
    ms = w.missions("worker")
    assert ms[0]["state"] == "resolved"
    assert ms[0]["approvals"][0]["comment"] == "approved by approve_flow.sh"
    w.close()


@pytest.mark.slow
def test_wait_exits_1_when_the_mission_ends_in_another_final_state(make_graced, marker) -> None:
    """gracectl.1: `wait` exits 1 if the mission ends in another final state: a script
    waiting for "resolved" learns at once that the mission was rejected."""
    g, w = setup(make_graced, process_detector(marker) + restart_playbook(marker, "high"))
    waiting = w.wait("mission.awaiting_approval", "worker", 30)["payload"]
    mid = str(waiting["id"])
    waiter = LineCollector(g.ctl_popen("wait", mid, "--state", "resolved", "--timeout", "60"))
    assert g.ctl("missions", "reject", mid, "--comment", "not now").returncode == 0
    assert waiter.wait_exit(30) == 1
    assert waiter.proc.stderr is not None
    err = waiter.proc.stderr.read()
    assert err.count("\n") == 1 and f"mission {mid} ended rejected, not resolved" in err, err
    assert mission(g, int(mid))["state"] == "rejected"
    w.close()
