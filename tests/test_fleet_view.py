"""The fleet's pure parts with plain values: subject names, message ids, and the per-host
view (ordering by seq, copies, forged and misfiled events)."""

from __future__ import annotations

import uuid

import nacl.signing

from gracectl.fleetview import FleetView, resolve_host
from graced.protocol import GENESIS_PREV, ExitCode, Signer
from graced.protocol import fleet as names

DAEMON = str(uuid.uuid4())


def test_subjects_keep_only_what_nats_allows() -> None:
    assert names.subject_for(DAEMON, "mission.opened") == f"grace.{DAEMON}.mission.opened"
    # A user topic may hold wildcards, spaces or empty tokens: none reach the subject.
    assert names.subject_for(DAEMON, "user.a b.*.>..") == f"grace.{DAEMON}.user.a_b._._._._"
    assert names.daemon_of(f"grace.{DAEMON}.daemon.heartbeat") == DAEMON
    assert names.daemon_of("grace.not-a-uuid.daemon.heartbeat") is None
    assert names.daemon_of(f"other.{DAEMON}.x") is None


def test_message_ids_are_unguessable_before_the_event_and_round_trip() -> None:
    import hashlib

    body = b'{"seq":42}'
    sha = hashlib.sha256(body).hexdigest()
    mid = names.msg_id("0123456789abcdef", 42, body)
    assert mid == f"0123456789abcdef:42:{sha}"  # the body's hash: not known in advance
    assert names.msg_id("0123456789abcdef", 42, b'{"seq":42} ') != mid
    assert names.parse_msg_id(mid) == ("0123456789abcdef", 42, sha)
    fresh = names.msg_id("0123456789abcdef", 42, body, "00ff")
    assert fresh == mid + ":00ff" and names.parse_msg_id(fresh) == ("0123456789abcdef", 42, sha)
    for bad in (None, "", "k:1", "0123456789abcdef:1", "0123456789abcdef:0:" + sha,
                "0123456789abcdef:-1:" + sha, "0123456789ABCDEF:1:" + sha,
                "0123456789abcdef:1:" + sha[:-1], "0123456789abcdef:1:" + sha + ":"):
        assert names.parse_msg_id(bad) is None, bad


def _chain(signer: Signer, n: int, first_topic: str = "daemon.started") -> list[tuple[str, bytes]]:
    out, prev = [], GENESIS_PREV
    for seq in range(1, n + 1):
        topic = first_topic if seq == 1 else "daemon.heartbeat"
        payload = {"host": "web1", "version": "0.1.0"} if seq == 1 else {"interval": 5}
        ev = signer.make_event(seq=seq, ts=1_800_000_000.0 + seq, topic=topic,
                               payload=payload, prev=prev)
        prev = ev.hash
        out.append((names.subject_for(DAEMON, topic), ev.text.encode()))
    return out


def _view(signer: Signer, messages: list[tuple[str, bytes]]) -> FleetView:
    view = FleetView({DAEMON: signer.public_key}, clock=lambda: 1_800_000_100.0)
    for subject, data in messages:
        view.add(subject, data)
    view.settle()
    view.finish()
    return view


def test_events_stored_out_of_order_and_copies_still_verify() -> None:
    signer = Signer(nacl.signing.SigningKey.generate())
    msgs = _chain(signer, 6)
    stored = [msgs[0], msgs[3], msgs[4], msgs[1], msgs[2], msgs[5], msgs[2]]
    host = _view(signer, stored).hosts[DAEMON]
    assert host.violation is None and host.verified == "ok"
    assert (host.first_seq, host.last_seq, host.events, host.copies) == (1, 6, 6, 1)
    assert host.host == "web1"


