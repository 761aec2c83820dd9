"""Fixtures that start the real graced and run the real gracectl."""

from __future__ import annotations

import contextlib
import json
import os
import random
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.locks import run_lock
from tests.helpers.users import CREATED_ENV, remove_created

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def bin_path(name: str) -> str:
    found = BIN / name
    return str(found) if found.exists() else (shutil.which(name) or name)


class Graced:
    """A real graced subprocess on a private state dir and socket."""

    def __init__(self, base: Path, extra_config: str = "", heartbeat: float = 0.5,
                 detectors: str = "", top: str = "detector = []\n") -> None:
        self.base = base
        self.state = base / "state"
        self.socket = base / "g.sock"
        self.config = base / "graced.toml"
        self.home = base / "home"
        self.home.mkdir(exist_ok=True)
        # No host detectors unless a test asks: a loaded CI host must not add missions.
        self.config.write_text(
            "version = 1\n" + (top if not detectors else "") + "[daemon]\n"
            f'state_dir = "{self.state}"\nsocket = "{self.socket}"\n'
            f"heartbeat_interval = {heartbeat}\n" + extra_config + "\n" + detectors
        )
        self.proc: subprocess.Popen[str] | None = None
        self.notify_path = base / "notify.sock"
        self.notify: socket.socket | None = None
        self.stderr_path = base / "graced.stderr"
        self.wrap: list[str] = []  # e.g. nsenter: run graced inside another namespace
        self.pass_config = True  # False: no --config, graced finds self.config itself
        self.env_extra: dict[str, str] = {}  # e.g. CONFIGURATION_DIRECTORY, as systemd sets
        self.run_args: list[str] = []  # e.g. --new-key

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            "GRACE_SOCKET": str(self.socket),
            "XDG_CONFIG_HOME": str(self.home / ".config"),
            "XDG_STATE_HOME": str(self.home / ".state"),
            "XDG_RUNTIME_DIR": str(self.home / "run"),
            "HOME": str(self.home),
        })
        env.pop("GRACE_URL", None)
        env.update(self.env_extra)
        return env

    def start(self, timeout: float = 20.0) -> None:
        """Start graced and wait for its READY=1 on a real NOTIFY_SOCKET."""
        if self.notify is None:
            self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self.notify.bind(str(self.notify_path))
        env = self.env
        env["NOTIFY_SOCKET"] = str(self.notify_path)
        self.stderr_file = open(self.stderr_path, "a")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [*self.wrap, bin_path("graced"), "run",
             *(["--config", str(self.config)] if self.pass_config else []), *self.run_args],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=self.stderr_file, text=True,
        )
        self.wait_notify("READY=1", timeout)

    def wait_notify(self, what: str, timeout: float) -> str:
        assert self.notify is not None
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"graced did not send {what}; stderr:\n{self.stderr()}")
            self.notify.settimeout(min(remaining, 0.5))
            try:
                msg = self.notify.recv(4096).decode()
            except TimeoutError:
                if self.proc is not None and self.proc.poll() is not None:
                    raise RuntimeError(
                        f"graced exited {self.proc.returncode}:\n{self.stderr()}") from None
                continue
            if what in msg.split("\n"):
                return msg

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text()
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        rc = self.proc.wait(timeout)
        self.stderr_file.close()
        return rc

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)
        self.stderr_file.close()

    def ctl(self, *args: str, check: bool = False, timeout: float = 60,
            input: str | None = None, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
        """Run the real gracectl against this daemon."""
        result = subprocess.run(
            [bin_path("gracectl"), *args], env=env or self.env, capture_output=True,
            text=True, timeout=timeout, input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"gracectl {' '.join(args)} exited {result.returncode}: {result.stderr}"
            )
        return result

    def ctl_argv0(self) -> str:
        return bin_path("gracectl")

    def ctl_popen(self, *args: str, **kw: Any) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [bin_path("gracectl"), *args], env=self.env, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, **kw,
        )

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()
        if self.notify is not None:
            self.notify.close()


