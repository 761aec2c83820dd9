"""The second attacker review of learning (issue #22), the pure-core findings by value:
each test failed on the code the review broke."""

from __future__ import annotations

import json
from typing import Any

from graced.learning.knowledge import PAGE_BYTES, PAGE_RECORDS, Knowledge
from graced.protocol.knowledge import check


def rec(sig: str = "web:api", playbook: str = "p", **over: Any) -> dict[str, Any]:
    det, subj = sig.split(":", 1)
    return {"signature": sig, "detector": det, "subject": subj, "playbook": playbook,
            "successes": 5, "failures": 0, "ttr_total": 0.0, "ttr_count": 0,
            "first_seen": 1.0, "last_seen": 2.0, **over}


def imported(k: Knowledge, source: str, patterns: list[dict[str, Any]], now: float = 10.0,
             exported_at: float | None = None) -> None:
    k.apply_import(k.plan_import(source, check(patterns), host="h", kid="k", now=now,
                                 exported_at=now if exported_at is None else exported_at))


def test_a_page_of_patterns_is_bounded_in_records_and_bytes() -> None:
    """Finding 1: two imports of 64 playbooks for each pattern made the default page
    (1000 patterns) 128,000 records: ~20 s on the event loop and a reply over 16 MB. A
    page ends at PAGE_RECORDS records (and PAGE_BYTES), and the pages still cover all."""
    k = Knowledge()
    wide = [rec(f"q:s{i:04}", f"pb{j:02}", last_seen=2.0 + i) for i in range(120)
            for j in range(64)]
    imported(k, "a", wide)
    imported(k, "b", wide)
    page = k.summaries(20.0, 1000)
    assert len(page) == PAGE_RECORDS // 128 < 120
    assert [p["pattern"] for p in page[:2]] == ["q:s0119", "q:s0118"]
    assert len(json.dumps(page)) <= PAGE_BYTES
    assert sum(len(pb["sources"]) for p in page for pb in p["playbooks"]) <= PAGE_RECORDS
    seen, offset = [], 0
    while offset < len(k.patterns):
        more = k.summaries(20.0, 1000, offset)
        assert more
        seen += [p["pattern"] for p in more]
        offset += len(more)
    assert sorted(seen) == sorted(k.patterns) and len(seen) == 120
    # A pattern larger than the budget is still shown, alone.
    assert len(k.summaries(20.0, 1000, records=10)) == 1
    assert len(k.summaries(20.0, 1000, size=10)) == 1
