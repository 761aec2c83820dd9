"""Who may call which method: roles, signed requests and what refusals cost.

A request is *signed* when it carries ``auth`` (see docs/protocol.md): the signature
covers the request, the signer's key id, a timestamp and the daemon's id, so a
captured request is useless against another daemon. A signed request is accepted
once: its ``KID:nonce`` is remembered (in memory for reads, for as long as the
request window; durably for approvals, by :mod:`graced.api`).

Roles: ``read`` (the stream, missions, detectors, status, knowledge) and ``control``
(read, plus approve, reject, pause, resume, emit). Over TCP nothing but ``hello`` is
served without a signature by a key that holds the role; over the Unix socket the
peer's uid decides as before (root and the daemon's own user control).

Refusals of unauthenticated requests are never journaled: they are counted and
logged, at most :data:`LOG_BURST` lines per :data:`LOG_PERIOD` seconds.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from . import keys
from .protocol import check_signature, key_id
from .protocol.wire import Request, request_signing_bytes

log = logging.getLogger("graced.auth")

READ, CONTROL = "read", "control"
RANK = {None: 0, READ: 1, CONTROL: 2}
LOG_BURST = 10
LOG_PERIOD = 60.0
MAX_NONCES = 100_000  # remembered in memory; older ones fall out (the window refuses them)


class AuthError(Exception):
    """A signed request that cannot be accepted; the message says why (for the client)."""


def parse_keys(lines: list[str], where: str) -> dict[str, bytes]:
    """``{kid: public key}`` from config lines; unparsable ones are logged and skipped."""
    out: dict[str, bytes] = {}
    for line in lines:
        try:
            public = keys.parse_public_key(line)
        except ValueError:
            log.warning("ignoring a key in %s that cannot be parsed: %r", where, line[:60])
            continue
        out[key_id(public)] = public
    return out


class Authenticator:
    """Checks signed requests against the configured keys and their roles."""

    def __init__(self, daemon_id: str, clock: Callable[[], float] = time.time) -> None:
        self.daemon_id = daemon_id
        self.clock = clock
        self.window = 60.0
        self.roles: dict[str, str] = {}
        self.keys: dict[str, bytes] = {}
        self._nonces: OrderedDict[str, float] = OrderedDict()

    def configure(self, *, read_keys: list[str], control_keys: list[str],
                  authorized_keys: list[str], window: float) -> None:
        """Take the keys and their roles from the config (at start and on reload)."""
        roles: dict[str, str] = {}
        found: dict[str, bytes] = {}
        for lines, where, role in ((read_keys, "[remediation] read_keys", READ),
                                   (control_keys, "[remediation] control_keys", CONTROL),
                                   (authorized_keys, "[remediation] authorized_keys", CONTROL)):
            for kid, public in parse_keys(lines, where).items():
                found[kid] = public
                if RANK[role] > RANK[roles.get(kid)]:
                    roles[kid] = role
        self.keys, self.roles, self.window = found, roles, window

    def verify(self, req: Request) -> tuple[str, str]:
        """``(kid, role)`` of a signed request; raises :class:`AuthError`."""
        kid = self.screen(req)
        nonce_key = f"{kid}:{req.nonce}"
        if nonce_key in self._nonces:
            raise AuthError("replayed request: its nonce was used before")
        self._remember(nonce_key, self.clock())
        return kid, self.roles[kid]

    def screen(self, req: Request) -> str:
        """The signer's kid if the signed request passes every check but its nonce's
        (a key with a role, this daemon, signature, freshness); raises
        :class:`AuthError`. Changes nothing, so any thread may call it: the fleet's
        NATS thread screens requests with it before they wait for trio."""
        auth = req.auth
        assert auth is not None
        kid = auth["kid"]
        public = self.keys.get(kid)
        if public is None:
            raise AuthError(f"key {kid} is not in [remediation] read_keys, control_keys "
                            "or authorized_keys")
        if auth.get("daemon") != self.daemon_id:
            raise AuthError(f"the request is bound to daemon {auth.get('daemon')!r}, "
                            f"not this one ({self.daemon_id})")
        data = request_signing_bytes(req.id, req.nonce, req.method, req.params, auth["ts"],
                                     kid, auth["daemon"])
        if not check_signature({"sig": auth["sig"]}, public, data=data):
            raise AuthError("bad signature on the request")
        now = self.clock()
        skew = now - float(auth["ts"])
        if abs(skew) > self.window:
            raise AuthError(f"stale request: its timestamp is {skew:.0f} s off "
                            f"(window {self.window:g} s)")
        return str(kid)

    def _remember(self, nonce_key: str, now: float) -> None:
        """Keep nonces while a request carrying them could still be fresh; no longer."""
        nonces = self._nonces
        nonces[nonce_key] = now
        horizon = now - 2 * self.window
        while nonces and (len(nonces) > MAX_NONCES or next(iter(nonces.values())) < horizon):
            nonces.popitem(last=False)

    @property
    def nonces_held(self) -> int:
        return len(self._nonces)


class LogBudget:
    """At most :data:`LOG_BURST` log lines per :data:`LOG_PERIOD` seconds of one kind; the
    rest are counted, and their number logged when the next period starts."""

    def __init__(self, what: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.what, self.clock = what, clock
        self.suppressed = 0
        self._window_start = -LOG_PERIOD
        self._logged = 0

    def allow(self) -> bool:
        """Whether one more line may be logged now."""
        now = self.clock()
        if now - self._window_start >= LOG_PERIOD:
            if self.suppressed:
                log.warning("%d more %s were not logged", self.suppressed, self.what)
            self._window_start, self._logged, self.suppressed = now, 0, 0
        if self._logged < LOG_BURST:
            self._logged += 1
            return True
        self.suppressed += 1
        return False


class PerKeyBudget:
    """At most ``burst`` events per key (a uid, an address) per ``period`` seconds; the
    rest are counted, and the count handed to the next one allowed. At most ``keys``
    keys are tracked at once (the oldest window is forgotten first)."""

    def __init__(self, burst: int = LOG_BURST, period: float = LOG_PERIOD,
                 clock: Callable[[], float] = time.monotonic, keys: int = 4096) -> None:
        self.burst, self.period, self.clock, self.max_keys = burst, period, clock, keys
        # key -> [window start, taken in the window, not taken since the last taken]
        self._windows: OrderedDict[Any, list[float]] = OrderedDict()

    def take(self, key: Any) -> int | None:
        """None when ``key`` is over its budget (counted); else how many were refused
        for it since the last one taken (0 usually)."""
        now = self.clock()
        w = self._windows.get(key)
        if w is None or now - w[0] >= self.period:
            skipped = int(w[2]) if w is not None else 0
            w = [now, 0.0, float(skipped)]
            self._windows[key] = w
            self._windows.move_to_end(key)
            while len(self._windows) > self.max_keys:
                self._windows.popitem(last=False)
        if w[1] >= self.burst:
            w[2] += 1
            return None
        w[1] += 1
        skipped, w[2] = int(w[2]), 0.0
        return skipped


class Refusals:
    """Counts refused requests and logs them without letting a flood fill the log."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.total = 0
        self._budget = LogBudget("refused requests", clock)

    @property
    def suppressed(self) -> int:
        return self._budget.suppressed

    def refuse(self, peer: str, method: str, reason: str) -> None:
        self.total += 1
        if self._budget.allow():
            log.warning("refused %s from %s: %s", _short(method), peer, _short(reason))

    def status(self) -> dict[str, Any]:
        return {"refused": self.total}


def _short(text: str, limit: int = 200) -> str:
    text = text.encode("unicode_escape").decode("ascii")
    return text if len(text) <= limit else text[:limit] + "…"
