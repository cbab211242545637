"""`/specswarm/dialback/1.0.0`: ask another peer to dial us back on a FRESH connection, to learn whether
peers can reach us (libp2p's AutoNAT cannot tell: its dial-back reuses the connection the request came on).

The requester sends one frame (`protocol.framing`) holding JSON `{"v": 1, "nonce": <32 hex>, "ports":
{"libp2p": P, "data": D}}` ("data" optional). The helper dials, each with a new TCP connection and within
DIAL_TIMEOUT s, the requester's IP AS THE HELPER SEES IT (the source of the connection the request came on)
on those ports:
  * libp2p: a TCP connection, then the Noise handshake, which must prove the requester's own peer id
    (it answers on that port, not some other host behind the same address); then the helper hangs up.
  * data (the direct inference port): a TCP connection carrying one frame `PROBE + nonce`; the requester's
    listener (`ProbeSniffer`) records the nonce, answers `ACK` and hangs up: the requester itself sees the
    nonce arrive, so a helper cannot claim a dial-back that did not happen.
It then answers `{"v": 1, "nonce": ..., "observed": <the requester's IP as seen>, "results": {"libp2p":
"ok"|"timeout"|"refused"|"unreachable"|"not_you", "data": "ok"|"no_ack"|...}}`, or on refusal `{"v": 1,
"error": <code>, "message": <one line>}` (codes: bad_request, too_large, timeout, rate_limited, busy,
unsupported, relayed).

A request must come on a direct connection: over a relayed one (Circuit Relay, peer/relay.py) the IP the
helper sees is the relay's, so the helper refuses it ("relayed") and `ask` does not even send it. The
dial-backs themselves never go through a relay: they are plain TCP connections to an IP.

Hostile input: the helper dials only the observed IP, never an address from the message (no amplification
toward third parties, no SSRF), at most the two ports named, each once; requests are at most MAX_REQUEST
bytes and must arrive within READ_TIMEOUT s; each requester IP gets a token bucket (PER_IP_BURST requests,
one more every PER_IP_EVERY s; loopback is exempt by default: every peer of a test swarm shares 127.0.0.1),
and at most MAX_PARALLEL dial-backs run at once. Whatever comes in, the helper answers with an error
and keeps serving.

Knows libp2p streams, its Noise upgrader, TCP sockets and the framing; nothing of verdicts, announced
addresses, the DHT or records (peer/reachability.py decides what the answers mean).
"""

from __future__ import annotations

import errno
import ipaddress
import json
import logging
import time
from collections import Counter, OrderedDict
from typing import Any, Callable

import trio
from libp2p.io.trio import TrioTCPStream
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.network.stream.exceptions import StreamEOF, StreamReset
from libp2p.peer.id import ID

from peer.relay import is_relayed
from protocol import framing

log = logging.getLogger("specswarm.dialback")
PROTOCOL = "/specswarm/dialback/1.0.0"
KINDS = ("libp2p", "data")
NONCE_BYTES = 16
MAX_REQUEST, MAX_REPLY = 512, 2048
READ_TIMEOUT, DIAL_TIMEOUT = 5.0, 3.0
ASK_TIMEOUT = READ_TIMEOUT + 2 * DIAL_TIMEOUT
PER_IP_BURST, PER_IP_EVERY, MAX_PARALLEL, MAX_IPS = 4, 30.0, 8, 4096
PROBE = b"specswarm-dialback/1 nonce "  # + the nonce: the one frame a helper sends to a data port
ACK = b"specswarm-dialback/1 ok"


class DialbackError(ValueError):
    """A request or answer that breaks the protocol; `code` names the rule (module docstring)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def encode_request(nonce: bytes, ports: dict[str, int]) -> bytes:
    return json.dumps({"v": 1, "nonce": nonce.hex(), "ports": ports}, separators=(",", ":")).encode()


def parse_request(body: bytes) -> tuple[bytes, dict[str, int]]:
    """(nonce, {kind: port}) from a request body; DialbackError("bad_request", why) for anything else."""
    try:
        msg = json.loads(body)
        if not isinstance(msg, dict):
            raise ValueError
        nonce = bytes.fromhex(msg["nonce"]) if isinstance(msg.get("nonce"), str) else b""
    except (ValueError, RecursionError):  # (UnicodeDecodeError is a ValueError)
        raise DialbackError("bad_request", "a request is one JSON object {v, nonce, ports}") from None
    if msg.get("v") != 1:
        raise DialbackError("bad_request", f"unsupported version {str(msg.get('v'))[:20]!r} (this peer speaks 1)")
    if len(nonce) != NONCE_BYTES:
        raise DialbackError("bad_request", f"the nonce must be {NONCE_BYTES} bytes in hex")
    ports = msg.get("ports")
    if not isinstance(ports, dict) or not ports or set(ports) - set(KINDS) or \
            not all(type(p) is int and 0 < p < 65536 for p in ports.values()):
        raise DialbackError("bad_request", f"ports must map some of {list(KINDS)} to TCP ports 1..65535")
    return nonce, dict(ports)


def parse_reply(body: bytes, nonce: bytes) -> dict[str, Any]:
    """The helper's answer {observed, results}; DialbackError(code, message) for a refusal or nonsense."""
    try:
        msg = json.loads(body)
        if not isinstance(msg, dict):
            raise ValueError
    except (ValueError, RecursionError):
        raise DialbackError("bad_reply", "the helper's answer is not a JSON object") from None
    if "error" in msg:
        raise DialbackError(str(msg["error"])[:40], str(msg.get("message", ""))[:300])
    results, observed = msg.get("results"), msg.get("observed")
    if msg.get("nonce") != nonce.hex() or not isinstance(results, dict) or not isinstance(observed, str):
        raise DialbackError("bad_reply", "the helper's answer does not match the request")
    try:
        observed = str(ipaddress.ip_address(observed))
    except ValueError:
        raise DialbackError("bad_reply", f"the helper saw us at {observed[:60]!r}, not an IP address") from None
    return {"observed": observed, "results": {k: str(v)[:40] for k, v in results.items() if k in KINDS}}