def test_a_dropped_event_a_forgery_and_a_misfiled_event_are_reported() -> None:
    signer = Signer(nacl.signing.SigningKey.generate())
    msgs = _chain(signer, 5)
    gap = _view(signer, msgs[:2] + msgs[3:]).hosts[DAEMON]
    assert gap.violation is not None and gap.violation.code == ExitCode.CHAIN_BROKEN
    assert gap.violation.seq == 4

    # Injected messages (anyone on NATS can publish) are rejected and reported; the
    # host's own events still verify.
    attacker = Signer(nacl.signing.SigningKey.generate())
    forged = _chain(attacker, 6)[5]
    lying = forged[1].replace(attacker.kid.encode(), signer.kid.encode())
    host = _view(signer, [*msgs, (forged[0], lying)]).hosts[DAEMON]
    assert host.violation is None and host.events == 5
    assert host.rejection is not None and host.rejection.seq == 6
    assert host.rejection.code == ExitCode.BAD_SIGNATURE
    assert host.rejection.reason == "forged (bad signature)"

    misfiled = _view(signer, [*msgs, (f"grace.{DAEMON}.mission.opened", msgs[-1][1])])
    assert misfiled.hosts[DAEMON].violation is None and misfiled.hosts[DAEMON].events == 5
    assert "filed under subject" in str(misfiled.hosts[DAEMON].rejection)

    other = str(uuid.uuid4())
    unknown = FleetView({}, require_keys=True)
    unknown.add(f"grace.{other}.daemon.started", msgs[0][1])
    assert unknown.hosts[other].violation is not None


def _steps_chain(signer: Signer, steps: list[tuple[str, dict[str, object]]],
                 t0: float = 1_800_000_000.0) -> list[tuple[str, bytes]]:
    """These (topic, payload) signed in a chain from genesis, a second apart from t0."""
    out, prev = [], GENESIS_PREV
    for seq, (topic, payload) in enumerate(steps, 1):
        ev = signer.make_event(seq=seq, ts=t0 + seq, topic=topic, payload=payload, prev=prev)
        prev = ev.hash
        out.append((names.subject_for(DAEMON, topic), ev.text.encode()))
    return out


def _mission_chain(signer: Signer) -> list[tuple[str, bytes]]:
    """started, heartbeat, mission 1 awaiting approval, heartbeat, heartbeat."""
    steps: list[tuple[str, dict[str, object]]] = [
        ("daemon.started", {"host": "web1", "version": "0.1.0"}),
        ("daemon.heartbeat", {"interval": 5, "host": "web1"}),
        ("mission.opened", {"id": 1, "state": "awaiting_approval", "severity": "high"}),
        ("daemon.heartbeat", {"interval": 5, "host": "web1"}),
        ("daemon.heartbeat", {"interval": 5, "host": "web1"})]
    return _steps_chain(signer, steps, 1_800_000_090.0)


def test_one_injected_message_does_not_blind_the_view_to_a_host() -> None:
    """A copy of one of the host's events, re-numbered and signed by another key, stored
    first at a seq the host also used, or far ahead: reported as forged (exit 10), once
    per host, and the host's heartbeat, missions and liveness still come from its own
    verified events."""
    import json

    signer = Signer(nacl.signing.SigningKey.generate())
    attacker = Signer(nacl.signing.SigningKey.generate())
    msgs = _mission_chain(signer)
    for seq, kid in ((5, attacker.kid), (10_000, signer.kid)):
        copy = json.loads(msgs[2][1])
        copy.update(seq=seq, topic="mission.resolved", kid=kid,
                    payload={**copy["payload"], "state": "resolved"})
        ev = attacker.make_event(seq=seq, ts=1_800_000_099.0, topic="mission.resolved",
                                 payload=copy["payload"], prev=copy["prev"])
        body = ev.text.replace(attacker.kid, kid).encode()
        view = _view(signer, [(names.subject_for(DAEMON, "mission.resolved"), body),
                              *msgs])
        host = view.hosts[DAEMON]
        assert host.violation is None, host.violation
        assert (host.events, host.rejected) == (5, 1)
        assert host.rejection is not None and host.rejection.seq == seq
        assert host.rejection.code == ExitCode.BAD_SIGNATURE
        assert "forged" in str(host.rejection)
        assert host.last_heartbeat == 1_800_000_095.0
        assert host.state(1_800_000_100.0) == "up"
        assert host.missions[1]["state"] == "awaiting_approval"
        # Stopped (SIGSTOP) after that: its heartbeat ages, and it is STALE, not up.
        assert host.state(1_800_000_200.0) == "STALE"


