"""The fleet against an attacker who can publish and subscribe on its NATS: real
nats-server, real graced, the real gracectl fleet (as tests/test_fleet_e2e.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.nats import knowledge_bucket, one_host, status, wait_caught_up
from tests.helpers.procs import LineCollector, poll_until
from tests.test_fleet_e2e import assert_whole


def _nats(url: str, work: Any) -> Any:
    """Run ``work(nc, js)`` on a connection of the attacker's own."""
    import nats

    async def go() -> Any:
        nc = await nats.connect(url)
        try:
            return await work(nc, nc.jetstream())
        finally:
            await nc.close()

    return asyncio.run(go())


@pytest.mark.slow
def test_guessed_message_ids_a_purge_or_a_deleted_stream_silence_no_host(
        shortdir: Path) -> None:
    """Message ids published ahead under the old guessable form do not make JetStream drop
    the host's events; after a purge (JetStream still remembers the ids) a restarted
    graced is told its events are "duplicates" of messages no longer held: it does not
    count them as sent, it sends them again, and says so in status and integration; a
    stream deleted under it is made again and the journal's history sent again."""
    with one_host(shortdir, "integration_interval = 0.3\n") as site:
        server, op, g = site.server, site.op, site.g
        daemon_id = op.pin(g)
        st = wait_caught_up(g)
        head = st["head_seq"]
        kid = json.loads(g.ctl("tail", "--json", "--no-follow", "--since", "1",
                               check=True).stdout.splitlines()[0])["kid"]

        async def squat(nc: Any, js: Any) -> None:  # any subject takes a stream-wide id
            for seq in range(head + 1, head + 400):
                await js.publish("grace.x.y", b"junk", headers={"Nats-Msg-Id": f"{kid}:{seq}"})

        _nats(server.url, squat)
        assert g.ctl("emit", "user.after", "--count", "50").returncode == 0
        host = assert_whole(op, g, daemon_id)
        assert host["last_seq"] >= head + 50
        # The stream graced made is bounded (bytes, oldest dropped first; message size).
        info = _nats(server.url, lambda nc, js: js.stream_info("GRACE"))
        assert (info.config.max_bytes, info.config.discard) == (16 * (256 << 20), "old")
        assert info.config.max_msg_size == 16 << 20

        # The start of the host's history purged: verified, but only "partial"; its name
        # still known (every heartbeat carries it, signed).
        async def purge_start(nc: Any, js: Any) -> None:
            await js.purge_stream("GRACE", subject=f"grace.{daemon_id}.>", seq=4)

        _nats(server.url, purge_start)
        host = next(h for h in op.fleet_json("ls")["hosts"] if h["daemon_id"] == daemon_id)
        assert host["first_seq"] == 4 and host["verified"].startswith("partial"), host
        assert host["host"] == socket.gethostname() and host["open_missions_reported"] == 0

        async def purge(nc: Any, js: Any) -> None:
            await js.purge_stream("GRACE")

        sent = wait_caught_up(g)["fleet"]["acked_seq"]
        g.stop()
        _nats(server.url, purge)
        g.start()
        host = assert_whole(op, g, daemon_id)  # every event from seq 1 again
        fl = status(g)["fleet"]
        assert fl["refused_duplicates"] >= sent, fl
        assert "did not send" in (fl["alert"] or ""), fl
        poll_until(lambda: status(g)["integration"].get("fleet", {}).get("state")
                   == "failing", 10, "the fleet component failing")

        # The stream deleted under a running graced: it is made again, history resent.
        async def delete(nc: Any, js: Any) -> None:
            await js.delete_stream("GRACE")

        _nats(server.url, delete)
        assert g.ctl("emit", "user.after", "--count", "5").returncode == 0
        assert_whole(op, g, daemon_id)


def _forge_host(url: str, daemon_id: str, events: list[tuple[str, dict[str, Any]]],
                signer: Any = None, first: int = 1, prev: str = "0" * 64) -> Any:
    """Publish a chain of events signed by ``signer`` (a new key by default) under
    ``daemon_id``'s subjects, as anyone on NATS may."""
    import nacl.signing

    from graced.protocol import Signer
    from graced.protocol import fleet as names

    signer = signer or Signer(nacl.signing.SigningKey.generate())
    now = time.time()

    async def go(nc: Any, js: Any) -> None:
        nonlocal prev
        for seq, (topic, payload) in enumerate(events, first):
            ev = signer.make_event(seq=seq, ts=now, topic=topic, payload=payload, prev=prev)
            prev = ev.hash
            await js.publish(names.subject_for(daemon_id, topic), ev.text.encode())

    _nats(url, go)
    return signer


