"""One hop's codec: a message (plus opaque onion bytes) to a frame payload and back, sealed or not.

Every party of a session speaks through a codec with one interface:

    seal(msg, onion=b"") -> bytes        the payload of one frame to send
    open(frame) -> (msg, onion)          the message in a received frame, and the bytes after it

`Plain` is the plaintext protocol (a `protocol.messages` encoding, never an onion). `Sealed` seals
with one direction's key and opens with the other's (protocol/crypto.py); its payload is

    u32 length | message | onion (opaque: the layers for the hops after this one, or empty)

The client's end of a hop (c2p out, p2c in), the peer's (p2c out, c2p in), a push link (one way)
and an onion layer (one hop's instructions) are all `Sealed`. `ClientHop` adds the handshake: the
first frame it seals, the Open, is the sealed OPEN frame. `PeerHop.accept` is the peer's side of it.

Knows messages and keys; nothing about streams, sessions, models or who owns what.
"""

from __future__ import annotations

import secrets
import struct

from . import crypto
from . import messages as m
from .crypto import Envelope, OpenKey, SealError, SealKey, StaticKey, Type

MAX_ELEMENTS = 1 << 26  # largest tensor a codec decodes unless told otherwise (as `messages.decode`)
_LEN = struct.Struct(">I")


def pack(message: bytes, rest: bytes | memoryview = b"") -> bytes:
    """A sealed payload: the message's length, the message, then `rest` (an onion layer, or nothing)."""
    return _LEN.pack(len(message)) + message + bytes(rest)


def unpack(data: bytes | memoryview) -> tuple[memoryview, memoryview]:
    data = memoryview(data)
    if len(data) < _LEN.size:
        raise SealError("sealed payload is too short")
    (n,) = _LEN.unpack(data[:_LEN.size])
    if _LEN.size + n > len(data):
        raise SealError("sealed payload announces more bytes than it has")
    return data[_LEN.size:_LEN.size + n], data[_LEN.size + n:]


class Plain:
    """The plaintext protocol: what `--insecure` clients, Info requests and refusals of strangers use."""

    sealed = False

    def __init__(self, max_elements: int = MAX_ELEMENTS):
        self.max_elements = max_elements

    def seal(self, msg: m.Message, onion: bytes | memoryview = b"") -> bytes:
        if len(onion):
            raise ValueError("a plaintext frame carries no onion layer")
        return m.encode(msg)

    def open(self, frame: bytes | memoryview) -> tuple[m.Message, memoryview]:
        if crypto.is_envelope(frame):
            raise SealError("a sealed frame where a plaintext one was expected")
        return m.decode(frame, self.max_elements), memoryview(b"")


class Sealed:
    """Seals with `send` and opens with `recv` (either may be missing: a one-way link or onion layer)."""

    sealed = True

    def __init__(self, send: SealKey | None = None, recv: OpenKey | None = None, max_elements: int = MAX_ELEMENTS):
        self.send, self.recv, self.max_elements = send, recv, max_elements

    def seal(self, msg: m.Message, onion: bytes | memoryview = b"") -> bytes:
        if self.send is None:
            raise SealError("no key to seal frames in this direction")
        payload = pack(m.encode(msg), onion)
        return self.send.seal_onion(payload) if self.send.kind == Type.ONION else self.send.seal(payload)

    def open(self, frame: bytes | memoryview | Envelope) -> tuple[m.Message, memoryview]:
        """Authenticate (SealError, ReplayError), then decode (ProtocolError); a refused frame changes nothing."""
        if self.recv is None:
            raise SealError("a sealed frame from a direction this side has no key for")
        if self.recv.kind == Type.ONION:
            return self.read(self.recv.open_onion(frame))
        return self.read(self.recv.open(frame if isinstance(frame, Envelope) else crypto.parse_envelope(frame)))

    def read(self, payload: bytes | memoryview, max_elements: int | None = None) -> tuple[m.Message, memoryview]:
        """The message and onion in an authenticated payload."""
        inner, rest = unpack(payload)
        return m.decode(inner, self.max_elements if max_elements is None else max_elements), rest


class ClientHop(Sealed):
    """The client's end of a sealed hop to the peer whose X25519 key is `static`.

    The first frame it seals must be the hop's Open: that frame is the handshake (a fresh ephemeral
    key), and from then on frames go out under c2p and come in under p2c; `onion` seals this hop's
    instructions for the previous peers to carry. A plaintext frame on a sealed hop can only be an
    Error (a refusal of something that did not authenticate); it opens marked "(unauthenticated)".
    """

    def __init__(self, static: bytes, session: str):
        super().__init__()
        self.static, self.channel = static, bytes.fromhex(session)
        self.onion: Sealed | None = None

    def seal(self, msg: m.Message, onion: bytes | memoryview = b"") -> bytes:
        if self.send is not None:
            return super().seal(msg, onion)
        if not isinstance(msg, m.Open):
            raise SealError("a sealed hop begins with its Open")
        keys, frame = crypto.client_handshake(self.static, self.channel, pack(m.encode(msg), onion))
        self.send, self.recv, self.onion = keys.c2p, keys.p2c, Sealed(keys.onion)
        return frame

    def open(self, frame: bytes | memoryview) -> tuple[m.Message, memoryview]:
        if crypto.is_envelope(frame):
            return super().open(frame)
        msg, rest = Plain(self.max_elements).open(frame)
        if not isinstance(msg, m.Error):
            raise SealError(f"a plaintext {type(msg).__name__} on a sealed session")
        msg.message = f"(unauthenticated) {msg.message}"
        return msg, rest


class PeerHop(Sealed):
    """The peer's end of a sealed hop: p2c out, c2p in; `onion` opens this hop's own instructions."""

    def __init__(self, keys: crypto.SessionKeys, max_elements: int):
        super().__init__(keys.p2c, keys.c2p, max_elements)
        self.onion = Sealed(recv=keys.onion, max_elements=0)  # a Control carries no tensor

    @classmethod
    def accept(cls, static: StaticKey, env: Envelope, max_elements: int = MAX_ELEMENTS) -> tuple[PeerHop, bytes]:
        """The hop a client's OPEN frame starts (SealError unless it authenticates), and that frame's payload
        (for `read`)."""
        keys, payload = static.accept(env)
        return cls(keys, max_elements), payload


def link_secret() -> str:
    """A fresh push-link secret (hex), which the client puts in both neighbours' sealed Opens."""
    return secrets.token_hex(crypto.KEY_LEN)


def link(secret: str, session: str, max_elements: int = MAX_ELEMENTS) -> tuple[Sealed, Sealed]:
    """(sending end, receiving end) of the push link into `session` (the next hop's), from its hex secret."""
    out, into = crypto.link_keys(bytes.fromhex(secret), bytes.fromhex(session))
    return Sealed(send=out), Sealed(recv=into, max_elements=max_elements)


Codec = Plain | Sealed
