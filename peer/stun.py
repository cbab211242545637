"""A STUN server (RFC 8489 Binding only), run by publicly reachable peers so that a private swarm needs no
third-party STUN server: a peer behind a NAT asks it which public address its UDP packets come from
(its "srflx" ICE candidate).

Answers a Binding request with XOR-MAPPED-ADDRESS (and the classic MAPPED-ADDRESS, SOFTWARE
"specswarm", FINGERPRINT). Everything else is dropped without a reply: other STUN messages silently,
malformed datagrams counted (logged at debug, and a warning at most once a minute), datagrams over
MAX_DATAGRAM bytes counted. Each source IP has a token bucket (`rate` answers a second, `burst` at
once), so the server cannot be used to flood a victim whose address is spoofed (an answer is ~3x its
request). `counters` holds answered, ignored, malformed, oversize, rate_limited.

Knows UDP sockets and aioice's STUN codec; nothing of ICE sessions, WebRTC, libp2p or the swarm.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import struct
import time
from collections import OrderedDict
from typing import Any, Callable

from aioice import stun

log = logging.getLogger("specswarm.stun")
MAX_DATAGRAM = 1280  # bytes; a Binding request is 20-100
SOFTWARE = "specswarm"
MAX_IPS = 4096  # token buckets kept (the least recently seen IPs are forgotten)
WARN_EVERY = 60.0  # seconds between warnings about malformed datagrams
_BINDING_REQUEST = stun.Method.BINDING | stun.Class.REQUEST


class StunServer(asyncio.DatagramProtocol):
    def __init__(self, rate: float = 50.0, burst: int = 100, clock: Callable[[], float] = time.monotonic):
        self.rate, self.burst, self.clock = rate, burst, clock
        self.counters = {"answered": 0, "ignored": 0, "malformed": 0, "oversize": 0, "rate_limited": 0}
        self.addr: tuple[str, int] | None = None
        self._transport: asyncio.DatagramTransport | None = None
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # ip -> (tokens, when)
        self._warned_at = float("-inf")

    @classmethod
    async def start(cls, host: str = "0.0.0.0", port: int = 3478, **kwargs: Any) -> "StunServer":
        """Listen on UDP host:port (port 0: any free one, see `.addr`); OSError saying where if it cannot."""
        server = cls(**kwargs)
        try:
            await asyncio.get_running_loop().create_datagram_endpoint(lambda: server, local_addr=(host, port))
        except OSError as exc:
            raise OSError(exc.errno, f"STUN server cannot listen on UDP {host}:{port}: {exc.strerror or exc}") \
                from None
        log.info("STUN server listening on UDP %s:%d", *server.addr)
        return server

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self.addr = tuple(transport.get_extra_info("sockname")[:2])  # type: ignore[assignment]

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    def error_received(self, exc: Exception) -> None:
        log.debug("STUN server: %s", exc)  # ICMP errors from earlier answers; nothing to do

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        if len(data) > MAX_DATAGRAM:
            self.counters["oversize"] += 1
            return
        ip, port = _plain(addr[0]), addr[1]
        if not self._admit(ip):
            self.counters["rate_limited"] += 1
            return
        try:
            msg_type, length, cookie = struct.unpack_from("!HHI", data)
            if msg_type & 0xC000 or cookie != stun.COOKIE or length % 4 or len(data) != stun.HEADER_LENGTH + length:
                raise ValueError("not a STUN message (bad type bits, magic cookie or length)")
            if msg_type != _BINDING_REQUEST:
                self.counters["ignored"] += 1  # a STUN message, but not ours to answer
                return
            request = stun.parse_message(data)  # checks FINGERPRINT if present
        except Exception as exc:  # noqa: BLE001 - aioice's parser raises anything on garbage
            self._malformed(ip, exc)
            return
        response = stun.Message(stun.Method.BINDING, stun.Class.RESPONSE, transaction_id=request.transaction_id,
                                attributes={"XOR-MAPPED-ADDRESS": (ip, port), "MAPPED-ADDRESS": (ip, port),
                                            "SOFTWARE": SOFTWARE})
        response.add_fingerprint()
        if self._transport is not None:
            self._transport.sendto(bytes(response), addr)
            self.counters["answered"] += 1

    def _admit(self, ip: str) -> bool:
        now = self.clock()
        tokens, then = self._buckets.pop(ip, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - then) * self.rate)
        admitted = tokens >= 1.0
        self._buckets[ip] = (tokens - 1.0 if admitted else tokens, now)
        while len(self._buckets) > MAX_IPS:
            self._buckets.popitem(last=False)
        return admitted

    def _malformed(self, ip: str, exc: Exception) -> None:
        self.counters["malformed"] += 1
        log.debug("STUN server: malformed datagram from %s: %s", ip, exc)
        now = self.clock()
        if now - self._warned_at >= WARN_EVERY:
            self._warned_at = now
            log.warning("STUN server: %d malformed datagram(s) dropped so far (the last from %s: %s)",
                        self.counters["malformed"], ip, exc)


def _plain(host: str) -> str:
    """The source address as STUN encodes it: without an IPv6 scope ("%eth0"), and an IPv4-mapped IPv6
    source (a dual-stack socket) as the IPv4 address it is."""
    host = host.split("%")[0]
    addr = ipaddress.ip_address(host)
    return str(addr.ipv4_mapped) if addr.version == 6 and addr.ipv4_mapped else host


async def serve_stun(host: str = "0.0.0.0", port: int = 3478, **kwargs: Any) -> StunServer:
    return await StunServer.start(host, port, **kwargs)
