"""The third attacker review of learning (issue #22), the pure-core findings by value:
each test failed on the code the review broke. (The end-to-end halves are in
tests/test_learning_review3_e2e.py.)"""

from __future__ import annotations

import json
import logging
import unicodedata
from typing import Any

import nacl.signing
import pytest

from graced.fleet.knowledge import trusted_keys
from graced.learning.knowledge import MAX_SKEW, Knowledge, load_sources
from graced.protocol import Signer
from graced.protocol import knowledge as pk
from graced.protocol.knowledge import check, text
from graced.protocol.signing import b64
from graced.protocol.text import safe
from tests.test_learning_review2 import imported, rec, rows_of

NOW = 1_800_000_000.0

# Default_Ignorable_Code_Point, DerivedCoreProperties.txt (Unicode 15.1): Python's
# unicodedata has no such property, so the ranges are written out here.
DEFAULT_IGNORABLE = [
    (0x00AD, 0x00AD), (0x034F, 0x034F), (0x061C, 0x061C), (0x115F, 0x1160),
    (0x17B4, 0x17B5), (0x180B, 0x180F), (0x200B, 0x200F), (0x202A, 0x202E),
    (0x2060, 0x206F), (0x3164, 0x3164), (0xFE00, 0xFE0F), (0xFEFF, 0xFEFF),
    (0xFFA0, 0xFFA0), (0xFFF0, 0xFFF8), (0x1BCA0, 0x1BCA3), (0x1D173, 0x1D17A),
    (0xE0000, 0xE0FFF)]
BIDI_CONTROL = [0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A)]


# -- 5 ---------------------------------------------------------------------------------

def test_format_bidi_and_zero_width_characters_are_refused_and_escaped() -> None:
    """Finding 5: U+061C and zero-width characters passed the imported-name filter, so
    "fix-queue" + U+200B listed as a second "fix-queue". Every Cf code point, every
    Bidi_Control and every Default_Ignorable one is now refused in an import (naming the
    field and the code point) and escaped by safe (gracectl's and graced's logs')."""
    cf = [c for c in range(0x110000) if unicodedata.category(chr(c)) == "Cf"
          and not 0xD800 <= c <= 0xDFFF]
    ignorable = [c for lo, hi in DEFAULT_IGNORABLE for c in range(lo, hi + 1)]
    assert len(cf) > 150 and len(ignorable) > 4000
    for c in sorted({*cf, *ignorable, *BIDI_CONTROL}):
        name = f"fix-queue{chr(c)}"
        assert chr(c) not in safe(name), hex(c)
        assert safe(name).startswith("fix-queue\\"), hex(c)
        with pytest.raises(ValueError, match=f"U\\+{c:04X}"):
            text(name, "patterns[0].playbook")
    # The review's two records: refused, naming the field.
    for over, field in (({"subject": "queue\u061c", "signature": "queue:queue\u061c"},
                         "signature"), ({"playbook": "fix-queue\u200b"}, "playbook")):
        with pytest.raises(ValueError, match=f"patterns\\[0\\].{field}: holds the control "
                                             "character U\\+(061C|200B)"):
            check([{**rec("queue:queue", "fix-queue"), **over}])
    assert safe("fix-queue\u200b") == "fix-queue\\u200b"
    assert safe("queue\u061c") == "queue\\u061c"
    assert safe("tag\U000e0041") == "tag\\U000e0041"
    # Text that is only text is left alone: letters of any script, emoji, CJK.
    for plain in ("fix-queue", "café", "очередь", "队列", "🔥 hot", "ﺍﻟﻌﺮﺑﻴﺔ"):
        assert safe(plain) == plain
        assert text(plain, "x") == plain


# -- 4 ---------------------------------------------------------------------------------

def local_row(**data: Any) -> tuple[Any, ...]:
    """A stored local row of fix-queue for queue:queue, its data overridden."""
    base = {"w_s": 0.0, "w_f": 3.0, "w_at": NOW - 100, "fails": [[901, NOW - 100, 1]],
            "host": "", "kid": "", "imported_at": 0.0, "exported_at": 0.0}
    return ("queue:queue", "fix-queue", "local", "queue", "queue", 0, 3, 0.0, 0,
            NOW - 200, NOW - 100, json.dumps({**base, **data}))


