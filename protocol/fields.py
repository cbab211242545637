"""Checks for the fields of a message header: each returns the value or raises `ProtocolError(BAD_REQUEST)`.

Every header comes from the network: types, ranges and lengths are checked here before anything is built
from them. Knows JSON values and error codes; nothing of messages' meaning, models or sockets.
"""

from __future__ import annotations

import math

MAX_INT = 2**31 - 1
SESSION_ID_LEN = 32  # hex characters of a random 128-bit id


class ErrorCode:
    BAD_REQUEST = "bad_request"
    VERSION = "unsupported_version"
    UNKNOWN_SESSION = "unknown_session"
    CACHE_FULL = "cache_full"
    BAD_STEP = "bad_step"
    TOO_MANY_SESSIONS = "too_many_sessions"
    TOO_LONG = "too_long"  # past the model's context or the session's length; the message ends "(N > M)"
    NEXT_HOP = "next_hop_failed"
    INTERNAL = "internal"
    BAD_SEAL = "bad_seal"  # a sealed frame failed authentication or is malformed
    REPLAYED = "replayed"  # a sealed frame's counter is not above the last accepted one
    ENCRYPTION_REQUIRED = "encryption_required"
    NO_ENCRYPTION = "no_encryption"  # the peer offers no signed X25519 key (the client refuses it)
    BAD_IDENTITY = "bad_identity"  # the peer's X25519 key is not signed by the peer id the client dialled
    NO_HEAD = "no_head"  # asked to verify at a peer that does not hold the LM head (or is not the last hop)
    BAD_CHECK = "bad_check"  # a round's drafts or draft distributions do not fit the step or the vocabulary
    TIMEOUT = "timeout"  # client-side, never sent: a peer did not answer in time
    DISCONNECTED = "disconnected"  # client-side, never sent: a peer's connection was lost


class ProtocolError(ValueError):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def bad(msg: str) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_REQUEST, msg)


def int_field(h: dict, key: str, lo: int = 0, hi: int = MAX_INT, optional: bool = False):
    v = h.get(key)
    if v is None and optional:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise bad(f"field {key!r} must be an integer in [{lo}, {hi}], got {v!r}")
    return v


def str_field(h: dict, key: str, max_len: int = 512, optional: bool = False):
    v = h.get(key)
    if v is None and optional:
        return None
    if not isinstance(v, str) or len(v) > max_len:
        raise bad(f"field {key!r} must be a string of at most {max_len} characters")
    return v


def session_field(h: dict, key: str = "session") -> str:
    v = str_field(h, key, SESSION_ID_LEN)
    if len(v) != SESSION_ID_LEN or any(c not in "0123456789abcdef" for c in v):
        raise bad(f"field {key!r} must be {SESSION_ID_LEN} lowercase hex characters")
    return v


def int_list(h: dict, key: str, lo: int, hi: int, max_len: int, optional: bool = True):
    v = h.get(key)
    if v is None and optional:
        return None
    if not isinstance(v, list) or len(v) > max_len:
        raise bad(f"field {key!r} must be a list of at most {max_len} integers")
    for x in v:
        if not isinstance(x, int) or isinstance(x, bool) or not lo <= x <= hi:
            raise bad(f"field {key!r} holds {x!r}, outside [{lo}, {hi}]")
    return v


def hex_field(h: dict, key: str, length: int, optional: bool = True):
    v = str_field(h, key, length, optional)
    if v is not None and (len(v) != length or any(c not in "0123456789abcdef" for c in v)):
        raise bad(f"field {key!r} must be {length} lowercase hex characters")
    return v


def is_tcp_addr(v) -> bool:
    """'tcp://HOST:PORT' with a port in 1..65535 (what peers offer as their direct address)."""
    if not isinstance(v, str) or not v.startswith("tcp://") or len(v) > 256:
        return False
    host, sep, port = v[6:].rpartition(":")
    return bool(sep and host and port.isdigit() and port.isascii() and 0 < int(port) < 65536)


def span_field(h: dict, key: str = "blocks") -> tuple[int, int]:
    v = int_list(h, key, 0, 1 << 20, 2, optional=False)
    if len(v) != 2 or v[0] >= v[1]:
        raise bad(f"field {key!r} must be [start, end) with start < end")
    return v[0], v[1]


def float_field(h: dict, key: str, lo: float, hi: float, optional: bool = False):
    v = h.get(key)
    if v is None and optional:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
        raise bad(f"field {key!r} must be a finite number in [{lo}, {hi}], got {v!r}")
    return float(v)


def bool_field(h: dict, key: str, default: bool = False) -> bool:
    v = h.get(key, default)
    if not isinstance(v, bool):
        raise bad(f"field {key!r} must be true or false")
    return v
