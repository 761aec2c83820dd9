"""Topic patterns: globs over event topics (``mission.*``), as the daemon and its clients
match them alike (a subscription's patterns; ``gracectl tail PATTERN``)."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable


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