def observed_ip(remote: Any) -> str | None:
    """The IP of a connection's remote end (`get_remote_address()`), IPv4-mapped IPv6 made IPv4."""
    try:
        ip = ipaddress.ip_address(remote[0])
    except (TypeError, ValueError, IndexError):
        return None
    return str(ip.ipv4_mapped or ip) if ip.version == 6 else str(ip)


class RateLimit:
    """Per-IP token buckets (bounded: the least recently seen IPs are forgotten) and a cap on dial-backs
    under way. `admit(ip)` raises DialbackError(rate_limited | busy); `done()` after each admitted one."""

    def __init__(self, burst: int = PER_IP_BURST, every: float = PER_IP_EVERY, parallel: int = MAX_PARALLEL,
                 exempt_loopback: bool = True, clock: Callable[[], float] = time.monotonic):
        self.burst, self.every, self.parallel, self.exempt_loopback, self.clock = burst, every, parallel, \
            exempt_loopback, clock
        self.busy = 0
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # ip -> (tokens, when)

    def admit(self, ip: str) -> None:
        if self.busy >= self.parallel:
            raise DialbackError("busy", f"{self.busy} dial-backs under way; ask again later")
        if not (self.exempt_loopback and ipaddress.ip_address(ip).is_loopback):
            now = self.clock()
            tokens, then = self._buckets.pop(ip, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - then) / self.every)
            if tokens < 1.0:
                self._buckets[ip] = (tokens, now)
                raise DialbackError("rate_limited", f"{ip} asked too often: one dial-back per "
                                                    f"{self.every:.0f} s (after {self.burst} at once)")
            self._buckets[ip] = (tokens - 1.0, now)
            while len(self._buckets) > MAX_IPS:
                self._buckets.popitem(last=False)
        self.busy += 1

    def done(self) -> None:
        self.busy -= 1


async def _read_frame(stream: Any, limit: int) -> bytes:
    """One frame from a libp2p stream (trio); DialbackError("too_large") over `limit`, EOFError if it ends."""
    async def exactly(n: int) -> bytes:
        chunks, got = [], 0
        while got < n:
            try:
                chunk = await stream.read(n - got)
            except (StreamEOF, StreamReset):
                chunk = b""
            if not chunk:
                raise EOFError("the stream ended inside a dial-back frame")
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)
    try:
        length = framing.parse_header(await exactly(framing.HEADER_SIZE), limit)
    except framing.FrameTooLarge as exc:
        raise DialbackError("too_large", str(exc)) from None
    return await exactly(length)


