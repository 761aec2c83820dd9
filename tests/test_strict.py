"""Strict parsing and explicit completeness, on the pure verifier (graced.protocol) and
the offline file verifier (gracectl.verify): every hostile line fails with its exit
code and a one-line reason, never an exception of another kind."""

from __future__ import annotations

import io
import json

import nacl.signing
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gracectl.verify import verify_stream
from graced.protocol import (
    GENESIS_PREV,
    ExitCode,
    Signer,
    Violation,
    canonical_bytes,
    parse_anchor,
    parse_event_line,
)
from tests.helpers.streams import mutate

SIGNER = Signer(nacl.signing.SigningKey(bytes(range(32))))


def _stream(n: int = 6, payloads: list | None = None) -> list[bytes]:
    lines, prev = [], GENESIS_PREV
    for seq in range(1, n + 1):
        topic = "daemon.stopping" if seq == n else "user.t"
        payload = payloads[seq - 1] if payloads else {"n": seq, "x": 99.5, "s": "é"}
        ev = SIGNER.make_event(seq=seq, ts=1000.0 + seq, topic=topic, payload=payload,
                               prev=prev)
        prev = ev.hash
        lines.append(ev.text.encode())
    return lines


def _verify(lines: list[bytes], **kw: object) -> Violation | None:
    data = b"".join(line + b"\n" for line in lines)
    try:
        verify_stream(io.BytesIO(data), SIGNER.public_key, **kw)  # type: ignore[arg-type]
    except Violation as exc:
        return exc
    return None


def test_a_whole_stream_verifies() -> None:
    assert _verify(_stream()) is None


def _tamper(line: bytes, old: bytes, new: bytes) -> bytes:
    assert old in line
    return line.replace(old, new, 1)


HOSTILE = {
    # A duplicate key in front: Python keeps the last, SQLite's json_extract the first.
    "duplicate key": lambda ln: b'{"topic":"mission.rejected",' + ln[1:],
    "whitespace": lambda ln: _tamper(ln, b'"seq":3,', b'"seq": 3,'),
    "number form": lambda ln: _tamper(ln, b"99.5", b"99.50"),
    "exponent form": lambda ln: _tamper(ln, b"99.5", b"9.95e1"),
    "escape form": lambda ln: _tamper(ln, "é".encode(), b"\\u00e9"),
    "NaN": lambda ln: _tamper(ln, b"99.5", b"NaN"),
    "infinity": lambda ln: _tamper(ln, b"99.5", b"1e400"),
    "lone surrogate": lambda ln: _tamper(ln, "é".encode(), b"\\ud800"),
    "deep array": lambda ln: _tamper(ln, b"99.5", b"[" * 100_000 + b"]" * 100_000),
    "not UTF-8": lambda ln: _tamper(ln, "é".encode(), b"\xff\xfe"),
    "sig spelling": lambda ln: ln.replace(b'==","topic"', b'=\\u003d","topic"'),
    "carriage return": lambda ln: ln + b"\r",
    "huge integer": lambda ln: _tamper(ln, b'"n":3', b'"n":9007199254740993'),
    "garbage": lambda ln: b"\x00\x01\x02garbage\xff" * 10,
}


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_each_hostile_line_fails_with_exit_11_and_names_seq(kind: str) -> None:
    lines = _stream()
    lines[2] = HOSTILE[kind](lines[2])
    exc = _verify(lines)
    assert exc is not None, kind
    assert exc.code == ExitCode.CHAIN_BROKEN, (kind, exc)
    if kind != "garbage":
        assert exc.seq == 3, (kind, exc)
    assert "\n" not in str(exc) and len(str(exc)) < 300


def test_duplicate_key_is_named() -> None:
    lines = _stream()
    exc = _verify([lines[0], lines[1], HOSTILE["duplicate key"](lines[2])] + lines[3:])
    assert exc is not None and 'duplicate key "topic"' in exc.reason


def test_numbers_where_jcs_and_python_differ_round_trip() -> None:
    payloads = [{"a": 5.0, "b": 1e-7, "c": 0.00001, "d": 1e21, "e": -0.0, "f": 2.0**60}] * 4
    lines = _stream(4, payloads)
    assert b'"a":5,' in lines[0] and b'"b":1e-7' in lines[0] and b'"c":0.00001' in lines[0]
    # JCS writes a double as ECMAScript does: shortest digits, then zeros.
    assert b'"f":1152921504606847000' in lines[0]
    assert _verify(lines) is None
    with pytest.raises(ValueError):
        canonical_bytes({"x": float("nan")})
    with pytest.raises(ValueError):
        canonical_bytes({"x": 2**60})  # an integer beyond 2**53 has no exact JSON number
    with pytest.raises(ValueError):
        canonical_bytes({"x": "\ud800"})


