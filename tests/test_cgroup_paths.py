"""cgroup paths the cgroup detectors name (review of #19: attacker 6, newcomer 3): config
check warns about a path with '..', one outside every cgroup v2 mount and a cgroup without
the file the detector reads; the running detector says plainly why the file is missing."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from graced.cgroupfs import cgroup2_mounts
from tests.test_config_keys import graced_cmd


def _cgroup2_root() -> str:
    mounts = cgroup2_mounts()
    if not mounts:
        pytest.skip("no cgroup2 mount on this host (cgroup v1 only)")
    return mounts[0]


def test_check_warns_about_cgroup_paths_outside_cgroupfs_or_without_their_file(
        tmp_path: Path) -> None:
    root = _cgroup2_root()  # the root cgroup has no memory.events, on any host
    path = tmp_path / "graced.toml"
    path.write_text(f'version = 1\n[[detector]]\nname = "p"\nkind = "psi_cpu"\n'
                    'cgroup = "/sys/fs/cgroup/../../../etc"\n'
                    '[[detector]]\nname = "m"\nkind = "cgroup_memory"\ncgroup = "/etc/../tmp"\n'
                    f'[[detector]]\nname = "r"\nkind = "cgroup_memory"\ncgroup = "{root}"\n')
    res = graced_cmd("config", "check", str(path))
    assert (res.returncode, res.stdout) == (0, f"{path}: ok\n"), res.stderr
    lines = res.stderr.splitlines()
    assert "Traceback" not in res.stderr and all(
        ln.startswith(f"graced: warning: {path}:") for ln in lines), res.stderr
    p = [ln for ln in lines if "(p) cgroup:" in ln]
    assert "is not a plain path (it means /etc)" in p[0], p
    assert "/etc is not under a cgroup v2 mount" in p[1], p
    assert "no cpu.pressure in /etc" in p[2], p
    m = [ln for ln in lines if "(m) cgroup:" in ln]
    assert "it means /tmp" in m[0] and "/tmp is not under a cgroup v2 mount" in m[1], m
    assert "no memory.events in /tmp: the memory controller is not enabled" in m[2], m
    r = [ln for ln in lines if "(r) cgroup:" in ln]
    assert len(r) == 1 and f"no memory.events in {root}: the memory controller" in r[0], r
    assert len(lines) == 7, lines


def test_a_cgroup_without_memory_events_fails_with_a_plain_reason(make_graced) -> None:
    root = _cgroup2_root()
    g = make_graced(detectors=f'[[detector]]\nname = "cgm"\nkind = "cgroup_memory"\n'
                              f'cgroup = "{root}"\n')
    deadline = time.monotonic() + 15
    while True:
        det = json.loads(g.ctl("detectors", "--json", check=True).stdout)["cgm"]
        if det["state"] == "error":
            break
        assert time.monotonic() < deadline, det
        time.sleep(0.1)
    assert det["last_error"] == (
        f"no memory.events in {root}: the memory controller is not "
        "enabled for this cgroup (on cgroup v2, +memory in its parent's "
        "cgroup.subtree_control; on a hybrid host the v1 hierarchy holds it)"), det
