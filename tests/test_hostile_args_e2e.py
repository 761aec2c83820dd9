"""No traceback, ever: every command and subcommand of gracectl and graced, run as real
processes with hostile arguments and environments (junk files, junk ids, an unreachable
socket, a socket in a directory the user cannot enter, bad URLs, a corrupt pinned-keys
file, no HOME), ends with its errors on stderr as one line (click's usage text for a usage
error) and an exit code its man page documents."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import click
import pytest

from gracectl.cli import cli as _ctl_cli
from graced.cli import cli as daemon_cli
from graced.errors import DaemonExit
from graced.protocol import ExitCode
from tests.conftest import bin_path

CTL_CODES = {int(c) for c in ExitCode}
DAEMON_CODES = {int(c) for c in DaemonExit}

ctl_cli = _ctl_cli.load_all()  # fleet and web are loaded when asked for


def _leaves(group: click.Group, prefix: tuple[str, ...] = ()) -> Iterator[
        tuple[tuple[str, ...], click.Command]]:
    for name, cmd in sorted(group.commands.items()):
        if isinstance(cmd, click.Group):
            yield from _leaves(cmd, (*prefix, name))
        else:
            yield (*prefix, name), cmd


def _junk_args(cmd: click.Command, junk: Path) -> list[str]:
    """Values for every required argument and option: junk, of the right shape."""
    out: list[str] = []
    for p in cmd.params:
        if isinstance(p, click.Argument) and p.required or (
                isinstance(p, click.Option) and p.required):
            value = (str(junk) if isinstance(p.type, (click.Path, click.File)) else
                     "99999" if isinstance(p.type, (click.types.IntParamType,
                                                    click.types.FloatParamType)) else
                     p.type.choices[-1] if isinstance(p.type, click.Choice) else
                     "junk:\x1b[31m*")
            if isinstance(p, click.Option):
                out.append(p.opts[0])
            out.append(str(value))
    return out


@pytest.fixture(scope="module", autouse=True)
def bytecode() -> None:
    """Hundreds of starts: from bytecode, as an installed gracectl starts (with
    PYTHONDONTWRITEBYTECODE each start would compile every module again)."""
    root = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(root / "graced"),
                    str(root / "gracectl")], check=True, stdout=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def junk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("hostile")
    j = base / "garbage.bin"
    j.write_bytes(b"\xff\xfe\x00garbage\n{\"kid\": 1}\n" + os.urandom(512))
    return j


def _env(base: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GRACE_", "XDG_"))}
    env.update({"HOME": str(base / "home"), "XDG_RUNTIME_DIR": str(base / "run"),
                "XDG_CONFIG_HOME": str(base / "home" / ".config"),
                "XDG_STATE_HOME": str(base / "home" / ".state"),
                "GRACE_SOCKET": str(base / "nowhere.sock"), "LANG": "C.UTF-8"})
    env.update(extra)
    return {k: v for k, v in env.items() if v != ""}


def _environments(base: Path) -> dict[str, tuple[list[str], dict[str, str]]]:
    """name -> (global gracectl options, environment)."""
    (base / "home").mkdir(exist_ok=True)
    corrupt = base / "corrupt"
    (corrupt / ".config" / "grace").mkdir(parents=True, exist_ok=True)
    (corrupt / ".config" / "grace" / "known_keys.json").write_bytes(b"{\"unix:\xff\x00 [")
    return {
        "unreachable": ([], _env(base)),
        "no-home": ([], _env(base, HOME="", XDG_CONFIG_HOME="", XDG_STATE_HOME="",
                          XDG_RUNTIME_DIR="")),
        "corrupt-keys": ([], _env(base, HOME=str(corrupt),
                                  XDG_CONFIG_HOME=str(corrupt / ".config"))),
        "url-no-scheme": (["--url", "127.0.0.1:7480"], _env(base)),
        "url-http": (["--url", "http://127.0.0.1:1/"], _env(base)),
        "url-bad-port": (["--url", "ws://127.0.0.1:99999999/"], _env(base)),
        "url-junk": (["--url", "wss://[::1/\x1b"], _env(base)),
        "socket-dir": (["--socket", str(base)], _env(base)),
    }


def _check(argv: list[str], env: dict[str, str], codes: set[int],
           as_user: list[str] | None = None) -> str | None:
    """What is wrong with running ``argv`` (None: nothing)."""
    try:
        res = subprocess.run([*(as_user or []), *argv], env=env, capture_output=True,
                             text=True, errors="replace", timeout=60,
                             stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return f"{argv}: still running after 60 s"
    where = f"{' '.join(argv)!r} -> {res.returncode}"
    if "Traceback" in res.stderr or "Traceback" in res.stdout:
        return f"{where}: traceback\n{res.stderr[-1500:]}"
    if res.returncode not in codes:
        return f"{where}: undocumented exit code; stderr: {res.stderr[-300:]}"
    if res.returncode != 0:
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        usage = any(ln.startswith("Usage:") for ln in lines)
        if not lines or (not usage and len(lines) > 2):
            return f"{where}: expected one line on stderr, got {lines[:6]}"
    return None


@pytest.mark.slow
def test_every_gracectl_command_with_hostile_arguments_and_environments(
        tmp_path: Path, junk: Path) -> None:
    ctl = bin_path("gracectl")
    runs = []
    for name, (opts, env) in _environments(tmp_path).items():
        for path, cmd in _leaves(ctl_cli):
            if path == ("top",):
                args = ["--once"]
            else:
                args = _junk_args(cmd, junk)
            runs.append(([ctl, *opts, *path, *args], env))
            if name == "unreachable":  # junk ids, junk option values, unknown options
                runs.append(([ctl, *path, *args, "--no-such-option"], env))
                runs.append(([ctl, *path, "\x1b[2J", "-1", "--", "--json"], env))
    with ThreadPoolExecutor(4) as pool:
        problems = [p for p in pool.map(lambda r: _check(r[0], r[1], CTL_CODES), runs) if p]
    assert not problems, "\n".join(problems)


def test_the_cases_seen_by_a_new_user(tmp_path: Path, junk: Path) -> None:
    """Each of the issue's cases, with the exit code it must give."""
    ctl = bin_path("gracectl")
    env = _environments(tmp_path)
    cases = [
        ([ctl, "verify", "--key", str(junk), str(junk)], env["unreachable"][1], {1}),
        ([ctl, "--url", "127.0.0.1:7480", "status"], env["unreachable"][1], {2}),
        ([ctl, "--url", "http://127.0.0.1:7480", "status"], env["unreachable"][1], {2}),
        ([ctl, "status"], env["corrupt-keys"][1], {1}),
        ([ctl, "status"], env["unreachable"][1], {3}),
        ([ctl, "emit", "deploy"], env["unreachable"][1], {2}),
        ([ctl, "tail", "--since", "yesterday-ish"], env["unreachable"][1], {2}),
    ]
    for argv, e, codes in cases:
        problem = _check(argv, e, codes)
        assert problem is None, problem


