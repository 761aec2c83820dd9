"""The unit files: systemd-analyze verify is clean and the sandbox exposure of graced and
of an installed action is at most 2.0."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT, bin_path

UNIT = ROOT / "systemd" / "graced.service"
pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                reason="systemd-analyze is not installed")


def test_security_exposure_is_at_most_2_0() -> None:
    res = subprocess.run(["systemd-analyze", "security", "--offline=true", str(UNIT)],
                         capture_output=True, text=True)
    m = re.search(r"Overall exposure level for graced.service: ([0-9.]+)", res.stdout)
    assert m, res.stdout + res.stderr
    assert float(m.group(1)) <= 2.0, m.group(0)


def _action(tmp_path: Path) -> Path:
    """grace-action@clean-logs.service as installed: the template plus the example drop-in."""
    unit = tmp_path / "grace-action@clean-logs.service"
    unit.write_text((ROOT / "systemd" / "grace-action@.service").read_text())
    dropin = tmp_path / "grace-action@clean-logs.service.d"
    dropin.mkdir()
    (dropin / "action.conf").write_text(
        (ROOT / "systemd" / "actions" / "clean-logs.conf").read_text())
    return unit


def test_an_installed_action_is_sandboxed_and_valid(tmp_path: Path) -> None:
    unit = _action(tmp_path)
    res = subprocess.run(["systemd-analyze", "security", "--offline=true", unit.name],
                         capture_output=True, text=True, cwd=tmp_path)
    m = re.search(r"Overall exposure level for grace-action@clean-logs.service: ([0-9.]+)",
                  res.stdout)
    assert m, res.stdout + res.stderr
    assert float(m.group(1)) <= 2.0, m.group(0)
    verify = subprocess.run(["systemd-analyze", "verify", "--man=no", unit.name],
                            capture_output=True, text=True, cwd=tmp_path,
                            env={**os.environ, "SYSTEMD_UNIT_PATH": f"{tmp_path}:"})
    assert verify.returncode == 0 and not verify.stdout + verify.stderr, verify.stderr


def test_an_action_without_its_drop_in_cannot_start(tmp_path: Path) -> None:
    # The template alone has no ExecStart=: only what the administrator installed runs.
    unit = tmp_path / "grace-action@anything.service"
    unit.write_text((ROOT / "systemd" / "grace-action@.service").read_text())
    res = subprocess.run(["systemd-analyze", "verify", "--man=no", unit.name],
                         capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "SYSTEMD_UNIT_PATH": f"{tmp_path}:"})
    assert res.returncode != 0 and "has no ExecStart=" in res.stdout + res.stderr


def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    # Verify the shipped unit with ExecStart pointing at this checkout's graced.
    unit = tmp_path / "graced.service"
    unit.write_text(UNIT.read_text().replace("/opt/grace/current/bin/",
                                             str(Path(bin_path("graced")).parent) + "/"))
    res = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)],
                         capture_output=True, text=True)
    lines = [ln for ln in (res.stdout + res.stderr).splitlines()
             if "graced.service" in ln]
    assert res.returncode == 0 and not lines, res.stdout + res.stderr


def test_every_relaxed_sandbox_setting_says_why() -> None:
    text = UNIT.read_text().splitlines()
    for i, line in enumerate(text):
        if line.startswith(("RestrictAddressFamilies=", "ProtectProc=default", "PrivateUsers=no",
                            "IPAddressDeny=")):
            assert text[i - 1].startswith("#"), f"{line} has no comment saying why"


def test_config_units_lists_the_actions_after_the_units(tmp_path: Path) -> None:
    cfg = tmp_path / "graced.toml"
    base = 'version = 1\n[[detector]]\nname = "d"\nkind = "load"\n'
    steps = ('[[playbook]]\nname = "p"\ndetector = "d"\nrisk = "low"\n'
             '[[playbook.step]]\naction = "start_action"\nunit = "clean-logs"\n'
             '[[playbook.step]]\naction = "restart_unit"\nunit = "web.service"\n'
             '[[playbook.step]]\naction = "start_action"\nunit = "grace-action@rotate.service"\n')
    cfg.write_text(base + steps)
    res = subprocess.run([bin_path("graced"), "config", "units", "--config", str(cfg)],
                         capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stderr
    assert res.stdout == ("web.service\ngrace-action@clean-logs.service\n"
                          "grace-action@rotate.service\n")
    # Nothing from a mission may choose the action: no placeholder, no path.
    # Nor another unit than an installed action: sshd.service is no action.
    for unit in ("{subject}", "../../etc/x", "a b", "sshd.service", "grace-action@x"):
        cfg.write_text(base + steps.replace('"clean-logs"', f'"{unit}"'))
        bad = subprocess.run([bin_path("graced"), "config", "check", str(cfg)],
                             capture_output=True, text=True, stdin=subprocess.DEVNULL)
        assert bad.returncode == 3 and "an installed action's name" in bad.stderr, bad.stderr
        assert bad.stderr.count("\n") == 1