class DialbackServer:
    """The helper's side: `handle` is a libp2p (trio) stream handler for PROTOCOL on `host`."""

    def __init__(self, host: Any, limit: RateLimit | None = None, dial_timeout: float = DIAL_TIMEOUT):
        self.host, self.limit, self.dial_timeout = host, limit or RateLimit(), dial_timeout
        self.stats: Counter[str] = Counter()  # "answered", and each refusal's code

    async def handle(self, stream: Any) -> None:
        ip = observed_ip(stream.get_remote_address())
        peer = stream.muxed_conn.peer_id
        try:
            try:
                if is_relayed(stream.muxed_conn):
                    raise DialbackError("relayed", "this request came through a relay, so the IP seen here is the "
                                                   "relay's: ask over a direct connection")
                with trio.fail_after(READ_TIMEOUT):
                    body = await _read_frame(stream, MAX_REQUEST)
                if ip is None:
                    raise DialbackError("unsupported", "this connection has no IP address to dial back")
                self.limit.admit(ip)
            except trio.TooSlowError:
                raise DialbackError("timeout", f"no complete request within {READ_TIMEOUT:.0f} s") from None
            try:
                nonce, ports = parse_request(body)
                results = await self._dial_all(ip, ports, nonce, peer)
            finally:
                self.limit.done()
            reply = {"v": 1, "nonce": nonce.hex(), "observed": ip, "results": results}
            self.stats["answered"] += 1
            log.debug("dial-back for %s at %s: %s", peer, ip, results)
        except DialbackError as exc:
            self.stats[exc.code] += 1
            log.debug("refused a dial-back request from %s at %s [%s]: %s", peer, ip, exc.code, exc)
            reply = {"v": 1, "error": exc.code, "message": str(exc)}
        except EOFError:
            reply = None
        try:
            if reply is not None:
                with trio.move_on_after(READ_TIMEOUT):
                    await stream.write(framing.frame(json.dumps(reply).encode()))
        except Exception as exc:  # the requester is gone: nothing more to tell it
            log.debug("could not answer a dial-back request from %s: %r", peer, exc)
        finally:
            with trio.move_on_after(1):
                await stream.close()

    async def _dial_all(self, ip: str, ports: dict[str, int], nonce: bytes, peer: ID) -> dict[str, str]:
        results: dict[str, str] = {}

        async def one(kind: str, port: int) -> None:
            try:
                with trio.fail_after(self.dial_timeout):
                    sock = await trio.open_tcp_stream(ip, port)
                    try:
                        results[kind] = await (self._libp2p(sock, peer) if kind == "libp2p" else self._data(sock, nonce))
                    finally:
                        with trio.CancelScope(shield=True), trio.move_on_after(1):
                            await sock.aclose()
            except trio.TooSlowError:
                results[kind] = "timeout"
            except OSError as exc:
                results[kind] = "refused" if _refused(exc) else "unreachable"
            except Exception as exc:  # the connection broke half way (trio.BrokenResourceError, ...)
                log.debug("dial-back to %s:%d failed: %r", ip, port, exc)
                results[kind] = "broken"
        async with trio.open_nursery() as nursery:
            for kind, port in ports.items():
                nursery.start_soon(one, kind, port)
        return results

    async def _libp2p(self, sock: trio.SocketStream, peer: ID) -> str:
        raw = RawConnection(TrioTCPStream(sock), initiator=True)
        try:  # the Noise handshake checks that the listener holds `peer`'s key; then we hang up
            secured = await self.host.get_network().upgrader.upgrade_security(raw, True, peer)
        except Exception as exc:
            log.debug("dial-back handshake with %s failed: %r", peer, exc)
            return "not_you"
        with trio.move_on_after(1):
            await secured.close()
        return "ok"

    async def _data(self, sock: trio.SocketStream, nonce: bytes) -> str:
        await sock.send_all(framing.frame(PROBE + nonce))
        want, got = framing.frame(ACK), b""
        while len(got) < len(want):
            chunk = await sock.receive_some(len(want) - len(got))
            if not chunk:
                break
            got += chunk
        return "ok" if got == want else "no_ack"


def _refused(exc: BaseException) -> bool:
    """Whether a failed connect was refused (trio hides the errno in the errors of every attempt)."""
    causes = getattr(exc.__cause__, "exceptions", [exc.__cause__]) if exc.__cause__ else []
    return any(getattr(e, "errno", None) == errno.ECONNREFUSED for e in [exc, *causes])


async def ask(host: Any, helper: ID, nonce: bytes, ports: dict[str, int], timeout: float = ASK_TIMEOUT) -> dict:
    """The requester's side (trio): ask `helper` to dial us back on `ports`; its parsed answer (parse_reply).
    DialbackError for a refusal, OSError/EOFError/trio.TooSlowError/libp2p errors when it cannot answer."""
    conns = [c for c in host.get_network().get_connections(helper) if not c.is_closed]
    if conns and all(map(is_relayed, conns)):  # (a stream takes a direct connection when there is one)
        raise DialbackError("relayed", f"we reach {helper} through a relay only: the IP it would dial back is the "
                                       "relay's")
    with trio.fail_after(timeout):
        stream = await host.new_stream(helper, [PROTOCOL])
        try:
            await stream.write(framing.frame(encode_request(nonce, ports)))
            return parse_reply(await _read_frame(stream, MAX_REPLY), nonce)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await stream.close()


def probe_nonce(frame: bytes | memoryview) -> bytes | None:
    """The nonce of a dial-back probe frame sent to a data port; None for any other frame."""
    data = bytes(frame[:len(PROBE) + NONCE_BYTES + 1])
    return data[len(PROBE):] if data.startswith(PROBE) and len(data) == len(PROBE) + NONCE_BYTES else None


class ProbeSniffer:
    """Wraps a direct (data port) stream: if its first frame is a dial-back probe, hands the nonce to
    `on_nonce`, answers ACK and ends the stream (recv raises EOFError); any other stream passes through."""

    def __init__(self, stream: Any, on_nonce: Callable[[bytes], None]):
        self._stream, self._on_nonce, self._first = stream, on_nonce, True

    async def recv(self) -> bytes:
        data = await self._stream.recv()
        if self._first:
            self._first = False
            nonce = probe_nonce(data)
            if nonce is not None:
                self._on_nonce(nonce)
                await self._stream.send(ACK)
                raise EOFError("a dial-back probe (answered)")
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)
