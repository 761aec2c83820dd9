"""The pure protocol core: canonical bytes, the documented test vector, the verifier."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import nacl.signing
import pytest
import rfc8785

from graced.protocol import (
    GENESIS_PREV,
    ChainVerifier,
    ExitCode,
    Signer,
    Violation,
    canonical_bytes,
    event_hash,
    signing_bytes,
)
from graced.protocol.canonical import canonical_text_v1
from graced.protocol.signing import b64

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"


def _doc_value(name: str) -> str:
    m = re.search(rf"^- {re.escape(name)}: `([^`]+)`", DOC.read_text(), re.M)
    assert m, f"{name} missing from docs/protocol.md"
    return m.group(1)


def _doc_vector_lines() -> list[str]:
    """The test vectors' JSON lines, in order: v2 event 1's signing bytes, v2 events 2 and
    3 as sent, v1 event 1's signing bytes, v1 event 2 as sent."""
    return [ln for ln in DOC.read_text().splitlines() if ln.startswith('{"kid":"')]


VECTOR_PAYLOAD = {"small": 1e-7, "tiny": 0.00001, "big": 1e21, "two": 2.0, "third": 1 / 3,
                  "neg_zero": -0.0, "text": "tab\t bell\u0007 é 😀", "ﬁ": 3, "😀": 2}


def test_documented_test_vectors_match_the_implementation() -> None:
    seed = bytes.fromhex(_doc_value("seed-hex"))
    signer = Signer(nacl.signing.SigningKey(seed))
    assert base64.b64encode(signer.public_key).decode() == _doc_value("public-key-base64")
    assert signer.kid == _doc_value("kid")
    ev1 = signer.make_event(seq=1, ts=1767225600.0, topic="daemon.started",
                            payload={"host": "example", "pid": 42, "note": "héllo"},
                            prev=GENESIS_PREV)
    signing_block, wire_2, wire_3, v1_signing, v1_wire_2 = _doc_vector_lines()
    assert signing_bytes(ev1.fields) == signing_block.encode("utf-8")
    assert ev1.hash == _doc_value("hash-1")
    assert ev1.fields["sig"] == _doc_value("sig-1")
    ev2 = signer.make_event(seq=2, ts=1767225605.5, topic="daemon.heartbeat",
                            payload={"interval": 5.0, "uptime": 5.5}, prev=ev1.hash)
    assert ev2.text == wire_2
    assert ev2.hash == _doc_value("hash-2")
    ev3 = signer.make_event(seq=3, ts=1767225606.0, topic="user.vector",
                            payload=VECTOR_PAYLOAD, prev=ev2.hash)
    assert ev3.text == wire_3 and ev3.hash == _doc_value("hash-3")
    # The JCS reference implementation agrees byte for byte.
    assert rfc8785.dumps(ev3.fields) == wire_3.encode("utf-8")
    # A third party's verifier, given only the public key, accepts them, strictly.
    v = ChainVerifier(base64.b64decode(_doc_value("public-key-base64")), first_seq=1)
    v.feed_line(ev1.text.encode(), 0.0)
    v.feed_line(wire_2.encode(), 0.0)
    v.feed_line(wire_3.encode(), 0.0)
    v.flush()
    assert v.last_seq == 3 and v.last_hash == _doc_value("hash-3")


def test_version_1_events_keep_verifying() -> None:
    """Events journaled by 0.1.0 (Python's json as canonical form) verify, and a v2
    event can continue their chain."""
    signer = Signer(nacl.signing.SigningKey(bytes.fromhex(_doc_value("seed-hex"))))
    _, _, _, v1_signing, v1_wire_2 = _doc_vector_lines()
    fields = json.loads(v1_signing)
    fields["sig"] = _doc_value("v1-sig-1")
    v1_line_1 = canonical_text_v1(fields)
    assert event_hash(fields) == _doc_value("v1-hash-1")
    v = ChainVerifier(signer.public_key, first_seq=1)
    v.feed_line(v1_line_1.encode(), 0.0)
    v.feed_line(v1_wire_2.encode(), 0.0)
    assert v.last_hash == _doc_value("v1-hash-2")
    ev3 = signer.make_event(seq=3, ts=1767225610.0, topic="daemon.started", payload={},
                            prev=_doc_value("v1-hash-2"))
    v.feed_line(ev3.text.encode(), 0.0)
    v.flush()
    assert v.count == 3


def test_canonical_form_sorts_keys_and_refuses_nan() -> None:
    assert canonical_bytes({"b": 1, "a": [1.5, "é", None]}) == '{"a":[1.5,"é",null],"b":1}'.encode()
    with pytest.raises(ValueError):
        canonical_bytes({"x": float("nan")})


@pytest.fixture
def chain() -> tuple[Signer, list[dict]]:
    signer = Signer(nacl.signing.SigningKey(bytes(32)))
    events = []
    prev = GENESIS_PREV
    for seq in range(1, 9):
        ev = signer.make_event(seq=seq, ts=1000.0 + seq, topic="user.t", payload={"n": seq},
                               prev=prev)
        prev = ev.hash
        events.append(json.loads(ev.text))
    return signer, events