@pytest.fixture
def shortdir() -> Iterator[Path]:
    """A temp dir with a short path (Unix socket paths are limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="g", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def graced(shortdir: Path) -> Iterator[Graced]:
    g = Graced(shortdir)
    g.start()
    try:
        yield g
    finally:
        g.close()


@pytest.fixture
def make_graced(shortdir: Path) -> Iterator[Any]:
    made: list[Graced] = []

    def make(extra_config: str = "", heartbeat: float = 0.5, start: bool = True,
             detectors: str = "") -> Graced:
        g = Graced(shortdir, extra_config, heartbeat, detectors)
        if start:
            g.start()
        made.append(g)
        return g

    try:
        yield make
    finally:
        for g in made:
            g.close()


SLOW_AFTER = 3.0  # seconds: a test that takes longer alone is marked @pytest.mark.slow
_unmarked_slow: list[tuple[str, float]] = []
# The fuzz tests' seed: new each run unless given, printed at the end of every run that
# fuzzed, so a failure replays with GRACE_FUZZ_SEED=<seed>.
FUZZ_SEED = int(os.environ.get("GRACE_FUZZ_SEED") or random.SystemRandom().randrange(2**32))
_fuzzed: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call" and report.duration > SLOW_AFTER and "slow" not in report.keywords:
        _unmarked_slow.append((report.nodeid, report.duration))
    if report.when == "call" and "fuzz" in report.nodeid:
        _fuzzed.append(report.nodeid)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Name the tests that took over SLOW_AFTER without the slow marker (a hint, since a
    loaded machine stretches any test; the quick part must stay under 90 s)."""
    if _fuzzed:
        terminalreporter.write_line(f"fuzz seed {FUZZ_SEED} (replay with "
                                    f"GRACE_FUZZ_SEED={FUZZ_SEED})")
    if _unmarked_slow:
        terminalreporter.write_sep("-", f"over {SLOW_AFTER:g} s and not marked slow")
        for nodeid, seconds in _unmarked_slow:
            terminalreporter.write_line(f"{seconds:5.1f} s  {nodeid}")


# --- Tests that run in the background -------------------------------------------------
# A test marked @pytest.mark.background takes minutes of real time mostly waiting (faults a
# minute apart, a user toggling a file for ten minutes). The whole suite still runs it, but
# not in line: as soon as collection is done, each one starts in a child pytest of its own
# (GRACE_BACKGROUND_CHILD=1), running beside the rest of the suite; its item is moved to the
# end, where it waits for its child's exit and fails with the child's output if the child
# failed. Run alone (or in the child), such a test runs in line as any other.
#
# The suite runs in pytest-xdist workers (-n in pyproject.toml's addopts): the first worker
# to finish collecting starts the children (under a lock, in the run's directory, shared
# through the environment); whichever worker gets a background item waits for its child by
# a pidfd (the child need not be its own) and reads the exit status the child wrote.
CHILD_ENV = "GRACE_BACKGROUND_CHILD"
RUN_DIR_ENV = "GRACE_TEST_RUN_DIR"  # the run's shared directory (background children)
RC_ENV = "GRACE_BACKGROUND_RC"  # in a child: where it writes its exit status
_children: list[subprocess.Popen[bytes]] = []


def in_background_child() -> bool:
    """True where a background test's body must run here (the child, or a run of it alone)."""
    return os.environ.get(CHILD_ENV) == "1"


def _is_worker(config: Any) -> bool:
    return hasattr(config, "workerinput")


def pytest_collection_modifyitems(config: Any, items: list[pytest.Item]) -> None:
    """Background tests last, so everything else runs while their children work."""
    items.sort(key=lambda item: item.get_closest_marker("background") is not None)


def _manifest() -> Path:
    return Path(os.environ[RUN_DIR_ENV]) / "background.json"


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start a child pytest for each selected background test, unless it is alone; once
    for the whole run, however many workers collect."""
    if in_background_child():
        return
    chosen = [i for i in session.items if i.get_closest_marker("background")]
    if not chosen or len(chosen) == len(session.items):
        os.environ[CHILD_ENV] = "1"  # alone: run in line, nothing to overlap with
        return
    run_dir = Path(os.environ[RUN_DIR_ENV])
    with run_lock(f"background-{run_dir.name}"):
        if _manifest().exists():
            return
        started = {}
        for n, item in enumerate(chosen):
            log, rc = run_dir / f"{n}.log", run_dir / f"{n}.rc"
            with log.open("wb") as out:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0",
                     "-rA", item.nodeid],
                    cwd=session.config.rootpath, stdin=subprocess.DEVNULL, stdout=out,
                    stderr=subprocess.STDOUT,
                    env=dict(os.environ, **{CHILD_ENV: "1", RC_ENV: str(rc)}),
                    start_new_session=True)
            _children.append(proc)
            started[item.nodeid] = {"pid": proc.pid, "log": str(log), "rc": str(rc)}
        _manifest().write_text(json.dumps(started))


def _wait_exit(pid: int, timeout: float | None = None) -> bool:
    """Wait for process ``pid`` (any process, not only a child of this one) to end; True
    once it has ended, False if ``timeout`` passed first."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


