"""Chain verification of an event stream, sans-IO.

Theory of operation
-------------------
A verifier is fed events in the order they arrived, with the local time of arrival.
A received line is fed with :meth:`ChainVerifier.feed_line`, which first parses it
strictly (:func:`parse_event_line`): the line counts only if its bytes are exactly the
canonical form of what it parses to, so no two readers can see different events in it
(duplicate keys, whitespace, number and escape forms, NaN, lone surrogates, excessive
depth and invalid UTF-8 are all *chain broken*, 11). Then, for each event, in order:

1. shape: the event has exactly the envelope fields (else *chain broken*, 11);
2. key: ``kid`` is the trusted key's id (else *unknown key*, 10);
3. order: ``seq`` is the previous seq + 1. A seq at or below the last one is a
   *replay* (12) when the event is identical to the one already received with that
   seq, and *chain broken* (11) otherwise; a seq that skips ahead is a dropped or
   reordered event (11);
4. signature: the Ed25519 signature over the signing bytes. A bad signature is held
   for one event: if the next event's ``prev`` is the hash of the suspect event's
   content, the content is authentic and only the signature was forged (10); if not,
   the content was altered (11). If the stream ends first, it is reported as a bad
   signature (10);
5. chain: ``prev`` is the hash of the previous event (else *chain broken*, 11).

Completeness: the first event must be where the verifier was told the stream
starts: seq 1 with ``prev`` all zeros (genesis), a given ``first_seq``, or an anchor
``(seq, hash)`` the user trusts (the anchor event itself or the one after it).
:meth:`ChainVerifier.finish` fails an empty stream and, unless partial, one that
does not end with ``daemon.stopping``.

Freshness is checked with :meth:`ChainVerifier.check_fresh`: no event (the daemon
sends a heartbeat every few seconds) for longer than ``stale_after`` seconds is a
*stale* stream (13), and so is a stream that ends without the daemon's
``daemon.stopping`` event (:meth:`ChainVerifier.end`).
"""

from __future__ import annotations

import enum
import functools
import hashlib
import json
import math
import operator
import re
from dataclasses import dataclass
from itertools import accumulate, chain, repeat
from operator import add, sub
from typing import Any, NoReturn

import orjson

from .canonical import MAX_DEPTH, CanonicalError, canonical_bytes_for, is_canonical_line
from .signing import (
    GENESIS_PREV,
    key_id,
    signing_bytes,
    verify_detached,
    well_formed_event,
)

MAX_LINE_BYTES = 16 << 20
"""The longest line a verifier reads (graced's events are far smaller)."""


class ExitCode(enum.IntEnum):
    """gracectl's exit codes; the verification ones are 10-13."""

    OK = 0
    ERROR = 1
    USAGE = 2
    UNREACHABLE = 3
    NOT_AUTHORISED = 4
    NOT_FOUND = 5
    TIMEOUT = 6
    DEGRADED = 7  # gracectl status: journal commits or a detector failing
    PRUNED = 8  # tail --since: the events asked for were pruned (journal retention)
    NOT_WAITING = 9  # approve, reject, playbooks run: the mission is not waiting for that
    BAD_SIGNATURE = 10
    CHAIN_BROKEN = 11
    REPLAYED = 12
    STALE = 13
    PROTOCOL = 14


class Violation(Exception):
    """A verification failure: the kind (an exit code), the seq and a reason."""

    def __init__(self, code: ExitCode, seq: int | None, reason: str) -> None:
        self.code = code
        self.seq = seq
        self.reason = reason
        where = f"seq {seq}: " if seq is not None else ""
        super().__init__(f"{where}{reason}")

    @property
    def kind(self) -> str:
        return {
            ExitCode.BAD_SIGNATURE: "bad-signature",
            ExitCode.CHAIN_BROKEN: "chain-broken",
            ExitCode.REPLAYED: "replayed",
            ExitCode.STALE: "stale",
            ExitCode.PROTOCOL: "protocol",
        }.get(self.code, "error")


_SEQ = re.compile(rb'"seq":(\d{1,16})[,}]')


def _seq_of(line: bytes) -> int | None:
    m = _SEQ.search(line[:MAX_LINE_BYTES])
    return int(m.group(1)) if m else None


