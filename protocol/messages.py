"""Versioned messages between clients and peers, and their byte encoding.

A message is one frame payload:

    b"SS" | version u8 | kind u8 | header length u32 | header (UTF-8 JSON object) | tensor bytes

The JSON header holds the fields; a message that carries hidden states describes them in its
`tensor` field and its bytes follow the header. `decode` trusts nothing: every field's type and
range is checked and a violation raises `ProtocolError` with the error code to reply with.
Knows nothing about models or sockets.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from enum import IntEnum

import torch

from .tensors import TensorFormatError, decode_tensor, encode_tensor

VERSION = 1
MAGIC = b"SS"
PREFIX = struct.Struct(">2sBBI")
MAX_HEADER = 64 * 1024
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
    TIMEOUT = "timeout"  # client-side, never sent: a peer did not answer in time
    DISCONNECTED = "disconnected"  # client-side, never sent: a peer's connection was lost


class ProtocolError(ValueError):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class Kind(IntEnum):
    INFO = 1
    INFO_REPLY = 2
    OPEN = 3
    OPENED = 4
    STEP = 5
    RESULT = 6
    CLOSE = 7
    ERROR = 8
    CONTROL = 9  # a hop's instructions for one push step, inside its onion layer


# --- field checks: each returns the value or raises ProtocolError(BAD_REQUEST) ----------------------

def _bad(msg: str) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_REQUEST, msg)


def _int(h: dict, key: str, lo: int = 0, hi: int = MAX_INT, optional: bool = False):
    v = h.get(key)
    if v is None and optional:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise _bad(f"field {key!r} must be an integer in [{lo}, {hi}], got {v!r}")
    return v


def _str(h: dict, key: str, max_len: int = 512, optional: bool = False):
    v = h.get(key)
    if v is None and optional:
        return None
    if not isinstance(v, str) or len(v) > max_len:
        raise _bad(f"field {key!r} must be a string of at most {max_len} characters")
    return v


def _session(h: dict, key: str = "session") -> str:
    v = _str(h, key, SESSION_ID_LEN)
    if len(v) != SESSION_ID_LEN or any(c not in "0123456789abcdef" for c in v):
        raise _bad(f"field {key!r} must be {SESSION_ID_LEN} lowercase hex characters")
    return v


def _int_list(h: dict, key: str, lo: int, hi: int, max_len: int, optional: bool = True):
    v = h.get(key)
    if v is None and optional:
        return None
    if not isinstance(v, list) or len(v) > max_len:
        raise _bad(f"field {key!r} must be a list of at most {max_len} integers")
    for x in v:
        if not isinstance(x, int) or isinstance(x, bool) or not lo <= x <= hi:
            raise _bad(f"field {key!r} holds {x!r}, outside [{lo}, {hi}]")
    return v


def _hex(h: dict, key: str, length: int, optional: bool = True):
    v = _str(h, key, length, optional)
    if v is not None and (len(v) != length or any(c not in "0123456789abcdef" for c in v)):
        raise _bad(f"field {key!r} must be {length} lowercase hex characters")
    return v


def is_tcp_addr(v) -> bool:
    """'tcp://HOST:PORT' with a port in 1..65535 (what peers offer as their direct address)."""
    if not isinstance(v, str) or not v.startswith("tcp://") or len(v) > 256:
        return False
    host, sep, port = v[6:].rpartition(":")
    return bool(sep and host and port.isdigit() and port.isascii() and 0 < int(port) < 65536)


def _span(h: dict, key: str = "blocks") -> tuple[int, int]:
    v = _int_list(h, key, 0, 1 << 20, 2, optional=False)
    if len(v) != 2 or v[0] >= v[1]:
        raise _bad(f"field {key!r} must be [start, end) with start < end")
    return v[0], v[1]


# --- messages ------------------------------------------------------------------------------------

@dataclass
class Info:
    KIND = Kind.INFO

    def header(self) -> dict:
        return {}

    @classmethod
    def parse(cls, h, tensor):
        return cls()


@dataclass
class InfoReply:
    KIND = Kind.INFO_REPLY
    model: str
    blocks: tuple[int, int]
    num_blocks: int
    free_cache_tokens: int
    dtype: str
    data_addr: str | None = None  # "tcp://host:port": a direct stream for inference traffic, if offered
    # encrypted sessions: the peer's X25519 key (hex), signed by its libp2p identity key (hex, serialized)
    x25519: str | None = None
    x25519_sig: str | None = None
    public_key: str | None = None

    def header(self) -> dict:
        h = dict(model=self.model, blocks=list(self.blocks), num_blocks=self.num_blocks,
                 free_cache_tokens=self.free_cache_tokens, dtype=self.dtype)
        for key in ("data_addr", "x25519", "x25519_sig", "public_key"):
            if getattr(self, key):
                h[key] = getattr(self, key)
        return h

    @classmethod
    def parse(cls, h, tensor):
        data_addr = _str(h, "data_addr", 256, optional=True)
        if data_addr is not None and not is_tcp_addr(data_addr):
            raise _bad("field 'data_addr' must be tcp://HOST:PORT")
        return cls(_str(h, "model"), _span(h), _int(h, "num_blocks", 1), _int(h, "free_cache_tokens"),
                   _str(h, "dtype", 16), data_addr, _hex(h, "x25519", 64),
                   _hex(h, "x25519_sig", 128), _str(h, "public_key", 512, optional=True))


@dataclass
class NextHop:
    """Where a peer pushes its output in push mode: the next peer (multiaddr) and its session."""

    addr: str
    session: str
    link: str | None = None  # sealed sessions: hex secret of the push link's key (the next hop gets it too)


@dataclass
class Open:
    KIND = Kind.OPEN
    session: str
    max_length: int
    blocks: tuple[int, int]
    wire_dtype: str = "float32"
    next: NextHop | None = None  # None: results come back to the opener (client-mediated or last hop)
    prev_link: str | None = None  # sealed sessions in push mode: hex secret of the link from the previous hop

    def header(self) -> dict:
        h = dict(session=self.session, max_length=self.max_length, blocks=list(self.blocks), wire_dtype=self.wire_dtype)
        if self.next:
            h["next"] = {"addr": self.next.addr, "session": self.next.session}
            if self.next.link:
                h["next"]["link"] = self.next.link
        if self.prev_link:
            h["prev_link"] = self.prev_link
        return h

    @classmethod
    def parse(cls, h, tensor):
        nxt = h.get("next")
        if nxt is not None:
            if not isinstance(nxt, dict):
                raise _bad("field 'next' must be an object")
            nxt = NextHop(_str(nxt, "addr", 1024), _session(nxt), _hex(nxt, "link", 64))
        wire = _str(h, "wire_dtype", 16)
        if wire not in ("float32", "float16", "bfloat16"):
            raise _bad(f"unsupported wire dtype {wire!r}")
        return cls(_session(h), _int(h, "max_length", 1), _span(h), wire, nxt, _hex(h, "prev_link", 64))


@dataclass
class Opened:
    KIND = Kind.OPENED
    session: str
    max_length: int

    def header(self) -> dict:
        return dict(session=self.session, max_length=self.max_length)

    @classmethod
    def parse(cls, h, tensor):
        return cls(_session(h), _int(h, "max_length", 1))


@dataclass
class Step:
    """Run `hidden` [n, d] at positions from `start` (a chain, or a tree given by `parents`).

    `compact` = (start, path) first keeps only an accepted path of the previous tree step.
    """

    KIND = Kind.STEP
    session: str
    step: int
    start: int
    hidden: torch.Tensor
    parents: list[int] | None = None
    compact: tuple[int, list[int]] | None = None
    wire_dtype: str | None = None

    def header(self) -> dict:
        return _layout_header(self)

    @classmethod
    def parse(cls, h, tensor):
        if tensor is None:
            raise _bad("a step must carry hidden states")
        parents = _int_list(h, "parents", -1, MAX_INT, 4096)
        compact = h.get("compact")
        if compact is not None:
            if not isinstance(compact, dict):
                raise _bad("field 'compact' must be an object")
            compact = (_int(compact, "start"), _int_list(compact, "path", 0, MAX_INT, 4096, optional=False))
        return cls(_session(h), _int(h, "step"), _int(h, "start"), tensor, parents, compact)


def _layout_header(msg) -> dict:
    """Header of a message that carries a step's layout (Step, Control)."""
    h = dict(session=msg.session, step=msg.step, start=msg.start)
    if msg.parents is not None:
        h["parents"] = list(msg.parents)
    if msg.compact is not None:
        h["compact"] = {"start": msg.compact[0], "path": list(msg.compact[1])}
    return h


