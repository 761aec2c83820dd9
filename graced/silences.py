"""Silences: "I'm working on this, leave it alone for a while". Pure code.

Theory of operation
-------------------
A silence covers a detector (optionally one subject, a glob) or everything (``--all``)
until it expires. While a mission's (detector, subject) is covered, the mission is
opened and recorded as usual, but no playbook runs for it and no notifier is told: the
executor marks it ``silenced`` and defers it. When the silence ends (it expires, is
removed, or, if it was added with ``until_resolved``, the missions it held have all
closed), deferred missions that are still active go through the policy again.

The set is small and bounded (:data:`MAX_SILENCES`); it is kept as JSON in the journal's
``meta`` table, written with the signed event that changed it (``silence.added``,
``silence.removed``, ``silence.expired``), so a restart keeps it exactly.
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from .protocol.times import iso_times

MAX_SILENCES = 1000
MAX_DURATION = 90 * 86400.0
MAX_COMMENT = 1000


@dataclass
class Silence:
    id: int
    detector: str | None  # None: every detector (--all)
    subject: str | None  # None: every subject; else a glob
    created_at: float
    expires_at: float
    comment: str
    by: str
    until_resolved: bool = False
    missions: list[int] = field(default_factory=list)  # the missions it held back

    def covers(self, detector: str, subject: str) -> bool:
        return ((self.detector is None or self.detector == detector)
                and (self.subject is None or fnmatch.fnmatchcase(subject, self.subject)))

    @property
    def target(self) -> str:
        if self.detector is None:
            return "all"
        return self.detector + (f":{self.subject}" if self.subject is not None else "")

    def public(self) -> dict[str, Any]:
        return {**asdict(self), "target": self.target}

    def event(self, **extra: Any) -> dict[str, Any]:
        """A silence.* event's payload: :meth:`public` and ``extra``, times in the ISO
        form of an event's ts."""
        return dict(iso_times({**self.public(), **extra}))


def parse_target(text: str) -> tuple[str, str | None]:
    """``DETECTOR[:SUBJECT]`` -> (detector, subject or None); ValueError if malformed."""
    detector, sep, subject = text.partition(":")
    if not detector or len(text) > 400 or (sep and not subject):
        raise ValueError("a silence's target is DETECTOR or DETECTOR:SUBJECT")
    return detector, (subject if sep else None)


class Silences:
    """The silences in force; every change returns what to journal with it."""

    def __init__(self, items: list[Silence] | None = None, next_id: int = 1) -> None:
        self.items: dict[int, Silence] = {s.id: s for s in items or []}
        self.next_id = next_id

    def add(self, *, detector: str | None, subject: str | None, duration: float,
            comment: str, by: str, until_resolved: bool, now: float) -> Silence:
        """A new silence; ValueError names what is wrong with the request."""
        if not 0 < duration <= MAX_DURATION:
            raise ValueError(f"the duration must be more than 0 and at most "
                             f"{MAX_DURATION / 86400:g} days")
        if not comment.strip() or len(comment) > MAX_COMMENT:
            raise ValueError(f"a silence needs a comment (1-{MAX_COMMENT} characters): say "
                             "why, for whoever looks next")
        for what, text in (("comment", comment), ("target", detector), ("target", subject)):
            if text is not None and not text.isascii():
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:
                    # It could be neither journaled nor signed (see graced.protocol.wire).
                    raise ValueError(f"the {what} is not valid UTF-8") from None
        if until_resolved and detector is None:
            raise ValueError("--until-resolved needs a DETECTOR[:SUBJECT], not --all")
        if len(self.items) >= MAX_SILENCES:
            raise ValueError(f"{MAX_SILENCES} silences already; remove some first")
        s = Silence(id=self.next_id, detector=detector, subject=subject, created_at=now,
                    expires_at=now + duration, comment=comment, by=by,
                    until_resolved=until_resolved)
        self.next_id += 1
        self.items[s.id] = s
        return s

    def remove(self, silence_id: int) -> Silence | None:
        return self.items.pop(silence_id, None)

    def covering(self, detector: str, subject: str, now: float) -> Silence | None:
        """The silence in force for this (detector, subject), the longest-lasting first."""
        found = [s for s in self.items.values() if s.expires_at > now and s.covers(
            detector, subject)]
        return max(found, key=lambda s: s.expires_at) if found else None

    def due(self, now: float, active: set[int]) -> list[tuple[Silence, str]]:
        """Silences that end now, each with why: expired, or its missions all closed."""
        out = []
        for s in list(self.items.values()):
            if s.expires_at <= now:
                out.append((s, "expired"))
            elif s.until_resolved and s.missions and not (set(s.missions) & active):
                out.append((s, "its missions closed"))
        for s, _ in out:
            del self.items[s.id]
        return out

    def listed(self) -> list[dict[str, Any]]:
        return [s.public() for s in sorted(self.items.values(), key=lambda s: s.id)]

    def dump(self) -> str:
        return json.dumps({"next_id": self.next_id,
                           "items": [asdict(s) for s in self.items.values()]})

    def write(self) -> tuple[str, tuple[Any, ...]]:
        """The journal write that stores the set as it is now."""
        return ("INSERT OR REPLACE INTO meta (key, value) VALUES ('silences', ?)",
                (self.dump(),))

    @classmethod
    def load(cls, text: str | None) -> Silences:
        if not text:
            return cls()
        try:
            data = json.loads(text)
            items = [Silence(**{**item, "missions": list(item.get("missions", []))})
                     for item in data.get("items", [])]
            return cls(items, int(data.get("next_id", 1)))
        except (ValueError, TypeError, AttributeError):
            return cls()