def test_times_from_the_future_are_quarantined_at_start_and_refused_in_imports() -> None:
    """Finding 4: failures dated 2255 (under MAX_EPOCH) kept fix-queue demoted for good
    (never retried, never faded) and an import last seen in 2033 sorted above a local
    pattern. Any time later than now + MAX_SKEW is out of bounds now."""
    future = [[901, 9.0e9, 1], [902, 9.1e9, 1], [903, 9.2e9, 1]]
    rows = [local_row(fails=future), local_row(w_at=9.0e9),
            local_row(exported_at=9.0e9, imported_at=9.0e9),
            (*local_row()[:9], NOW - 200, 2e9, local_row()[11])]
    for row in rows:
        k = Knowledge([row], now=NOW)
        assert not k.patterns and len(k.quarantined) == 1, row
        assert "in the future" in k.quarantined[0][3], k.quarantined
    # The same rows without a clock (the bounds alone) passed: what the review saw.
    assert not Knowledge([rows[0]]).quarantined
    # Within the skew is fine: clocks differ a little.
    ok = Knowledge([local_row(fails=[[901, NOW + MAX_SKEW, 1]])], now=NOW)
    assert not ok.quarantined and ok.patterns
    # Imports: first_seen, last_seen, exported_at.
    for over in ({"last_seen": 2e9}, {"first_seen": NOW + 700, "last_seen": NOW + 700}):
        with pytest.raises(ValueError, match="patterns\\[0\\].(first|last)_seen: .* in the "
                                             "future"):
            check([rec("queue:queue", "p", **over)], now=NOW)
    assert check([rec("queue:queue", "p", last_seen=NOW + 500)], now=NOW)
    signer = Signer(nacl.signing.SigningKey.generate())
    body = signer.sign_frame({"format": pk.EXPORT_FORMAT, "version": pk.EXPORT_VERSION,
                              "source": "d", "host": "h", "exported_at": NOW + 3600,
                              "patterns": []})
    with pytest.raises(ValueError, match="exported_at: .* in the future"):
        pk.parse_export(json.dumps(body).encode(), NOW)
    # A source's stored export time in the future: its key stays pinned, the time is
    # now (nothing exported before this start is taken from it), and it is reported.
    sources, notes = load_sources(json.dumps({
        "d": {"host": "h", "kid": "k1", "exported_at": 9.0e9, "imported_at": NOW},
        "e": {"host": "h", "kid": "k2", "exported_at": NOW - 5, "imported_at": NOW}}), NOW)
    assert sources["d"] == {"host": "h", "kid": "k1", "exported_at": NOW, "imported_at": NOW}
    assert sources["e"]["exported_at"] == NOW - 5
    assert len(notes) == 1 and "'d'" in notes[0] and "in the future" in notes[0]


# -- 2, 3 ------------------------------------------------------------------------------

def test_a_reset_keeps_a_sources_pinned_key_and_export_time() -> None:
    """Finding 2: resetting a source's last record forgot its pinned key and export
    time, so an old export could be replayed and another key claim the id. Both stay
    now; only forget_source (knowledge reset --source) drops them, with the records."""
    k = Knowledge()
    imported(k, "d", [rec("queue:queue", "noop-queue")], now=NOW, exported_at=NOW - 10)
    writes, removed = k.reset("noop-queue")
    assert removed == 1 and not k.patterns
    assert k.sources["d"]["kid"] == "k" and k.sources["d"]["exported_at"] == NOW - 10
    assert all("knowledge_sources" not in str(w) for w in writes)
    assert k.source_list() == [{"source": "d", "host": "h", "kid": "k",
                                "exported_at": NOW - 10, "imported_at": NOW, "records": 0}]
    imported(k, "d", [rec("queue:queue", "noop-queue"), rec("web:api", "p")], now=NOW)
    version = k.version
    writes, removed = k.forget_source("d")
    assert removed == 2 and "d" not in k.sources and not k.patterns and k.version > version
    assert writes[0] == ("DELETE FROM patterns WHERE source = ?", ("d",))
    assert json.loads(writes[1][1][1]) == {}


