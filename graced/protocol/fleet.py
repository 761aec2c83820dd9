"""Names on NATS JetStream for the fleet (sans-IO): subjects, message ids, buckets.

Each graced forwards every signed event, byte for byte, to the subject
``grace.<daemon-id>.<topic>`` with the header ``Nats-Msg-Id: <kid>:<seq>:<sha256>``
(the SHA-256 of the message body, the signed event), so that JetStream drops a copy sent
twice (after a reconnect or a restart) within its duplicate window. Message ids are
stream-wide: an id anyone could compute before the event exists (``<kid>:<seq>``) would
let any publisher make JetStream drop the host's real event as a "duplicate".

A topic's tokens are mapped to what a NATS subject allows (a ``user.*`` topic
may hold anything): each token keeps ``[A-Za-z0-9_-]`` and every other character becomes
``_``; an empty token becomes ``_``. The event itself, in the message body, keeps its
real topic: a subject only routes.

Requests (``fleet approve``) go to ``grace-rpc.<daemon-id>`` by request/reply: the body
is the same JSON request a client sends over the WebSocket, the reply the same signed
response frame. That subject is outside the stream's ``grace.>``, so nothing a client
asks is stored.
"""

from __future__ import annotations

import hashlib
import re
import uuid

PREFIX = "grace"
RPC_PREFIX = "grace-rpc"
DEFAULT_STREAM = "GRACE"
KNOWLEDGE_BUCKET = "grace-knowledge"
MSG_ID_HEADER = "Nats-Msg-Id"

_TOKEN_BAD = re.compile(r"[^A-Za-z0-9_-]")
_MSG_ID = re.compile(r"([0-9a-f]{16}):([1-9][0-9]{0,18}):([0-9a-f]{64})(?::[0-9a-f]{1,32})?")


def valid_daemon_id(daemon_id: str) -> bool:
    """A daemon id as graced makes them (a UUID): safe as one subject token."""
    try:
        return str(uuid.UUID(daemon_id)) == daemon_id
    except ValueError:
        return False


def subject_token(text: str) -> str:
    return _TOKEN_BAD.sub("_", text) or "_"


def subject_for(daemon_id: str, topic: str) -> str:
    """The subject an event of ``topic`` from ``daemon_id`` is published on."""
    tokens = [subject_token(t) for t in topic.split(".")]
    return ".".join([PREFIX, daemon_id, *tokens])


def host_filter(daemon_id: str = "*", topic: str = ">") -> str:
    """A subject filter: one host's (or every host's) events of a topic pattern."""
    return f"{PREFIX}.{daemon_id}.{topic}"


def rpc_subject(daemon_id: str) -> str:
    return f"{RPC_PREFIX}.{daemon_id}"


def msg_id(kid: str, seq: int, body: bytes, resend: str = "") -> str:
    """The message id of an event: unguessable before the event exists. ``resend`` (hex)
    makes a fresh id for an event JetStream dropped as a copy of a message that was not
    this one."""
    tail = f":{resend}" if resend else ""
    return f"{kid}:{seq}:{hashlib.sha256(body).hexdigest()}{tail}"


def parse_msg_id(value: str | None) -> tuple[str, int, str] | None:
    """``(kid, seq, sha256)`` of a message id graced set, or None for anything else."""
    m = _MSG_ID.fullmatch(value or "")
    return (m.group(1), int(m.group(2)), m.group(3)) if m else None


def daemon_of(subject: str) -> str | None:
    """The daemon id a forwarded event's subject names, if it is one."""
    parts = subject.split(".", 2)
    if len(parts) < 3 or parts[0] != PREFIX or not valid_daemon_id(parts[1]):
        return None
    return parts[1]
