"""Request and response frames on the wire (sans-IO).

A client sends ``{"id": ID, "nonce": NONCE, "method": NAME, "params": {...}}`` as a
text message. The daemon answers with a signed response frame that echoes both::

    {"type": "response", "id": ID, "nonce": NONCE, "ok": true, "result": {...},
     "ts": ..., "kid": ..., "sig": ...}
    {"type": "response", "id": ID, "nonce": NONCE, "ok": false,
     "error": {"code": "bad_request", "message": "..."}, "ts": ..., "kid": ..., "sig": ...}

Events are sent as the bare signed event object (it has no ``type`` field); notices
(for example why the daemon is closing the connection) are ``{"type": "notice", ...}``.
One WebSocket text message carries one or more frames separated by a newline.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from .canonical import canonical_bytes
from .verify import ExitCode

ERROR_EXIT = {
    "bad_request": ExitCode.ERROR,
    "unknown_method": ExitCode.ERROR,
    "too_large": ExitCode.ERROR,
    "internal": ExitCode.ERROR,
    "unavailable": ExitCode.ERROR,
    "not_authorised": ExitCode.NOT_AUTHORISED,
    "not_found": ExitCode.NOT_FOUND,
    "not_waiting": ExitCode.NOT_WAITING,
    "invalid": ExitCode.ERROR,
    "plan_changed": ExitCode.ERROR,
    "bad_signature": ExitCode.BAD_SIGNATURE,
    "key_changed": ExitCode.BAD_SIGNATURE,
    "clearing": ExitCode.ERROR,
    "pruned": ExitCode.PRUNED,
}

# A stream closed because its key lost the read role (a reload revoked it): not
# authorised, not a fault of the stream (WebSocket close codes 4000-4999 are the
# application's).
CLOSE_REVOKED = 4003

MAX_NONCE = 128
MAX_ID = 128
MAX_DEPTH = 32
KID = re.compile(r"[0-9a-f]{16}")

# A lone surrogate in a decoded request comes from a \uD800-\uDFFF escape (or, in text
# not read from a WebSocket frame, from the character itself).
_MAYBE_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]|[\ud800-\udfff]")
_SURROGATE = re.compile("[\ud800-\udfff]")


class RequestError(Exception):
    """A request the daemon refuses; carries the wire error code."""

    def __init__(self, code: str, message: str, req_id: Any = None, nonce: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.req_id = req_id
        self.nonce = nonce


@dataclass(frozen=True)
class Request:
    id: int | str
    nonce: str
    method: str
    params: dict[str, Any] = field(default_factory=dict)
    auth: dict[str, Any] | None = None
    # Set by the daemon once ``auth`` is verified: the signer's key id and its role.
    kid: str | None = None
    role: str | None = None


def request_signing_bytes(req_id: Any, nonce: str, method: str, params: dict[str, Any],
                          ts: float, kid: str, daemon: str) -> bytes:
    """What a client signs to authenticate a request (see docs/protocol.md).

    ``daemon`` is the id of the daemon the request is meant for (``hello`` tells it), so
    a captured request cannot be replayed to another daemon.
    """
    return canonical_bytes({"id": req_id, "nonce": nonce, "method": method, "params": params,
                            "ts": ts, "kid": kid, "daemon": daemon})


def not_utf8(obj: Any, where: str = "params") -> str | None:
    """Where a string in ``obj`` (a decoded JSON value: keys and values) has no UTF-8
    form, or None when every one has.

    Such a string (a lone surrogate: a ``\\uDCFF`` escape, or a byte that was not UTF-8
    in a command line argument, which Python decodes to U+DC80-U+DCFF) can be neither
    signed nor journaled: canonical JSON is UTF-8. A request holding one is refused
    before anything is stored or queued, and gracectl refuses to send one.
    """
    stack: list[tuple[Any, str]] = [(obj, where)]
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            bad = _SURROGATE.search(item)
            if bad:
                code = ord(bad.group())
                what = (f"byte 0x{code - 0xDC00:02X}" if 0xDC80 <= code <= 0xDCFF
                        else f"a lone surrogate U+{code:04X}")
                return f"{path} is not valid UTF-8 ({what})"
        elif isinstance(item, dict):
            for k, v in item.items():
                key = f"{path}.{k}" if isinstance(k, str) and k.isidentifier() else path
                stack.append((v, key))
                stack.append((k, f"a key in {path}"))
        elif isinstance(item, (list, tuple)):
            stack.extend((v, f"{path}[{i}]") for i, v in enumerate(item))
    return None


def _depth(obj: Any, limit: int) -> int:
    """Nesting depth of a decoded JSON value, stopping once past ``limit``."""
    stack: list[tuple[Any, int]] = [(obj, 1)]
    deepest = 0
    while stack:
        item, d = stack.pop()
        deepest = max(deepest, d)
        if deepest > limit:
            return deepest
        if isinstance(item, dict):
            stack.extend((v, d + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, d + 1) for v in item)
    return deepest


def parse_request(message: str | bytes, max_bytes: int) -> Request:
    """Decode and validate one request; raises :class:`RequestError`."""
    if isinstance(message, bytes):
        raise RequestError("bad_request", "binary frames are not accepted; send JSON text")
    if len(message) > max_bytes or len(message.encode("utf-8", "surrogatepass")) > max_bytes:
        raise RequestError("too_large", f"request larger than {max_bytes} bytes")
    try:
        obj = json.loads(message)
    except (ValueError, RecursionError) as exc:
        raise RequestError("bad_request", f"invalid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise RequestError("bad_request", "a request must be a JSON object")
    req_id = obj.get("id")
    nonce = obj.get("nonce")
    if not (isinstance(req_id, str) and len(req_id) <= MAX_ID) and not (
        isinstance(req_id, int) and not isinstance(req_id, bool) and abs(req_id) < 2**53
    ):
        raise RequestError("bad_request", "field 'id' must be an integer or a short string")
    if not isinstance(nonce, str) or not 1 <= len(nonce) <= MAX_NONCE:
        raise RequestError(
            "bad_request", f"field 'nonce' must be a string of 1-{MAX_NONCE} characters", req_id
        )
    if _MAYBE_SURROGATE.search(message) and (not_utf8(req_id, "id") or not_utf8(nonce, "nonce")):
        # Not echoed: the answer, which echoes both, could not be signed.
        raise RequestError("bad_request", "fields 'id' and 'nonce' must be valid UTF-8")
    method = obj.get("method")
    if not isinstance(method, str):
        raise RequestError("bad_request", "field 'method' must be a string", req_id, nonce)
    params = obj.get("params", {})
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise RequestError("bad_request", "field 'params' must be an object", req_id, nonce)
    if _depth(params, MAX_DEPTH) > MAX_DEPTH:
        raise RequestError("bad_request", f"params nested deeper than {MAX_DEPTH}", req_id, nonce)
    if _MAYBE_SURROGATE.search(message):
        # Refused here, for every method: a string with no UTF-8 form can reach neither
        # a signature nor the journal (a topic or a comment held one wedged the journal).
        why = not_utf8(method, "method") or not_utf8(params)
        if why:
            raise RequestError("bad_request", why, req_id, nonce)
    extra = sorted(set(obj) - {"id", "nonce", "method", "params", "auth"})
    if extra:
        raise RequestError(
            "bad_request", "unexpected field(s): " + ", ".join(extra), req_id, nonce
        )
    auth = obj.get("auth")
    if auth is not None and not (
        isinstance(auth, dict) and set(auth) == {"kid", "ts", "sig", "daemon"}
        and isinstance(auth["kid"], str) and KID.fullmatch(auth["kid"])
        and isinstance(auth["sig"], str) and len(auth["sig"]) == 88
        and isinstance(auth["daemon"], str) and len(auth["daemon"]) <= MAX_ID
        and isinstance(auth["ts"], (int, float)) and not isinstance(auth["ts"], bool)
        and math.isfinite(auth["ts"])
    ):
        raise RequestError("bad_request", "field 'auth' must be {kid (16 hex digits), ts, "
                           "sig (base64 of 64 bytes), daemon}", req_id, nonce)
    return Request(id=req_id, nonce=nonce, method=method, params=params, auth=auth)


def response(req_id: Any, nonce: Any, ts: str, result: Any) -> dict[str, Any]:
    return {"type": "response", "id": req_id, "nonce": nonce, "ok": True,
            "result": result, "ts": ts}


def error_response(req_id: Any, nonce: Any, ts: str, code: str, message: str) -> dict[str, Any]:
    return {"type": "response", "id": req_id, "nonce": nonce, "ok": False,
            "error": {"code": code, "message": message}, "ts": ts}


def notice(ts: str, code: str, message: str) -> dict[str, Any]:
    return {"type": "notice", "code": code, "message": message, "ts": ts}


def loopback_host(host: str) -> bool:
    """Is ``host`` a loopback name or address? Plain ``ws://``/``http://`` is used only
    there: graced's TCP listener without TLS, and the ``gracectl web`` relay."""
    if host == "localhost":
        return True
    import ipaddress  # here: gracectl over its Unix socket never needs it

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