@dataclass
class Control:
    """One hop's own instructions for a push step (its layout), sealed for it alone in an onion layer."""

    KIND = Kind.CONTROL
    session: str
    step: int
    start: int
    parents: list[int] | None = None
    compact: tuple[int, list[int]] | None = None

    def header(self) -> dict:
        return _layout_header(self)

    @classmethod
    def parse(cls, h, tensor):
        if tensor is not None:
            raise _bad("a control message carries no tensor")
        step = Step.parse(h, torch.empty(0))
        return cls(step.session, step.step, step.start, step.parents, step.compact)


@dataclass
class Result:
    KIND = Kind.RESULT
    session: str
    step: int
    hidden: torch.Tensor
    wire_dtype: str | None = None

    def header(self) -> dict:
        return dict(session=self.session, step=self.step)

    @classmethod
    def parse(cls, h, tensor):
        if tensor is None:
            raise _bad("a result must carry hidden states")
        return cls(_session(h), _int(h, "step"), tensor)


@dataclass
class Close:
    KIND = Kind.CLOSE
    session: str

    def header(self) -> dict:
        return dict(session=self.session)

    @classmethod
    def parse(cls, h, tensor):
        return cls(_session(h))


@dataclass
class Error:
    KIND = Kind.ERROR
    code: str
    message: str
    session: str | None = None
    step: int | None = None
    peer: str | None = field(default=None)  # which peer reports it (set by the sender)

    def header(self) -> dict:
        h = dict(code=self.code, message=self.message)
        for key in ("session", "step", "peer"):
            if getattr(self, key) is not None:
                h[key] = getattr(self, key)
        return h

    @classmethod
    def parse(cls, h, tensor):
        return cls(_str(h, "code", 64), _str(h, "message", 4096), _session(h) if h.get("session") is not None
                   else None, _int(h, "step", optional=True), _str(h, "peer", 256, optional=True))