def test_a_host_without_a_verified_heartbeat_is_never_shown_up() -> None:
    signer = Signer(nacl.signing.SigningKey.generate())
    msgs = _mission_chain(signer)
    started = _view(signer, msgs[:1]).hosts[DAEMON]
    assert started.last_heartbeat is None and started.state(1_800_000_100.0) == "unknown"
    broken = _view(signer, msgs[:1] + msgs[2:]).hosts[DAEMON]  # seq 2 dropped
    assert broken.violation is not None and broken.state(1_800_000_100.0) == "FAILED"


def test_hosts_are_found_by_id_prefix_or_name() -> None:
    signer = Signer(nacl.signing.SigningKey.generate())
    view = _view(signer, _chain(signer, 2))
    assert resolve_host(view.hosts, "web1").daemon_id == DAEMON
    assert resolve_host(view.hosts, DAEMON[:8]).daemon_id == DAEMON
    try:
        resolve_host(view.hosts, "db9")
    except LookupError as exc:
        assert "no host" in str(exc)
    else:
        raise AssertionError("an unknown host was found")


def test_the_fleet_is_a_component_whose_health_is_published() -> None:
    from graced.integration import changes, snapshot

    base = {"detectors": {}, "notifiers": {}, "journal": {}, "executor": {}, "wire": {}}
    assert "fleet" not in snapshot(**base)  # no [fleet]: no component
    up = snapshot(**base, fleet={"connected": True, "lag_events": 0, "acked_seq": 9,
                                 "last_error": "an old error"})
    down = snapshot(**base, fleet={"connected": False, "lag_events": 40, "acked_seq": 9,
                                   "last_error": "ConnectionRefusedError"})
    assert up["fleet"]["state"] == "up" and up["fleet"]["last_error"] is None
    assert down["fleet"]["last_error"] == "ConnectionRefusedError"
    assert [(c["component"], c["was"], c["state"]) for c in changes(up, down)] == [
        ("fleet", "up", "disconnected")]


def test_json_output_escapes_control_and_bidi_characters() -> None:
    from gracectl.fleetview import dumps

    text = dumps({"host": "web\u009b2J\u202eevil", "ok": "é"})
    assert text.isascii() and "\\u009b" in text and "\\u202e" in text
    import json

    assert json.loads(text)["host"] == "web\u009b2J\u202eevil"


def test_a_fleet_pin_never_becomes_the_key_for_a_daemons_knowledge(
        tmp_path: object, monkeypatch: object) -> None:
    """A key pinned by gracectl fleet trust came by NATS: knowledge import does not take it."""
    import pytest

    from gracectl import trust

    assert isinstance(monkeypatch, pytest.MonkeyPatch)
    monkeypatch.setenv("GRACE_KNOWN_KEYS", f"{tmp_path}/known_keys.json")
    key = Signer(nacl.signing.SigningKey.generate()).public_key
    trust.pin(f"fleet:{DAEMON}", key, DAEMON)
    assert trust.pinned(f"fleet:{DAEMON}") == key
    assert trust.pinned_for_daemon(DAEMON) is None
    trust.pin("unix:/run/graced.sock", key, DAEMON)  # pinned over its socket: taken
    assert trust.pinned_for_daemon(DAEMON) == key


