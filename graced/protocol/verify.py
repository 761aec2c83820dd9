"""Chain verification of an event stream, sans-IO.

Theory of operation
-------------------
A verifier is fed events in the order they arrived, with the local time of arrival.
For each event it checks, in this order:

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

Freshness is checked with :meth:`ChainVerifier.check_fresh`: no event (the daemon
sends a heartbeat every few seconds) for longer than ``stale_after`` seconds is a
*stale* stream (13), and so is a stream that ends without the daemon's
``daemon.stopping`` event (:meth:`ChainVerifier.end`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from .signing import check_signature, event_hash, key_id, well_formed_event


class ExitCode(enum.IntEnum):
    """gracectl's exit codes; the verification ones are 10-13."""

    OK = 0
    ERROR = 1
    USAGE = 2
    UNREACHABLE = 3
    NOT_AUTHORISED = 4
    NOT_FOUND = 5
    TIMEOUT = 6
    BAD_SIGNATURE = 10
    CHAIN_BROKEN = 11
    REPLAYED = 12
    STALE = 13


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
        }.get(self.code, "error")


@dataclass
class _Suspect:
    seq: int
    hash: str


class ChainVerifier:
    """Verifies a stream of events against one trusted public key.

    ``anchor`` is ``(seq, hash)`` of the last event already trusted (for example
    from a previous session), or None to accept the first event's ``prev`` as given.
    """

    def __init__(
        self,
        public_key: bytes,
        *,
        anchor: tuple[int, str] | None = None,
        stale_after: float | None = None,
        remember: int = 1_000_000,
    ) -> None:
        self.public_key = public_key
        self.kid = key_id(public_key)
        self.stale_after = stale_after
        self.last_seq: int | None = anchor[0] if anchor else None
        self.last_hash: str | None = anchor[1] if anchor else None
        self.last_topic: str | None = None
        self.last_time: float | None = None
        self.count = 0
        self._seen: dict[int, str] = {}
        self._remember = remember
        self._suspect: _Suspect | None = None

    @property
    def pending(self) -> bool:
        """True while a bad signature waits for the next event to be classified."""
        return self._suspect is not None

    def feed(self, event: Any, now: float) -> None:
        """Check one event; raises :class:`Violation` at the first problem."""
        problem = well_formed_event(event)
        if problem is not None:
            bad_seq = event.get("seq") if isinstance(event, dict) else None
            raise Violation(
                ExitCode.CHAIN_BROKEN, bad_seq if isinstance(bad_seq, int) else None,
                f"malformed event ({problem})",
            )
        seq: int = event["seq"]
        if event["kid"] != self.kid:
            raise Violation(
                ExitCode.BAD_SIGNATURE, seq,
                f"unknown key {event['kid']} (trusted key is {self.kid})",
            )
        h = event_hash(event)
        if self.last_seq is not None:
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
        signed = check_signature(event, self.public_key)
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
        self.last_seq = seq
        self.last_hash = h
        self.last_topic = event["topic"]
        self.last_time = now
        self.count += 1
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

    def end(self, *, expect_stop: bool = True) -> None:
        """The stream ended. Unless the daemon said it was stopping, it was cut short."""
        self.flush()
        if expect_stop and self.last_topic != "daemon.stopping":
            raise Violation(
                ExitCode.STALE, self.last_seq,
                "stream cut short (closed without daemon.stopping)",
            )