MESSAGES = {cls.KIND: cls for cls in (Info, InfoReply, Open, Opened, Step, Result, Close, Error, Control)}
Message = Info | InfoReply | Open | Opened | Step | Result | Close | Error | Control


def encode(msg: Message) -> bytes:
    header = msg.header()
    tensor_bytes = b""
    hidden = getattr(msg, "hidden", None)
    if hidden is not None:
        header["tensor"], tensor_bytes = encode_tensor(hidden, getattr(msg, "wire_dtype", None))
    body = json.dumps(header, separators=(",", ":")).encode()
    return PREFIX.pack(MAGIC, VERSION, int(msg.KIND), len(body)) + body + tensor_bytes


def decode(data: bytes | bytearray | memoryview, max_elements: int = 1 << 26) -> Message:
    """Parse one frame payload. Raises ProtocolError (with the code to reply with) on anything malformed."""
    data = memoryview(data)
    if len(data) < PREFIX.size:
        raise _bad(f"message of {len(data)} bytes is shorter than its {PREFIX.size}-byte prefix")
    magic, version, kind, header_len = PREFIX.unpack(data[:PREFIX.size])
    if magic != MAGIC:
        raise _bad("not a specswarm message (bad magic)")
    if version != VERSION:
        raise ProtocolError(ErrorCode.VERSION, f"protocol version {version} is not supported (this peer speaks {VERSION})")
    if kind not in MESSAGES.keys():
        raise _bad(f"unknown message kind {kind}")
    if header_len > MAX_HEADER or PREFIX.size + header_len > len(data):
        raise _bad(f"header length {header_len} is out of bounds")
    try:
        header = json.loads(bytes(data[PREFIX.size:PREFIX.size + header_len]))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise _bad(f"header is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise _bad("header must be a JSON object")
    rest = data[PREFIX.size + header_len:]
    tensor = None
    if "tensor" in header:
        try:
            tensor = decode_tensor(header["tensor"], rest, max_elements)
        except TensorFormatError as e:
            raise _bad(str(e)) from None
    elif len(rest):
        raise _bad(f"{len(rest)} trailing bytes after a message without a tensor")
    msg = MESSAGES[Kind(kind)].parse(header, tensor)
    if tensor is not None and hasattr(msg, "wire_dtype"):
        msg.wire_dtype = header["tensor"]["dtype"]
    return msg
