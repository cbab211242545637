"""The WebRTC data plane for peers behind NATs (issue 15): ICE configuration and signalling.

`connect(signal, ice)` offers a WebRTC link over `signal`, `RtcAcceptor.handle(signal, peer)` answers
one; both give an `RtcLink` (peer/webrtc_link.py) whose `RtcStream`s carry frames like TCP streams do.
`link.path` says how the bytes flow: "webrtc" (a host/srflx/prflx candidate pair: direct, through the
NATs) or "webrtc-turn" (a TURN relay carries them).

Signalling is one offer and one answer, JSON frames `{"v": 1, "type": "offer"|"answer", "sdp": str}`
or a refusal `{"v": 1, "type": "error", "code": str, "message": str}` (codes: bad_request, too_large,
busy, timeout, failed), over any stream of frames the caller gives (send/recv/close of bytes, e.g. a
libp2p stream through a relay); the caller owns that stream and closes it. The answerer checks a
hostile offer (size, JSON, SDP shape, candidate count and addresses) before aiortc sees it, and
limits links in all and per remote peer.

aiortc facts: all candidates are gathered in setLocalDescription (no trickle): host candidates at
once, a srflx one waits for the STUN server (up to 5 s when it does not answer), a relay one for the
TURN server (likewise); loopback is never gathered; one STUN and one TURN server at most; without a
working pair, ICE gives up only after ~30 s, so `timeout` is what ends a hopeless attempt.

Knows aiortc, ICE, SDP and the framing; nothing of libp2p, models, sessions or routing.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.exceptions import InvalidStateError
from aiortc.rtcconfiguration import RTCIceTransportPolicy
from aiortc.rtcicetransport import parse_stun_turn_uri
from aiortc.sdp import SessionDescription

from peer.tcp import DEFAULT_FRAME_TIMEOUT
from peer.webrtc_link import CHUNK, WINDOW, Handler, RtcLink, RtcStream, path_of, selected_pair
from protocol.framing import DEFAULT_MAX_FRAME

__all__ = ["CHUNK", "WINDOW", "IceConfig", "RtcAcceptor", "RtcLink", "RtcStream", "SignalError", "check_sdp", "connect",
           "path_of", "selected_pair"]
log = logging.getLogger("specswarm.webrtc")

MAX_SIGNAL = 32 * 1024  # bytes in one signalling frame
MAX_SDP_LINES = 200
MAX_CANDIDATES = 32


# --- configuration -------------------------------------------------------------------------------------------

@dataclass
class IceConfig:
    """STUN/TURN servers for ICE. aiortc uses one STUN and one TURN server at most. `turn_only` gathers
    relay candidates only (every byte through the TURN server: for tests and benchmarks of that path)."""

    stun: list[str] = field(default_factory=list)  # ["stun:203.0.113.10:3478"]
    turn: str | None = None  # "turn:host:port", "turn:host:port?transport=tcp", "turns:host:port"
    turn_user: str | None = None
    turn_password: str | None = None
    turn_only: bool = False

    @classmethod
    def parse(cls, stun: str | list[str] | None = None, turn: str | None = None, user: str | None = None,
              password: str | None = None, turn_only: bool = False) -> "IceConfig":
        """Checked URLs (from --stun/--turn); ValueError with one line saying what is wrong."""
        stuns = [stun] if isinstance(stun, str) else list(stun or [])
        if len(stuns) > 1:
            raise ValueError(f"--stun given {len(stuns)} times: aiortc uses a single STUN server")
        for url in stuns:
            _check_url(url, "stun")
        if turn is not None:
            _check_url(turn, "turn")
            if not user or password is None:
                raise ValueError(f"--turn {turn}: a TURN server needs a user name and a password")
        if turn_only and turn is None:
            raise ValueError("relay-only ICE needs a TURN server (--turn)")
        return cls(stuns, turn, user, password, turn_only)

    def servers(self) -> list[RTCIceServer]:
        """aiortc's ice servers; an empty list, not None (None makes aiortc ask Google's STUN server)."""
        out = [RTCIceServer(urls=url) for url in self.stun[:1]]
        if self.turn:
            out.append(RTCIceServer(urls=self.turn, username=self.turn_user, credential=self.turn_password))
        return out

    def configuration(self) -> RTCConfiguration:
        return RTCConfiguration(
            iceServers=self.servers(),
            iceTransportPolicy=RTCIceTransportPolicy.RELAY if self.turn_only else RTCIceTransportPolicy.ALL,
            alwaysNegotiateDataChannels=True)  # the offer has its application m-line without a first channel


def _check_url(url: str, kind: str) -> None:
    example = "stun:203.0.113.10:3478" if kind == "stun" else "turn:203.0.113.10:3478?transport=udp"
    flag = f"--{kind} {url!r}"
    if not isinstance(url, str) or not url.startswith(kind):
        raise ValueError(f"{flag}: not a {kind.upper()} URL (expected e.g. {example})")
    if "[" in url:
        raise ValueError(f"{flag}: IPv6 {kind.upper()} servers are not supported by aioice; give an IPv4 address "
                         "or a host name")
    try:
        parsed = parse_stun_turn_uri(url)
    except ValueError as exc:
        raise ValueError(f"{flag}: {exc} (expected e.g. {example})") from None
    if parsed["scheme"] not in (("stun",) if kind == "stun" else ("turn", "turns")):
        raise ValueError(f"{flag}: scheme {parsed['scheme']}: is not supported (expected e.g. {example})")
    if not 0 < parsed["port"] < 65536:
        raise ValueError(f"{flag}: port {parsed['port']} is out of range")
    if not parsed["host"].strip() or any(c.isspace() for c in parsed["host"]):
        raise ValueError(f"{flag}: bad host name {parsed['host']!r}")
    transport = parsed.get("transport")
    if kind == "turn" and (transport not in ("udp", "tcp") or (parsed["scheme"] == "turns" and transport != "tcp")):
        raise ValueError(f"{flag}: transport {transport!r} is not supported (turn: udp or tcp; turns: tcp)")


# --- signalling ----------------------------------------------------------------------------------------------

class SignalError(ValueError):
    """A signalling frame that breaks the rules; `code` goes into the error reply."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def _candidate_problem(ip: str, port: int) -> str | None:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return f"candidate host {ip[:64]!r} is not an IP address (host names and mDNS are not resolved)"
    addr = getattr(addr, "ipv4_mapped", None) or addr  # ::ffff:127.0.0.1 is loopback too (3.11 says no)
    if addr.is_unspecified or addr.is_multicast or addr.is_loopback or addr.is_reserved or addr.is_link_local \
            or addr == ipaddress.IPv4Address("255.255.255.255") or (addr.version == 4 and addr.packed[0] == 0):
        return f"candidate address {ip} is not usable (unspecified, multicast, loopback, link-local or reserved)"
    if not 0 < port < 65536:
        return f"candidate port {port} is out of range"
    return None


