"""Features graced.toml.5 documents, each run against the real graced: the hourly cap on
automatic actions, approver groups with a second Unix user, allowed origins on the TCP
listener, and the cpu, swap, inodes and process_rss detectors on this host's real values."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import trio
import trio_websocket

from graced.keys import parse_public_key
from graced.protocol import check_signature
from tests.conftest import Graced
from tests.helpers.users import ensure_user
from tests.test_missions_e2e import MISSIONS, Watch, _ready_tail
from tests.test_remediation_e2e import (
    kill_all,
    mission,
    process_detector,
    restart_playbook,
    setup,
    start_sleeper,
)

APPROVER, GROUP = "grace-approver", "grace-approvers"


@pytest.fixture
def marker() -> Iterator[str]:
    m = f"grace-worker-{uuid.uuid4().hex[:8]}"
    yield m
    kill_all(m)


@pytest.mark.slow
def test_max_actions_per_hour_caps_automatic_actions(make_graced, marker, shortdir) -> None:
    count = shortdir / "ran"
    start_sleeper(marker)
    g, w = setup(make_graced, process_detector(marker)
                 + restart_playbook(marker, "low", "budget = 100\n", str(count)),
                 remediation="max_actions_per_hour = 2\n")
    _ready_tail(w, g)
    for n in (1, 2):  # within the cap: each death is fixed by the playbook
        kill_all(marker)
        w.wait("mission.resolved", "worker", 30, count=n)
    kill_all(marker)
    escalated = w.wait("mission.escalated", "worker", 20)["payload"]
    assert escalated["reason"] == "global cap spent: 2 automatic actions in the last hour"
    assert count.read_text().count("ran") == 2
    w.close()


@pytest.fixture
def approver() -> Iterator[str]:
    """A second Unix user, in group grace-approvers (created here when root)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create a second Unix user and act as it")
    yield ensure_user(APPROVER, (GROUP,))


def awaiting_group_approval(make_graced: Any, marker: str,
                            remediation: str = f'approver_groups = ["{GROUP}"]\n'
                            ) -> tuple[Graced, Watch, dict]:
    """A high-risk mission awaiting approval by group grace-approvers (or as
    ``remediation`` says), on a daemon whose socket any user may reach (the approval
    rules alone decide)."""
    g, w = setup(make_graced, process_detector(marker) + restart_playbook(marker, "high"),
                 remediation=remediation)
    os.chmod(g.socket, 0o666)
    os.chmod(g.base, 0o755)
    os.chmod(g.home, 0o777)
    return g, w, w.wait("mission.awaiting_approval", "worker", 10)["payload"]


@pytest.mark.slow
def test_a_member_of_an_approver_group_approves_and_the_fix_runs(make_graced, marker,
                                                                 approver) -> None:
    g, w, waiting = awaiting_group_approval(make_graced, marker)

    def approve_as(*cred: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["setpriv", *cred, g.ctl_argv0(), "missions", "approve",
                               str(waiting["id"]), "--yes", "--comment", "looked at it"], env=g.env,
                              capture_output=True, text=True, stdin=subprocess.DEVNULL,
                              timeout=60)

    # The same user without the group's membership is refused: the group is what counts.
    bare = approve_as("--reuid", approver, "--regid", "nogroup", "--clear-groups")
    assert bare.returncode == 4 and "may not approve" in bare.stderr, bare.stderr
    member = approve_as("--reuid", approver, "--regid", "nogroup", "--init-groups")
    assert member.returncode == 0, member.stderr
    w.wait("mission.resolved", "worker", 30)
    m = mission(g, waiting["id"])
    assert m["state"] == "resolved" and m["steps"], m["timeline"]
    assert m["approvals"][0]["decision"] == "approved"
    assert m["approvals"][0]["user"] == approver
    assert m["approvals"][0]["comment"] == "looked at it"
    w.close()


