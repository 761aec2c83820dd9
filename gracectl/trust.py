"""Pinned daemon keys, as ssh's known_hosts: ``~/.config/grace/known_keys.json``.

Keyed by endpoint (socket path or URL). A key seen for the first time is pinned; a
different key for a pinned endpoint is refused until the operator replaces it.
"""

from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path
from typing import Any

from graced.paths import client_config_dir
from graced.protocol import key_id


def store_path() -> Path:
    explicit = os.environ.get("GRACE_KNOWN_KEYS")
    return Path(explicit) if explicit else client_config_dir() / "known_keys.json"


def _load() -> dict[str, Any]:
    path = store_path()
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: unreadable known keys file: {exc}") from None
    return data if isinstance(data, dict) else {}


def pinned(endpoint: str) -> bytes | None:
    entry = _load().get(endpoint)
    if not isinstance(entry, dict):
        return None
    try:
        raw = base64.b64decode(entry["public_key"], validate=True)
    except (KeyError, ValueError):
        return None
    return raw if len(raw) == 32 else None


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
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
