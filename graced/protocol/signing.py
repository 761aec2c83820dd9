"""Ed25519 signing and the event envelope: build, hash, sign and check one event.

Pure code: no clocks are read and no I/O is done here; callers pass the time in.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import repeat
from operator import add
from typing import TYPE_CHECKING, Any

# libsodium through PyNaCl's own cffi binding, not nacl.signing nor nacl.bindings, which
# import every primitive PyNaCl binds: verifying is all a one-shot gracectl command does
# with a key, and it should not pay for the rest at each start.
from nacl._sodium import ffi as _ffi
from nacl._sodium import lib as _sodium

from .canonical import canonical_bytes_for, canonical_text

if TYPE_CHECKING:
    import nacl.signing

if _sodium.sodium_init() < 0:  # as importing nacl.bindings does: once, idempotent
    raise RuntimeError("libsodium could not be initialised")

PROTOCOL_VERSION = 2
SUPPORTED_VERSIONS = (1, 2)
GENESIS_PREV = "0" * 64
EVENT_FIELDS = ("v", "seq", "ts", "topic", "payload", "prev", "kid", "sig")


def key_id(public_key: bytes) -> str:
    """The key id: the first 16 hex digits of SHA-256 of the raw 32-byte public key."""
    return hashlib.sha256(public_key).hexdigest()[:16]


def format_ts(epoch: float) -> str:
    """RFC 3339 UTC timestamp with microseconds, e.g. ``2026-11-23T23:39:35.123456Z``."""
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


_TS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")


def parse_ts(ts: str) -> float:
    """Inverse of :func:`format_ts`; raises ValueError on a malformed timestamp."""
    if not _TS.fullmatch(ts):
        raise ValueError(f"timestamp {ts[:40]!r} is not YYYY-MM-DDTHH:MM:SS.ffffffZ")
    return datetime.fromisoformat(ts).timestamp()  # the "Z" makes it UTC


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


def signing_bytes(obj: dict[str, Any]) -> bytes:
    """Canonical bytes of every field but ``sig``: what is signed, and what is hashed.

    An event of version 1 is canonicalised as version 1 did; everything else (events of
    version 2, responses, notices) as RFC 8785.
    """
    unsigned = {k: v for k, v in obj.items() if k != "sig"}
    return canonical_bytes_for(1 if obj.get("v") == 1 else 2, unsigned)


def event_hash(event: dict[str, Any]) -> str:
    """SHA-256 (hex) of the event's signing bytes; the next event's ``prev``."""
    return hashlib.sha256(signing_bytes(event)).hexdigest()


@dataclass(frozen=True, slots=True)
class SignedEvent:
    """One signed event: its fields, its hash and its canonical wire text."""

    seq: int
    topic: str
    fields: dict[str, Any]
    hash: str
    text: str


class Signer:
    """Holds a signing key and signs events and frames."""

    def __init__(self, signing_key: nacl.signing.SigningKey) -> None:
        from nacl.bindings import crypto_sign

        self._crypto_sign = crypto_sign
        self._key = signing_key
        self._sk = signing_key._signing_key
        self.public_key = bytes(signing_key.verify_key)
        self.kid = key_id(self.public_key)

    def sign_bytes(self, data: bytes) -> str:
        # nacl.bindings directly: the same Ed25519 signature without SignedMessage objects.
        return b64(self._crypto_sign(data, self._sk)[:64])

    def make_event(
        self, *, seq: int, ts: float, topic: str, payload: Any, prev: str
    ) -> SignedEvent:
        """Build, sign and hash one event."""
        fields: dict[str, Any] = {
            "v": PROTOCOL_VERSION,
            "seq": seq,
            "ts": format_ts(ts),
            "topic": topic,
            "payload": payload,
            "prev": prev,
            "kid": self.kid,
        }
        unsigned = canonical_text(fields)
        data = unsigned.encode("utf-8")
        sig = self.sign_bytes(data)
        fields["sig"] = sig
        # The full text is the unsigned text with "sig" spliced in before "topic" (keys
        # are sorted). rfind: a payload may hold the same keys, but it comes earlier.
        marker = f',"seq":{seq},"topic":'
        cut = unsigned.rfind(marker) + len(f',"seq":{seq}')
        text = f'{unsigned[:cut]},"sig":"{sig}"{unsigned[cut:]}'
        return SignedEvent(
            seq=seq,
            topic=topic,
            fields=fields,
            hash=hashlib.sha256(data).hexdigest(),
            text=text,
        )

    def sign_frame(self, frame: dict[str, Any]) -> dict[str, Any]:
        """Add ``kid`` and ``sig`` to a non-event frame (a response or a notice)."""
        frame = dict(frame)
        frame["kid"] = self.kid
        frame["sig"] = self.sign_bytes(signing_bytes(frame))
        return frame


_SIG_SPELLINGS = re.compile(r"(?:[A-Za-z0-9+/]{85}[AQgw]==\n)*")


def verify_all(sigs: Sequence[str], datas: Sequence[bytes], public_key: bytes) -> bool:
    """True if every ``sigs[i]`` is, in its one canonical spelling (as
    :func:`verify_detached` demands), an Ed25519 signature of ``datas[i]`` by
    ``public_key``.

    The same check as :func:`verify_detached` for many signatures at once, with no
    Python code run per signature: one regular expression spells them all, and
    libsodium's ``crypto_sign_open`` (through PyNaCl's own cffi binding, into one
    reused buffer) is called from a C loop.
    """
    if len(sigs) != len(datas) or len(public_key) != 32:
        return False
    if not sigs:
        return True
    try:
        # Each one line of the 88 characters a spelling has (none may hide a newline).
        if (list(map(len, sigs)).count(88) != len(sigs)
                or not _SIG_SPELLINGS.fullmatch("\n".join(sigs) + "\n")):
            return False
    except TypeError:  # a sig that is not a string
        return False
    signed = list(map(add, map(binascii.a2b_base64, sigs), datas))
    out = _ffi.new("unsigned char[]", max(map(len, signed), default=1))
    out_len = _ffi.new("unsigned long long *")
    results = list(map(_sodium.crypto_sign_open, repeat(out), repeat(out_len), signed,
                       map(len, signed), repeat(public_key)))
    return results.count(0) == len(results)


def verify_detached(sig: str, data: bytes, public_key: bytes) -> bool:
    """True if ``sig`` (standard base64 of 64 bytes, in its one canonical spelling) is an
    Ed25519 signature of ``data`` by ``public_key``."""
    # 64 bytes are 85 characters and 2 bits, then "==": the 86th character's 4 unused
    # bits must be zero ("A", "Q", "g" or "w"), or one signature would have 16 spellings.
    if len(sig) != 88 or sig[85] not in "AQgw" or not sig.endswith("=="):
        return False
    try:
        raw = base64.b64decode(sig, validate=True)
    except (ValueError, binascii.Error):
        return False
    try:
        signed = raw + data
        if len(public_key) != 32:
            return False
        out = _ffi.new("unsigned char[]", len(signed))
        return _sodium.crypto_sign_open(out, _ffi.new("unsigned long long *"), signed,
                                        len(signed), public_key) == 0
    except TypeError:  # a key or data that is not bytes
        return False


def check_signature(obj: dict[str, Any], public_key: bytes, *,
                    data: bytes | None = None) -> bool:
    """True if ``obj["sig"]`` is a valid Ed25519 signature of its signing bytes (or ``data``)."""
    sig = obj.get("sig")
    if not isinstance(sig, str) or not sig.isascii():
        return False
    try:
        signed = signing_bytes(obj) if data is None else data
    except ValueError:
        return False
    return verify_detached(sig, signed, public_key)


_FIELD_SET = frozenset(EVENT_FIELDS)


def well_formed_event(obj: Any) -> str | None:
    """Return None if ``obj`` has the shape of an event, else what is wrong with it."""
    if not isinstance(obj, dict):
        return "not a JSON object"
    if (obj.keys() == _FIELD_SET and type(obj["v"]) is int and obj["v"] in SUPPORTED_VERSIONS
            and type(obj["seq"]) is int and obj["seq"] >= 1 and type(obj["ts"]) is str
            and type(obj["topic"]) is str and type(obj["prev"]) is str
            and type(obj["kid"]) is str and type(obj["sig"]) is str):
        return None  # the common case, checked at once
    missing = [k for k in EVENT_FIELDS if k not in obj]
    if missing:
        return "missing field(s) " + ", ".join(missing)
    extra = sorted(set(obj) - set(EVENT_FIELDS))
    if extra:
        return "unexpected field(s) " + ", ".join(extra)
    if type(obj["v"]) is not int or obj["v"] not in SUPPORTED_VERSIONS:
        return f"unsupported version {obj['v']!r}"
    if not isinstance(obj["seq"], int) or isinstance(obj["seq"], bool) or obj["seq"] < 1:
        return "seq is not a positive integer"
    for key in ("ts", "topic", "prev", "kid", "sig"):
        if not isinstance(obj[key], str):
            return f"{key} is not a string"
    return None