def _no_constants(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a JSON number")


_ODD_NUMBER = [False]


def _float(token: str) -> float:
    """A float as parsed; notes one whose JCS spelling is not Python's ``repr``."""
    f = float(token)
    if f.is_integer() or not math.isfinite(f) or "e-0" in repr(f):
        _ODD_NUMBER[0] = True
    return f


def _int(token: str) -> int:
    """An integer as parsed; notes one that may lie beyond 2**53 (16 digits or more)."""
    if len(token) > 15:
        _ODD_NUMBER[0] = True
    return int(token)


_DECODER = json.JSONDecoder(parse_float=_float, parse_int=_int,
                            parse_constant=_no_constants)


def _duplicate_key(text: str) -> str | None:
    found: list[str] = []

    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in pairs]
        if len(set(keys)) != len(keys) and not found:
            found.append(next(k for i, k in enumerate(keys) if k in keys[:i]))
        return dict(pairs)

    json.loads(text, object_pairs_hook=hook)
    return found[0] if found else None


def _not_canonical(line: bytes, text: str, canonical: bytes) -> str:
    dup = _duplicate_key(text)
    if dup is not None:
        return f"duplicate key {json.dumps(dup)[:60]}"
    at = next((i for i, (a, b) in enumerate(zip(line, canonical, strict=False)) if a != b),
              min(len(line), len(canonical)))
    got = line[at:at + 12].decode("utf-8", "backslashreplace")
    want = canonical[at:at + 12].decode("utf-8", "backslashreplace")
    return (f"not in canonical form at byte {at} (whitespace, number or escape form): "
            f"{json.dumps(got)} where canonical has {json.dumps(want)}")


# orjson writes an integral double as "5.0" (JCS: "5") and an exponent always with its
# sign ("1e-7", "1e+21"); JCS spells some of those otherwise ("1e+16" is
# 10000000000000000). These find such numbers; a match inside a string only costs a
# needless exact check, never a wrong answer.
_INTEGRAL_DOUBLE = re.compile(rb"[0-9]\.0[,}\]]")
_EXPONENT = re.compile(rb"[0-9]e[-+][0-9]+[,}\]]")
_ASTRAL_UTF8 = re.compile(rb"[\xf0-\xf4]")
_ORJSON_CANONICAL = orjson.OPT_SORT_KEYS | orjson.OPT_STRICT_INTEGER


def _fast_event(line: bytes) -> tuple[dict[str, Any], bytes] | None:
    """The common line, checked in C: (event, signing bytes) if ``line`` is certainly a
    well-formed v2 event in canonical form, else None (the exact check decides).

    orjson parses it (strict UTF-8, no lone surrogates, no NaN) and writes it back with
    sorted keys and integers within 2**53; byte equality proves no whitespace, no escape
    or number spelling of its own and no duplicate key. orjson and JCS agree on strings,
    on key order below U+10000 and on non-integral numbers in plain decimal notation;
    an integral double, an exponent or a 4-byte character sends the line to the exact
    check.
    """
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    if (type(obj) is not dict or well_formed_event(obj) is not None or obj["v"] != 2
            or line.count(b"[") + line.count(b"{") > MAX_DEPTH):
        return None
    try:
        if orjson.dumps(obj, option=_ORJSON_CANONICAL) != line:
            return None
    except (orjson.JSONEncodeError, TypeError):
        return None
    if not line.isascii() and _ASTRAL_UTF8.search(line):
        return None
    # Numbers live in the payload and seq (an integer): after the payload the envelope
    # ("prev", "seq", "sig", "topic", "ts", "v") holds strings and integers.
    # A number ends at a delimiter: the payload's last one at the "," before "prev".
    cut = line.rfind(b',"prev":"') + 1
    if ((line.find(b".0", 0, cut) >= 0 and _INTEGRAL_DOUBLE.search(line, 0, cut))
            or ((line.find(b"e-", 0, cut) >= 0 or line.find(b"e+", 0, cut) >= 0)
                and _EXPONENT.search(line, 0, cut))):
        return None
    cut = line.rfind(b',"sig":"')
    end = line.index(b'"', cut + 8)
    return obj, line[:cut] + line[end + 1:]