def check_sdp(sdp: Any) -> SessionDescription:
    """The parsed SDP of an offer or answer, or SignalError("bad_request") saying what is wrong. Checked
    before aiortc acts on it: one application (data channel) section, ICE credentials, a DTLS fingerprint,
    at most MAX_CANDIDATES candidates, each an IP literal we may send checks to."""
    if not isinstance(sdp, str):
        raise SignalError("bad_request", "sdp must be a string")
    if sdp.count("\n") > MAX_SDP_LINES:
        raise SignalError("bad_request", f"SDP of over {MAX_SDP_LINES} lines")
    try:
        parsed = SessionDescription.parse(sdp)
    except Exception as exc:  # noqa: BLE001 - aiortc's parser raises anything (asserts included)
        raise SignalError("bad_request", f"unparsable SDP ({type(exc).__name__})") from None
    kinds = [media.kind for media in parsed.media]
    if kinds != ["application"]:
        raise SignalError("bad_request", f"SDP must have exactly one application section, not {kinds[:8]}")
    media = parsed.media[0]
    if not media.ice or not media.ice.usernameFragment or not media.ice.password:
        raise SignalError("bad_request", "SDP lacks ICE credentials (ice-ufrag, ice-pwd)")
    if not media.dtls or not media.dtls.fingerprints:
        raise SignalError("bad_request", "SDP lacks a DTLS fingerprint or setup role")
    if len(media.ice_candidates) > MAX_CANDIDATES:
        raise SignalError("bad_request", f"{len(media.ice_candidates)} ICE candidates (at most {MAX_CANDIDATES})")
    for candidate in media.ice_candidates:
        problem = _candidate_problem(candidate.ip, candidate.port)
        if problem:
            raise SignalError("bad_request", problem)
    return parsed