def test_one_hosts_flood_fails_that_host_only(monkeypatch: object) -> None:
    import pytest

    from gracectl import fleetview

    assert isinstance(monkeypatch, pytest.MonkeyPatch)
    signer = Signer(nacl.signing.SigningKey.generate())
    msgs = _chain(signer, 4)
    monkeypatch.setattr(fleetview, "MAX_HOST_BYTES", sum(len(d) for _, d in msgs[:3]))
    monkeypatch.setattr(fleetview, "MAX_HOSTS", 2)
    other = str(uuid.uuid4())
    view = FleetView({DAEMON: signer.public_key, other: signer.public_key},
                     clock=lambda: 1_800_000_100.0)
    for subject, data in msgs:  # the fourth goes over the byte limit
        view.add(subject, data)
    for subject, data in msgs[:2]:
        view.add(subject.replace(DAEMON, other), data)
    view.add(f"grace.{uuid.uuid4()}.daemon.started", msgs[0][1])  # a third host: foreign
    view.settle()
    view.finish()
    flooded, fine = view.hosts[DAEMON], view.hosts[other]
    assert flooded.violation is not None and "held for this host" in str(flooded.violation)
    assert fine.violation is None and fine.events == 2 and fine.verified == "ok"
    assert len(view.hosts) == 2 and view.foreign == 1


def test_a_host_whose_history_starts_after_genesis_is_partial() -> None:
    signer = Signer(nacl.signing.SigningKey.generate())
    host = _view(signer, _chain(signer, 5)[2:]).hosts[DAEMON]
    assert host.violation is None and host.first_seq == 3
    assert host.verified.startswith("partial: verified from seq 3")


def test_hosts_with_no_key_pinned_share_one_memory_limit(monkeypatch: object) -> None:
    import pytest

    from gracectl import fleetview

    assert isinstance(monkeypatch, pytest.MonkeyPatch)
    signer = Signer(nacl.signing.SigningKey.generate())
    msgs = _chain(signer, 3)
    monkeypatch.setattr(fleetview, "MAX_UNPINNED_BYTES", sum(len(d) for _, d in msgs) + 10)
    made_up = [str(uuid.uuid4()) for _ in range(2)]
    view = FleetView({DAEMON: signer.public_key}, clock=lambda: 1_800_000_100.0)
    for host in [*made_up, DAEMON]:  # the second made-up host goes over the shared limit
        for subject, data in msgs:
            view.add(subject.replace(DAEMON, host), data)
    view.settle()
    view.finish()
    first, second = (view.hosts[h] for h in made_up)
    assert first.violation is None and first.events == 3
    assert second.violation is not None and "not read further" in str(second.violation)
    assert view.hosts[DAEMON].verified == "ok" and view.hosts[DAEMON].events == 3
    assert view.unpinned_bytes == 0  # all released once settled


def test_fleet_tables_fit_the_terminal_and_tell_same_named_hosts_apart() -> None:
    """As missions ls: cut with … to the width, the reason (or the verification) on a line
    of its own, nothing cut when --wide (width None); a daemon-id prefix tells two hosts
    named alike apart."""
    from gracectl.fleet import hosts_table, missions_table

    signer = Signer(nacl.signing.SigningKey.generate())
    view = _view(signer, _mission_chain(signer))
    host = view.hosts[DAEMON]
    twin = str(uuid.uuid4())
    rows = [{"host": "web1", "daemon_id": d, "verified": True, "id": 1, "severity": "high",
             "state": "awaiting_approval", "detector": "queue",
             "subject": "/var/lib/a/very/long/path/to/the/queue/file", "opened_at": 0,
             "summary": "queue /var/lib/a/very/long/path/to/the/queue/file at 700.0, above "
                        "the threshold 100.0"} for d in (DAEMON, twin)]
    for text in (hosts_table([host], 1_800_000_100.0, 72),
                 missions_table(rows, 1_800_000_100.0, 72)):
        assert all(len(line) <= 72 for line in text.splitlines()), text
        assert "…" in text, text
    spilled = missions_table(rows, 1_800_000_100.0, 72).splitlines()
    assert spilled[3] == "    at 700.0, above the threshold 100.0", spilled
    assert DAEMON[:8] in spilled[2] and twin[:8] in spilled[4], spilled
    whole = missions_table(rows, 1_800_000_100.0, None)
    assert "/var/lib/a/very/long/path/to/the/queue/file" in whole and "…" not in whole
    assert DAEMON in hosts_table([host], 1_800_000_100.0, None)