async def test_allowed_origins_admit_their_origin_and_only_it(make_graced) -> None:
    g = make_graced(extra_config='listen = ["127.0.0.1:0"]\n'
                                 'allowed_origins = ["https://ops.example"]\n')
    port = json.loads(g.ctl("status", "--json", check=True).stdout)["wire"]["tcp_ports"][0]
    url = f"ws://127.0.0.1:{port}/"
    pub = parse_public_key((g.state / "key.pub").read_text())

    async def hello(origin: str | None) -> dict:
        headers = [("Origin", origin)] if origin else []
        async with trio_websocket.open_websocket_url(url, extra_headers=headers) as ws:
            await ws.send_message(json.dumps({"id": 7, "nonce": "n-7", "method": "hello"}))
            with trio.fail_after(10):
                while True:
                    for line in str(await ws.get_message()).split("\n"):
                        reply = json.loads(line)
                        if reply.get("type") == "response":
                            return reply  # type: ignore[no-any-return]

    for origin in ("https://ops.example", None):  # the listed origin; a non-browser client
        reply = await hello(origin)
        assert reply["ok"] and (reply["id"], reply["nonce"]) == (7, "n-7")
        assert check_signature(reply, pub)
    with pytest.raises(trio_websocket.ConnectionRejected) as refused:
        await hello("https://evil.example")
    assert refused.value.status_code == 403
    # The answer echoes nothing the peer sent (a 12 KB Origin once came back whole).
    assert refused.value.body == b"forbidden: Origin or Host not allowed\n"