def _read_signal(raw: bytes, expect: str) -> dict:
    if len(raw) > MAX_SIGNAL:
        raise SignalError("too_large", f"signalling frame of {len(raw)} bytes (at most {MAX_SIGNAL})")
    # a signalling message is one flat object: refuse nesting before the parser recurses into it (how deep
    # json.loads goes before RecursionError depends on the interpreter's recursion limit at the time)
    if raw.count(b"[") + raw.count(b"{") > 8:
        raise SignalError("bad_request", "signalling frame is not JSON of the expected shape (nested too deeply)")
    try:
        msg = json.loads(raw)
    except (ValueError, RecursionError):
        raise SignalError("bad_request", "signalling frame is not JSON") from None
    if not isinstance(msg, dict):
        raise SignalError("bad_request", "signalling frame is not a JSON object")
    if msg.get("v") != 1:
        raise SignalError("bad_request", f"unsupported signalling version {str(msg.get('v'))[:16]!r} (we speak 1)")
    if msg.get("type") not in (expect, "error"):
        raise SignalError("bad_request", f"expected type {expect!r}, got {str(msg.get('type'))[:32]!r}")
    return msg


async def _send_json(signal: Any, msg: dict) -> None:
    await signal.send(json.dumps(msg).encode())


async def _refuse(signal: Any, code: str, message: str) -> None:
    try:
        await _send_json(signal, {"v": 1, "type": "error", "code": code, "message": message})
    except Exception:  # noqa: BLE001 - the asker may be gone
        pass


def _candidate_summary(sdp: str | None) -> str:
    """e.g. "host x2, srflx x1" from the candidate lines of an SDP."""
    if not sdp:
        return "none"
    kinds = Counter(line.split(" typ ")[1].split()[0] for line in sdp.splitlines()
                    if line.startswith("a=candidate:") and " typ " in line)
    return ", ".join(f"{kind} x{n}" for kind, n in sorted(kinds.items())) or "none"


def _failure_hint(local_sdp: str | None, remote_sdp: str | None) -> str:
    local, remote = _candidate_summary(local_sdp), _candidate_summary(remote_sdp)
    hint = f"local candidates: {local}; remote: {remote}"
    if "relay" not in local + remote:
        hint += ("; peers behind NATs need a STUN server (--stun) to find their public address, and a TURN "
                 "server (--turn) when a NAT maps each destination to a new port (symmetric)")
    return hint


def _connected_line(link: RtcLink, elapsed: float) -> str:
    who = link.remote_peer_id or "an unknown peer"
    if link.pair is None:
        return f"WebRTC to {who}: connected in {elapsed * 1e3:.0f} ms, path {link.path}"
    ltype, rtype, (lhost, lport), (rhost, rport) = link.pair
    return (f"WebRTC to {who}: connected in {elapsed * 1e3:.0f} ms via {ltype}/{rtype} pair "
            f"{lhost}:{lport} <-> {rhost}:{rport}, path {link.path}")