@pytest.mark.slow
def test_made_up_hosts_and_offered_keys_are_not_trusted(shortdir: Path) -> None:
    """A made-up host's forged mission is left out of fleet missions ls (shown, marked,
    with --unverified); junk on a made-up host's subjects is reported for that host only; fleet
    trust without --key pins the key of the host's genesis event only when its chain
    verifies with it, and refuses when the stream offers another key."""
    from graced.keys import parse_public_key
    from graced.protocol.signing import b64

    with one_host(shortdir) as site:
        server, op, g = site.server, site.op, site.g
        daemon_id = str(json.loads(g.ctl("status", "--json", check=True).stdout)["daemon_id"])
        wait_caught_up(g)
        fake = str(uuid.uuid4())
        import nacl.signing

        from graced.protocol import Signer

        genesis_key = Signer(nacl.signing.SigningKey.generate())
        _forge_host(server.url, fake, [("crypto.key_created", {
            "kid": genesis_key.kid, "public_key": b64(genesis_key.public_key)})],
            signer=genesis_key)
        _forge_host(server.url, fake, [  # ... but the rest is signed by another key
            ("daemon.started", {"host": "db-1", "version": "0.1.0"}),
            ("mission.opened", {"id": 7, "state": "awaiting_approval", "severity": "critical",
                                "detector": "disk", "subject": "/", "opened_at": time.time(),
                                "summary": "disk full: approve wipe-and-reboot"})], first=2)
        junk = str(uuid.uuid4())
        _nats(server.url, lambda nc, js: js.publish(f"grace.{junk}.daemon.started", b"junk"))

        # Trust on first use: the genesis key, the whole chain verified with it.
        trusted = op.fleet("trust", daemon_id)
        assert trusted.returncode == 0, trusted.stderr
        own = parse_public_key((g.state / "key.pub").read_text())
        pinned = json.loads((op.home / ".config" / "grace" / "known_keys.json").read_text())
        assert pinned[f"fleet:{daemon_id}"]["public_key"] == b64(own)
        made_up = op.fleet("trust", fake)  # its chain does not verify with its genesis key
        assert made_up.returncode == 10 and "does not verify" in made_up.stderr, made_up.stderr

        listed = {h["daemon_id"]: h for h in op.fleet_json("ls")["hosts"]}  # exit 0
        assert listed[daemon_id]["verified"] == "ok"
        assert listed[fake]["verified"].startswith("unverified")
        assert listed[junk]["rejection"] is not None, listed[junk]
        assert listed[junk]["state"] == "unknown", listed[junk]  # never "up"
        assert op.fleet_json("missions", "ls") == []
        shown = op.fleet_json("missions", "ls", "--unverified")
        assert [(m["daemon_id"], m["id"], m["verified"]) for m in shown] == [(fake, 7, False)]
        text = op.fleet("missions", "ls", "--unverified")
        assert text.returncode == 0 and "db-1 UNVERIFIED" in text.stdout, text

        # Another key offered on the host's own subjects: no key is taken on first use.
        signer = Signer(nacl.signing.SigningKey.generate())
        _forge_host(server.url, daemon_id, [("crypto.key_loaded", {
            "kid": signer.kid, "public_key": b64(signer.public_key)})], signer=signer,
            first=listed[daemon_id]["last_seq"] + 1)
        again = op.fleet("trust", daemon_id, "--replace")
        assert again.returncode == 10 and "2 different keys" in again.stderr, again.stderr
        pinned = json.loads((op.home / ".config" / "grace" / "known_keys.json").read_text())
        assert pinned[f"fleet:{daemon_id}"]["public_key"] == b64(own)