def test_empty_exports_take_no_place_and_pins_are_capped() -> None:
    """Finding 3: 100 empty exports took every source place, invisibly; the 101st
    daemon with real records was refused. A source with no record does not count
    towards MAX_SOURCES; pins (key and export time) are capped apart, at MAX_PINNED."""
    k = Knowledge()
    for i in range(100):
        imported(k, f"empty{i:03}", [])
    imported(k, "real", [rec("queue:queue", "p")])
    assert k.held_sources() == 1 and len(k.sources) == 101
    for i in range(99):
        imported(k, f"full{i:03}", [rec(f"web:s{i:03}", "p")])
    with pytest.raises(ValueError, match="knowledge from 100 daemons is held already"):
        imported(k, "one-more", [rec("web:x", "p")])
    imported(k, "one-more", [])  # no record: no place taken, pinned
    for i in range(k.held_sources(), pk.MAX_PINNED - len(k.sources) + k.held_sources()):
        imported(k, f"pin{i:04}", [])
    assert len(k.sources) == pk.MAX_PINNED
    with pytest.raises(ValueError, match=f"keys of {pk.MAX_PINNED} daemons are pinned"):
        imported(k, "too-many", [])
    k.forget_source("empty000")
    imported(k, "too-many", [])
    # Stored and loaded again: the pins stay, the places count the same.
    again = Knowledge(rows_of(k), sources=load_sources(json.dumps(k.sources))[0])
    assert len(again.sources) == pk.MAX_PINNED and again.held_sources() == 100


# -- code read: learn() and the version --------------------------------------------------

def test_a_new_local_record_outdates_an_import_plan() -> None:
    """A plan made in a worker thread is applied only if the knowledge base did not
    change; learn() did not count as a change, so an outcome adding a 64th playbook
    meanwhile let an import push the pattern past 64 (quarantined at the next start).
    A new local record now bumps the version; another outcome of it does not."""
    k = Knowledge()
    imported(k, "d", [rec("queue:queue", f"pb{i:02}") for i in range(62)])
    plan = k.plan_import("e", check([rec("queue:queue", "pb-e")]), host="h", kid="k2",
                         exported_at=20.0, now=20.0)
    k.learn(sig="queue:queue", detector="queue", subject="queue", playbook="local-pb",
            success=True, ttr=1.0, now=21.0, incident=1)
    assert plan.version != k.version
    with pytest.raises(ValueError, match="more than 64 playbooks"):
        k.plan_import("e", check([rec("queue:queue", "pb-e"), rec("queue:queue", "pb-f")]),
                      host="h", kid="k2", exported_at=20.0, now=22.0)
    version = k.version
    k.learn(sig="queue:queue", detector="queue", subject="queue", playbook="local-pb",
            success=False, ttr=None, now=23.0, incident=2)
    assert k.version == version


# -- 1 ---------------------------------------------------------------------------------

def test_fleet_knowledge_keys_bind_a_key_to_its_daemon_ids(caplog: Any) -> None:
    """Finding 1 (the configuration half): each knowledge_keys line binds its key to the
    daemon ids written after it; the same key on two lines speaks for both; a line with
    a word that is no daemon id is skipped (a mistyped id must not leave the key free)."""
    x = Signer(nacl.signing.SigningKey.generate())
    line = f"ed25519 {b64(x.public_key)} {x.kid}"
    a, b = "22222222-2222-2222-2222-222222222222", "33333333-3333-3333-3333-333333333333"
    assert trusted_keys([line]) == {x.kid: (x.public_key, frozenset())}
    assert trusted_keys([f"{line} {a}", f"{line} {b.upper()}"]) == {
        x.kid: (x.public_key, frozenset({a, b}))}
    with caplog.at_level(logging.WARNING, logger="graced.fleet"):
        assert trusted_keys([f"{line} 2222-not-an-id"]) == {}
    assert "'2222-not-an-id' is not a daemon id" in caplog.text