def test_completeness_is_explicit() -> None:
    lines = _stream(8)
    missing_head = _verify(lines[2:])
    assert missing_head and missing_head.code == ExitCode.CHAIN_BROKEN
    assert "missing head" in missing_head.reason and missing_head.seq == 3
    missing_tail = _verify(lines[:-1])
    assert missing_tail and missing_tail.code == ExitCode.STALE
    assert "missing tail" in missing_tail.reason and missing_tail.seq == 7
    assert _verify(lines[:-1], partial=True) is None
    empty = _verify([])
    assert empty and empty.code == ExitCode.CHAIN_BROKEN and "empty" in empty.reason
    # From an anchor: the anchored event itself, or the one after it.
    third = parse_event_line(lines[2])[1]
    import hashlib
    anchor = (3, hashlib.sha256(third).hexdigest())
    assert _verify(lines[2:], anchor=anchor) is None
    assert _verify(lines[3:], anchor=anchor) is None
    wrong = _verify(lines[4:], anchor=anchor)
    assert wrong and wrong.code == ExitCode.CHAIN_BROKEN and "missing head" in wrong.reason
    other = _verify(lines[2:], anchor=(3, "0" * 64))
    assert other and "anchor mismatch" in other.reason
    assert parse_anchor(f"3:{anchor[1]}") == anchor
    with pytest.raises(ValueError):
        parse_anchor("3:xyz")


def test_cut_mid_line_fails() -> None:
    data = b"".join(ln + b"\n" for ln in _stream())[:-1]
    with pytest.raises(Violation) as info:
        verify_stream(io.BytesIO(data), SIGNER.public_key)
    assert info.value.code == ExitCode.CHAIN_BROKEN and "newline" in info.value.reason


STREAM = b"".join(ln + b"\n" for ln in _stream(4, [{"v": 1.5, "t": "é\t"}] * 4))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_mutation_fails_or_is_byte_identical(data: st.DataObject) -> None:
    """Whatever is done to a signed stream's bytes, it fails verification or is the same
    stream: nothing else verifies."""
    buf = mutate(data, STREAM, swap_lines=False)
    try:
        verify_stream(io.BytesIO(bytes(buf)), SIGNER.public_key)
    except Violation:
        return
    assert bytes(buf) == STREAM


def test_parse_event_line_never_raises_anything_but_violation() -> None:
    for junk in [b"", b"[]", b"{}", b"null", b'{"v":2}', b"\xff", b'"\\ud800"', b"[" * 5000,
                 json.dumps({"v": 2, "seq": True}).encode()]:
        with pytest.raises(Violation):
            parse_event_line(junk)


def _timed_stream(steps: list[tuple[float, str]]) -> list[bytes]:
    """Events at the given times with the given topics, chained and signed."""
    lines, prev = [], GENESIS_PREV
    for seq, (ts, topic) in enumerate(steps, start=1):
        ev = SIGNER.make_event(seq=seq, ts=ts, topic=topic, payload={"interval": 1.0}
                               if topic == "daemon.heartbeat" else {}, prev=prev)
        prev = ev.hash
        lines.append(ev.text.encode())
    return lines


def test_a_crash_gap_before_the_daemons_start_is_a_restart_not_a_stale_stream() -> None:
    """kill -9, then graced starts again 30 s later: its first event is its signed key
    event, and the chain goes on unbroken. The same silence before any other event is a
    stale stream (13)."""
    before = [(1000.0, "crypto.key_created"), (1000.1, "daemon.started"),
              (1001.0, "daemon.heartbeat"), (1002.0, "daemon.heartbeat")]
    restart = _timed_stream(before + [(1032.0, "crypto.key_loaded"),
                                      (1032.1, "daemon.started"),
                                      (1033.0, "daemon.stopping")])
    assert _verify(restart) is None
    withheld = _timed_stream(before + [(1032.0, "daemon.heartbeat"),
                                       (1033.0, "daemon.stopping")])
    exc = _verify(withheld)
    assert exc is not None and exc.code == ExitCode.STALE and exc.seq == 5, exc


# -- the fast path (orjson) proves only what the exact check proves ------------------

TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=12)
# Keys that sort differently by UTF-16 code units (JCS) and by code points (Python).
KEYS = st.sampled_from(["\U0001f600", "\ufffd", "\ue000", "a", "\u00e9"]) | TEXT
JSON_VALUES = st.recursive(
    st.none() | st.booleans()
    | st.integers(-(2**64), 2**64)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from([5.0, -0.0, 1e-7, 1.5e-5, 1e16, 1e21, 2.0**60, 1e300, 5e-324, 0.1,
                       2**53, -(2**53), 2**53 - 1])
    | TEXT,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(KEYS, inner, max_size=5),
    max_leaves=12)


def _spellings(payload: object) -> list[bytes]:
    """One event in JCS form (if it has one), and the same event as other encoders
    write it (the signature is left as it is: parsing does not check it)."""
    try:
        ev = SIGNER.make_event(seq=7, ts=1000.0, topic="user.t", payload=payload,
                               prev=GENESIS_PREV)
    except ValueError:
        ev = SIGNER.make_event(seq=7, ts=1000.0, topic="user.t", payload=None,
                               prev=GENESIS_PREV)
    event = {**json.loads(ev.text), "payload": payload}  # numbers as Python has them
    return [ev.text.encode(),
            json.dumps(event, sort_keys=True, separators=(",", ":"),
                       ensure_ascii=False).encode("utf-8", "surrogatepass"),
            json.dumps(event, sort_keys=True, separators=(",", ":")).encode()]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payload=JSON_VALUES, data=st.data())
def test_the_fast_path_accepts_only_what_the_exact_check_accepts(
        payload: object, data: st.DataObject) -> None:
    """``parse_event_line`` first tries orjson; whatever it accepts must be exactly the
    RFC 8785 form (checked here against the reference encoder) and what the exact,
    all-Python check accepts, with the same event and signing bytes."""
    import rfc8785

    from graced.protocol.canonical import _as_doubles
    from graced.protocol.verify import _exact_event, _fast_event

    for line in _spellings(payload):
        if data.draw(st.booleans()):  # and a byte changed somewhere
            buf = bytearray(line)
            buf[data.draw(st.integers(0, len(buf) - 1))] = data.draw(st.integers(0, 255))
            line = bytes(buf)
        fast = _fast_event(line)
        if fast is None:
            continue
        assert rfc8785.dumps(_as_doubles(fast[0])) == line
        assert _exact_event(line) == fast


@pytest.mark.parametrize("payload", [
    0.0, -0.0, 5.0, 1e16, 1e21, 1e-7, 1.5e-5, 2.0**60, 2**53 + 1, -(2**53) - 1, 2**60 + 3,
    [1.0], {"a": 10.0}, {"\U0001f600": 1, "\ufffd": 2}, "\u2028\x7f\x1f", {"x": [[[1e300]]]},
])
def test_the_fast_path_on_numbers_and_keys_where_encoders_differ(payload: object) -> None:
    from graced.protocol.verify import _exact_event, _fast_event

    for line in _spellings(payload):
        fast = _fast_event(line)
        try:
            exact = _exact_event(line)
        except Violation:
            assert fast is None, line
        else:
            assert fast is None or fast == exact


# -- the block path (gracectl verify's hot loop) proves only what the line path proves --


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payloads=st.lists(JSON_VALUES, min_size=1, max_size=4), data=st.data())
def test_the_block_path_accepts_only_what_the_line_path_accepts(
        payloads: list[object], data: st.DataObject) -> None:
    """``parse_event_block`` reads many lines at once; whatever block it accepts, each
    of its lines is what the exact, all-Python check makes of it: the same event, the
    same signature, the same signing bytes."""
    from graced.protocol.verify import _exact_event, parse_event_block

    lines = [data.draw(st.sampled_from(_spellings(p))) for p in payloads]
    block = bytearray(b"".join(line + b"\n" for line in lines))
    for _ in range(data.draw(st.integers(0, 2))):  # bytes changed, inserted, deleted
        at = data.draw(st.integers(0, len(block) - 1))
        op = data.draw(st.sampled_from(["set", "insert", "delete"]))
        if op == "set":
            block[at] = data.draw(st.integers(0, 255))
        elif op == "insert":
            block[at:at] = data.draw(st.binary(min_size=1, max_size=3))
        else:
            del block[at:at + data.draw(st.integers(1, 4))]
    got = parse_event_block(bytes(block))
    if got is None:
        return
    rows = bytes(block).split(b"\n")[:-1]
    assert len(rows) == len(got.events)
    for i, row in enumerate(rows):
        event, signing = _exact_event(row)
        assert {**got.events[i], "sig": got.sigs[i]} == event
        assert got.signing[i] == signing
        assert (got.seqs[i], got.prevs[i], got.kids[i], got.topics[i], got.stamps[i]) == (
            event["seq"], event["prev"], event["kid"], event["topic"], event["ts"])