@pytest.mark.slow
def test_a_trusted_peer_cannot_overwrite_the_hosts_own_knowledge(shortdir: Path) -> None:
    """Exports signed by a trusted peer's key but naming source "local", the host's own
    id, or no daemon id at all are refused (counted); a proper one is imported. The
    host's own entry in the bucket, overwritten, is put back."""
    import nacl.signing

    from graced.protocol import Signer, canonical_text
    from graced.protocol import knowledge as pk
    from graced.protocol.signing import b64

    peer = Signer(nacl.signing.SigningKey.generate())
    line = f"ed25519 {b64(peer.public_key)} {peer.kid}"
    with one_host(shortdir, fleet="knowledge_interval = 1\n"
                  f"knowledge_keys = {json.dumps([line])}\n") as site:
        server, g = site.server, site.g
        own_id = status(g)["daemon_id"]
        poll_until(lambda: status(g)["fleet"]["knowledge"] is not None
                   and status(g)["fleet"]["connected"], 20, "the fleet connected")
        imports = LineCollector(g.ctl_popen("tail", "--json", "--since", "1",
                                            "learning.imported"))
        good = str(uuid.uuid4())

        def export(source: str) -> bytes:
            body = {"format": pk.EXPORT_FORMAT, "version": pk.EXPORT_VERSION,
                    "source": source, "host": "peer", "exported_at": time.time(),
                    "patterns": []}
            return canonical_text(peer.sign_frame(body)).encode()

        async def put(nc: Any, js: Any) -> None:
            kv = await knowledge_bucket(js)
            for source in ("local", "not-a-daemon-id", own_id.upper(), good):
                await kv.put(source, export(source))

        _nats(server.url, put)
        assert imports.wait_for(lambda lines: len(lines) >= 1, 30), imports.lines
        imports.proc.kill()
        got = json.loads(imports.lines[0])
        assert got["payload"]["source"] == good and got["payload"]["by"] == "fleet", got
        knowledge = status(g)["fleet"]["knowledge"]
        assert knowledge["imports"] == 1 and knowledge["refused"] == 3, knowledge
        sources = [json.loads(x)["payload"]["source"] for x in g.ctl(
            "tail", "--json", "--no-follow", "--since", "1", "learning.imported",
            check=True).stdout.splitlines()]
        assert sources == [good]

        # Its own entry overwritten (here: by the trusted peer): put back, counted.
        async def entry(nc: Any, js: Any) -> bytes:
            return bytes((await (await js.key_value("grace-knowledge")).get(own_id)).value)

        async def overwrite(nc: Any, js: Any) -> None:
            await (await js.key_value("grace-knowledge")).put(own_id, export(good))

        poll_until(lambda: pk.parse_export(_nats(server.url, entry))[0]["source"] == own_id,
                   20, "the host's own export in the bucket")
        _nats(server.url, overwrite)
        poll_until(lambda: pk.parse_export(_nats(server.url, entry))[0]["source"] == own_id
                   and status(g)["fleet"]["knowledge"]["overwritten"] >= 1, 20,
                   "the host's export put back")


@pytest.mark.slow
def test_a_junk_replier_and_a_flood_of_unsigned_requests_do_not_stop_approvals(
        shortdir: Path) -> None:
    """Someone subscribed to grace-rpc.<id> answers every request with junk, and floods
    it with 30,000 unsigned requests: fleet approve still gets the host's own signed
    answer (here: no such mission, exit 5), within its 5 s timeout."""
    import threading

    stop = threading.Event()
    ready = threading.Event()
    with one_host(shortdir, control=True) as site:
        server, op, g = site.server, site.op, site.g
        try:
            daemon_id = op.pin(g)
            wait_caught_up(g)
            subject = f"grace-rpc.{daemon_id}"

            def replier() -> None:
                import nats

                async def go() -> None:
                    nc = await nats.connect(server.url)

                    async def junk(msg: Any) -> None:
                        if msg.reply:
                            await msg.respond(b'{"id":1,"ok":true,"result":{},"type":"response"}')

                    await nc.subscribe(subject, cb=junk)
                    await nc.flush()
                    ready.set()
                    await asyncio.get_running_loop().run_in_executor(None, stop.wait)
                    await nc.close()

                asyncio.run(go())

            thread = threading.Thread(target=replier, daemon=True)
            thread.start()
            assert ready.wait(10)
            res = op.fleet("approve", daemon_id, "999", "--yes")
            assert res.returncode == 5 and "999" in res.stderr, res.stderr

            async def flood(nc: Any, js: Any) -> None:
                body = json.dumps({"id": 1, "nonce": "n" * 32, "method": "missions.approve",
                                   "params": {"id": 999, "opened": 1.0}}).encode()
                for _ in range(30_000):
                    await nc.publish(subject, body, reply="flood.inbox")
                await nc.flush()

            _nats(server.url, flood)
            started = time.monotonic()
            res = op.fleet("approve", daemon_id, "999", "--yes")
            assert res.returncode == 5 and "999" in res.stderr, res.stderr
            assert time.monotonic() - started < 5.0
            assert status(g)["fleet"]["requests_dropped"] > 1000
        finally:
            stop.set()


