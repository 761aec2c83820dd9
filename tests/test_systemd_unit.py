"""The unit file: systemd-analyze verify is clean and the sandbox exposure is at most 2.5."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT, bin_path

UNIT = ROOT / "systemd" / "graced.service"
pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                reason="systemd-analyze is not installed")


def test_security_exposure_is_at_most_2_5() -> None:
    res = subprocess.run(["systemd-analyze", "security", "--offline=true", str(UNIT)],
                         capture_output=True, text=True)
    m = re.search(r"Overall exposure level for graced.service: ([0-9.]+)", res.stdout)
    assert m, res.stdout + res.stderr
    assert float(m.group(1)) <= 2.5, m.group(0)


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
