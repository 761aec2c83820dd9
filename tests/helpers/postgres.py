"""A real, private PostgreSQL server for a test: its own data dir, a Unix socket only.

Uses Debian's ``postgresql`` package (installed with apt-get when running as root and it
is missing); skips with the reason when it cannot be had. As root, initdb and pg_ctl
run as the ``postgres`` user (the server refuses to run as root).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.helpers.locks import apt_install


def _bindir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


def ensure_postgres() -> Path:
    """The server's bin directory, installing Debian's postgresql if root; else skip."""
    bindir = _bindir()
    if bindir is None:
        apt_install(["postgresql"], lambda: _bindir() is not None)
        bindir = _bindir()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (Debian's postgresql package) and cannot "
                    "be installed here (needs root and apt-get)")
    if os.geteuid() == 0:
        try:
            import pwd

            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root but there is no postgres user to run the server")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("psycopg is not installed (pip install '.[postgres]' in this checkout)")
    return bindir


@contextmanager
def postgres_server() -> Iterator[str]:
    """Start a private server; yields its socket directory (a libpq ``host``)."""
    bindir = ensure_postgres()
    base = Path(tempfile.mkdtemp(prefix="gpg", dir="/tmp"))
    data, sock, logfile = base / "data", base / "sock", base / "log"
    sock.mkdir()
    as_user: list[str] = []
    if os.geteuid() == 0:
        as_user = ["runuser", "-u", "postgres", "--"]
        subprocess.run(["chown", "-R", "postgres:postgres", str(base)], check=True)
    base.chmod(0o755)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*as_user, *args], capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=120)

    res = run(str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres",
              "--no-sync")
    assert res.returncode == 0, res.stderr
    res = run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(logfile), "-w", "-t", "60",
              "-o", f"-k {sock} -c listen_addresses='' -c fsync=off", "start")
    assert res.returncode == 0, res.stderr + (logfile.read_text() if logfile.exists() else "")
    try:
        yield str(sock)
    finally:
        run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(base, ignore_errors=True)
