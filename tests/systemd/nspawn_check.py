#!/usr/bin/env python3
"""Prove graced under a real systemd: boot a Debian bookworm container with systemd-nspawn,
install Grace with its unit files, and show, printing each step:

  * `systemctl start graced` returns only after READY=1, and the unit is active;
  * `gracectl` inside talks to it, over the sandboxed unit's socket;
  * the sandbox still lets it work: state dir, socket, and restarting an allowed unit
    through systemd (a unit that fails its HTTP probe is restarted by a playbook);
  * a hung event loop (SIGSTOP) is killed by the watchdog and restarted;
  * `systemctl stop graced` is clean.

Needs root, systemd-nspawn and debootstrap (Debian packages systemd-container and
debootstrap). Exits 0 when every check passes, 77 when it cannot run here (and says
why), 1 on a failed check. The root tree is cached in /var/tmp/grace-nspawn.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("GRACE_NSPAWN_CACHE", "/var/tmp/grace-nspawn"))
TREE = CACHE / "root"
MACHINE = "grace-check"
SKIP = 77


def say(msg: str) -> None:
    print(f"nspawn-check: {msg}", flush=True)


def run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, text=True, capture_output=True, **kw)  # type: ignore[call-overload]


def can_run() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    for tool in ("systemd-nspawn", "debootstrap", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian packages systemd-container, debootstrap)"
    return None


def build_tree() -> None:
    if (TREE / "usr/lib/systemd/systemd").exists() and (TREE / ".grace-ready").exists():
        say(f"using cached root tree {TREE}")
        return
    shutil.rmtree(TREE, ignore_errors=True)
    TREE.parent.mkdir(parents=True, exist_ok=True)
    say("debootstrap bookworm (minbase + systemd, dbus, logind, polkitd, python3) ...")
    t0 = time.monotonic()
    res = run(["debootstrap", "--variant=minbase",
               "--include=systemd,systemd-sysv,dbus,libpam-systemd,polkitd,python3,python3-venv,procps,curl",
               "bookworm", str(TREE)])
    if res.returncode != 0:
        # The mirror or the machine, not Grace: say so plainly and skip.
        print(f"nspawn-check: SKIPPED: debootstrap failed: {res.stdout[-1500:]}"
              f"{res.stderr[-500:]}", flush=True)
        raise SystemExit(SKIP)
    (TREE / ".grace-ready").write_text("")
    say(f"root tree ready in {time.monotonic() - t0:.0f} s")


def install_grace() -> None:
    wheels = Path(tempfile.mkdtemp(prefix="grace-wheels"))
    res = run([sys.executable, "-m", "pip", "wheel", "-q", "-w", str(wheels), str(ROOT)])
    if res.returncode != 0:
        raise SystemExit(f"pip wheel failed: {res.stderr[-2000:]}")
    dest = TREE / "opt/grace-wheels"
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(wheels, dest)
    shutil.rmtree(TREE / "opt/grace", ignore_errors=True)
    # A fresh start each run: no state left by an earlier run of this check.
    for old in ("var/lib/graced", "var/lib/private/graced", "etc/graced"):
        shutil.rmtree(TREE / old, ignore_errors=True)
    res = run(["chroot", str(TREE), "sh", "-c",
               "python3 -m venv /opt/grace && /opt/grace/bin/pip install -q --no-index "
               "--find-links /opt/grace-wheels grace && "
               "ln -sf /opt/grace/bin/graced /usr/bin/graced && "
               "ln -sf /opt/grace/bin/gracectl /usr/bin/gracectl"])
    if res.returncode != 0:
        raise SystemExit(f"installing grace in the tree failed: {res.stderr[-2000:]}")
    unit = (ROOT / "systemd/graced.service").read_text()
    # A short watchdog for the check (the shipped unit says 30 s).
    (TREE / "etc/systemd/system/graced.service").write_text(unit)
    dropin = TREE / "etc/systemd/system/graced.service.d"
    dropin.mkdir(parents=True, exist_ok=True)
    (dropin / "check.conf").write_text("[Service]\nWatchdogSec=4s\n")
    (TREE / "usr/lib/sysusers.d").mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "systemd/graced.sysusers", TREE / "usr/lib/sysusers.d/graced.conf")
    rules = (ROOT / "systemd/graced.polkit.rules").read_text().replace(
        '["example.service"]', '["flaky.service"]')
    (TREE / "etc/polkit-1/rules.d").mkdir(parents=True, exist_ok=True)
    (TREE / "etc/polkit-1/rules.d/50-graced.rules").write_text(rules)
    # A service that fails its probe while /run/flaky-broken exists; a restart fixes it.
    (TREE / "usr/local/bin/flaky.py").write_text(
        "import http.server, os\n"
        "class H(http.server.BaseHTTPRequestHandler):\n"
        "    def do_GET(self):\n"
        "        broken = os.path.exists('/run/flaky-broken')\n"
        "        self.send_response(503 if broken else 200); self.end_headers()\n"
        "    def log_message(self, *a): pass\n"
        "http.server.HTTPServer(('127.0.0.1', 8765), H).serve_forever()\n")
    (TREE / "etc/systemd/system/flaky.service").write_text(
        "[Unit]\nDescription=a service that breaks\n[Service]\n"
        "ExecStartPre=/bin/rm -f /run/flaky-broken\n"
        "ExecStart=/usr/bin/python3 /usr/local/bin/flaky.py\n"
        "[Install]\nWantedBy=multi-user.target\n")
    (TREE / "etc/graced").mkdir(exist_ok=True)
    (TREE / "etc/graced/graced.toml").write_text(
        "version = 1\n[daemon]\nheartbeat_interval = 1.0\n\n"
        "[missions]\nresolve_after = 2\n\n"
        '[[detector]]\nname = "flaky"\nkind = "http"\ninterval = 1.0\n'
        'url = "http://127.0.0.1:8765/"\n\n'
        '[[playbook]]\nname = "restart-flaky"\ndetector = "flaky"\nrisk = "low"\n'
        "verify_timeout = 30.0\n"
        '[[playbook.step]]\naction = "restart_unit"\nunit = "flaky.service"\n')
    say("installed grace, graced.service (+ WatchdogSec=4s drop-in), sysusers, polkit rule, "
        "flaky.service")


class Container:
    def __init__(self) -> None:
        self.log = open(CACHE / "nspawn.log", "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            ["systemd-nspawn", "--quiet", "-D", str(TREE), "--machine", MACHINE, "--boot",
             "--register=no", "--keep-unit"], stdin=subprocess.DEVNULL, stdout=self.log,
            stderr=self.log)
        self.pid = self._leader()

    def _leader(self) -> int:
        """The container's PID 1: the shallowest 'systemd' descending from nspawn."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit("systemd-nspawn exited: "
                                 + (CACHE / "nspawn.log").read_text()[-2000:])
            parent: dict[int, int] = {}
            comm: dict[int, str] = {}
            for entry in Path("/proc").iterdir():
                if not entry.name.isdigit():
                    continue
                try:
                    stat = (entry / "stat").read_text()
                    comm[int(entry.name)] = stat[stat.index("(") + 1:stat.rindex(")")]
                    parent[int(entry.name)] = int(stat[stat.rindex(")") + 2:].split()[1])
                except (OSError, ValueError):
                    continue
            best: tuple[int, int] | None = None
            for pid, name in comm.items():
                if name != "systemd":
                    continue
                depth, p = 0, pid
                while p in parent and p != self.proc.pid and depth < 10:
                    p, depth = parent[p], depth + 1
                if p == self.proc.pid and (best is None or depth < best[0]):
                    best = (depth, pid)
            if best is not None:
                return best[1]
            time.sleep(0.2)
        raise SystemExit("the container's systemd did not appear")

    def sh(self, script: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return run(["nsenter", "-t", str(self.pid), "-a", "/bin/sh", "-c", script],
                   timeout=timeout)

    def stop(self) -> None:
        self.sh("systemctl poweroff", timeout=30)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def check(cond: bool, what: str, detail: str = "") -> None:
    if not cond:
        say(f"FAIL: {what}" + (f"\n{detail}" if detail else ""))
        raise SystemExit(1)
    say(f"ok: {what}")


def main() -> int:
    why = can_run()
    if why:
        print(f"nspawn-check: SKIPPED: {why}", flush=True)
        return SKIP
    build_tree()
    install_grace()
    c = Container()
    try:
        res = c.sh("systemctl is-system-running --wait", timeout=120)
        say(f"container booted: {res.stdout.strip()} (systemd pid {c.pid} on the host)")
        c.sh("systemctl start flaky.service")
        t0 = time.monotonic()
        res = c.sh("systemctl start graced.service; echo rc=$?", timeout=60)
        took = time.monotonic() - t0
        state = c.sh("systemctl show -p ActiveState,SubState,Type,StatusText graced").stdout
        check("rc=0" in res.stdout and "ActiveState=active" in state,
              f"systemctl start graced returned after READY=1 ({took:.1f} s): "
              f"{' '.join(state.split())}", res.stdout + res.stderr)
        status = c.sh("gracectl --socket /run/graced/graced.sock status")
        check(status.returncode == 0, "gracectl inside talks to graced over /run/graced",
              status.stderr)
        say("\n" + status.stdout.rstrip())
        perms = c.sh("stat -c '%U %a %n' /var/lib/graced /var/lib/graced/key "
                     "/run/graced/graced.sock").stdout
        check("graced 600 /var/lib/graced/key" in perms,
              "state dir and key owned by graced, key mode 0600", perms)
        say(perms.strip().replace("\n", "; "))
        before = c.sh("systemctl show -p InvocationID --value flaky.service").stdout.strip()
        c.sh("touch /run/flaky-broken")
        say("broke flaky.service (its HTTP probe now answers 503)")
        deadline = time.monotonic() + 60
        resolved = ""
        while time.monotonic() < deadline:
            out = c.sh("gracectl --socket /run/graced/graced.sock missions ls --all --json")
            if '"resolved"' in out.stdout:
                resolved = out.stdout
                break
            time.sleep(1)
        after = c.sh("systemctl show -p InvocationID --value flaky.service").stdout.strip()
        show = c.sh("gracectl --socket /run/graced/graced.sock missions show 1").stdout
        check(bool(resolved) and before != after,
              "graced restarted flaky.service through systemd (new InvocationID) and the "
              "mission resolved", show)
        say("\n" + show.rstrip())
        main_pid = c.sh("systemctl show -p MainPID --value graced").stdout.strip()
        c.sh(f"kill -STOP {main_pid}")
        say(f"froze graced's event loop (SIGSTOP to pid {main_pid}); watchdog is 4 s")
        deadline = time.monotonic() + 60
        new_pid = main_pid
        while time.monotonic() < deadline:
            new_pid = c.sh("systemctl show -p MainPID --value graced").stdout.strip()
            active = c.sh("systemctl is-active graced").stdout.strip()
            if new_pid not in (main_pid, "0") and active == "active":
                break
            time.sleep(1)
        journal = c.sh("journalctl -u graced --no-pager -n 30 -o cat").stdout
        check(new_pid not in (main_pid, "0") and "Watchdog timeout" in journal,
              f"the watchdog killed the hung graced and systemd restarted it (pid {main_pid} "
              f"-> {new_pid})", journal)
        t0 = time.monotonic()
        res = c.sh("systemctl stop graced; systemctl show -p ActiveState,Result --value graced")
        took = time.monotonic() - t0
        check("inactive" in res.stdout and "success" in res.stdout,
              f"systemctl stop graced is clean ({took:.1f} s): {' '.join(res.stdout.split())}",
              res.stdout + c.sh("journalctl -u graced --no-pager -n 10 -o cat").stdout)
    finally:
        c.stop()
    say("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
