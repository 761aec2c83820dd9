"""The replay ring is bounded in bytes as well as in events (a real journal, no mocks)."""

from __future__ import annotations

from pathlib import Path

import nacl.signing
import trio

from graced.journal import Journal
from graced.mesh import Mesh
from graced.protocol import Signer


async def test_the_replay_ring_is_bounded_in_bytes(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.db", synchronous="normal")
    mesh = Mesh(journal, Signer(nacl.signing.SigningKey.generate()), ring_size=10_000,
                ring_max_bytes=1 << 20)
    async with trio.open_nursery() as nursery:
        await nursery.start(mesh.run)
        for i in range(100):  # 100 events of 60 KB: 6 MB, the ring keeps at most 1 MB
            await mesh.publish("user.big", {"i": i, "blob": "x" * 60_000})
        assert mesh.ring_bytes <= 1 << 20
        assert mesh.ring_bytes == sum(len(r.text) for r in mesh.ring)
        assert 10 <= len(mesh.ring) <= 17
        last = mesh.delivered_seq
        # What the ring still holds replays from it; older events come from the journal.
        assert [r.seq for r in mesh.recent(last - 5) or []] == list(range(last - 5, last + 1))
        assert mesh.recent(1) is None
        nursery.cancel_scope.cancel()
    mesh.close()
    journal.close()