@dataclass(slots=True)
class EventBlock:
    """Many parsed events, each with its signing bytes, and the envelope's fields as
    columns (``seqs[i]`` is ``events[i]["seq"]``). The events are left without their
    ``sig`` (it is in ``sigs``)."""

    events: list[dict[str, Any]]
    signing: list[bytes]
    seqs: tuple[int, ...]
    prevs: tuple[str, ...]
    kids: tuple[str, ...]
    sigs: tuple[str, ...]
    topics: tuple[str, ...]
    stamps: tuple[str, ...]  # the events' ``ts``

    @classmethod
    def of(cls, events: list[dict[str, Any]], signing: list[bytes]) -> EventBlock | None:
        """The block of these well-formed events (None if there are none)."""
        if not events:
            return None
        seqs, prevs, kids, sigs, topics, stamps = zip(*map(_ENVELOPE, events), strict=True)
        list(map(dict.pop, events, repeat("sig")))
        return cls(events, signing, seqs, prevs, kids, sigs, topics, stamps)


_ENVELOPE = operator.itemgetter("seq", "prev", "kid", "sig", "topic", "ts")
_ENVELOPE_ALL = operator.itemgetter("seq", "prev", "kid", "sig", "topic", "ts", "v",
                                    "payload")
_DUMPS = functools.partial(orjson.dumps, option=_ORJSON_CANONICAL)
_SIG_MEMBER_BYTES = len(',"sig":""') + 88
_NOT_BRACKET = bytes(c for c in range(256) if c not in b"[{\n")
_DEEP = re.compile(rb"[^\n]{%d}" % (MAX_DEPTH + 1))
_BELOW_F0 = bytes(range(0xF0))


def parse_event_block(block: bytes) -> EventBlock | None:
    """:func:`parse_event_line`'s fast path for many lines at once, with no Python code
    run per line in the common case: an :class:`EventBlock` if every line of ``block``
    (whole lines, each ending in a newline) is certainly a well-formed v2 event in
    canonical form, else None (parse the lines one by one: the exact check decides).

    The same proof as :func:`_fast_event`'s: orjson parses each line and writes it back
    with sorted keys, byte for byte; the numbers and characters where orjson and JCS
    differ send the block to the exact check, and so does any line with more than
    ``MAX_DEPTH`` brackets. Every event has exactly the envelope's fields with their
    types, and version 2.
    """
    lines = block.split(b"\n")
    if lines.pop() != b"" or not lines or max(map(len, lines)) > MAX_LINE_BYTES:
        return None
    # Brackets counted per line at once: only they (and the newlines) are kept.
    if _DEEP.search(block.translate(None, _NOT_BRACKET)):
        return None
    if not block.isascii() and block.translate(None, _BELOW_F0):  # a 4-byte character
        return None
    n = len(lines)
    try:
        events = list(map(orjson.loads, lines))
        # One call writes them all back: "[" + d1 + "," + d2 ... + "]" equals the lines
        # so joined only if each di is its line (a JSON text ends where its value does).
        written, joined = orjson.dumps(events, option=_ORJSON_CANONICAL), b",".join(lines)
        if (len(written) != len(joined) + 2 or not written.startswith(joined, 1)
                or written[0] != 0x5B or written[-1] != 0x5D):  # "[" and "]"
            return None
        if list(map(type, events)).count(dict) != n or list(map(len, events)).count(8) != n:
            return None
        seqs, prevs, kids, sigs, topics, stamps, vs, payloads = zip(
            *map(_ENVELOPE_ALL, events), strict=True)
    except (orjson.JSONDecodeError, orjson.JSONEncodeError, TypeError, KeyError):
        return None
    # Eight fields, the envelope's eight: exactly the envelope. Its types:
    if (list(map(type, vs)).count(int) != n or vs.count(2) != n
            or list(map(type, seqs)).count(int) != n or min(seqs) < 1
            or set(map(type, chain(prevs, kids, sigs, topics, stamps))) != {str}):
        return None
    # Numbers live in the payloads (seq is an integer): an integral double or an
    # exponent, which JCS writes otherwise, sends the block to the exact check.
    numbers = orjson.dumps(payloads)
    for needle in (b".0", b"e-", b"e+"):
        at = numbers.find(needle)
        while at >= 0:
            if (_INTEGRAL_DOUBLE if needle == b".0" else _EXPONENT).match(numbers, at - 1):
                return None
            at = numbers.find(needle, at + 2)
    # The signing bytes: every field but "sig", written back in one call. A signature
    # of 88 characters that need no escape is a member of 97 bytes (',"sig":"' and '"'),
    # so each event's signing bytes are its line's length less 97.
    if list(map(len, sigs)).count(88) != n:
        return None
    list(map(dict.pop, events, repeat("sig")))
    unsigned = orjson.dumps(events, option=_ORJSON_CANONICAL)
    lengths = list(map(sub, map(len, lines), repeat(_SIG_MEMBER_BYTES)))
    starts = list(accumulate(map(add, lengths, repeat(1)), initial=1))
    if len(unsigned) != starts.pop():  # a member longer than 97 bytes: an escape
        return None
    signing = list(map(unsigned.__getitem__, map(slice, starts, map(add, starts, lengths))))
    return EventBlock(events, signing, seqs, prevs, kids, sigs, topics, stamps)