def test_the_fleet_frame_counts_hosts_and_puts_approvals_first() -> None:
    """top --fleet's frame (pure): the header counts hosts by state and the open
    missions; a mission awaiting approval of a pinned host is listed, an unpinned
    host's is not (said instead); STALE turns the header to an alert, a failed chain to
    an alarm; text from the hosts is escaped."""
    from gracectl.fleettop import render
    from gracectl.top import plain

    signer = Signer(nacl.signing.SigningKey.generate())
    view = _view(signer, _mission_chain(signer))
    other = str(uuid.uuid4())
    stranger = Signer(nacl.signing.SigningKey.generate())
    ev = stranger.make_event(seq=1, ts=1_800_000_091.0, topic="mission.opened",
                             payload={"id": 9, "state": "awaiting_approval",
                                      "severity": "critical", "summary": "\x1b[2Jwipe"},
                             prev=GENESIS_PREV)
    view.add(names.subject_for(other, "mission.opened"), ev.text.encode())
    view.settle()
    frame = render(view, 120, 40, 1_800_000_100.0)
    text = plain(frame, 120)
    assert frame[0][1][1] == "header", frame[0]
    assert "2 hosts: 1 unknown, 1 up" in text and "1 open mission, 1 awaiting approval" in text
    missions = text.split("missions open")[1]
    assert "web1" in missions and "awaiting_approval" in missions
    assert "wipe" not in missions and "1 host with no key pinned" in text
    assert "\x1b" not in text
    assert frame[-1][0][0].startswith(" q quit")
    assert render(view, 120, 40, 1_800_000_300.0)[0][1][1] == "header_alert"  # STALE
    short = render(view, 120, 5, 1_800_000_100.0)
    assert len(short) == 5 and short[-1][0][0].startswith(" q quit")
    broken = _view(signer, _mission_chain(signer)[:1] + _mission_chain(signer)[2:])
    assert render(broken, 120, 40, 1_800_000_100.0)[0][1][1] == "alarm"


def test_a_reads_consumer_is_replicated_as_the_stream_once_a_peer_is_lost() -> None:
    """nats-server 2.9 may place an R1 consumer on a stream peer that was killed a moment
    ago; its creation is then never answered (a third of the reads after a node of a
    3-node cluster died, measured in session 10). While every peer is current a read's
    consumer is R1 (milliseconds to make); once one is not, it has the stream's copies."""
    from nats.js import api

    from gracectl.fleet import consumer_replicas, stream_replicas

    def info(replicas: int, *peers: tuple[bool, bool | None]) -> api.StreamInfo:
        return api.StreamInfo.from_response({
            "config": {"name": "GRACE", "num_replicas": replicas},
            "state": {"messages": 0, "bytes": 0, "first_seq": 0, "last_seq": 0,
                      "consumer_count": 0},
            "cluster": {"name": "grace", "leader": "n2", "replicas": [
                {"name": f"n{i}", "current": current, "offline": offline, "active": 0}
                for i, (current, offline) in enumerate(peers, 3)]}})

    assert consumer_replicas(info(3, (True, None), (True, None))) == 1
    assert consumer_replicas(info(3, (True, None), (False, None))) == 3
    assert consumer_replicas(info(3, (True, None), (True, True))) == 3
    assert consumer_replicas(info(1)) == 1  # one server: no peers
    assert stream_replicas(info(5, (True, None))) == 5


