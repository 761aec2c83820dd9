"""Learning on the defaults over real time (about 10 minutes each, mostly waiting: marked
``background``, so the whole suite runs each in a child pytest beside the other tests;
``pytest tests/test_learning_slow_e2e.py`` runs them in line).

* Ten real faults (a worker process killed) a minute apart, on the embedded default
  settings plus two playbooks (one restarts the worker, one does nothing): the working
  playbook ends ranked first and ``explain`` says why. A minute apart is the point: it
  is well inside the default ``flap_window`` (600 s) and ``budget_window`` (3600 s),
  where 0.1.0 escalated every repeat as "flapping" and learned nothing. The interval is
  real, not scaled: each fault must also finish (a failed run waits ``verify_timeout``)
  before the next.
* A second, unprivileged Unix user toggles a watched file for 10 minutes, holding the
  symptom through verifications to make the working playbook look broken: it is not
  demoted, and its record moves by no more than the documented bound (one failure per
  incident, ``budget`` runs per hour; docs/security.md).
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.procs import LineCollector
from tests.helpers.users import ensure_user
from tests.test_learning_e2e import NORMAL, fix, value_detector
from tests.test_missions_e2e import Watch
from tests.test_remediation_e2e import kill_all, process_detector, restart_playbook, start_sleeper

pytestmark = [pytest.mark.slow, pytest.mark.background]


def noop_playbook(name: str, detector: str) -> str:
    return (f'[[playbook]]\nname = "{name}"\ndetector = "{detector}"\nrisk = "low"\n'
            f"verify_timeout = 15.0\n"
            f'[[playbook.step]]\naction = "run"\nargv = ["true"]\n')


def test_ten_real_faults_a_minute_apart_teach_the_working_playbook(
        background: bool, make_graced) -> None:
    if not background:
        return  # its child run passed (tests/conftest.py)
    marker = f"grace-worker-{uuid.uuid4().hex[:8]}"
    start_sleeper(marker)
    try:
        # Embedded defaults: no [missions], [remediation] or [learning] table at all.
        g = make_graced(detectors=process_detector(marker).replace('"high"', '"medium"')
                        + noop_playbook("clear-cache", "worker")
                        + restart_playbook(marker, "low"))
        w = Watch(g)
        recovered = LineCollector(g.ctl_popen("tail", "--json", "detector.recovered"))
        start = time.monotonic()
        def closed() -> int:
            return sum(len(w.events(f"mission.{s}", "worker")) for s in ("resolved",
                                                                         "escalated"))

        for n in range(10):
            # Every fault starts on the minute, once the worker runs again.
            time.sleep(max(0.0, start + 60 * n - time.monotonic()))
            seen, before = len(recovered.events()), closed()
            kill_all(marker)
            assert w.tail.wait_for(lambda _, b=before: closed() > b, 55), w.tail.lines[-3:]
            if subprocess.run(["pgrep", "-f", marker], capture_output=True).returncode:
                start_sleeper(marker)  # escalated to a human: the operator restarts it
            assert recovered.wait_for(lambda _, k=seen: len(recovered.events()) > k, 30)
        w.close()
        recovered.proc.terminate()
        escalated = [e["payload"]["reason"] for e in w.events("mission.escalated", "worker")]
        assert not any("flapping" in r for r in escalated), escalated
        shown = json.loads(g.ctl("knowledge", "show", "worker:" + marker, "--json",
                                 check=True).stdout)["pattern"]
        assert shown["best_playbook"] == "restart-worker", shown
        best = shown["playbooks"][0]
        assert best["playbook"] == "restart-worker" and best["successes"] >= 3
        ms = sorted(w.missions("worker"), key=lambda m: m["id"])
        last = next(m for m in reversed(ms) if m.get("decision"))
        why = g.ctl("missions", "explain", str(last["id"]), check=True).stdout
        assert "restart-worker" in why and ("chosen" in why or "held back" in why), why
        # Listings name a playbook only where it ran.
        for m in ms:
            if m["playbook"]:
                assert m["steps"] or m["state"] == "awaiting_approval", m
    finally:
        kill_all(marker)


@pytest.fixture
def second_user() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("a second Unix user can only be created as root")
    if not shutil.which("useradd") or not shutil.which("runuser"):
        pytest.skip("useradd/runuser not installed: cannot create a second Unix user")
    try:
        yield ensure_user("grace-toggler")
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"useradd failed: {exc.stderr.strip()}")


TOGGLER = """
# Hold the symptom through the fix and its verification (20 s), let it clear, again.
end=$(( $(date +%s) + $2 ))
while [ "$(date +%s)" -lt "$end" ]; do
    hold=$(( $(date +%s) + 20 ))
    while [ "$(date +%s)" -lt "$hold" ]; do echo 99 > "$1"; sleep 0.05; done
    echo 0 > "$1"
    sleep 3
done
"""


def test_an_unprivileged_user_toggling_a_watched_file_cannot_demote_a_working_playbook(
        background: bool, make_graced, second_user: str) -> None:
    if not background:
        return  # its child run passed (tests/conftest.py)
    shared = Path(tempfile.mkdtemp(prefix="gtog", dir="/tmp"))
    try:
        shared.chmod(0o755)
        watched = shared / "queue"
        watched.write_text(NORMAL)
        watched.chmod(0o666)
        script = shared / "toggle.sh"
        script.write_text(TOGGLER)
        script.chmod(0o644)
        assert pwd.getpwnam(second_user).pw_uid != os.geteuid()
        # Embedded default settings; one playbook that works, one that does nothing.
        g = make_graced(detectors=value_detector("queue", watched)
                        + (f'[[playbook]]\nname = "fix-queue"\ndetector = "queue"\n'
                           f'risk = "low"\nverify_timeout = 10.0\n[[playbook.step]]\n'
                           f'action = "run"\nargv = {json.dumps(fix(watched))}\n')
                        + noop_playbook("noop", "queue"))
        w = Watch(g)
        toggler = subprocess.run(
            ["runuser", "-u", second_user, "--", "/bin/sh", str(script), str(watched), "600"],
            capture_output=True, text=True, timeout=700)
        assert toggler.returncode == 0, toggler.stderr
        watched.write_text(NORMAL)
        shown = json.loads(g.ctl("knowledge", "show", "queue:queue", "--json",
                                 check=True).stdout)["pattern"]
        fixer = next(p for p in shown["playbooks"] if p["playbook"] == "fix-queue")
        # Not demoted; at most `budget` (3) runs an hour, one failure per incident.
        assert not fixer["demoted"], fixer
        assert fixer["runs"] <= 3 and fixer["failures"] <= 3, fixer
        ms = w.missions("queue")
        ran = [m for m in ms if m["playbook"] == "fix-queue" and m["steps"]]
        assert len(ran) <= 3
        escalated = [m["reason"] for m in ms if m["state"] == "escalated"]
        assert not any("demoted" in r for r in escalated), escalated
        # The bound: its posterior mean is no lower than (1 + s) / (5 + s + f) of before
        # the attack (s = f = 0 here: 1/5).
        assert fixer["posterior_mean"] >= 0.2 - 1e-9
        held = g.ctl("knowledge", "show", "queue:queue", check=True).stdout
        assert "held back" in held or "not demoted" in held or fixer["failures"] == 0
        w.close()
    finally:
        shutil.rmtree(shared, ignore_errors=True)