def parse_event_line(line: bytes) -> tuple[dict[str, Any], bytes]:
    """Parse one received line strictly; returns the event and its signing bytes.

    Raises :class:`Violation` (chain broken) unless the line's bytes are exactly the
    canonical form of an event (a trailing newline is not part of the line).
    """
    if len(line) <= MAX_LINE_BYTES:
        fast = _fast_event(line)
        if fast is not None:
            return fast
    return _exact_event(line)


def _exact_event(line: bytes) -> tuple[dict[str, Any], bytes]:
    """:func:`parse_event_line` without the fast path: every check in Python, with the
    reason for a refusal."""
    def bad(reason: str, seq: int | None = None) -> Violation:
        return Violation(ExitCode.CHAIN_BROKEN, seq if seq is not None else _seq_of(line),
                         reason)

    if len(line) > MAX_LINE_BYTES:
        raise bad(f"line longer than {MAX_LINE_BYTES} bytes")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise bad(f"not UTF-8 (byte {exc.start})") from None
    _ODD_NUMBER[0] = False
    try:
        obj = _DECODER.decode(text)
    except RecursionError:
        raise bad("not an event: JSON nested too deep") from None
    except ValueError as exc:
        raise bad(f"not JSON: {str(exc)[:120]}") from None
    problem = well_formed_event(obj)
    seq = obj.get("seq") if isinstance(obj, dict) else None
    seq = seq if type(seq) is int else None
    if problem == "missing field(s) sig":
        raise Violation(ExitCode.BAD_SIGNATURE, seq, "unsigned event (no sig)")
    if problem is not None:
        raise bad(f"malformed event ({problem})", seq)
    if obj["v"] == 1 or not is_canonical_line(line, text, obj, not _ODD_NUMBER[0]):
        try:
            canonical = canonical_bytes_for(obj["v"], obj, parsed=True)
        except CanonicalError as exc:
            raise bad(f"not canonical JSON: {exc}", seq) from None
        if canonical != line:
            raise bad(_not_canonical(line, text, canonical), seq)
    # In a canonical event, the last ',"sig":"' is the envelope's (a string cannot hold
    # a bare quote), and removing one member of a canonical object leaves the canonical
    # form of the rest: the signing bytes.
    cut = line.rfind(b',"sig":"')
    end = line.index(b'"', cut + 8)
    return obj, line[:cut] + line[end + 1:]


# Which signed events announce the heartbeat interval, and under which payload key.
_ANNOUNCES = {"daemon.heartbeat": "interval", "daemon.config_reloaded": "heartbeat_interval"}
ANNOUNCING_TOPICS = frozenset(_ANNOUNCES)


def announced_interval(event: dict[str, Any]) -> float | None:
    """The heartbeat interval a (verified) event announces, or None.

    ``daemon.heartbeat`` carries it as ``interval``; ``daemon.config_reloaded`` as
    ``heartbeat_interval``, before the first heartbeat at the new pace, so a reload that
    slows the heartbeat is never taken for a withheld stream.
    """
    key = _ANNOUNCES.get(event.get("topic", ""))
    payload = event.get("payload")
    if key is None or not isinstance(payload, dict):
        return None
    value = payload.get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return float(value)
    return None


# A daemon that starts again after a crash (no daemon.stopping before it) opens with its
# signed key event. In a saved stream the time before that event is the daemon being down,
# and the unbroken chain across it shows that nothing was held back: a restart, not a
# stale stream. (A live verifier still reports silence as it happens.)
RESTART_TOPICS = frozenset({"crypto.key_loaded", "crypto.key_created"})