def wait_for_background(nodeid: str) -> None:
    """In the parent run: wait for this test's child; skip if it skipped, fail with its
    output if it failed."""
    child = json.loads(_manifest().read_text())[nodeid]
    rc_file = Path(child["rc"])
    if not rc_file.exists():  # written as the child ends: until then, wait for its exit
        _wait_exit(child["pid"])
    rc = rc_file.read_text().strip() if rc_file.exists() else "killed"
    text = Path(child["log"]).read_text(errors="replace")
    assert rc == "0", f"background run of {nodeid} failed (exit {rc}):\n{text[-6000:]}"
    skipped = [line for line in text.splitlines() if line.startswith("SKIPPED")]
    if skipped:  # -rA names each outcome; rc 0 with a skip is a skip here too
        pytest.skip(f"skipped in its background run: {skipped[0]}")


@pytest.fixture
def background(request: pytest.FixtureRequest) -> bool:
    """For a @pytest.mark.background test: False in the parent run, once its child has
    passed (the test returns at once); True where the body must run."""
    if in_background_child():
        return True
    wait_for_background(request.node.nodeid)
    return False


@pytest.fixture(autouse=True)
def _alone_if_host_wide(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test marked ``host_wide`` judges something every process of the host moves (the
    host's memory use): it runs with no other test of this run beside it (the workers'
    tests hold a shared run lock, it holds it exclusively). Background tests, which run
    for minutes (or wait that long for their child), stay out of it, as they did before
    the suite ran in workers."""
    if request.node.get_closest_marker("background"):
        yield
        return
    name = f"host-wide-{Path(os.environ.get(RUN_DIR_ENV, 'alone')).name}"
    with run_lock(name, shared=request.node.get_closest_marker("host_wide") is None):
        yield


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """A background child writes its exit status. At the end of the whole run (not of one
    worker): a run cut short leaves no background child behind, and the run removes the
    Unix users and groups it created (tests/helpers/users.py) and its shared directory."""
    if in_background_child() and os.environ.get(RC_ENV):
        Path(os.environ[RC_ENV]).write_text(str(int(exitstatus)))
    for proc in _children:
        proc.poll()  # reap the ones that ended; the others are waited for below
    if _is_worker(session.config) or _RUN_DIR is None:
        return
    try:
        children = json.loads(_manifest().read_text())
    except (OSError, ValueError):
        children = {}
    live = [c["pid"] for c in children.values() if not Path(c["rc"]).exists()]
    for pid in live:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
    for pid in live:
        if not _wait_exit(pid, 10):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
    if _CREATED is not None:
        remove_created(_CREATED)
    shutil.rmtree(_RUN_DIR, ignore_errors=True)
    Path(f"/tmp/grace-test-host-wide-{_RUN_DIR.name}.lock").unlink(missing_ok=True)
    Path(f"/tmp/grace-test-background-{_RUN_DIR.name}.lock").unlink(missing_ok=True)


def pytest_sessionstart(session: pytest.Session) -> None:
    """One record of the users and groups this run creates, one shared directory and one
    fuzz seed, shared with its workers and children (they inherit the environment: this
    runs before xdist starts its workers)."""
    global _CREATED, _RUN_DIR
    if CREATED_ENV not in os.environ:
        fd, name = tempfile.mkstemp(prefix="grace-test-users-")
        os.close(fd)
        os.environ[CREATED_ENV] = name
        _CREATED = Path(name)
    if RUN_DIR_ENV not in os.environ:
        _RUN_DIR = Path(tempfile.mkdtemp(prefix="grace-run-"))
        os.environ[RUN_DIR_ENV] = str(_RUN_DIR)
    os.environ.setdefault("GRACE_FUZZ_SEED", str(FUZZ_SEED))


_RUN_DIR: Path | None = None
_CREATED: Path | None = None