async def connect(signal: Any, ice: IceConfig, timeout: float = 10.0, max_frame: int = DEFAULT_MAX_FRAME,
                  remote_peer_id: str | None = None, on_stream: Handler | None = None,
                  frame_timeout: float | None = DEFAULT_FRAME_TIMEOUT) -> RtcLink:
    """Offer a WebRTC link over `signal` (a stream of frames to the answerer) and return it once ICE and
    DTLS are up. ConnectionError with a clear message on refusal, timeout or failure (nothing is left
    open). `on_stream` serves streams the remote opens on this link."""
    start = time.monotonic()
    pc = RTCPeerConnection(ice.configuration())
    link = RtcLink(pc, remote_peer_id, on_stream, max_frame, frame_timeout)
    stage, answer_sdp = "gathering ICE candidates", None
    try:
        async with asyncio.timeout(timeout):
            await pc.setLocalDescription(await pc.createOffer())  # gathers every candidate first
            if _candidate_summary(pc.localDescription.sdp) == "none":
                raise ConnectionError("no ICE candidate gathered (no usable network interface"
                                      + (" or the TURN server did not answer)" if ice.turn else ")"))
            stage = "waiting for the answer"
            await _send_json(signal, {"v": 1, "type": "offer", "sdp": pc.localDescription.sdp})
            msg = _read_signal(await signal.recv(), "answer")
            if msg["type"] == "error":
                raise ConnectionError(f"refused: {str(msg.get('message'))[:200]} ({str(msg.get('code'))[:32]})")
            answer_sdp = msg.get("sdp")
            check_sdp(answer_sdp)
            stage = "connecting (ICE, DTLS)"
            await pc.setRemoteDescription(RTCSessionDescription(answer_sdp, "answer"))
            await link.wait_connected()
    except BaseException as exc:
        await link.close()
        if isinstance(exc, TimeoutError):
            why = f"timed out after {timeout:g} s {stage}"
        elif isinstance(exc, SignalError):
            why = f"bad answer: {exc}"
        elif isinstance(exc, EOFError):
            why = f"the signalling stream closed while {stage}"
        elif isinstance(exc, (ConnectionError, OSError, ValueError, InvalidStateError)):
            why = f"{exc} while {stage}" if stage.startswith("connecting") else str(exc)
        else:
            raise
        if stage.startswith("connecting"):
            why += f" ({_failure_hint(pc.localDescription and pc.localDescription.sdp, answer_sdp)})"
        raise ConnectionError(f"WebRTC to {remote_peer_id or 'the peer'}: {why}") from None
    log.info("%s", _connected_line(link, time.monotonic() - start))
    return link


