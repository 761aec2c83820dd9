"""Topic patterns: globs over event topics (``mission.*``), as the daemon and its clients
match them alike (a subscription's patterns; ``gracectl tail PATTERN``)."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable

FAMILIES = ("daemon", "crypto", "detector", "mission", "executor", "learning",
            "integration", "silence", "user")
"""The topic families graced publishes (a topic is FAMILY.NAME: DESIGN.md, Topics)."""


def compile_patterns(patterns: Iterable[str]) -> Callable[[str], bool]:
    """A matcher for topic globs (``*``, ``?``, ``[...]``); no patterns match all."""
    pats = list(patterns)
    if not pats or "*" in pats:
        return lambda topic: True
    regex = re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in pats))
    cache: dict[str, bool] = {}

    def match(topic: str) -> bool:
        hit = cache.get(topic)
        if hit is None:
            hit = cache[topic] = regex.match(topic) is not None
            if len(cache) > 4096:
                cache.clear()
        return hit

    return match


def matches_no_family(pattern: str) -> bool:
    """Whether glob ``pattern`` can match no topic of any family: a bare word ('queue',
    where 'detector.*' was meant), or one that names an unknown family ('deploy.*').
    Judged on the literal part before the first wildcard; a pattern that might match
    is never reported."""
    cut = min((i for i, c in enumerate(pattern) if c in "*?["), default=None)
    literal = pattern if cut is None else pattern[:cut]
    if "." in literal:
        return literal.split(".", 1)[0] not in FAMILIES
    if cut is None:  # no dot, no wildcard: every topic has a dot
        return True
    return not any(f.startswith(literal) for f in FAMILIES)


MAX_USER_TOPIC = 200
# A user event's topic: ``user.`` and a non-empty name of letters, digits, ``_ . -``;
# no glob or NATS wildcard (``* ? [ >``), so ``tail user.NAME`` selects exactly it.
USER_TOPIC = re.compile(r"user\.[A-Za-z0-9_.-]+")


def user_topic_error(topic: object) -> str | None:
    """Why ``topic`` is not a user event's topic (``emit``), or None when it is one."""
    if isinstance(topic, str) and len(topic) <= MAX_USER_TOPIC \
            and USER_TOPIC.fullmatch(topic):
        return None
    return (f"a topic is 'user.' then a name of letters, digits, '_', '.' or '-' "
            f"(at most {MAX_USER_TOPIC} characters in all), e.g. user.deploy")
