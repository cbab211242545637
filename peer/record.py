"""The signed discovery record a peer publishes about itself, and the rules every reader checks.

A `PeerRecord` says, for one model: peer id, multiaddrs, block range [start, end), direct data
address, throughput, free cache, state, public keys, RTTs to the peers of the next blocks, when
it was issued and expires, and (since issue 15; optional, so that older records still verify) its
reachability verdict, the IP other peers see it at and, for a public peer, its STUN server's URL. On the wire it is canonical JSON, a newline, then the hex Ed25519
signature (by the peer's libp2p key) of a domain tag + the JSON. `verify` believes a record only if
it is well-formed (every field checked), at most 16 KiB, signed by the key that hashes to the peer
id it names, and unexpired (with at most MAX_TTL + CLOCK_SKEW to go). The newest record wins.
`record_key` and `provider_key` say where such records live in a DHT.

Knows libp2p keys and peer ids; nothing about the DHT that stores records, sockets or sessions.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

import multiaddr
from libp2p.crypto.keys import KeyPair, KeyType, PrivateKey
from libp2p.crypto.serialization import deserialize_public_key
from libp2p.peer.id import ID

from protocol.messages import is_tcp_addr

NAMESPACE = "specswarm"
PROTOCOL_VERSION = 1
STATES = ("joining", "online", "leaving", "offline")
REACHABILITY = ("public", "private", "unknown")  # peer/reachability.py
MAX_RECORD_BYTES = 16 * 1024
MAX_TTL = 600.0  # seconds a record may live (so a dead peer cannot look alive for longer)
CLOCK_SKEW = 60.0  # tolerated for "expires too far in the future"
_DOMAIN = b"specswarm-peer-record/1\n"  # signatures by the peer key cannot be replayed elsewhere


class RecordError(ValueError):
    """A record that must not be trusted: unsigned, forged, expired, oversized or malformed."""


@dataclass
class PeerRecord:
    """What a peer says about itself, for one model. `sign()` it to publish, `verify()` what you read."""

    model: str
    start: int  # blocks [start, end)
    end: int
    peer_id: str = ""  # filled in by sign() / announce()
    addrs: list[str] = field(default_factory=list)
    data_addr: str | None = None  # e.g. "tcp://host:port"
    throughput: float = 0.0  # tokens/s
    cache_tokens: int = 0
    state: str = "online"
    version: int = PROTOCOL_VERSION
    public_key: str = ""  # hex of the libp2p-serialized public key; filled in by sign()
    x25519: str | None = None  # hex, 32 bytes
    rtts: dict[str, float] = field(default_factory=dict)  # peer id -> ms
    issued: float = 0.0  # unix seconds; the newest record of a peer wins
    expires: float = 0.0
    reachability: str = "unknown"  # can peers dial it: public, private, unknown (not checked)
    observed: str | None = None  # the IP address other peers see it at
    stun: str | None = None  # "stun:HOST:PORT": this (public) peer answers STUN binding requests there
    head: bool = False  # it holds the LM head with the model's last block: clients may verify rounds there
    moves: bool = False  # it chose its own blocks and moves them to close a gap (peer/rebalance.py)

    @property
    def blocks(self) -> range:
        return range(self.start, self.end)

    def sign(self, key_pair: KeyPair) -> bytes:
        """The signed bytes stored in the DHT (peer_id/public_key taken from `key_pair`)."""
        peer_id = str(ID.from_pubkey(key_pair.public_key))
        if self.peer_id not in ("", peer_id):
            raise RecordError(f"record claims peer {self.peer_id} but the key is {peer_id}'s")
        rec = dataclasses.replace(self, peer_id=peer_id, public_key=key_pair.public_key.serialize().hex())
        _check(dataclasses.asdict(rec))
        return _seal(dataclasses.asdict(rec), key_pair.private_key)

    @classmethod
    def verify(cls, data: bytes, now: float | None = None) -> PeerRecord:
        """The record in `data`; RecordError(reason) unless it is well-formed, signed by the key of
        the peer it names, and unexpired at `now` (default: the current time)."""
        if not isinstance(data, (bytes, bytearray)):
            raise RecordError(f"not bytes: {type(data).__name__}")
        if len(data) > MAX_RECORD_BYTES:
            raise RecordError(f"oversized: {len(data)} > {MAX_RECORD_BYTES} bytes")
        body, sep, sig_hex = bytes(data).rpartition(b"\n")
        try:
            sig = bytes.fromhex(sig_hex.decode("ascii")) if sep else b""
        except ValueError:  # (UnicodeDecodeError is one)
            sig = b""
        if len(sig) != 64:
            raise RecordError("unsigned (no signature after the body)")
        try:
            fields = json.loads(body)
        except (ValueError, RecursionError):
            raise RecordError("malformed: not JSON") from None
        rec = _check(fields)
        try:
            key = deserialize_public_key(bytes.fromhex(rec.public_key))
        except Exception:
            raise RecordError("bad public key") from None
        if key.get_type() != KeyType.Ed25519:
            raise RecordError("not an Ed25519 key")
        if str(ID.from_pubkey(key)) != rec.peer_id:
            raise RecordError("public key does not match the peer id")
        if not key.verify(_DOMAIN + body, sig):
            raise RecordError("bad signature")
        now = time.time() if now is None else now
        if rec.expires <= now:
            raise RecordError(f"expired {now - rec.expires:.1f} s ago")
        if rec.expires > now + MAX_TTL + CLOCK_SKEW:
            raise RecordError("expiry too far in the future")
        return rec


def _seal(fields: dict[str, Any], private_key: PrivateKey) -> bytes:
    body = json.dumps(fields, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
    data = body + b"\n" + private_key.sign(_DOMAIN + body).hex().encode()
    if len(data) > MAX_RECORD_BYTES:
        raise RecordError(f"oversized: {len(data)} > {MAX_RECORD_BYTES} bytes")
    return data


def _int(v: Any, lo: int = 0, hi: int = 2**53) -> bool:
    return type(v) is int and lo <= v < hi  # (not bool)


def _num(v: Any) -> bool:
    return type(v) in (int, float) and math.isfinite(v) and abs(v) < 2**53


def _str(v: Any, n: int = 256) -> bool:
    return type(v) is str and 0 < len(v) <= n


def _hex(v: Any, n: int) -> bool:
    return _str(v, n) and set(v) <= set("0123456789abcdef")


def _maddr(v: Any) -> bool:
    return _str(v) and multiaddr.Multiaddr(v) is not None  # raises if it is not one


_RULES = {  # field -> is its value acceptable (an exception means no)
    "model": _str, "peer_id": lambda v: _str(v, 128),
    "start": lambda v: _int(v, 0, 1_000_000), "end": lambda v: _int(v, 1, 1_000_001),
    "addrs": lambda v: type(v) is list and len(v) <= 32 and all(map(_maddr, v)),
    "data_addr": lambda v: v is None or is_tcp_addr(v),
    "throughput": lambda v: _num(v) and v >= 0, "cache_tokens": _int,
    "state": lambda v: v in STATES, "version": lambda v: _int(v, 0, 2**31),
    "public_key": lambda v: _hex(v, 512), "x25519": lambda v: v is None or (_hex(v, 64) and len(v) == 64),
    "rtts": lambda v: type(v) is dict and len(v) <= 256 and all(_str(k, 128) and _num(ms) and ms >= 0
                                                                 for k, ms in v.items()),
    "issued": _num, "expires": _num,
}
_OPTIONAL = {  # field -> (rule, value when absent): records from before these fields still verify
    "reachability": (lambda v: v in REACHABILITY, "unknown"),
    "observed": (lambda v: v is None or (_str(v, 64) and ipaddress.ip_address(v) is not None), None),
    "stun": (lambda v: v is None or _stun_url(v), None),
    "head": (lambda v: type(v) is bool, False),
    "moves": (lambda v: type(v) is bool, False),
}


def _stun_url(v: Any) -> bool:
    if not (_str(v, 128) and v.startswith("stun:")):
        return False
    host, _, port = v.removeprefix("stun:").rpartition(":")
    return bool(host) and port.isdigit() and 0 < int(port) < 65536 and ipaddress.ip_address(host.strip("[]")) is not None


def _check(d: Any) -> PeerRecord:
    """A PeerRecord from decoded JSON, or RecordError naming the first bad field."""
    if not isinstance(d, dict):
        raise RecordError("malformed: not a JSON object")
    if missing := [name for name in _RULES if name not in d]:
        raise RecordError(f"malformed: missing {missing}")
    values = {name: d[name] for name in _RULES}
    values.update({name: d.get(name, absent) for name, (_, absent) in _OPTIONAL.items()})
    for name, ok in [*_RULES.items(), *((name, rule) for name, (rule, _) in _OPTIONAL.items())]:
        try:
            good = ok(values[name])
        except Exception:
            good = False
        if not good:
            raise RecordError(f"malformed: bad {name}: {values[name]!r}"[:200])
    rec = PeerRecord(**values)  # unknown keys (newer versions) are ignored
    if rec.start >= rec.end or rec.issued > rec.expires:
        raise RecordError("malformed: empty block range, or issued after it expires")
    return rec


def record_key(model: str, peer_id: str) -> str:
    return f"/{NAMESPACE}/{hashlib.sha256(model.encode()).hexdigest()[:32]}/{peer_id}"


def provider_key(model: str, epoch: int) -> bytes:
    return hashlib.sha256(f"{NAMESPACE}/providers/{model}/{epoch}".encode()).digest()