class RtcAcceptor:
    """The answering side: `handle(signal, remote_peer_id)` per incoming signalling stream. Streams the
    remote opens run `on_stream(stream)` in their own tasks. Limits: `max_links` in all and
    `max_links_per_peer` per remote peer id (then "busy"); links that fail or close are forgotten."""

    def __init__(self, ice: IceConfig, on_stream: Handler, max_links: int = 64, max_links_per_peer: int = 4,
                 max_frame: int = DEFAULT_MAX_FRAME, frame_timeout: float | None = DEFAULT_FRAME_TIMEOUT,
                 timeout: float = 10.0):
        self.ice, self.on_stream, self.max_links, self.max_links_per_peer = ice, on_stream, max_links, \
            max_links_per_peer
        self.max_frame, self.frame_timeout, self.timeout = max_frame, frame_timeout, timeout
        self.links: dict[RtcLink, str | None] = {}  # link -> remote peer id
        self._waiting: Counter[str | None] = Counter()  # remote peer id -> signallers whose offer is awaited
        self._closed = False

    def count(self, remote_peer_id: str | None = None) -> int:
        return sum(1 for peer in self.links.values() if peer == remote_peer_id)

    async def handle(self, signal: Any, remote_peer_id: str | None) -> RtcLink | None:
        """Read one offer from `signal`, answer it and return the connected link; or refuse with an
        error frame (and return None). Never raises for what the remote sends."""
        who = remote_peer_id or "an unknown peer"
        start = time.monotonic()
        # signallers still to send their offer count against the same limits as links (a silent one holds a
        # handler for `timeout` s)
        if sum(self._waiting.values()) >= self.max_links or self._waiting[remote_peer_id] >= self.max_links_per_peer:
            log.info("WebRTC offer from %s refused: busy, too many offers awaited", who)
            await _refuse(signal, "busy", f"{self._waiting[remote_peer_id]} offers from you awaited already "
                                          f"(at most {self.max_links_per_peer})")
            return None
        self._waiting[remote_peer_id] += 1
        try:
            async with asyncio.timeout(self.timeout):
                raw = await signal.recv()
        except TimeoutError:
            await _refuse(signal, "timeout", f"no offer within {self.timeout:g} s")
            log.info("WebRTC offer from %s: none came within %g s", who, self.timeout)
            return None
        except Exception as exc:  # noqa: BLE001 - EOF, reset, an oversized frame on the signal stream...
            log.info("WebRTC offer from %s: could not read it (%s)", who, exc)
            return None
        finally:
            self._waiting[remote_peer_id] -= 1
        try:
            msg = _read_signal(raw, "offer")
            if msg["type"] != "offer":
                raise SignalError("bad_request", "expected an offer")
            check_sdp(msg.get("sdp"))
        except SignalError as exc:
            log.info("WebRTC offer from %s refused: %s", who, exc)
            await _refuse(signal, exc.code, str(exc))
            return None
        if self._closed:
            await _refuse(signal, "busy", "this peer is shutting down")
            return None
        if len(self.links) >= self.max_links or self.count(remote_peer_id) >= self.max_links_per_peer:
            why = (f"{len(self.links)} WebRTC links open (at most {self.max_links})"
                   if len(self.links) >= self.max_links else
                   f"{self.count(remote_peer_id)} WebRTC links open to you (at most {self.max_links_per_peer})")
            log.info("WebRTC offer from %s refused: busy, %s", who, why)
            await _refuse(signal, "busy", why)
            return None

        pc = RTCPeerConnection(self.ice.configuration())
        link = RtcLink(pc, remote_peer_id, self.on_stream, self.max_frame, self.frame_timeout)
        self.links[link] = remote_peer_id  # counted from now on, so concurrent offers cannot overshoot
        link.on_close(lambda done: self.links.pop(done, None))
        stage = "answering"
        try:
            async with asyncio.timeout(self.timeout):
                await pc.setRemoteDescription(RTCSessionDescription(msg["sdp"], "offer"))
                await pc.setLocalDescription(await pc.createAnswer())
                await _send_json(signal, {"v": 1, "type": "answer", "sdp": pc.localDescription.sdp})
                stage = "connecting (ICE, DTLS)"
                await link.wait_connected()
        except BaseException as exc:
            await link.close()
            if not isinstance(exc, Exception):
                raise  # cancelled, interrupted
            why = f"timed out after {self.timeout:g} s" if isinstance(exc, TimeoutError) else str(exc) or repr(exc)
            if stage == "answering":
                await _refuse(signal, "failed", f"could not answer the offer: {why}"[:300])
            else:
                why += f" ({_failure_hint(pc.localDescription and pc.localDescription.sdp, msg['sdp'])})"
            log.info("WebRTC from %s: %s while %s", who, why, stage)
            return None
        log.info("%s", _connected_line(link, time.monotonic() - start))
        return link

    async def close(self) -> None:
        self._closed = True
        await asyncio.gather(*(link.close() for link in list(self.links)), return_exceptions=True)
