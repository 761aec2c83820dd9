"""systemd/install.sh for real, as root, in a throwaway overlay of / (its own mount
namespace; systemctl stubbed, since PID 1 here is not systemd): an upgrade keeps the
actions apart from the restart units, a systemd-escaped name reaches the polkit rule
intact, a name that could inject JavaScript is refused, and a failed upgrade changes
nothing. The rule is evaluated by node with a minimal polkit."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

POLKIT_EVAL = r"""
const fs = require("fs");
const [rules, user, actionId, verb, unit] = process.argv.slice(2);
const polkit = { Result: { YES: "yes", NO: "no" }, rules: [], addRule(f) { this.rules.push(f); },
                 log() {} };
eval(fs.readFileSync(rules, "utf8"));
const action = { id: actionId, lookup: (k) => ({ verb, unit })[k] };
const subject = { user, isInGroup: () => false, active: true, local: true };
let r = "no";
for (const f of polkit.rules) { const x = f(action, subject); if (x) { r = x; break; } }
console.log(r);
"""

PLAYBOOKS = r"""
[[detector]]
name = "crypt"
kind = "systemd"
units = ["systemd-cryptsetup@*"]

[[playbook]]
name = "clean"
detector = "crypt"
risk = "low"
[[playbook.step]]
action = "start_action"
unit = "clean-logs"

[[playbook]]
name = "reopen"
detector = "crypt"
risk = "high"
[[playbook.step]]
action = "restart_unit"
unit = 'systemd-cryptsetup@luks\x2d1234.service'
"""

BAD = """
[[playbook]]
name = "{name}"
detector = "crypt"
risk = "high"
[[playbook.step]]
action = "restart_unit"
unit = '{unit}'
"""

INJECT = 'app.service"]; polkit.addRule(function(a, s) { return polkit.Result.YES; }); var X = ["'

# Runs inside the chroot: the README's install, playbooks appended, the upgrade, then two
# upgrades that must fail and change nothing. Prints one JSON object.
SCRIPT = r"""
set -u
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
mkdir -p /usr/local/sbin
printf '#!/bin/sh\ncase "$1" in is-active) exit 3;; esac\nexit 0\n' > /usr/local/sbin/systemctl
chmod +x /usr/local/sbin/systemctl
cd /srv/grace
R=/etc/polkit-1/rules.d/50-graced.rules
out=/srv/out; mkdir -p $out
systemd/install.sh > $out/install1.log 2>&1; echo $? > $out/rc1
cat /srv/playbooks.toml >> /etc/graced/graced.toml
systemd/install.sh > $out/install2.log 2>&1; echo $? > $out/rc2
cp $R $out/rule2; readlink /opt/grace/current > $out/current2
for n in inject slash; do
    cp /etc/graced/graced.toml /srv/good.toml
    cat /srv/$n.toml >> /etc/graced/graced.toml
    sleep 1  # a new venv name (it carries the time to the second)
    systemd/install.sh > $out/install-$n.log 2>&1; echo $? > $out/rc-$n
    cp $R $out/rule-$n; readlink /opt/grace/current > $out/current-$n
    cp /srv/good.toml /etc/graced/graced.toml
done
"""


def _overlay_run(tmp: Path, script: str) -> None:
    ovl = tmp / "ovl"
    ovl.mkdir()
    inner = f"""
set -e
mount -t tmpfs -o size=2g tmpfs {ovl}
mkdir {ovl}/u {ovl}/w {ovl}/m
mount -t overlay overlay -o lowerdir=/,upperdir={ovl}/u,workdir={ovl}/w {ovl}/m
mount --rbind /dev {ovl}/m/dev
mount -t proc proc {ovl}/m/proc
mount -t tmpfs tmpfs {ovl}/m/run
mkdir -p {ovl}/m/srv/grace
cp -r {tmp}/src/. {ovl}/m/srv/grace/
cp {tmp}/*.toml {tmp}/run.sh {ovl}/m/srv/
chroot {ovl}/m /bin/sh /srv/run.sh
cp -r {ovl}/m/srv/out {tmp}/out
"""
    res = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", inner],
                         capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stderr


@pytest.mark.slow
def test_install_upgrade_keeps_actions_and_a_failed_upgrade_changes_nothing(
        tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("install.sh runs as root (in a throwaway overlay of /)")
    for tool in ("unshare", "chroot", "systemd-sysusers", "systemd-tmpfiles", "node"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool}")
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a mount namespace here: {probe.stderr.strip()}")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "graced", "gracectl", "systemd", "man"):
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name,
                            ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, src / name)
    (tmp_path / "playbooks.toml").write_text(PLAYBOOKS)
    (tmp_path / "inject.toml").write_text(BAD.format(name="vendor", unit=INJECT))
    (tmp_path / "slash.toml").write_text(BAD.format(name="slash", unit="app/x.service"))
    (tmp_path / "run.sh").write_text(SCRIPT)
    _overlay_run(tmp_path, SCRIPT)
    out = tmp_path / "out"

    def log(name: str) -> str:
        return (out / f"install{name}.log").read_text()

    assert (out / "rc1").read_text().strip() == "0", log("1")
    assert (out / "rc2").read_text().strip() == "0", log("2")
    rule = out / "rule2"
    (tmp_path / "eval.js").write_text(POLKIT_EVAL)

    def polkit(user: str, verb: str, unit: str, rules: Path = rule) -> str:
        res = subprocess.run(["node", str(tmp_path / "eval.js"), str(rules), user,
                              "org.freedesktop.systemd1.manage-units", verb, unit],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        return res.stdout.strip()

    # The upgrade put the action among the actions (start), not the restart units.
    assert polkit("graced", "start", "grace-action@clean-logs.service") == "yes"
    assert polkit("graced", "restart", "grace-action@clean-logs.service") == "no"
    # The escaped name is the unit systemd names, byte for byte (sed made it "luks-1234").
    assert polkit("graced", "restart", r"systemd-cryptsetup@luks\x2d1234.service") == "yes"
    assert polkit("graced", "stop", "sshd.service") == "no"
    assert polkit("nobody", "restart", r"systemd-cryptsetup@luks\x2d1234.service") == "no"
    # A name that would have broken out of its string, and one with a slash (sed failed
    # after the switch, leaving an empty rule): both refused, nothing changed.
    for name in ("inject", "slash"):
        assert (out / f"rc-{name}").read_text().strip() != "0", log(f"-{name}")
        assert "nothing changed" in log(f"-{name}"), log(f"-{name}")
        assert "unit: not a systemd unit name" in log(f"-{name}"), log(f"-{name}")
        assert (out / f"rule-{name}").read_bytes() == rule.read_bytes()
        assert (out / f"current-{name}").read_text() == (out / "current2").read_text()
    assert polkit("nobody", "stop", "sshd.service", out / "rule-inject") == "no"
