"""Config files, keys and state: clear errors with exit codes, nothing overwritten."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from graced.config import ConfigError, default_config, parse_config, to_toml
from graced.errors import DaemonExit
from tests.conftest import Graced, bin_path


def graced_cmd(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([bin_path("graced"), *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, env=env, timeout=30)


@pytest.mark.parametrize("text, needle", [
    ("[daemon]\nheartbeat_intervl = 5\n", ":2: [daemon] heartbeat_intervl: unknown key"),
    ("[daemon]\nheartbeat_interval = \"5s\"\n",
     ":2: [daemon] heartbeat_interval: expected a number, got string '5s'"),
    ("[daemon]\n\nheartbeat_interval = -1\n",
     ":3: [daemon] heartbeat_interval: must be greater than 0"),
    ("[daemon]\nsocket_mode = \"0999\"\n", ":2: [daemon] socket_mode: must be an octal"),
    ("[daemon]\nlisten = [\"localhost\"]\n", "listen: 'localhost' is not HOST:PORT"),
    ("[journal]\nsynchronous = \"off\"\n", ":2: [journal] synchronous: must be"),
    ("version = 99\n", ":1: version: config version 99 is newer than this graced"),
    ("[deamon]\n", "unknown top-level key 'deamon'"),
    ("[daemon\n", "invalid TOML"),
    ('[[detector]]\nname = "a"\nkind = "memory"\n[[detector]]\nname = "a"\nkind = "cpu"\n',
     ":5: [[detector]] #2 (a) name: duplicate detector name"),
    ('[[detector]]\nname = "t"\nkind = "tcp"\nhost = "localhost"\n',
     '[[detector]] #1 (t) port: required for kind "tcp"'),
    ('[[playbook]]\nname = "p"\n[[playbook.step]]\naction = "run"\nargv = ["true"]\n',
     ":1: [[playbook]] #1 (p) risk: missing"),
    ('[[playbook]]\nname = "p"\nrisk = "low"\n[[playbook.step]]\naction = "run"\n',
     ':4: [[playbook]] #1 (p) step 1 argv: required for action "run"'),
    ('[[playbook]]\nname = "p"\nrisk = "urgent"\n',
     ':3: [[playbook]] #1 (p) risk: must be one of "low", "medium", "high", "critical"'),
    ('[[notifier]]\nname = "n"\nkind = "pager"\n',
     ':3: [[notifier]] #1 (n) kind: must be "command" or "webhook"'),
    ('[remediation]\nmode = "yolo"\n', ':2: [remediation] mode: must be "act" or "observe"'),
])
def test_config_check_names_file_line_key_and_reason(tmp_path: Path, text: str,
                                                      needle: str) -> None:
    path = tmp_path / "graced.toml"
    path.write_text(text)
    res = graced_cmd("config", "check", str(path))
    assert res.returncode == DaemonExit.CONFIG
    assert res.stderr.count("\n") == 1, res.stderr
    assert str(path) in res.stderr and needle in res.stderr, res.stderr
    assert res.stdout == ""


def test_default_config_roundtrips_and_is_valid(tmp_path: Path) -> None:
    res = graced_cmd("config", "default")
    assert res.returncode == 0
    path = tmp_path / "d.toml"
    path.write_text(res.stdout)
    assert graced_cmd("config", "check", str(path)).returncode == 0
    cfg = parse_config(to_toml(default_config()), "x")
    assert cfg.daemon == default_config().daemon


def test_default_paths_follow_xdg_and_systemd(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items()
           if k not in ("INVOCATION_ID", "STATE_DIRECTORY", "RUNTIME_DIRECTORY")}
    env.update(XDG_STATE_HOME=str(tmp_path / "st"), XDG_RUNTIME_DIR=str(tmp_path / "rt"))
    out = graced_cmd("config", "default", env=env).stdout
    # Paths are found at start, so a default written from root's shell suits the service.
    assert f'# state_dir = ""   # found at start; here: {tmp_path}/st/graced' in out
    assert f'# socket = ""   # found at start; here: {tmp_path}/rt/graced/graced.sock' in out
    assert "\nstate_dir" not in out and "\nsocket" not in out
    env.update(INVOCATION_ID="x", STATE_DIRECTORY="/var/lib/graced",
               RUNTIME_DIRECTORY="/run/graced")
    out = graced_cmd("config", "default", env=env).stdout
    assert "here: /var/lib/graced\n" in out and "here: /run/graced/graced.sock\n" in out


def test_parse_errors_are_config_errors() -> None:
    with pytest.raises(ConfigError):
        parse_config("[daemon]\nmax_clients = true\n", "f")


def test_run_with_bad_config_exits_3_without_touching_state(shortdir: Path) -> None:
    g = Graced(shortdir)
    g.config.write_text(g.config.read_text() + "bogus = 1\n")
    res = graced_cmd("run", "--config", str(g.config))
    assert res.returncode == DaemonExit.CONFIG
    assert "bogus: unknown key" in res.stderr
    assert not g.state.exists()


def _first_start(shortdir: Path) -> Graced:
    g = Graced(shortdir)
    g.start()
    assert g.stop() == 0
    g.close()
    return g


def test_key_is_private_and_refused_when_exposed(shortdir: Path) -> None:
    g = _first_start(shortdir)
    key = g.state / "key"
    assert (key.stat().st_mode & 0o777) == 0o600
    assert (g.state / "key.pub").read_text().startswith("ed25519 ")
    before = key.read_bytes()
    key.chmod(0o644)
    res = graced_cmd("run", "--config", str(g.config))
    assert res.returncode == DaemonExit.STATE
    assert "readable by group or others" in res.stderr and "chmod 600" in res.stderr
    assert key.read_bytes() == before


def test_invalid_key_is_refused_and_not_overwritten(shortdir: Path) -> None:
    g = _first_start(shortdir)
    key = g.state / "key"
    key.write_text("not a key\n")
    res = graced_cmd("run", "--config", str(g.config))
    assert res.returncode == DaemonExit.STATE
    assert "not a valid Ed25519 key" in res.stderr
    assert key.read_text() == "not a key\n"


def test_garbage_journal_is_refused_and_not_overwritten(shortdir: Path) -> None:
    g = _first_start(shortdir)
    db = g.state / "journal.db"
    for suffix in ("-wal", "-shm"):
        Path(str(db) + suffix).unlink(missing_ok=True)
    db.write_bytes(b"garbage" * 1000)
    res = graced_cmd("run", "--config", str(g.config))
    assert res.returncode == DaemonExit.STATE
    assert "journal" in res.stderr and "cannot open" in res.stderr
    assert db.read_bytes() == b"garbage" * 1000


def test_second_daemon_on_the_same_socket_is_refused(graced: Graced) -> None:
    res = graced_cmd("run", "--config", str(graced.config))
    assert res.returncode == DaemonExit.SOCKET
    assert "another graced" in res.stderr and res.stderr.count("\n") == 1
    assert graced.ctl("status").returncode == 0


def test_config_from_a_newer_version_is_refused(shortdir: Path) -> None:
    g = Graced(shortdir)
    g.config.write_text("version = 7\n" + g.config.read_text().split("\n", 1)[1])
    res = graced_cmd("run", "--config", str(g.config))
    assert res.returncode == DaemonExit.CONFIG
    assert f"{g.config}:1: version: config version 7 is newer" in res.stderr
    assert res.stderr.count("\n") == 1 and not g.state.exists()


def _unchanged_after_refusal(g: Graced, path: Path, needle: str) -> None:
    before = path.read_bytes()
    listing = sorted(p.name for p in g.state.iterdir())
    res = graced_cmd("run", "--config", str(g.config))
    assert res.returncode == DaemonExit.STATE, res.stderr
    assert needle in res.stderr and res.stderr.count("\n") == 1, res.stderr
    assert path.read_bytes() == before
    assert sorted(p.name for p in g.state.iterdir() if p.name != "lock") == [
        n for n in listing if n != "lock"]


def test_journal_from_a_newer_graced_is_refused_untouched(shortdir: Path) -> None:
    import sqlite3

    g = _first_start(shortdir)
    db = g.state / "journal.db"
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA user_version = 99")
    conn.close()
    _unchanged_after_refusal(g, db, "schema version 99 is newer than this graced understands")


def test_truncated_journal_is_refused_untouched(shortdir: Path) -> None:
    g = _first_start(shortdir)
    db = g.state / "journal.db"
    for suffix in ("-wal", "-shm"):
        Path(str(db) + suffix).unlink(missing_ok=True)
    data = db.read_bytes()
    assert len(data) > 8192
    db.write_bytes(data[: len(data) // 2 + 100])  # cut mid-page
    _unchanged_after_refusal(g, db, "journal")


def test_foreign_key_file_is_refused_untouched(shortdir: Path) -> None:
    g = _first_start(shortdir)
    key = g.state / "key"
    key.write_bytes(os.urandom(64))  # binary garbage of a plausible size
    _unchanged_after_refusal(g, key, "not a valid Ed25519 key")