@pytest.mark.slow
def test_a_real_approval_gets_through_a_flood_of_forged_signed_requests(
        shortdir: Path) -> None:
    """While someone floods grace-rpc.<id> with 150,000 approvals that name the operator's
    real key, this daemon and the time now (fresh nonces; only the signature is not the
    key's), the operator's real fleet approve, sent a quarter of the way in, is answered
    and runs the playbook: within 10 s of the flood's end (before the screening and
    gracectl's resending it was dropped: the forged ones filled the queue for signed
    requests)."""
    import base64
    import secrets
    import threading

    import nacl.signing

    from tests.test_missions_e2e import MISSIONS, Watch
    from tests.test_remediation_e2e import (
        kill_all,
        process_detector,
        restart_playbook,
        start_sleeper,
    )

    marker = f"grace-flood-{os.getpid()}"
    start_sleeper(marker)
    with one_host(shortdir, control=True, detectors=process_detector(marker)
                  + restart_playbook(marker, "high") + MISSIONS.format(flap=0)) as site:
        server, op, g = site.server, site.op, site.g
        try:
            assert site.operator_key is not None
            kid = site.operator_key.split()[-1]
            daemon_id = op.pin(g)
            w = Watch(g)
            kill_all(marker)  # a real fault: the worker dies, a high-risk mission waits
            mid = w.wait("mission.awaiting_approval", "worker", 30)["payload"]["id"]
            wait_caught_up(g)
            # A well-formed signature by another key (random bytes would be refused by
            # libsodium before the costly part): only the whole check tells them apart.
            sig = base64.b64encode(nacl.signing.SigningKey.generate().sign(b"x")
                                   .signature).decode()
            forged = [json.dumps({
                "id": 1, "nonce": secrets.token_hex(16), "method": "missions.approve",
                "params": {"id": mid, "opened": 1.0},
                "auth": {"kid": kid, "ts": time.time(), "daemon": daemon_id,
                         "sig": sig},
            }).encode() for _ in range(150_000)]
            quarter = threading.Event()
            flooded: list[float] = []

            async def flood(nc: Any, js: Any) -> None:
                for i, body in enumerate(forged):
                    await nc.publish(f"grace-rpc.{daemon_id}", body, reply="flood.inbox")
                    if i == len(forged) // 4:
                        await nc.flush()
                        quarter.set()
                await nc.flush()
                flooded.append(time.monotonic())

            flooder = threading.Thread(target=_nats, args=(server.url, flood), daemon=True)
            flooder.start()
            assert quarter.wait(30)
            res = op.fleet("--timeout", "30", "approve", daemon_id, str(mid), "--yes")
            answered = time.monotonic()
            flooder.join(60)
            assert res.returncode == 0, res.stderr
            assert flooded and answered - flooded[0] < 10.0, answered - flooded[0]
            w.wait("mission.resolved", "worker", 60)
            w.close()
            fl = status(g)["fleet"]
            assert fl["requests_dropped"] > 1000, fl  # the forged ones, never queued
        finally:
            kill_all(marker)


@pytest.mark.slow
def test_a_replayed_old_event_of_the_host_does_not_make_graced_send_its_journal_again(
        shortdir: Path) -> None:
    """The security review: with graced stopped, a NATS client that is not the host
    published the host's genuine seq-1 event (crypto.key_created) again on its subject;
    on restart graced logged ``forwarding … from seq 2 (JetStream holds up to 1)`` and
    sent its whole journal again. graced never resumes below its own acknowledged
    position because of what the stream's last message for it says; it goes back only
    if the stream really lacks the event it acked (looked up by its stream seq). Here
    JetStream's duplicate window is 1 s (as after graced was down for longer than the
    default 2 minutes): anything sent again would be stored again."""
    with one_host(shortdir) as site:
        server, op, g = site.server, site.op, site.g
        daemon_id = op.pin(g)
        assert g.ctl("emit", "user.before", "--count", "30").returncode == 0
        acked = wait_caught_up(g)["fleet"]["acked_seq"]

        async def short_window(nc: Any, js: Any) -> None:
            info = await js.stream_info("GRACE")
            await js.update_stream(dataclasses.replace(info.config, duplicate_window=1.0))

        _nats(server.url, short_window)
        g.stop()
        time.sleep(1.5)  # the duplicate window (1 s) passes: the stream holds no id now

        async def replay(nc: Any, js: Any) -> int:
            first = await js.get_msg("GRACE", seq=1)
            assert json.loads(first.data)["seq"] == 1  # the host's genuine genesis event
            for _ in range(3):
                await js.publish(first.subject, first.data)
            return int((await js.stream_info("GRACE")).state.messages)

        held = _nats(server.url, replay)
        g.start()
        st = wait_caught_up(g)
        # Every journaled event once, and the attacker's three copies: none sent again.
        messages = _nats(server.url, lambda nc, js: js.stream_info("GRACE")).state.messages
        head = status(g)["head_seq"]  # heartbeats go on meanwhile
        assert st["head_seq"] + 3 <= messages <= head + 3, (messages, held, st["head_seq"])
        assert st["fleet"]["resumed_from"] > acked, (st["fleet"], acked)
        assert "from seq 2 " not in g.stderr()
        res = op.fleet("tail", "--verify", "--no-follow", "--host", daemon_id, timeout=120)
        assert res.returncode == 0, res.stderr