def test_the_block_path_leaves_what_orjson_and_jcs_spell_otherwise_to_the_line_path(
        ) -> None:
    from graced.protocol.verify import parse_event_block

    good = _stream(3)
    assert parse_event_block(b"".join(x + b"\n" for x in good)) is not None
    # Canonical lines the block path cannot prove on its own (an exponent, a character
    # beyond U+FFFF, more brackets than MAX_DEPTH): the line path proves them.
    for payload in [1e21, 1e-7, {"\U0001f600": 1}, [[]] * 70]:
        odd = _stream(3, [{"n": 1}, payload, {"n": 3}])
        assert parse_event_block(b"".join(x + b"\n" for x in odd)) is None, payload
        assert _verify(odd) is None
    # Lines orjson writes back as they are but JCS does not: refused on both paths.
    for old, new in [(b'"n":2', b'"n":2.0'), (b'"n":2', b'"n":1e+16')]:
        bad = [good[0], _tamper(good[1], old, new), good[2]]
        assert parse_event_block(b"".join(x + b"\n" for x in bad)) is None, new
        exc = _verify(bad)
        assert exc is not None and exc.code == ExitCode.CHAIN_BROKEN and exc.seq == 2, exc


# A longer stream for the chunk prover: heartbeats that announce an interval, a user
# event after a pause, a restart and the daemon's stop, each in its own place.
LONG = _timed_stream([(1000.0, "crypto.key_created"), (1000.1, "daemon.started")]
                     + [(1000.5 + i, "daemon.heartbeat" if i % 3 == 0 else "user.t")
                        for i in range(9)]
                     + [(1030.0, "crypto.key_loaded"), (1030.2, "user.t"),
                        (1030.4, "daemon.stopping")])
LONG_BYTES = b"".join(ln + b"\n" for ln in LONG)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_the_chunk_prover_proves_only_unaltered_runs_of_lines(data: st.DataObject) -> None:
    """``gracectl verify``'s parallel pass proves chunks (its blocks as small as one
    line, so every seam between blocks is crossed); whatever is done to a stream's
    bytes, a chunk it proves is a run of the stream's own lines, unaltered."""
    from gracectl import verify as gv

    buf = mutate(data, LONG_BYTES, longest_cut=400)
    block_bytes = data.draw(st.sampled_from([1, 600, 1 << 20]))
    old, gv.BLOCK_BYTES = gv.BLOCK_BYTES, block_bytes
    try:
        chunk = gv._prove(bytes(buf), SIGNER.public_key, None)
    finally:
        gv.BLOCK_BYTES = old
    if chunk is None:
        return
    run = LONG[chunk.first_seq - 1:chunk.last_seq]
    assert bytes(buf) == b"".join(ln + b"\n" for ln in run)
    assert chunk.count == len(run)


def test_the_chunk_prover_and_the_sequential_verifier_agree_on_time_gaps() -> None:
    from gracectl.verify import _Gaps, _prove

    assert _prove(LONG_BYTES, SIGNER.public_key, None) is not None
    for stale_after in (None, 2.0, 0.3):
        gaps = _Gaps(stale_after)
        try:
            for line in LONG:
                event, _ = parse_event_line(line)
                gaps.feed(event, event["seq"])
            sequential = (gaps.interval, gaps.early_gap, gaps.prev_ts)
        except Violation:
            sequential = None
        chunk = _prove(LONG_BYTES, SIGNER.public_key, stale_after)
        assert (None if chunk is None else (chunk.interval, chunk.early_gap, chunk.last_ts)
                ) == sequential, stale_after

    # A run of whole lines from anywhere in the stream is a chunk.
    chunk = _prove(b"".join(ln + b"\n" for ln in LONG[3:8]), SIGNER.public_key, None)
    assert chunk is not None and (chunk.first_seq, chunk.last_seq, chunk.count) == (4, 8, 5)


GAP_TOPICS = ["user.t", "user.t", "daemon.heartbeat", "daemon.config_reloaded",
              "daemon.stopping", "crypto.key_loaded", "crypto.key_created"]