def test_open_missions_and_escalated_ones_are_counted_as_the_host_counts_them() -> None:
    """As the host's status and missions ls: an escalated mission needs a person until
    the host sees its symptom normal (its detector.recovered, or a heartbeat whose
    escalated list no longer names it: a restart or a reload released it with no
    event); an interrupted one is still active; the counts agree with the heartbeat's."""
    from gracectl.fleet import hosts_table
    from gracectl.fleetview import ACTIVE, in_view
    from graced.missions.engine import ACTIVE as HOST_ACTIVE

    assert ACTIVE == HOST_ACTIVE
    signer = Signer(nacl.signing.SigningKey.generate())

    def mission(mid: int, state: str, severity: str, detector: str) -> dict[str, object]:
        return {"id": mid, "state": state, "severity": severity, "detector": detector,
                "subject": "s"}

    beat = {"interval": 5, "host": "web1", "open_missions": 2}
    steps: list[tuple[str, dict[str, object]]] = [
        ("daemon.started", {"host": "web1", "version": "0.1.0"}),
        ("mission.opened", mission(13, "open", "high", "a")),
        ("mission.escalated", mission(13, "escalated", "high", "a")),
        ("mission.opened", mission(15, "open", "medium", "b")),
        ("mission.interrupted", mission(16, "interrupted", "low", "c")),
        ("mission.opened", mission(17, "open", "high", "d")),
        ("mission.escalated", mission(17, "escalated", "high", "d")),
        ("mission.expired", mission(18, "expired", "medium", "e")),  # nobody decided
        ("daemon.heartbeat", {**beat, "escalated": [13, 17], "expired": [18]}),
    ]
    host = _view(signer, _steps_chain(signer, steps)).hosts[DAEMON]
    assert host.open_missions() == {"medium": 1, "low": 1}
    assert sum(host.open_missions().values()) == host.open_reported
    assert host.escalated() == [13, 17] and host.waiting("expired") == [18]
    assert sorted(i for i, m in host.missions.items() if in_view(m)) == [13, 15, 16, 17, 18]
    assert "1 medium, 1 low; 2 escalated; 1 expired" in hosts_table(
        [host], 1_800_000_010.0, None)
    # #13's symptom clears: the host says detector.recovered for its detector and subject.
    steps.append(("detector.recovered", {"detector": "a", "subject": "s", "value": 1}))
    host = _view(signer, _steps_chain(signer, steps)).hosts[DAEMON]
    assert host.escalated() == [17] and not in_view(host.missions[13])
    assert host.public(1_800_000_010.0)["escalated"] == [17]
    # A recovery of another subject releases nothing; a heartbeat that no longer names
    # #17 (released with no event, as by a reload that dropped its detector) does.
    steps.append(("detector.recovered", {"detector": "d", "subject": "t", "value": 1}))
    assert _view(signer, _steps_chain(signer, steps)).hosts[DAEMON].escalated() == [17]
    steps.append(("daemon.heartbeat", {**beat, "escalated": [], "expired": [18]}))
    host = _view(signer, _steps_chain(signer, steps)).hosts[DAEMON]
    assert host.escalated() == [] and host.missions[17]["state"] == "escalated"
    assert host.public(1_800_000_010.0)["expired"] == [18]
    # The expired one's symptom seen normal: released as the host releases it.
    steps.append(("detector.recovered", {"detector": "e", "subject": "s", "value": 1}))
    host = _view(signer, _steps_chain(signer, steps)).hosts[DAEMON]
    assert host.waiting("expired") == [] and not in_view(host.missions[18])
    # A heartbeat with no list (an older graced, or more than it lists) releases nothing.
    older = [*steps[:-2], ("daemon.heartbeat", beat)]
    host = _view(signer, _steps_chain(signer, older)).hosts[DAEMON]
    assert host.escalated() == [17] and host.waiting("expired") == [18]
