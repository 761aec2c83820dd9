"""Pinned daemon keys, as ssh's known_hosts: ``~/.config/grace/known_keys.json``.

Keyed by endpoint (socket path or URL). A key seen for the first time is pinned; a
different key for a pinned endpoint is refused until the operator replaces it.
"""

from __future__ import annotations

import base64
import json
import os
import stat
import time
from pathlib import Path
from typing import Any

from graced.paths import client_config_dir
from graced.protocol import ExitCode, Signer, key_id

from .errors import CtlError

MAX_FILE = 16 << 20  # bytes read of a key or known keys file at most


def store_path() -> Path:
    explicit = os.environ.get("GRACE_KNOWN_KEYS")
    return Path(explicit) if explicit else client_config_dir() / "known_keys.json"


def _read_checked(path: Path, what: str, forbidden: int, fix: str) -> bytes:
    """The bytes of ``path`` (a symlink's target too), refused as ssh does when a mode
    bit in ``forbidden`` is set or another user than this one (or root) owns it.
    Raises FileNotFoundError when it does not exist, ValueError naming it otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise ValueError(f"{path}: cannot read {what}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{path}: {what} is not a regular file")
        if st.st_uid not in (os.geteuid(), 0):
            raise ValueError(f"{path}: {what} belongs to uid {st.st_uid}, not to this user: "
                             "refusing it")
        if st.st_mode & forbidden:
            raise ValueError(f"{path}: {what} has mode {stat.S_IMODE(st.st_mode):04o}: "
                             f"refusing it ({fix} {path})")
        return fh.read(MAX_FILE + 1)[:MAX_FILE]


def _load() -> dict[str, Any]:
    path = store_path()
    try:
        # Whoever may write it may make gracectl trust any key.
        text = _read_checked(path, "the known keys file", 0o022, "chmod go-w")
        data = json.loads(text)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ValueError(str(exc) if str(exc).startswith(str(path)) else
                         f"{path}: unreadable known keys file: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: unreadable known keys file: not a JSON object")
    return data


class BadPin(CtlError, ValueError):
    """A pin that exists but cannot be read: never a reason to trust whatever key the
    daemon offers (exit 10, a key problem)."""

    code = ExitCode.BAD_SIGNATURE


def _entry_key(name: str, entry: Any) -> bytes:
    """The key of the pin ``name``; :class:`BadPin` naming the file and the endpoint
    when it is not a 32-byte Ed25519 public key in base64."""
    raw = _raw_key(entry)
    if raw is None:
        path = store_path()
        raise BadPin(f"{path}: the key pinned for {name[:200]} is unreadable (not an "
                     "Ed25519 public key in base64): refusing to trust any key for it; "
                     "mend or remove that entry, or pin again with 'gracectl keys trust "
                     "--replace'")
    return raw


def pinned(endpoint: str) -> bytes | None:
    """The key pinned for ``endpoint``, None when there is none; :class:`BadPin` when
    there is one that cannot be read."""
    data = _load()
    if endpoint not in data:
        return None
    return _entry_key(endpoint, data[endpoint])


def pin(endpoint: str, public_key: bytes, daemon_id: str = "") -> None:
    data = _load()
    data[endpoint] = {
        "public_key": base64.b64encode(public_key).decode(),
        "kid": key_id(public_key),
        "daemon_id": daemon_id,
        "pinned_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    path = store_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # two first uses at once: each its own
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def client_key_path() -> Path:
    explicit = os.environ.get("GRACE_CLIENT_KEY")
    return Path(explicit) if explicit else client_config_dir() / "client.key"


def load_client_key() -> Signer | None:
    """This user's own signing key (``gracectl keys generate``), if there is one."""
    path = client_key_path()
    try:
        # A private key others may read is no longer this user's alone (ssh's
        # "UNPROTECTED PRIVATE KEY FILE").
        text = _read_checked(path, "private key", 0o077, "chmod 600")
    except FileNotFoundError:
        return None
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except ValueError as exc:
        raise ValueError(f"{path}: unreadable client key: {exc}") from None
    if len(raw) != 32:
        raise ValueError(f"{path}: not an Ed25519 key")
    import nacl.signing

    return Signer(nacl.signing.SigningKey(raw))


def generate_client_key(force: bool) -> tuple[Path, Signer]:
    import nacl.signing

    path = client_key_path()
    if path.exists() and not force:
        raise FileExistsError(str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    seed = nacl.signing.SigningKey.generate().encode()
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, base64.b64encode(seed) + b"\n")
    finally:
        os.close(fd)
    os.replace(tmp, path)
    signer = Signer(nacl.signing.SigningKey(seed))
    pub = path.with_name(path.name + ".pub")
    pub.write_text(f"ed25519 {base64.b64encode(signer.public_key).decode()} {signer.kid}\n")
    return path, signer


def _raw_key(entry: Any) -> bytes | None:
    try:
        raw = base64.b64decode(entry["public_key"], validate=True)
    except (KeyError, TypeError, ValueError):
        return None
    return raw if len(raw) == 32 else None


KNOWLEDGE = "knowledge:"  # known_keys entries pinned for a daemon id's exports


FLEET = "fleet:"  # a key pinned by gracectl fleet trust, for the fleet view only


def pinned_for_daemon(daemon_id: str) -> bytes | None:
    """The key trusted for exports of a daemon id: the one pinned for that id (at its
    first import), else the one pinned for every endpoint that said it is that daemon
    (its socket or URL; never a fleet pin, whose key came by NATS).
    Raises ValueError when endpoints pinned different keys for the same id: a daemon id
    is a name anyone can claim, so neither is trusted; :class:`BadPin` when one of those
    pins cannot be read."""
    if not daemon_id:
        return None
    data = _load()
    if KNOWLEDGE + daemon_id in data:
        return _entry_key(KNOWLEDGE + daemon_id, data[KNOWLEDGE + daemon_id])
    found = {}
    for name, entry in data.items():
        if isinstance(entry, dict) and entry.get("daemon_id") == daemon_id \
                and not name.startswith((KNOWLEDGE, FLEET)):
            found[_entry_key(name, entry)] = name
    if len(found) > 1:
        raise ValueError(f"endpoints {', '.join(sorted(found.values()))} pinned different "
                         f"keys for daemon id {daemon_id}: pass --key FILE with the right one")
    return next(iter(found), None)


def pin_for_daemon(daemon_id: str, public_key: bytes) -> None:
    """Pin the key trusted for a daemon id's exports (see :func:`pinned_for_daemon`)."""
    pin(KNOWLEDGE + daemon_id, public_key, daemon_id)