@settings(max_examples=150, deadline=None)
@given(steps=st.lists(st.tuples(st.floats(-1, 12), st.sampled_from(GAP_TOPICS),
                                st.sampled_from([None, 0.5, 1.0, 3.0])), min_size=1,
                      max_size=30),
       stale_after=st.sampled_from([None, 0.5, 6.0]), cuts=st.lists(st.integers(1, 30)))
def test_time_gaps_block_by_block_as_event_by_event(
        steps: list[tuple[float, str, float | None]], stale_after: float | None,
        cuts: list[int]) -> None:
    """The chunk prover judges time gaps a block at a time (``_Gaps.feed_many``): the
    same verdict, the same seq and the same state after it as one event at a time."""
    from gracectl.verify import _Gaps

    events, ts = [], 1000.0
    for seq, (dt, topic, interval) in enumerate(steps, start=1):
        ts += dt
        payload = ({"interval": interval} if topic == "daemon.heartbeat" else
                   {"heartbeat_interval": interval} if topic == "daemon.config_reloaded"
                   else {})
        events.append({"seq": seq, "ts": ts, "topic": topic, "payload": payload})

    def outcome(feed: object) -> object:
        gaps = _Gaps(stale_after)
        try:
            feed(gaps)  # type: ignore[operator]
        except Violation as exc:
            return exc.code, exc.seq, exc.reason
        return gaps.interval, gaps.early_gap, gaps.prev_ts, gaps.prev_topic

    def one_by_one(gaps: _Gaps) -> None:
        for e in events:
            gaps._step(e["ts"], e["topic"], e, e["seq"])

    def by_blocks(gaps: _Gaps) -> None:
        at = 0
        for size in [*cuts, len(events)]:
            part = events[at:at + size]
            if part:
                gaps.feed_many([e["ts"] for e in part], [e["topic"] for e in part], part,
                               [e["seq"] for e in part])
            at += size

    assert outcome(by_blocks) == outcome(one_by_one)


def test_verify_all_accepts_exactly_what_verify_detached_accepts() -> None:
    """The batch signature check (libsodium from a C loop) against the one-by-one one,
    on the one canonical spelling and on others: each signature alone and all at once."""
    from graced.protocol.signing import verify_all, verify_detached

    ev = [parse_event_line(line) for line in _stream(3)]
    sigs, datas = [e["sig"] for e, _ in ev], [d for _, d in ev]
    assert verify_all(sigs, datas, SIGNER.public_key) and verify_all([], [], SIGNER.public_key)
    s = sigs[0]
    spellings = ([s, s[:85] + chr(ord(s[85]) + 1) + "==", s[:-2], s + "=", s.replace("=", "A"),
                  s[:40] + "\n" + s[41:], sigs[0] + "\n" + sigs[1], " " + s[1:], s.lower(),
                  s[:10] + "é" + s[11:], sigs[1]]
                 + [s[:85] + c + "==" for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ"])
    for sig in spellings:
        alone = verify_detached(sig, datas[0], SIGNER.public_key)
        assert verify_all([sig], [datas[0]], SIGNER.public_key) == alone, sig
        assert verify_all([sig, sigs[1]], [datas[0], datas[1]], SIGNER.public_key) == alone
    assert not verify_all(sigs, datas[:2], SIGNER.public_key)  # not one sig per message
    assert not verify_all([None], [datas[0]], SIGNER.public_key)  # type: ignore[list-item]
    assert not verify_all(sigs, datas, SIGNER.public_key[:31])  # not a key


def test_a_signature_with_a_second_one_after_a_newline_is_refused_on_both_paths() -> None:
    """A sig of two spellings joined by an (escaped) newline: parse_event_line lets the
    signature check decide, and both the sequential verifier and the chunk prover say
    no, though the first spelling alone is the event's valid signature."""
    from gracectl.verify import _prove

    sig = json.loads(LONG[2])["sig"]
    lines = list(LONG)
    lines[2] = _tamper(lines[2], sig.encode(), sig.encode() + b"\\n" + sig.encode())
    parse_event_line(lines[2])  # well-formed and canonical: only the signature is wrong
    data = b"".join(ln + b"\n" for ln in lines)
    assert _prove(data, SIGNER.public_key, None) is None
    exc = _verify(lines)
    assert exc is not None and exc.seq == 3 and exc.code in (ExitCode.BAD_SIGNATURE,
                                                              ExitCode.CHAIN_BROKEN), exc
