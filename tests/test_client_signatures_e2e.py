"""gracectl checks every signature itself, not only the key id it names.

An impostor (tests/helpers/fake_daemon.py) holding the trusted key's id sends answers and
events whose signature is wrong (one bit flipped) or whose content was changed after
signing: the key-id check passes them, so only the signature check can refuse them. Each
command exits 10 with one line on stderr, no traceback, and nothing of the altered
content shown. Run through the real gracectl, whatever client it uses inside.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from graced.protocol import ExitCode
from tests.conftest import bin_path
from tests.test_hostile_daemon_e2e import Impostor, impostor  # noqa: F401

WAIT = ("wait", "1", "--state", "resolved", "--timeout", "20")
APPROVE = ("missions", "approve", "1", "--yes")
CASES = [
    (mode, command)
    for kind in ("bad-sig", "altered")
    for mode, command in (
        (f"{kind}-response", ("status",)),
        (f"{kind}-response", APPROVE),
        (f"{kind}-event", WAIT),
        (f"{kind}-event", ("tail",)),
    )
]


@pytest.mark.slow
@pytest.mark.parametrize("mode, command", CASES, ids=[f"{m}-{c[0]}" for m, c in CASES])
def test_a_bad_signature_under_the_trusted_key_id_is_refused(
        impostor: Impostor, mode: str, command: tuple[str, ...]) -> None:  # noqa: F811
    sock = impostor.start(mode)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRACE_")}
    env.update({"GRACE_SOCKET": str(sock), "GRACE_KNOWN_KEYS": str(impostor.known),
                "HOME": str(impostor.base)})
    try:
        res = subprocess.run([bin_path("gracectl"), *command], env=env, capture_output=True,
                             text=True, stdin=subprocess.DEVNULL, timeout=40)
    except subprocess.TimeoutExpired as exc:  # plain tail follows what it accepted
        raise AssertionError(f"gracectl {' '.join(command)} accepted the {mode} and kept "
                             f"going; stdout: {exc.stdout!r}") from None
    assert res.returncode == ExitCode.BAD_SIGNATURE, (res.returncode, res.stdout, res.stderr)
    err = res.stderr
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "signature" in err, err
    assert "FORGED" not in res.stdout + err and "resolved" not in res.stdout, res.stdout
