"""``[[notifier]]`` tables, one schema per notifier kind.

To add a key to a kind: add the field to :class:`NotifierConfig` and name it in that
kind's entry of :data:`NOTIFIER_KINDS`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..missions.engine import STATES
from .schema import (
    Check,
    Where,
    build_table,
    check,
    each,
    http_url,
    kind_of,
    non_empty,
    non_empty_list,
    one_of,
    positive,
    require,
    tables,
    unique_name,
)


@dataclass(frozen=True)
class NotifierConfig:
    """One ``[[notifier]]``: a command that gets the mission as JSON, or a webhook."""

    name: str = field(default="", metadata=check(non_empty))
    kind: str = ""
    argv: list[str] = field(default_factory=list)
    url: str = ""
    timeout: float = field(default=10.0, metadata=check(positive))
    on: list[str] = field(
        default_factory=lambda: ["awaiting_approval", "escalated", "failed", "expired"],
        metadata=check(each(one_of(STATES))))


# Keys every notifier has.
COMMON = ("name", "kind", "timeout", "on")
NOTIFIER_KINDS: dict[str, tuple[Mapping[str, Check | None], tuple[str, ...]]] = {
    # kind: (its own keys with their checks, the keys it requires)
    "command": ({"argv": non_empty_list}, ("argv",)),
    "webhook": ({"url": http_url}, ("url",)),
}


def build_notifiers(value: Any, where: Where) -> list[NotifierConfig]:
    """The ``notifier`` array: each table checked against its kind's schema."""
    out: list[NotifierConfig] = []
    names: set[str] = set()
    for item, at, label in tables(value, "notifier", where):
        name = kind_of(item, "kind", tuple(NOTIFIER_KINDS), at, label, "notifier")
        keys, requires = NOTIFIER_KINDS[name]
        nt = build_table(NotifierConfig, item, "notifier", at, label,
                         allowed=[*COMMON, *keys], owner=f'kind "{name}"', ranges=keys)
        unique_name(nt.name, names, at, label, "notifier")
        require(item, requires, at, label, "notifier", f'kind "{name}"')
        out.append(nt)
    return out