def _run(signer: Signer, events: list[dict], key: bytes | None = None) -> Violation | None:
    v = ChainVerifier(key or signer.public_key, stale_after=10)
    try:
        for ev in events:
            v.feed(ev, 0.0)
        v.flush()
    except Violation as exc:
        return exc
    return None


def test_clean_chain_passes(chain: tuple[Signer, list[dict]]) -> None:
    signer, events = chain
    assert _run(signer, events) is None


def test_each_violation_has_its_code_and_seq(chain: tuple[Signer, list[dict]]) -> None:
    signer, events = chain
    other = nacl.signing.SigningKey(b"\x01" * 32)

    forged = [dict(e) for e in events]
    forged[3]["sig"] = b64(other.sign(signing_bytes(forged[3])).signature)
    exc = _run(signer, forged)
    assert exc and exc.code == ExitCode.BAD_SIGNATURE and exc.seq == 4 and "forged" in exc.reason

    altered = [dict(e) for e in events]
    altered[3]["payload"] = {"n": 999}
    exc = _run(signer, altered)
    assert exc and exc.code == ExitCode.CHAIN_BROKEN and exc.seq == 4 and "altered" in exc.reason

    exc = _run(signer, events, key=bytes(other.verify_key))
    assert exc and exc.code == ExitCode.BAD_SIGNATURE and "unknown key" in exc.reason

    exc = _run(signer, events[:3] + events[4:])
    assert exc and exc.code == ExitCode.CHAIN_BROKEN and exc.seq == 5 and "gap" in exc.reason

    swapped = events[:3] + [events[4], events[3]] + events[5:]
    exc = _run(signer, swapped)
    assert exc and exc.code == ExitCode.CHAIN_BROKEN and exc.seq == 5

    replayed = events[:5] + [events[3]] + events[5:]
    exc = _run(signer, replayed)
    assert exc and exc.code == ExitCode.REPLAYED and exc.seq == 4

    # A validly signed event that does not follow its predecessor (a rewritten history).
    rewritten = signer.make_event(seq=5, ts=2000.0, topic="user.t", payload={"n": "x"},
                                  prev="f" * 64)
    exc = _run(signer, events[:4] + [json.loads(rewritten.text)])
    assert exc and exc.code == ExitCode.CHAIN_BROKEN and exc.seq == 5 and "prev" in exc.reason


def test_forged_last_event_is_reported_at_flush(chain: tuple[Signer, list[dict]]) -> None:
    signer, events = chain
    bad = [dict(e) for e in events]
    bad[-1]["sig"] = base64.b64encode(b"\0" * 64).decode()
    exc = _run(signer, bad)
    assert exc and exc.code == ExitCode.BAD_SIGNATURE and exc.seq == 8


def test_freshness_and_cut_short(chain: tuple[Signer, list[dict]]) -> None:
    signer, events = chain
    v = ChainVerifier(signer.public_key, stale_after=3.0)
    v.feed(events[0], now=100.0)
    v.check_fresh(102.9)
    with pytest.raises(Violation) as info:
        v.check_fresh(103.5)
    assert info.value.code == ExitCode.STALE
    with pytest.raises(Violation) as info:
        v.end()
    assert info.value.code == ExitCode.STALE and "cut short" in info.value.reason


def test_hash_is_over_signing_bytes(chain: tuple[Signer, list[dict]]) -> None:
    _, events = chain
    assert events[1]["prev"] == event_hash(events[0])


def test_one_time_form_for_json() -> None:
    """Every time field as an event's ts is written; durations, a sample's detail and
    what is already a string are left alone; a request may name a time either way."""
    from graced.protocol.times import epoch, iso_times, same_instant

    t = 1796160432.7783372
    data = {"opened_at": t, "now": t, "uptime": 12.5, "duration_s": 3, "ttr": 4.0,
            "ts": "2026-12-01T21:27:12.778337Z", "closed_at": None, "flapping": True,
            "samples": [{"ts": t, "value": 93.1, "detail": {"now": 93.1, "at": 7}}],
            "huge_at": 1e300, "bad_at": float("nan")}
    out = iso_times(data)
    assert out["opened_at"] == out["now"] == "2026-12-01T21:27:12.778337Z"
    assert (out["uptime"], out["duration_s"], out["ttr"], out["flapping"]) == (12.5, 3, 4.0,
                                                                               True)
    assert out["closed_at"] is None and out["ts"] == data["ts"]
    assert out["samples"] == [{"ts": "2026-12-01T21:27:12.778337Z", "value": 93.1,
                               "detail": {"now": 93.1, "at": 7}}]
    assert out["huge_at"] == 1e300 and out["bad_at"] != out["bad_at"]  # kept: no calendar
    assert data["opened_at"] == t  # a copy
    assert same_instant(t, t) and same_instant(out["opened_at"], t)
    assert not same_instant(t + 1e-6, t) and not same_instant("2026-12-01T21:27:12Z", t)
    assert not same_instant(True, 1.0) and not same_instant(None, t)
    assert epoch(out["opened_at"]) == pytest.approx(t, abs=1e-6) and epoch(t) == t
    assert epoch("yesterday") is None and epoch(False) is None