def stale_limit(interval: float) -> float:
    """The silence that makes a stream stale: three heartbeats missed, plus 1 s."""
    return 3 * interval + 1


def parse_anchor(text: str) -> tuple[int, str]:
    """``SEQ:HASH`` (as ``gracectl checkpoint`` prints it) -> (seq, hash)."""
    seq_text, sep, digest = text.strip().partition(":")
    if not sep or not seq_text.isdigit() or int(seq_text) < 1 or not re.fullmatch(
            r"[0-9a-f]{64}", digest):
        raise ValueError("expected SEQ:HASH (a seq and 64 lower-case hex digits)")
    return int(seq_text), digest


@dataclass
class _Suspect:
    seq: int
    hash: str


class ChainVerifier:
    """Verifies a stream of events against one trusted public key.

    Where the stream must start: ``anchor`` is ``(seq, hash)`` of an event already
    trusted (a checkpoint, a previous verification): the stream starts with that event
    or the one after it. Else ``first_seq`` is the seq the first event must have (1:
    genesis, whose ``prev`` is all zeros). With neither, the first event anchors the
    chain as it comes (a live view that starts at the head).
    """

    def __init__(
        self,
        public_key: bytes,
        *,
        anchor: tuple[int, str] | None = None,
        first_seq: int | None = None,
        stale_after: float | None = None,
        remember: int = 1_000_000,
    ) -> None:
        self.public_key = public_key
        self.kid = key_id(public_key)
        self.stale_after = stale_after
        self.anchor = anchor
        self.first_seq = first_seq
        self.last_seq: int | None = None
        self.last_hash: str | None = None
        self.last_topic: str | None = None
        self.last_time: float | None = None
        self.first: int | None = None
        self.count = 0
        self._seen: dict[int, str] = {}
        self._remember = remember
        self._suspect: _Suspect | None = None

    @property
    def pending(self) -> bool:
        """True while a bad signature waits for the next event to be classified."""
        return self._suspect is not None

    def feed_line(self, line: bytes, now: float) -> dict[str, Any]:
        """Check one received line (strictly parsed); returns the event."""
        event, signing = parse_event_line(line)
        self._check(event, signing, now)
        return event

    def feed(self, event: Any, now: float) -> None:
        """Check one already-parsed event; raises :class:`Violation` at the first problem."""
        problem = well_formed_event(event)
        if problem is not None:
            bad_seq = event.get("seq") if isinstance(event, dict) else None
            raise Violation(
                ExitCode.CHAIN_BROKEN, bad_seq if isinstance(bad_seq, int) else None,
                f"malformed event ({problem})",
            )
        try:
            signing = signing_bytes(event)
        except CanonicalError as exc:
            raise Violation(ExitCode.CHAIN_BROKEN, event["seq"],
                            f"not canonical JSON: {exc}") from None
        self._check(event, signing, now)

    def check_start(self, seq: int, h: str, prev: str) -> None:
        """Check where the stream starts (the first event fed)."""
        if self.anchor is not None:
            a_seq, a_hash = self.anchor
            if seq == a_seq:
                if h != a_hash:
                    raise Violation(ExitCode.CHAIN_BROKEN, seq,
                                    f"anchor mismatch: seq {seq} hashes to {h}, not {a_hash}")
            elif seq == a_seq + 1:
                if prev != a_hash:
                    raise Violation(ExitCode.CHAIN_BROKEN, seq,
                                    f"anchor mismatch: prev is not {a_hash} (seq {a_seq})")
            else:
                raise Violation(ExitCode.CHAIN_BROKEN, seq,
                                f"missing head: the stream starts at seq {seq}, not at the "
                                f"anchor seq {a_seq} or {a_seq + 1}")
        elif self.first_seq is not None:
            if seq != self.first_seq:
                raise Violation(ExitCode.CHAIN_BROKEN, seq,
                                f"missing head: the stream starts at seq {seq}, expected "
                                f"{self.first_seq}" + (
                                    " (genesis; a journal pruned by retention verifies from "
                                    "its checkpoint: --from FIRST_SEQ:FIRST_HASH, which "
                                    "gracectl checkpoint prints)" if self.first_seq == 1
                                    else ""))
            if seq == 1 and prev != GENESIS_PREV:
                raise Violation(ExitCode.CHAIN_BROKEN, seq,
                                "genesis event's prev is not all zeros")

    def _check(self, event: dict[str, Any], signing: bytes, now: float) -> None:
        seq: int = event["seq"]
        if event["kid"] != self.kid:
            raise Violation(
                ExitCode.BAD_SIGNATURE, seq,
                f"unknown key {event['kid']} (trusted key is {self.kid})",
            )
        h = hashlib.sha256(signing).hexdigest()
        if self.last_seq is None:
            self.check_start(seq, h, event["prev"])
        else:
            if seq <= self.last_seq:
                if self._seen.get(seq) == h:
                    raise Violation(
                        ExitCode.REPLAYED, seq,
                        f"replayed event (already received; last seq was {self.last_seq})",
                    )
                raise Violation(
                    ExitCode.CHAIN_BROKEN, seq,
                    f"out of order: seq went back from {self.last_seq} (reordered or "
                    "conflicting event)",
                )
            if seq != self.last_seq + 1:
                raise Violation(
                    ExitCode.CHAIN_BROKEN, seq,
                    f"gap: expected seq {self.last_seq + 1} (dropped or reordered event)",
                )
        signed = verify_detached(event["sig"], signing, self.public_key)
        if self._suspect is not None:
            suspect, self._suspect = self._suspect, None
            if signed and event["prev"] == suspect.hash:
                raise Violation(
                    ExitCode.BAD_SIGNATURE, suspect.seq,
                    "bad signature (forged; the content matches the chain)",
                )
            raise Violation(
                ExitCode.CHAIN_BROKEN, suspect.seq,
                "altered event (signature invalid; content does not match the chain)",
            )
        if self.last_hash is not None and event["prev"] != self.last_hash:
            raise Violation(
                ExitCode.CHAIN_BROKEN, seq,
                f"chain broken: prev is not the hash of seq {self.last_seq}",
            )
        if self.first is None:
            self.first = seq
        self.last_seq = seq
        self.last_hash = h
        self.last_topic = event["topic"]
        self.last_time = now
        self.count += 1
        if self._remember:
            self._seen[seq] = h
            if len(self._seen) > self._remember:
                self._seen.pop(next(iter(self._seen)))
        if not signed:
            self._suspect = _Suspect(seq, h)

    def flush(self) -> None:
        """Report a held bad signature; call when no next event is coming."""
        if self._suspect is not None:
            suspect, self._suspect = self._suspect, None
            raise Violation(ExitCode.BAD_SIGNATURE, suspect.seq, "bad signature")

    def connected(self, now: float) -> None:
        """The stream is open at ``now``: its silence counts from then until the first
        event (a stream that never sends one is stale too)."""
        if self.last_time is None:
            self.last_time = now

    def check_fresh(self, now: float) -> None:
        """Raise STALE if nothing arrived for longer than ``stale_after`` seconds."""
        if self.stale_after is None or self.last_time is None:
            return
        silent = now - self.last_time
        if silent > self.stale_after:
            raise Violation(
                ExitCode.STALE, self.last_seq,
                f"stream stale: no event or heartbeat for {silent:.1f} s "
                f"(limit {self.stale_after:g} s)",
            )

    def finish(self, *, partial: bool = False) -> None:
        """A saved stream ended: it must hold events, and (unless ``partial``) end with
        the daemon's ``daemon.stopping``."""
        self.flush()
        if self.count == 0:
            raise Violation(ExitCode.CHAIN_BROKEN, None, "empty stream: no events to verify")
        if not partial and self.last_topic != "daemon.stopping":
            raise Violation(
                ExitCode.STALE, self.last_seq,
                f"missing tail: the stream ends at seq {self.last_seq} without "
                "daemon.stopping (cut short; --partial accepts a stream that is still going)",
            )

    def end(self, *, expect_stop: bool = True) -> None:
        """The stream ended. Unless the daemon said it was stopping, it was cut short."""
        self.flush()
        if expect_stop and self.last_topic != "daemon.stopping":
            raise Violation(
                ExitCode.STALE, self.last_seq,
                "stream cut short (closed without daemon.stopping)",
            )
