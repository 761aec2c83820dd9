"""The wire format shared by graced and gracectl: canonical JSON, signing, verification.

Imports no trio: everything here takes values and returns values.
"""

from .canonical import CanonicalError, canonical_bytes, canonical_text
from .signing import (
    EVENT_FIELDS,
    GENESIS_PREV,
    PROTOCOL_VERSION,
    SignedEvent,
    Signer,
    check_signature,
    event_hash,
    format_ts,
    key_id,
    parse_ts,
    signing_bytes,
    verify_detached,
    well_formed_event,
)
from .verify import ChainVerifier, ExitCode, Violation, parse_anchor, parse_event_line

__all__ = [
    "EVENT_FIELDS",
    "GENESIS_PREV",
    "PROTOCOL_VERSION",
    "CanonicalError",
    "ChainVerifier",
    "ExitCode",
    "SignedEvent",
    "Signer",
    "Violation",
    "canonical_bytes",
    "canonical_text",
    "check_signature",
    "event_hash",
    "format_ts",
    "key_id",
    "parse_anchor",
    "parse_event_line",
    "parse_ts",
    "signing_bytes",
    "verify_detached",
    "well_formed_event",
]
