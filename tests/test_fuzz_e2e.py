"""Fuzz the wire of a live graced with hypothesis: every malformed frame gets a signed
error reply or a clean close, the daemon stays up, and a verifying bystander is
unaffected. (bench/fuzz.py runs the same with 50,000+ cases.)

Each run draws a new seed and prints it; a failure replays with GRACE_FUZZ_SEED=<seed>.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, seed, settings

from graced.keys import parse_public_key
from tests.conftest import FUZZ_SEED, Graced
from tests.helpers.fuzz import FuzzClient, RawText, check_outcome, frames
from tests.helpers.procs import LineCollector

CASES = 400
MAX_REQUEST_BYTES = 65536
SEED = FUZZ_SEED
REPLAY = f"replay with GRACE_FUZZ_SEED={SEED}"


@pytest.fixture(scope="module")
def target() -> Iterator[tuple[Graced, FuzzClient, LineCollector]]:
    base = Path(tempfile.mkdtemp(prefix="g", dir="/tmp"))
    print(f"fuzz seed {SEED} ({REPLAY})")
    g = Graced(base, f"max_request_bytes = {MAX_REQUEST_BYTES}\n")
    g.start()
    g.ctl("keys", "trust", check=True)
    bystander = LineCollector(g.ctl_popen("tail", "--verify", "--json", "user.*"))
    client = FuzzClient(str(g.socket), parse_public_key((g.state / "key.pub").read_text()),
                        MAX_REQUEST_BYTES)
    try:
        yield g, client, bystander
    finally:
        client.close()
        bystander.proc.terminate()
        g.close()
        shutil.rmtree(base, ignore_errors=True)


OUTCOMES: dict[str, int] = {}


@seed(SEED)
@settings(max_examples=CASES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(frame=frames)
def test_every_frame_gets_its_reply_or_its_close(target, frame: str | bytes | RawText) -> None:
    g, client, _ = target
    try:
        outcome = client.send(frame)
    except AssertionError as exc:
        raise AssertionError(f"{exc} ({REPLAY})") from None
    OUTCOMES[outcome] = OUTCOMES.get(outcome, 0) + 1
    assert check_outcome(frame, outcome, MAX_REQUEST_BYTES), (outcome, REPLAY)


def test_after_the_fuzz_the_daemon_and_its_bystander_are_fine(target) -> None:
    g, client, bystander = target
    assert sum(OUTCOMES.values()) >= CASES, (OUTCOMES, REPLAY)
    assert g.proc is not None and g.proc.poll() is None
    assert client.hello_ok()
    g.ctl("emit", "user.after-fuzz", check=True)
    assert bystander.wait_for(lambda ls: any("user.after-fuzz" in x for x in ls), 10)
    assert bystander.proc.poll() is None  # still verifying, no violation
    # Error replies were the common case, and malformed input never became an internal
    # error.
    assert not any(k == "reply:internal" for k in OUTCOMES), OUTCOMES
    assert OUTCOMES.get("reply:bad_request", 0) > CASES // 4, (OUTCOMES, REPLAY)
    # Raw invalid UTF-8 text was sent, and failed its connection each time, with a 1007.
    assert OUTCOMES.get("closed:1007", 0) > 0 and "dropped" not in OUTCOMES, (OUTCOMES, REPLAY)
