"""Secrets in a config stay there: a config that holds them and others may read is
warned about, naming what and why, and no rejection of a config echoes one."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.conftest import bin_path

SECRET = "s3cr3t-Pa55"
WEBHOOK = f"""
[[notifier]]
name = "hook"
kind = "webhook"
url = "https://ops:{SECRET}@hooks.example/notify?token={SECRET}"
"""


def check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([bin_path("graced"), "config", "check", str(path)],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=30)


def test_a_config_with_secrets_others_may_read_is_warned_about(tmp_path: Path) -> None:
    path = tmp_path / "graced.toml"
    path.write_text("version = 1\n" + WEBHOOK)
    path.chmod(0o644)
    res = check(path)
    assert res.returncode == 0, res.stderr
    assert (f"graced: warning: {path}: holds secrets ([[notifier]] hook url) and everyone may "
            "read it (mode 0644): chmod go-r") in res.stderr, res.stderr
    path.chmod(0o640)
    res = check(path)
    assert "holds secrets ([[notifier]] hook url) and group " in res.stderr, res.stderr
    path.chmod(0o600)
    res = check(path)
    assert res.returncode == 0 and "secrets" not in res.stderr, res.stderr
    assert SECRET not in res.stdout + res.stderr


BAD_URL = WEBHOOK.replace('url = "', 'url = ["').replace(f'{SECRET}"\n', f'{SECRET}"]\n')
BAD_ENV = ('\n[[playbook]]\nname = "p"\ndetector = "none"\nrisk = "low"\n'
           f'step = [{{ action = "run", argv = ["/bin/true"], env = ["{SECRET}"] }}]\n')


def test_no_rejection_echoes_a_secret(make_graced) -> None:
    g = make_graced()
    good = g.config.read_text()
    for bad, needle in ((BAD_URL, "url: expected a string, got array"),
                        (BAD_ENV, "env: entry 1 is not NAME=VALUE")):
        g.config.write_text(good + bad)
        res = check(g.config)
        assert res.returncode == 3 and needle in res.stderr, res.stderr
        assert SECRET not in res.stderr + res.stdout
        reload = g.ctl("reload")
        assert reload.returncode == 1 and needle in reload.stderr, reload.stderr
        assert SECRET not in reload.stderr + reload.stdout
    saved = g.ctl("tail", "--json", "--since", "1", "--no-follow", "daemon.config_rejected")
    rejected = [json.loads(x) for x in saved.stdout.splitlines()]
    assert len(rejected) == 2, saved.stdout
    assert all(SECRET not in json.dumps(e) for e in rejected), saved.stdout
    assert SECRET not in g.stderr()
