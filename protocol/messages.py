"""Versioned messages between clients and peers, and their byte encoding.

A message is one frame payload:

    b"SS" | version u8 | kind u8 | header length u32 | header (UTF-8 JSON object) | tensor bytes

The JSON header holds the fields; a message that carries hidden states describes them in its
`tensor` field and its bytes follow the header. `decode` trusts nothing: every field's type and
range is checked (`protocol.fields`; a round's `Check` in `protocol.check`) and a violation raises
`ProtocolError` with the error code to reply with. Verification at the last peer adds `VerifyAt` to an
Open, a `Check` to a sampled round's Step (or the last hop's Control) and the `Verdict` reply.
Knows nothing about models or sockets.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from enum import IntEnum

import torch

from .check import MAX_CHECK_DRAFTS, MAX_Q_PAIRS, MAX_SEED, Check  # noqa: F401 - re-exported
from .fields import MAX_INT, SESSION_ID_LEN, ErrorCode, ProtocolError, is_tcp_addr  # noqa: F401 - re-exported
from .fields import bad as _bad
from .fields import bool_field, float_field
from .fields import hex_field as _hex
from .fields import int_field as _int
from .fields import int_list as _int_list
from .fields import session_field as _session
from .fields import span_field as _span
from .fields import str_field as _str
from .tensors import TensorFormatError, decode_tensor, encode_tensor

VERSION = 1
MAGIC = b"SS"
MAX_ARGMAX = 4096  # argmax entries a verdict carries (a step's last rows: all of a round's)
PREFIX = struct.Struct(">2sBBI")
MAX_HEADER = 64 * 1024
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
    VERDICT = 10  # a last peer that verifies rounds itself: its verdict instead of the hidden states


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
    head: bool = False  # it holds the final norm and LM head: sessions ending at its last block may verify there
    top_k: bool = False  # its verifier honours VerifyAt.top_k (a peer from before top-k does not say so)

    def header(self) -> dict:
        h = dict(model=self.model, blocks=list(self.blocks), num_blocks=self.num_blocks,
                 free_cache_tokens=self.free_cache_tokens, dtype=self.dtype)
        for key in ("data_addr", "x25519", "x25519_sig", "public_key", "head", "top_k"):
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
                   _hex(h, "x25519_sig", 128), _str(h, "public_key", 512, optional=True), bool_field(h, "head"),
                   bool_field(h, "top_k"))


@dataclass
class NextHop:
    """Where a peer pushes its output in push mode: the next peer (multiaddr) and its session."""

    addr: str
    session: str
    link: str | None = None  # sealed sessions: hex secret of the push link's key (the next hop gets it too)


@dataclass
class VerifyAt:
    """An Open's request that the last hop verify each round itself, with the client's sampling parameters."""

    temperature: float = 0.0  # 0: greedy (the verdict is the target's argmax after every node)
    top_p: float = 1.0
    # None: off, and then absent from the header, so a peer from before top-k reads the same Open. Such a peer
    # would ignore a "top_k" it does not know (parsers read only their own keys), so a client sends top-k only to
    # a peer whose InfoReply says it honours it (`InfoReply.top_k`), and verifies the rounds itself otherwise.
    top_k: int | None = None

    def header(self) -> dict:
        h = {"temperature": self.temperature, "top_p": self.top_p}
        if self.top_k is not None:
            h["top_k"] = self.top_k
        return h

    @classmethod
    def parse(cls, h):
        if not isinstance(h, dict):
            raise _bad("field 'verify' must be an object")
        top_p = float_field(h, "top_p", 0.0, 1.0)
        if top_p <= 0:
            raise _bad("field 'top_p' must be in (0, 1]")
        return cls(float_field(h, "temperature", 0.0, 1000.0), top_p, _int(h, "top_k", 1, MAX_INT, optional=True))


@dataclass
class Open:
    KIND = Kind.OPEN
    session: str
    max_length: int
    blocks: tuple[int, int]
    wire_dtype: str = "float32"
    next: NextHop | None = None  # None: results come back to the opener (client-mediated or last hop)
    prev_link: str | None = None  # sealed sessions in push mode: hex secret of the link from the previous hop
    verify: VerifyAt | None = None  # the last hop verifies rounds itself and answers with Verdicts

    def header(self) -> dict:
        h = dict(session=self.session, max_length=self.max_length, blocks=list(self.blocks), wire_dtype=self.wire_dtype)
        if self.next:
            h["next"] = {"addr": self.next.addr, "session": self.next.session}
            if self.next.link:
                h["next"]["link"] = self.next.link
        if self.prev_link:
            h["prev_link"] = self.prev_link
        if self.verify is not None:
            h["verify"] = self.verify.header()
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
        verify = VerifyAt.parse(h["verify"]) if h.get("verify") is not None else None
        return cls(_session(h), _int(h, "max_length", 1), _span(h), wire, nxt, _hex(h, "prev_link", 64), verify)


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
    check: Check | None = None  # a sampled round, for a last hop that verifies it (rides along in plain push)

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
        check = Check.parse(h["check"]) if h.get("check") is not None else None
        return cls(_session(h), _int(h, "step"), _int(h, "start"), tensor, parents, compact, None, check)


def _layout_header(msg) -> dict:
    """Header of a message that carries a step's layout (Step, Control)."""
    h = dict(session=msg.session, step=msg.step, start=msg.start)
    if msg.parents is not None:
        h["parents"] = list(msg.parents)
    if msg.compact is not None:
        h["compact"] = {"start": msg.compact[0], "path": list(msg.compact[1])}
    if msg.check is not None:
        h["check"] = msg.check.header()
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
    check: Check | None = None  # the last hop's, when it verifies rounds (sealed for it alone)

    def header(self) -> dict:
        return _layout_header(self)

    @classmethod
    def parse(cls, h, tensor):
        if tensor is not None:
            raise _bad("a control message carries no tensor")
        step = Step.parse(h, torch.empty(0))
        return cls(step.session, step.step, step.start, step.parents, step.compact, step.check)


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
class Verdict:
    """A verifying last hop's answer to a step: the target's argmax after each of its last rows (all of a round's)
    and, for a sampled round (a Step with a check), the accepted path of node indices and the token after it."""

    KIND = Kind.VERDICT
    session: str
    step: int
    argmax: list[int]
    path: list[int] | None = None
    token: int | None = None

    def header(self) -> dict:
        h = dict(session=self.session, step=self.step, argmax=list(self.argmax))
        if self.path is not None:
            h["path"], h["token"] = list(self.path), self.token
        return h

    @classmethod
    def parse(cls, h, tensor):
        if tensor is not None:
            raise _bad("a verdict carries no tensor")
        path = _int_list(h, "path", 0, MAX_CHECK_DRAFTS, MAX_CHECK_DRAFTS + 1)
        token = _int(h, "token", optional=path is None)
        if path is not None and (not path or path[0] != 0):
            raise _bad("field 'path' must start at node 0")
        return cls(_session(h), _int(h, "step"), _int_list(h, "argmax", 0, MAX_INT, MAX_ARGMAX, optional=False),
                   path, token if path is not None else None)


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


MESSAGES = {cls.KIND: cls for cls in (Info, InfoReply, Open, Opened, Step, Result, Close, Error, Control, Verdict)}
Message = Info | InfoReply | Open | Opened | Step | Result | Close | Error | Control | Verdict


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
