"""Root and XDG variables: root takes a user-mode base directory only if root owns it
and nobody else may write it or anything above it; otherwise the system paths."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

import pytest

from graced import paths

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the rule is about root: run as root")


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for var in ("INVOCATION_ID", "STATE_DIRECTORY", "RUNTIME_DIRECTORY",
                "CONFIGURATION_DIRECTORY"):
        monkeypatch.delenv(var, raising=False)
    tmp_path.chmod(0o755)
    return tmp_path


def test_root_ignores_xdg_dirs_another_user_controls(env: Path, monkeypatch) -> None:
    nobody = pwd.getpwnam("nobody").pw_uid
    theirs = env / "home"
    for sub in ("state", "run", "config/graced"):
        (theirs / sub).mkdir(parents=True)
    (theirs / "config" / "graced" / "graced.toml").write_text("version = 1\n")
    os.chown(theirs, nobody, -1)  # a directory above the XDG dirs: the user may swap them
    monkeypatch.setenv("XDG_STATE_HOME", str(theirs / "state"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(theirs / "run"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(theirs / "config"))
    assert paths.default_state_dir() == Path("/var/lib/graced")
    assert paths.default_socket() == Path("/run/graced/graced.sock")
    assert paths.default_config_file() in (None, Path("/etc/graced/graced.toml"))
    # Root's own private directories are used as given.
    os.chown(theirs, 0, -1)
    assert paths.default_state_dir() == theirs / "state" / "graced"
    assert paths.default_socket() == theirs / "run" / "graced" / "graced.sock"
    assert paths.default_config_file() == theirs / "config" / "graced" / "graced.toml"
    # ...unless others may write one of them.
    (theirs / "run").chmod(0o777)
    assert paths.default_socket() == Path("/run/graced/graced.sock")