def _as_nobody() -> list[str] | None:
    """A command prefix that runs as an unprivileged user (root ignores permissions)."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    return [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"] if setpriv else None


def test_a_socket_in_a_directory_the_user_cannot_enter(shortdir: Path) -> None:
    """The default socket or --socket alike: not authorised (exit 4: permission denied,
    with what to do), one line."""
    prefix = _as_nobody()
    if prefix is None:
        pytest.skip("running as root without setpriv: cannot be a user who lacks access")
    shortdir.chmod(0o755)  # the user's own home is in here
    locked = shortdir / "locked"
    locked.mkdir(mode=0o700)
    (locked / "graced").mkdir()
    env = _env(shortdir, XDG_RUNTIME_DIR=str(locked), GRACE_SOCKET="")
    home = shortdir / "home"
    home.mkdir(exist_ok=True)
    if prefix:
        os.chown(home, 65534, 65534)
    for argv in (["status"], ["--socket", str(locked / "graced" / "graced.sock"), "status"]):
        problem = _check([bin_path("gracectl"), *argv], env, {4}, as_user=prefix)
        assert problem is None, problem


@pytest.mark.slow
def test_every_graced_command_with_hostile_arguments(tmp_path: Path, junk: Path) -> None:
    daemon = bin_path("graced")
    env = _env(tmp_path)
    (tmp_path / "home").mkdir(exist_ok=True)
    runs = []
    for path, cmd in _leaves(daemon_cli):
        if path == ("run",):  # runs for good when it can start: give it a junk config
            runs.append([daemon, "run", "--config", str(junk)])
            continue
        args = _junk_args(cmd, junk)
        runs.append([daemon, *path, *args])
        runs.append([daemon, *path, *args, "--no-such-option"])
        if any(isinstance(p, click.Option) and "--config" in p.opts for p in cmd.params):
            runs.append([daemon, *path, *args, "--config", str(junk)])
    with ThreadPoolExecutor(4) as pool:
        problems = [p for p in pool.map(lambda a: _check(a, env, DAEMON_CODES), runs) if p]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name, content, kind", [
    ("nan.csv", b"timestamp,value\nnan,1\n1,2\n", "memory"),
    ("inf.csv", b"timestamp,value\ninf,1\n", "memory"),
    ("huge-field.csv", b"timestamp,value\n1," + b"9" * (200 * 1024) + b"\n", "memory"),
    ("latin1.csv", b"timestamp,value\n1,\xe9\xff\n", "memory"),
    ("nul.csv", b"timestamp,value\n1\x00,2\n", "memory"),
    ("empty.csv", b"", "memory"),
])
def test_backtest_on_hostile_csv(tmp_path: Path, name: str, content: bytes,
                                 kind: str) -> None:
    f = tmp_path / name
    f.write_bytes(content)
    problem = _check([bin_path("graced"), "backtest", str(f), "--kind", kind],
                     _env(tmp_path), DAEMON_CODES - {0})
    assert problem is None, problem


def test_config_check_on_a_deeply_nested_file(tmp_path: Path) -> None:
    f = tmp_path / "deep.toml"
    f.write_text("x = " + "[" * 50_000 + "]" * 50_000 + "\n")
    problem = _check([bin_path("graced"), "config", "check", str(f)], _env(tmp_path),
                     {int(DaemonExit.CONFIG)})
    assert problem is None, problem
