"""The daemon's Ed25519 key: created on first start, refused if exposed or invalid.

Files in the state dir: ``key`` (the 32-byte seed, base64, mode 0600) and
``key.pub`` (``ed25519 <base64 public key> <key id>``, mode 0644).
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
from pathlib import Path

from .errors import StateError
from .protocol import Signer, key_id
from .safefiles import write_new

KEY_FILE = "key"
PUB_FILE = "key.pub"


def format_public_key(public_key: bytes) -> str:
    return f"ed25519 {base64.b64encode(public_key).decode()} {key_id(public_key)}\n"


def parse_public_key(text: str) -> bytes:
    """Read a public key: the ``key.pub`` format, or bare base64 or hex of 32 bytes."""
    for token in text.split():
        for decode in (lambda t: base64.b64decode(t, validate=True), bytes.fromhex):
            try:
                raw = decode(token)
            except (ValueError, binascii.Error):
                continue
            if len(raw) == 32:
                return raw
    raise ValueError("no Ed25519 public key found (expected 'ed25519 BASE64 KEYID')")


def _write_private(path: Path, seed: bytes) -> None:
    write_new(path, base64.b64encode(seed) + b"\n", 0o600)


def _write_public(path: Path, public_key: bytes) -> None:
    write_new(path, format_public_key(public_key).encode(), 0o644)


def load_or_create(state_dir: Path) -> tuple[Signer, bool]:
    """Return the daemon's signer and whether the key was created just now.

    Raises :class:`StateError` if the key file is readable by group or others, not
    owned by this user, or not a valid key. An existing key is never overwritten.
    """
    import nacl.signing  # here: gracectl imports this module for parse_public_key alone

    path = state_dir / KEY_FILE
    created = False
    try:
        st = path.stat()
    except FileNotFoundError:
        seed = nacl.signing.SigningKey.generate().encode()
        _write_private(path, seed)
        st = path.stat()
        created = True
    if not stat.S_ISREG(st.st_mode):
        raise StateError(f"key file {path} is not a regular file")
    if st.st_mode & 0o077:
        raise StateError(
            f"key file {path} is readable by group or others (mode "
            f"{stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {path}"
        )
    if st.st_uid != os.geteuid():
        raise StateError(f"key file {path} is owned by uid {st.st_uid}, not by this user")
    try:
        raw = base64.b64decode(path.read_bytes().strip(), validate=True)
        if len(raw) != 32:
            raise ValueError(f"{len(raw)} bytes, expected 32")
        signing_key = nacl.signing.SigningKey(raw)
    except (ValueError, binascii.Error) as exc:
        raise StateError(f"key file {path} is not a valid Ed25519 key ({exc})") from None
    signer = Signer(signing_key)
    pub = state_dir / PUB_FILE
    expected = format_public_key(signer.public_key)
    try:
        current = pub.read_text()
    except OSError:
        current = ""
    if current != expected:
        _write_public(pub, signer.public_key)
    return signer, created
