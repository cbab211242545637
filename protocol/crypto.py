"""Per-hop end-to-end encryption: handshake, key derivation, sealed envelopes and onion layers.

Every peer has a static X25519 key for the life of its process, signed by its libp2p Ed25519
identity (`sign_static_key` / `verify_static_key`); the client checks that signature against the
peer id it dials before it trusts the key. Per session and hop the client makes an ephemeral
X25519 key, and both sides derive, with one HKDF-SHA256 over the shared secret:

    c2p    client -> peer, sent straight to the peer (Open, Step, Close)
    onion  client -> peer, carried through the previous peers (push mode: this hop's instructions)
    p2c    peer -> client (Opened, Result, Error)

(the OPEN frame is sealed with c2p's key under its own type and counter 0, a nonce no C2P frame uses).
A push link (peer i -> peer i+1) is sealed with a key derived from a random secret the client puts
in both peers' sealed Open messages. Each key has its own 64-bit counter: the nonce is the envelope
type, 3 zero bytes and the counter, so a key never seals two messages under one nonce. A receiver
authenticates a frame, then accepts it only if its counter is above the last one it accepted
(replays and reordering are refused); a refused frame changes nothing.

Envelope (one frame payload; the whole header is the AEAD's associated data):

    b"SE" | version u8 | type u8 | channel 16 bytes (the hop's session id) | counter u64
          | (type OPEN only: the client's ephemeral X25519 public key, 32 bytes) | ciphertext + tag

Onion layer (opaque bytes inside another message): counter u64 | ciphertext + tag, sealed with the
hop's onion key; the channel and type are bound through the associated data.

Seals and opens bytes: what a sealed payload holds (a message, then onion bytes) is
protocol/sealing.py's business. Knows nothing about sockets or models; libp2p is imported only to
check identity signatures.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .messages import ErrorCode, ProtocolError

MAGIC = b"SE"
VERSION = 1
ENVELOPE = struct.Struct(">2sBB16sQ")
ONION = struct.Struct(">Q")
KEY_LEN = 32
TAG_LEN = 16
MAX_COUNTER = 2**64 - 1
STATIC_KEY_DOMAIN = b"specswarm-x25519-static/1\n"  # what the libp2p key signs: domain + 32-byte key
SESSION_INFO = b"specswarm/1 session keys"
LINK_INFO = b"specswarm/1 push link"


class Type:
    OPEN = 1  # client -> peer, first message of a session (c2p key, counter 0, carries the ephemeral key)
    C2P = 2  # client -> peer
    P2C = 3  # peer -> client
    LINK = 4  # previous peer -> this peer (push mode)
    ONION = 5  # an onion layer (inside a LINK or C2P message, never a frame of its own)


TYPES = (Type.OPEN, Type.C2P, Type.P2C, Type.LINK)


class SealError(ProtocolError):
    """A sealed frame that is malformed, forged, tampered with, replayed or out of order."""

    def __init__(self, message: str, code: str = ErrorCode.BAD_SEAL):
        super().__init__(code, message)


class ReplayError(SealError):
    def __init__(self, message: str):
        super().__init__(message, ErrorCode.REPLAYED)


def is_envelope(data: bytes | bytearray | memoryview) -> bool:
    return bytes(data[:2]) == MAGIC


@dataclass
class Envelope:
    type: int
    channel: bytes  # 16 bytes: the session id of the hop it is for
    counter: int
    ephemeral: bytes | None  # OPEN only
    header: bytes  # everything before the ciphertext (the associated data)
    ciphertext: memoryview

    @property
    def session(self) -> str:
        return self.channel.hex()


def parse_envelope(data: bytes | bytearray | memoryview) -> Envelope:
    """Split a frame into its header fields and ciphertext; SealError if it cannot be one."""
    data = memoryview(data)
    if len(data) < ENVELOPE.size + TAG_LEN:
        raise SealError(f"sealed frame of {len(data)} bytes is too short")
    magic, version, kind, channel, counter = ENVELOPE.unpack(data[:ENVELOPE.size])
    if magic != MAGIC:
        raise SealError("not a sealed frame (bad magic)")
    if version != VERSION:
        raise SealError(f"sealed frame version {version} is not supported (this side speaks {VERSION})",
                        ErrorCode.VERSION)
    if kind not in TYPES:
        raise SealError(f"unknown sealed frame type {kind}")
    at, ephemeral = ENVELOPE.size, None
    if kind == Type.OPEN:
        if len(data) < at + KEY_LEN + TAG_LEN:
            raise SealError("sealed open frame is too short")
        ephemeral, at = bytes(data[at:at + KEY_LEN]), at + KEY_LEN
    return Envelope(kind, bytes(channel), counter, ephemeral, bytes(data[:at]), data[at:])


def _nonce(kind: int, counter: int) -> bytes:
    return bytes([kind, 0, 0, 0]) + counter.to_bytes(8, "big")


class SealKey:
    """The sending half of one direction: seals with a fresh counter each time."""

    def __init__(self, key: bytes, kind: int, channel: bytes, counter: int = 0):
        self.aead, self.kind, self.channel, self.counter = ChaCha20Poly1305(key), kind, channel, counter

    def _next(self) -> int:
        if self.counter >= MAX_COUNTER:
            raise SealError("counter exhausted: open a new session")
        self.counter += 1
        return self.counter

    def seal(self, plaintext: bytes, ephemeral: bytes | None = None) -> bytes:
        """A whole envelope. OPEN frames use counter 0 (the key's first), anything else counts up from 1."""
        counter = 0 if self.kind == Type.OPEN else self._next()
        header = ENVELOPE.pack(MAGIC, VERSION, self.kind, self.channel, counter) + (ephemeral or b"")
        return header + self.aead.encrypt(_nonce(self.kind, counter), plaintext, header)

    def seal_onion(self, plaintext: bytes) -> bytes:
        counter = self._next()
        head = ONION.pack(counter)
        aad = bytes([Type.ONION]) + self.channel + head
        return head + self.aead.encrypt(_nonce(Type.ONION, counter), plaintext, aad)


class OpenKey:
    """The receiving half of one direction: authenticates, then accepts only rising counters."""

    def __init__(self, key: bytes, kind: int, channel: bytes, last: int = 0):
        self.aead, self.kind, self.channel, self.last = ChaCha20Poly1305(key), kind, channel, last

    def _check(self, counter: int) -> None:
        if counter <= self.last:
            raise ReplayError(f"counter {counter} is not above {self.last}: a replayed or reordered frame")

    def open(self, env: Envelope) -> bytes:
        if env.type != self.kind or env.channel != self.channel:
            raise SealError("sealed frame of the wrong type or session for this key")
        try:
            plain = self.aead.decrypt(_nonce(env.type, env.counter), env.ciphertext, env.header)
        except InvalidTag:
            raise SealError("sealed frame failed authentication (tampered, or not for this session)") from None
        if env.type != Type.OPEN:  # authentic, but is it new?
            self._check(env.counter)
        self.last = env.counter
        return plain

    def open_onion(self, data: bytes | memoryview) -> bytes:
        data = memoryview(data)
        if len(data) < ONION.size + TAG_LEN:
            raise SealError(f"onion layer of {len(data)} bytes is too short")
        head = bytes(data[:ONION.size])
        (counter,) = ONION.unpack(head)
        aad = bytes([Type.ONION]) + self.channel + head
        try:
            plain = self.aead.decrypt(_nonce(Type.ONION, counter), data[ONION.size:], aad)
        except InvalidTag:
            raise SealError("onion layer failed authentication (tampered, or not for this session)") from None
        self._check(counter)
        self.last = counter
        return plain


# --- key agreement -----------------------------------------------------------------------------

def _hkdf(secret: bytes, salt: bytes | None, info: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(secret)


def _raw(pub: X25519PublicKey) -> bytes:
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _exchange(private: X25519PrivateKey, public: bytes) -> bytes:
    if len(public) != KEY_LEN:
        raise SealError(f"an X25519 public key has {KEY_LEN} bytes, not {len(public)}")
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError:  # a low-order point gives the all-zero secret
        raise SealError("degenerate X25519 public key") from None
    return shared


@dataclass
class SessionKeys:
    """One hop's keys, from one side's point of view (`client=True`: the client's)."""

    c2p: SealKey | OpenKey
    onion: SealKey | OpenKey
    p2c: SealKey | OpenKey
    first: SealKey | OpenKey  # the OPEN frame's: c2p's key under its own type, counter 0 (a nonce no C2P frame uses)

    @classmethod
    def derive(cls, shared: bytes, ephemeral: bytes, static: bytes, channel: bytes, client: bool) -> "SessionKeys":
        okm = _hkdf(shared, ephemeral + static, SESSION_INFO + channel, 3 * KEY_LEN)  # once per handshake
        c2p, onion, p2c = okm[:KEY_LEN], okm[KEY_LEN:2 * KEY_LEN], okm[2 * KEY_LEN:]
        if client:
            return cls(SealKey(c2p, Type.C2P, channel), SealKey(onion, Type.ONION, channel),
                       OpenKey(p2c, Type.P2C, channel), SealKey(c2p, Type.OPEN, channel))
        return cls(OpenKey(c2p, Type.C2P, channel), OpenKey(onion, Type.ONION, channel),
                   SealKey(p2c, Type.P2C, channel), OpenKey(c2p, Type.OPEN, channel))


class StaticKey:
    """A peer's X25519 key for the life of its process (never written to disk)."""

    def __init__(self, private: X25519PrivateKey | None = None):
        self.private = private or X25519PrivateKey.generate()
        self.public = _raw(self.private.public_key())

    def accept(self, env: Envelope) -> tuple[SessionKeys, bytes]:
        """The peer's side of a session handshake: its keys and the opened OPEN payload."""
        if env.type != Type.OPEN or env.counter != 0 or env.ephemeral is None:
            raise SealError("a session starts with a sealed open frame, counter 0")
        shared = _exchange(self.private, env.ephemeral)
        keys = SessionKeys.derive(shared, env.ephemeral, self.public, env.channel, client=False)
        return keys, keys.first.open(env)


def client_handshake(static: bytes, channel: bytes, open_plaintext: bytes) -> tuple[SessionKeys, bytes]:
    """The client's side: a fresh ephemeral key, this hop's keys, and the sealed OPEN frame."""
    eph = X25519PrivateKey.generate()
    eph_pub = _raw(eph.public_key())
    keys = SessionKeys.derive(_exchange(eph, static), eph_pub, static, channel, client=True)
    return keys, keys.first.seal(open_plaintext, eph_pub)


def link_keys(secret: bytes, channel: bytes) -> tuple[SealKey, OpenKey]:
    """Both ends of a push link into the session `channel` (the next hop's), from the client's secret."""
    if len(secret) != KEY_LEN:
        raise SealError(f"a link secret has {KEY_LEN} bytes")
    key = _hkdf(secret, None, LINK_INFO + channel, KEY_LEN)
    return SealKey(key, Type.LINK, channel), OpenKey(key, Type.LINK, channel)


# --- identity: the peer's libp2p key vouches for its X25519 key ----------------------------------

def sign_static_key(key_pair, public: bytes) -> tuple[str, str]:
    """(libp2p public key hex, signature hex) for `public`, signed with a libp2p `KeyPair`."""
    return key_pair.public_key.serialize().hex(), key_pair.private_key.sign(STATIC_KEY_DOMAIN + public).hex()


def verify_static_key(peer_id: str, public_key_hex: str | None, x25519_hex: str | None, sig_hex: str | None) -> bytes:
    """The peer's X25519 key, if its libp2p key (which must hash to `peer_id`) signed it; else SealError."""
    from libp2p.crypto.keys import KeyType
    from libp2p.crypto.serialization import deserialize_public_key
    from libp2p.peer.id import ID

    if not (public_key_hex and x25519_hex and sig_hex):
        raise SealError("the peer offers no signed X25519 key (it cannot do encrypted sessions)",
                        ErrorCode.NO_ENCRYPTION)
    try:
        x25519, sig = bytes.fromhex(x25519_hex), bytes.fromhex(sig_hex)
        key = deserialize_public_key(bytes.fromhex(public_key_hex))
    except Exception:  # noqa: BLE001 - any malformed field is the same refusal
        raise SealError("malformed identity fields in the peer's reply", ErrorCode.BAD_IDENTITY) from None
    if len(x25519) != KEY_LEN or key.get_type() != KeyType.Ed25519:
        raise SealError("the peer's keys are not an Ed25519 identity and a 32-byte X25519 key", ErrorCode.BAD_IDENTITY)
    if str(ID.from_pubkey(key)) != peer_id:
        raise SealError(f"the peer's identity key is not {peer_id}'s", ErrorCode.BAD_IDENTITY)
    try:
        good = key.verify(STATIC_KEY_DOMAIN + x25519, sig)
    except Exception:  # noqa: BLE001
        good = False
    if not good:
        raise SealError("the peer's X25519 key is not signed by its identity", ErrorCode.BAD_IDENTITY)
    return x25519