def _hog(marker: str, megabytes: int) -> subprocess.Popen[str]:
    code = (f"import sys; block = b'x' * ({megabytes} * 2**20); print('ready', flush=True); "
            "sys.stdin.read()")
    proc = subprocess.Popen([sys.executable, "-c", code, marker], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


@pytest.mark.slow
def test_process_rss_detector_sees_a_process_grow_and_shrink(make_graced) -> None:
    marker = f"grace-rss-{uuid.uuid4().hex[:8]}"
    base = _hog(marker, 0)
    try:
        g = make_graced(detectors=f'[[detector]]\nname = "rss"\nkind = "process_rss"\n'
                                  f'interval = 1.0\nprocess = "{marker}"\nmatch_cmdline = true\n'
                                  f"threshold = 60.0\n" + MISSIONS.format(flap=0))
        w = Watch(g)
        _ready_tail(w, g)
        hog = _hog(marker, 80)  # a second matching process: the detector sums them
        opened = w.wait("mission.opened", "rss", 10)["payload"]
        assert f"{marker} at " in opened["summary"] and "above the threshold 60.0 MB" in \
            opened["summary"], opened
        dets = json.loads(g.ctl("detectors", "--json", check=True).stdout)
        assert dets["rss"]["subjects"][marker]["unit"] == "MB"
        assert hog.stdin is not None
        hog.stdin.close()
        hog.wait(10)
        w.wait("mission.resolved", "rss", 15)
        w.close()
    finally:
        base.kill()


@pytest.mark.slow
def test_inodes_detector_opens_and_resolves_on_a_small_file_system(make_graced,
                                                                   shortdir: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs with few inodes")
    mnt = shortdir / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,nr_inodes=100", "tmpfs", str(mnt)],
                   check=True)
    try:
        g = make_graced(detectors=f'[[detector]]\nname = "ino"\nkind = "inodes"\n'
                                  f'interval = 1.0\npath = "{mnt}"\nthreshold = 50.0\n'
                                  + MISSIONS.format(flap=0))
        w = Watch(g)
        _ready_tail(w, g)
        for i in range(60):
            (mnt / f"f{i}").touch()
        opened = w.wait("mission.opened", "ino", 10)["payload"]
        assert opened["subject"] == str(mnt) and "above the threshold 50.0 %" in \
            opened["summary"], opened
        for i in range(60):
            (mnt / f"f{i}").unlink()
        w.wait("mission.resolved", "ino", 15)
        w.close()
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _meminfo_kb(field: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/meminfo")


@pytest.mark.slow
def test_cpu_and_swap_detectors_report_this_host(make_graced) -> None:
    # A real CPU burner makes the host busier than a 1 % threshold whoever else runs here.
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"],
                              stdin=subprocess.DEVNULL)
    try:
        g = make_graced(detectors='[[detector]]\nname = "cpu"\nkind = "cpu"\ninterval = 0.5\n'
                                  "window = 2.0\nthreshold = 1.0\n\n"
                                  '[[detector]]\nname = "swap"\nkind = "swap"\n'
                                  "interval = 0.5\n" + MISSIONS.format(flap=0))
        w = Watch(g)
        opened = w.wait("mission.opened", "cpu", 10)["payload"]
        assert "above the threshold 1.0 %" in opened["summary"], opened
    finally:
        burner.kill()
        burner.wait()
    _ready_tail(w, g)
    dets = json.loads(g.ctl("detectors", "--json", check=True).stdout)
    cpu = dets["cpu"]["subjects"]["host"]
    assert cpu["unit"] == "%" and 0 < cpu["value"] <= 100
    swap = dets["swap"]["subjects"]["host"]
    total_kb = _meminfo_kb("SwapTotal")
    expected = psutil.swap_memory().percent if total_kb else 0.0
    assert swap["unit"] == "%" and abs(swap["value"] - expected) < 5, (swap, expected)
    assert dets["swap"]["state"] == "up" and dets["cpu"]["state"] == "up"
    w.close()


JOURNALD = Path("/lib/systemd/systemd-journald")
# A private mount namespace gets its own /run/systemd, /run/log and /var/log/journal, so
# the journald started in it is the only one graced and the test see there.
NAMESPACE_SETUP = ("set -e; for d in /run/systemd /run/log /var/log/journal; do "
                   "mkdir -p $d; mount -t tmpfs tmpfs $d; done; "
                   "mkdir -p /run/systemd/journal /run/log/journal; exec {journald}")
SEND = """
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
for i in range(int(sys.argv[3])):
    s.sendto(f"MESSAGE={sys.argv[2]} {i}\\nOBJECT_SYSTEMD_UNIT={sys.argv[1]}\\n".encode(),
             "/run/systemd/journal/socket")
"""


@pytest.fixture
def journald(shortdir: Path) -> Iterator[list[str]]:
    """Where a journald runs: the host's, or a real systemd-journald started here in a
    private mount namespace (as root). Yields the command prefix that enters it."""
    if Path("/run/systemd/journal/socket").exists():
        yield []
        return
    if os.geteuid() != 0 or not JOURNALD.exists():
        pytest.skip("no journald runs here, and starting one needs root and "
                    f"{JOURNALD} (Debian package systemd)")
    import socket

    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(shortdir / "journald.notify"))
    notify.settimeout(1)
    proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                             NAMESPACE_SETUP.format(journald=JOURNALD)],
                            env=dict(os.environ, NOTIFY_SOCKET=str(shortdir / "journald.notify")),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if b"READY=1" in notify.recv(4096).split(b"\n"):
                    break
            except TimeoutError:
                if proc.poll() is not None:
                    assert proc.stderr is not None
                    pytest.skip(f"cannot start {JOURNALD} in a private mount namespace "
                                f"(exit {proc.returncode}): "
                                + proc.stderr.read().decode(errors="replace").strip()[-200:])
                if time.monotonic() > deadline:
                    raise
        yield ["nsenter", "-t", str(proc.pid), "-m", "--"]
    finally:
        notify.close()
        proc.terminate()
        proc.wait(10)


@pytest.mark.slow
def test_journald_detector_follows_a_units_errors(make_graced, journald: list[str]) -> None:
    unit = f"grace-{uuid.uuid4().hex[:8]}.service"

    def log(text: str, n: int) -> None:
        subprocess.run([*journald, sys.executable, "-c", SEND, unit, text, str(n)], check=True,
                       stdin=subprocess.DEVNULL, timeout=30)

    log("starting", 1)
    g = make_graced(start=False, detectors=f'[[detector]]\nname = "jd"\nkind = "journald"\n'
                                           f'interval = 1.0\nunit = "{unit}"\npattern = "ERROR"\n'
                                           f"max_ratio = 0.5\nmin_lines = 5\nwindow = 2.0\n"
                                           + MISSIONS.format(flap=0))
    g.wrap = journald
    g.start()
    w = Watch(g)
    _ready_tail(w, g)
    log("request failed: ERROR", 40)
    opened = w.wait("mission.opened", "jd", 10)["payload"]
    assert opened["subject"] == unit and "match /ERROR/" in opened["summary"], opened
    log("request ok", 40)
    w.wait("mission.resolved", "jd", 15)
    assert json.loads(g.ctl("detectors", "--json", check=True).stdout)["jd"]["state"] == "up"
    w.close()
