"""Issue 15: hostile input on the NAT-traversal surfaces of a real `swarm peer` process.

One tiny-model peer on loopback serves all blocks; as the first peer of a swarm (reachability UNKNOWN, with
its loopback address) it relays for others (Circuit Relay v2, here with small limits) and answers STUN. From
attacker libp2p nodes and UDP sockets in this process it gets: hostile WebRTC signalling frames
(`SIGNAL_PROTOCOL`: oversized, not JSON, JSON bombs, wrong version or type, SDPs that do not parse or name
too many, loopback or host-name candidates), floods of offers and signallers that never speak; relay
reservations and circuits beyond its limits and garbage on the relay's HOP and STOP streams; garbage,
oversized and flooding STUN datagrams. Each is refused with a clear error (or a dropped stream / no answer,
as asserted), and afterwards the peer still answers Info and serves a generation equal to a local one, with
no traceback in its log. Forged and malformed signed records carrying a `stun` URL are checked in-process.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from aioice import stun
from aioice.ice import get_host_addresses
from aiortc import RTCPeerConnection
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage, StopMessage
from libp2p.relay.circuit_v2.pb.circuit_pb2 import PeerId as CircuitPeerId
from libp2p.relay.circuit_v2.protocol import STREAM_READ_TIMEOUT
from libp2p.relay.circuit_v2.protocol_buffer import StatusCode
from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg
from test_reachability import wait_for  # the peer-process helpers (test_volunteer's)

from peer.p2p import P2PNode
from peer.paths import SIGNAL_PROTOCOL
from peer.record import PeerRecord, RecordError, _seal
from peer.relay import HOP, STOP
from peer.stun import MAX_DATAGRAM
from peer.transport import fetch_info
from peer.webrtc import MAX_CANDIDATES, MAX_SDP_LINES, MAX_SIGNAL, IceConfig, check_sdp
from protocol import framing
from protocol import messages as m
from swarm.launch import PeerProcess

pytestmark = pytest.mark.timeout(60)
ECHO = "/specswarm/test-echo/1"
ACCEPT_TIMEOUT = 10.0  # RtcAcceptor's default timeout, as peer/paths.py builds it: offers, ICE and DTLS
PER_PEER_LINKS = 4  # RtcAcceptor's default max_links_per_peer
STUN_RATE, STUN_BURST = 50.0, 100  # StunServer's defaults (a peer process has no flags for them)
PROMPT = "def fibonacci(n):"


@dataclass
class Target:
    model: Path
    proc: PeerProcess
    log: Path
    stun_port: int

    @property
    def addr(self) -> str:
        return self.proc.addr

    @property
    def peer_id(self) -> str:
        return self.proc.peer_id


@pytest.fixture(scope="module")
def target(tiny, tmp_path_factory):
    """The peer under attack: all 8 blocks, relay limits of 2 slots and 2 circuits per slot holder."""
    logs = tmp_path_factory.mktemp("nat-hostile")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPECSWARM_CACHE", str(tmp_path_factory.getbasetemp() / "nat-hostile-cache"))
        path = tiny("llama2").path
        proc = PeerProcess(path, (0, 8), "--relay-max-reservations", "2", "--relay-max-circuits-per-peer", "2",
                           "--relay-max-circuits", "16", "--summary-every", "0", log_file=logs / "peer.log")
        try:
            text = wait_for(logs / "peer.log", "answering STUN for the swarm on udp port", 20)
            found = re.search(r"answering STUN for the swarm on udp port (\d+) \(stun:127\.0\.0\.1:(\d+)\)", text)
            assert found and found.group(1) == found.group(2), text
            assert "relaying up to 16 circuits for up to 2 peers" in text, text
            yield Target(path, proc, logs / "peer.log", int(found.group(1)))
        finally:
            proc.stop()


# --- helpers -------------------------------------------------------------------------------------------------

async def attackers(target: Target, n: int) -> list[P2PNode]:
    nodes = [await P2PNode.start() for _ in range(n)]
    for node in nodes:
        await node.connect(target.addr)
    return nodes


async def close(*nodes: P2PNode) -> None:
    for node in nodes:
        await node.close()


async def ask(node: P2PNode, target: Target, raw: bytes, timeout: float = 15.0) -> dict:
    """Send one frame on a new signalling stream; the JSON reply."""
    stream = await node.open_stream(target.peer_id, SIGNAL_PROTOCOL)
    try:
        await stream.send(raw)
        return json.loads(await asyncio.wait_for(stream.recv(), timeout))
    finally:
        await stream.close()


def offer(sdp, **extra) -> bytes:
    return json.dumps({"v": 1, "type": "offer", "sdp": sdp, **extra}).encode()


async def offering() -> tuple[str, RTCPeerConnection]:
    """A genuine aiortc offer, and its peer connection: kept open, so that the peer's answer waits out its ICE
    and DTLS timeout (we never nominate a pair) instead of failing on closed ports."""
    pc = RTCPeerConnection(IceConfig().configuration())
    await pc.setLocalDescription(await pc.createOffer())
    return pc.localDescription.sdp, pc


def with_candidates(sdp: str, candidates: list[str]) -> str:
    """`sdp` with its candidate lines replaced by `candidates` (host, port) pairs."""
    lines = [line for line in sdp.split("\r\n") if not line.startswith("a=candidate:")]
    at = next(i for i, line in enumerate(lines) if line.startswith(("a=end-of-candidates", "a=ice-ufrag:")))
    lines[at:at] = [f"a=candidate:{i} 1 udp 2130706431 {host} {port} typ host"
                    for i, (host, port) in enumerate(candidates, 1)]
    return "\r\n".join(lines)


async def raw_exchange(node: P2PNode, target: Target, protocol: str, payload: bytes | HopMessage | StopMessage,
                       reply_cls=None, within: float = 20.0) -> tuple[object, str, float]:
    """Write `payload` (raw bytes, or one delimited message) on a new `protocol` stream, read a delimited
    `reply_cls` message if one comes, then read until the stream ends: (the reply or None, how the stream
    ended: "eof", "reset" or "open", seconds)."""
    async def run():
        stream = await node.host.new_stream(ID.from_base58(target.peer_id), [protocol])
        t0 = trio.current_time()
        if isinstance(payload, bytes):
            await stream.write(payload)
        else:
            await write_delimited_msg(stream, payload)
        reply, how = None, "open"
        with trio.move_on_after(within):
            if reply_cls is not None:
                with contextlib.suppress(Exception):  # no reply: the stream ended
                    reply = await read_delimited_msg(stream, reply_cls)
            try:
                while await stream.read(4096):
                    pass
                how = "eof"
            except Exception as exc:  # noqa: BLE001
                how = "reset" if "Reset" in type(exc).__name__ else "eof"
        elapsed = trio.current_time() - t0
        with contextlib.suppress(Exception):
            await stream.reset()
        return reply, how, elapsed
    return await node.run_trio(run)


async def echo(stream) -> None:
    while True:
        await stream.send(await stream.recv())


async def roundtrip(stream, payload: bytes = b"through the relay") -> None:
    await stream.send(payload)
    assert await asyncio.wait_for(stream.recv(), 15) == payload


async def info_ok(target: Target) -> float:
    """An Info round trip to the peer from a fresh node (ms)."""
    node = await P2PNode.start()
    try:
        reply, rtt = await fetch_info(node, target.addr, 10)
    finally:
        await node.close()
    assert isinstance(reply, m.InfoReply) and reply.blocks == (0, 8) and reply.num_blocks == 8
    return rtt


def log_of(target: Target) -> str:
    return target.log.read_text()


# --- WebRTC signalling ---------------------------------------------------------------------------------------

def test_signalling_refuses_hostile_frames(target):
    """Every malformed offer gets one error frame {"v": 1, "type": "error", "code", "message"} naming what is
    wrong; a frame whose header announces more than --max-frame ends the stream without a reply."""
    async def main():
        sdp, pc = await offering()
        (node,) = await attackers(target, 1)
        bomb = b"[" * 16000 + b"]" * 16000  # under MAX_SIGNAL, far deeper than json's recursion limit
        assert len(bomb) < MAX_SIGNAL
        many = with_candidates(sdp, [(f"198.51.100.{i}", 40000 + i) for i in range(1, 41)])
        cases = {
            "oversized": (b"{" + b" " * MAX_SIGNAL + b"}", "too_large",
                          f"signalling frame of {MAX_SIGNAL + 2} bytes (at most {MAX_SIGNAL})"),
            "binary": (b"\xff\xfe\x00 not json", "bad_request", "signalling frame is not JSON"),
            "json bomb": (bomb, "bad_request", "signalling frame is not JSON"),
            "object bomb": (b'{"a":' * 4000 + b"1" + b"}" * 4000, "bad_request", "signalling frame is not JSON"),
            "array": (b"[1, 2]", "bad_request", "not a JSON object"),
            "version 2": (json.dumps({"v": 2, "type": "offer", "sdp": sdp}).encode(), "bad_request",
                          "unsupported signalling version '2' (we speak 1)"),
            "version '1'": (json.dumps({"v": "1", "type": "offer", "sdp": sdp}).encode(), "bad_request",
                            "unsupported signalling version"),
            "no version": (json.dumps({"type": "offer", "sdp": sdp}).encode(), "bad_request",
                           "unsupported signalling version"),
            "answer": (json.dumps({"v": 1, "type": "answer", "sdp": sdp}).encode(), "bad_request",
                       "expected type 'offer', got 'answer'"),
            "long type": (json.dumps({"v": 1, "type": "x" * 5000, "sdp": sdp}).encode(), "bad_request",
                          "expected type 'offer', got '" + "x" * 32 + "'"),
            "error": (json.dumps({"v": 1, "type": "error", "code": "x", "message": "hi"}).encode(), "bad_request",
                      "expected an offer"),
            "no sdp": (json.dumps({"v": 1, "type": "offer"}).encode(), "bad_request", "sdp must be a string"),
            "sdp list": (offer(["v=0"]), "bad_request", "sdp must be a string"),
            "not sdp": (offer("hello"), "bad_request", "SDP must have exactly one application section, not []"),
            "unparsable": (offer(sdp.replace("a=ice-ufrag", "a=candidate:1 1 udp\r\na=ice-ufrag", 1)), "bad_request",
                           "unparsable SDP (AssertionError)"),
            "bad priority": (offer(with_candidates(sdp, [("198.51.100.1", 4000)]).replace("2130706431", "high")),
                             "bad_request", "unparsable SDP (ValueError)"),
            "two sections": (offer(sdp + sdp[sdp.index("m=application"):]), "bad_request",
                             "SDP must have exactly one application section, not ['application', 'application']"),
            "no ice-pwd": (offer(re.sub(r"a=ice-pwd:.*\r\n", "", sdp)), "bad_request",
                           "SDP lacks ICE credentials (ice-ufrag, ice-pwd)"),
            "no fingerprint": (offer(re.sub(r"a=fingerprint:.*\r\n", "", sdp)), "bad_request",
                               "SDP lacks a DTLS fingerprint or setup role"),
            "40 candidates": (offer(many), "bad_request", f"40 ICE candidates (at most {MAX_CANDIDATES})"),
            "too many lines": (offer(sdp + "a=x\r\n" * (MAX_SDP_LINES + 50)), "bad_request",
                               f"SDP of over {MAX_SDP_LINES} lines"),
            "loopback": (offer(with_candidates(sdp, [("198.51.100.1", 4000), ("127.0.0.1", 4000)])), "bad_request",
                         "candidate address 127.0.0.1 is not usable (unspecified, multicast, loopback, link-local or reserved)"),
            "ipv6 loopback": (offer(with_candidates(sdp, [("::1", 4000)])), "bad_request",
                              "candidate address ::1 is not usable"),
            "unspecified": (offer(with_candidates(sdp, [("0.0.0.0", 4000)])), "bad_request",
                            "candidate address 0.0.0.0 is not usable"),
            "multicast": (offer(with_candidates(sdp, [("224.0.0.251", 5353)])), "bad_request",
                          "candidate address 224.0.0.251 is not usable"),
            "host name": (offer(with_candidates(sdp, [("evil.example", 4000)])), "bad_request",
                          "candidate host 'evil.example' is not an IP address (host names and mDNS are not resolved)"),
            "mdns": (offer(with_candidates(sdp, [("0d5e-4d2a.local", 4000)])), "bad_request",
                     "candidate host '0d5e-4d2a.local' is not an IP address"),
            "port 0": (offer(with_candidates(sdp, [("198.51.100.1", 0)])), "bad_request",
                       "candidate port 0 is out of range"),
            "port 70000": (offer(with_candidates(sdp, [("198.51.100.1", 70000)])), "bad_request",
                           "candidate port 70000 is out of range"),
        }
        try:
            room = asyncio.Semaphore(PER_PEER_LINKS)  # more at once from one peer are refused as busy (below)

            async def asked(raw):
                async with room:
                    return await ask(node, target, raw)
            replies = await asyncio.gather(*(asked(raw) for raw, _, _ in cases.values()))
            for (name, (_, code, words)), reply in zip(cases.items(), replies):
                assert set(reply) == {"v", "type", "code", "message"}, (name, reply)
                assert (reply["v"], reply["type"], reply["code"]) == (1, "error", code), (name, reply)
                assert words in reply["message"] and len(reply["message"]) <= 300, (name, reply)

            # a header announcing 2 GiB (over --max-frame, 64 MiB): the peer resets the stream from the header
            # alone and answers nothing (py-libp2p's yamux shows us that reset as an end of stream)
            stream = await node.open_stream(target.peer_id, SIGNAL_PROTOCOL)

            async def header_only():
                await stream._s.write(framing.header(2**31))
            await node.run_trio(header_only)
            with pytest.raises(EOFError, match="closed"):
                await asyncio.wait_for(stream.recv(), 10)
            await stream.close()
            assert "could not read it (frame of 2147483648 bytes exceeds the limit of 67108864 bytes)" in \
                wait_for(target.log, "2147483648", 5)

            # the same attacker, now with a good offer: answered
            reply = await ask(node, target, offer(sdp))
            assert reply["type"] == "answer" and check_sdp(reply["sdp"]).media[0].kind == "application"
            logged = log_of(target)
            assert logged.count(f"WebRTC offer from {node.peer_id} refused: ") >= len(cases), logged[-3000:]
        finally:
            await close(node)
            await pc.close()
    asyncio.run(main())


def test_ipv4_mapped_loopback_candidates_are_refused(target):
    async def main():
        sdp, pc = await offering()
        (node,) = await attackers(target, 1)
        try:
            for host in ("::ffff:127.0.0.1", "::ffff:0.0.0.0", "::ffff:224.0.0.251", "255.255.255.255", "240.0.0.1",
                         "0.1.2.3", "fe80::1"):  # (mapped ones: Python 3.11 calls them neither; CPython gh-117566)
                reply = await ask(node, target, offer(with_candidates(sdp, [(host, 4000)])))
                assert (reply["type"], reply.get("code")) == ("error", "bad_request"), (host, reply)
                assert "is not usable" in reply["message"], (host, reply)
        finally:
            await close(node)
            await pc.close()
    asyncio.run(main())


def test_offer_floods_and_silent_signallers_are_bounded(target):
    """Concurrent offers from one peer id beyond its WebRTC link limit are refused as busy (another peer is
    still answered) until the pending links time out; signallers that say nothing, or stop inside a frame,
    get a timeout error after the acceptor's timeout, and one more than the limit while they wait is refused
    at once; a HOP stream that stops inside its message is ended
    after the relay's read timeout. Info is answered all along."""
    async def main():
        sdp, pc = await offering()
        flooder, other, mute = await attackers(target, 3)
        hop_staller = (await attackers(target, 1))[0]
        t0 = time.monotonic()

        async def flood():
            replies = await asyncio.gather(*(ask(flooder, target, offer(sdp)) for _ in range(PER_PEER_LINKS + 3)))
            kinds = sorted((r["type"], r.get("code")) for r in replies)
            assert kinds == [("answer", None)] * PER_PEER_LINKS + [("error", "busy")] * 3, replies
            busy = [r["message"] for r in replies if r["type"] == "error"]  # (links open, or offers awaited)
            assert all(m.endswith(f"(at most {PER_PEER_LINKS})") for m in busy), busy
            assert (await ask(other, target, offer(sdp)))["type"] == "answer"  # the limit is per peer
            await asyncio.sleep(max(0.0, t0 + 3 - time.monotonic()))
            assert (await ask(flooder, target, offer(sdp)))["code"] == "busy"  # pending links still count
            await asyncio.sleep(max(0.0, t0 + ACCEPT_TIMEOUT - 1 - time.monotonic()))
            while True:  # the pending links time out (we never finish ICE): the flooder is answered again
                reply = await ask(flooder, target, offer(sdp))
                if reply["type"] == "answer":
                    return time.monotonic() - t0
                assert reply["code"] == "busy" and time.monotonic() - t0 < ACCEPT_TIMEOUT + 15, reply
                await asyncio.sleep(0.5)

        async def silent():
            stream = await mute.open_stream(target.peer_id, SIGNAL_PROTOCOL)
            try:
                t = time.monotonic()
                reply = json.loads(await asyncio.wait_for(stream.recv(), ACCEPT_TIMEOUT + 15))
                return reply, time.monotonic() - t
            finally:
                await stream.close()

        async def one_too_many():  # a fifth signaller of `mute` while its four are awaited: refused at once
            await asyncio.sleep(1.0)
            t = time.monotonic()
            stream = await mute.open_stream(target.peer_id, SIGNAL_PROTOCOL)
            try:
                return json.loads(await asyncio.wait_for(stream.recv(), 5)), time.monotonic() - t
            finally:
                await stream.close()

        async def half_frame():  # a header for 1000 bytes, 10 of them, then nothing
            stream = await mute.open_stream(target.peer_id, SIGNAL_PROTOCOL)

            async def write():
                await stream._s.write(framing.header(1000) + b'{"v": 1, "')
            await mute.run_trio(write)
            try:
                return json.loads(await asyncio.wait_for(stream.recv(), ACCEPT_TIMEOUT + 15))
            finally:
                await stream.close()

        async def info_meanwhile():
            await asyncio.sleep(1)
            return await info_ok(target)

        try:
            freed, silents, half, extra, hop, rtt = await asyncio.gather(
                flood(), asyncio.gather(*(silent() for _ in range(PER_PEER_LINKS - 1))), half_frame(), one_too_many(),
                raw_exchange(hop_staller, target, HOP, b"\x64abc", HopMessage, within=STREAM_READ_TIMEOUT + 15),
                info_meanwhile())
        finally:
            await close(flooder, other, mute, hop_staller)
            await pc.close()
        for reply, waited in silents:
            assert reply == {"v": 1, "type": "error", "code": "timeout",
                             "message": f"no offer within {ACCEPT_TIMEOUT:g} s"}
            assert ACCEPT_TIMEOUT - 0.5 < waited < ACCEPT_TIMEOUT + 10, waited
        assert half == {"v": 1, "type": "error", "code": "timeout", "message": f"no offer within {ACCEPT_TIMEOUT:g} s"}
        assert extra[0] == {"v": 1, "type": "error", "code": "busy",
                            "message": f"{PER_PEER_LINKS} offers from you awaited already (at most {PER_PEER_LINKS})"}
        assert extra[1] < 3, extra  # at once, not after the timeout
        assert ACCEPT_TIMEOUT - 1 < freed < ACCEPT_TIMEOUT + 15, freed
        reply, how, took = hop
        assert (reply, how) == (None, "eof") and STREAM_READ_TIMEOUT - 0.5 < took < STREAM_READ_TIMEOUT + 10, hop
        assert rtt < 5000
        assert f"WebRTC offer from {mute.peer_id}: none came within 10 s" in log_of(target)
    asyncio.run(main())


# --- Circuit Relay v2 ----------------------------------------------------------------------------------------

def test_relay_limits_and_garbage_are_refused(target):
    """Slots beyond --relay-max-reservations, circuits to a peer without a slot or beyond
    --relay-max-circuits-per-peer are refused with the status that says so; garbage on the HOP and STOP
    streams ends the stream (with a STATUS where the message parsed); the circuits that were granted keep
    working, and freed slots and circuits go to the next comers."""
    async def main():
        holder, second, third, c1, c2, c3, vandal = await attackers(target, 7)
        for node in (holder, second, third):
            node.set_stream_handler(ECHO, echo)
        try:
            circuit = await holder.reserve(target.addr)
            assert circuit == f"{target.addr}/p2p-circuit/p2p/{holder.peer_id}"
            await second.reserve(target.addr)
            with pytest.raises(ConnectionError, match=re.escape(
                    f"relay {target.peer_id} refused us a slot (RESOURCE_LIMIT_EXCEEDED: the relay is at its limits)")):
                await third.reserve(target.addr)

            nobody = str(ID.from_pubkey(create_new_key_pair().public_key))
            with pytest.raises(ConnectionError, match=re.escape(
                    f"did not connect us to {nobody} (NO_RESERVATION: the peer holds no slot there")):
                await c1.connect(f"{target.addr}/p2p-circuit/p2p/{nobody}")

            s1 = await c1.open_stream(circuit, ECHO)
            s2 = await c2.open_stream(circuit, ECHO)
            await roundtrip(s1)
            await roundtrip(s2)
            assert await c1.connection_path(holder.peer_id) == "relay"
            with pytest.raises(ConnectionError, match=re.escape(
                    f"did not connect us to {holder.peer_id} (RESOURCE_LIMIT_EXCEEDED: the relay is at its limits)")):
                await c3.connect(circuit)  # --relay-max-circuits-per-peer 2

            # garbage on HOP: (what is sent, the STATUS answered or None); the stream ends each time
            someone = ID.from_base58(third.peer_id).to_bytes()
            hop_cases = [
                (b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", None),  # a varint longer than any
                (b"\x80\x80\x40" + os.urandom(64), None),  # a 1 MiB length (the cap is 64 KiB)
                (b"\x05\xff\xff\xff\xff\xff", None),  # not protobuf
                (b"\x03\x0f\x0f\x0f", None),  # a field of wire type 7 (there is none)
                (b"\x10" + b"\xff" * 16, None),
                (HopMessage(type=HopMessage.STATUS, status=100), StatusCode.UNEXPECTED_MESSAGE),
                (HopMessage(type=HopMessage.CONNECT), StatusCode.NO_RESERVATION),  # no peer at all
                (HopMessage(type=HopMessage.CONNECT, peer=CircuitPeerId(id=os.urandom(40))), StatusCode.NO_RESERVATION),
                (HopMessage(type=HopMessage.CONNECT, peer=CircuitPeerId(id=ID.from_base58(target.peer_id).to_bytes())),
                 StatusCode.NO_RESERVATION),  # to the relay itself
                # a RESERVE in another's name is a reservation for the sender: refused, the relay is full
                (HopMessage(type=HopMessage.RESERVE, peer=CircuitPeerId(id=someone)), StatusCode.RESOURCE_LIMIT_EXCEEDED),
                (b"\x00", StatusCode.RESOURCE_LIMIT_EXCEEDED),  # an empty message: a RESERVE (proto default)
            ]
            for sent, status in hop_cases:
                reply, how, _ = await raw_exchange(vandal, target, HOP, sent, HopMessage, within=5)
                assert how == "eof", (sent, how)
                if status is None:
                    assert reply is None, (sent, reply)
                else:
                    assert (reply.type, reply.status) == (HopMessage.STATUS, status.value), (sent, reply)

            # garbage on STOP (every node's side of a circuit): MALFORMED_MESSAGE, then the end
            reply, how, _ = await raw_exchange(vandal, target, STOP, b"\x05\xff\xff\xff\xff\xff", StopMessage, within=5)
            assert (reply.type, reply.status, how) == (StopMessage.STATUS, StatusCode.MALFORMED_MESSAGE.value, "eof")

            await roundtrip(s1, b"still relayed")  # the granted circuits were not disturbed
            await roundtrip(s2, b"still relayed")
            await c1.close()  # its circuit ends: room for c3
            deadline = time.monotonic() + 10
            while True:
                try:
                    await roundtrip(await c3.open_stream(circuit, ECHO))
                    break
                except ConnectionError:
                    assert time.monotonic() < deadline, "the relay never freed the closed circuit"
                    await asyncio.sleep(0.2)
            await second.close()  # its slot lapses with its connection: room for the third
            deadline = time.monotonic() + 10
            while True:
                try:
                    assert await third.reserve(target.addr) == f"{target.addr}/p2p-circuit/p2p/{third.peer_id}"
                    break
                except ConnectionError as exc:
                    assert time.monotonic() < deadline and "RESOURCE_LIMIT_EXCEEDED" in str(exc), exc
                    await asyncio.sleep(0.2)
            assert await info_ok(target) < 5000
        finally:
            await close(holder, second, third, c1, c2, c3, vandal)
    asyncio.run(main())


# --- STUN ----------------------------------------------------------------------------------------------------

class UdpClient(asyncio.DatagramProtocol):
    def __init__(self):
        self.replies: asyncio.Queue = asyncio.Queue()

    def connection_made(self, transport):
        self.transport = transport
        self.addr = transport.get_extra_info("sockname")[:2]

    def datagram_received(self, data, addr):
        self.replies.put_nowait(data)


async def udp_client(host: str = "127.0.0.1") -> UdpClient:
    _, client = await asyncio.get_running_loop().create_datagram_endpoint(UdpClient, local_addr=(host, 0))
    return client


def binding(cls: stun.Class = stun.Class.REQUEST, method: stun.Method = stun.Method.BINDING) -> stun.Message:
    return stun.Message(method, cls)


async def drain(client: UdpClient, wait: float) -> list[bytes]:
    await asyncio.sleep(wait)
    out = []
    while not client.replies.empty():
        out.append(client.replies.get_nowait())
    return out


def check_answer(data: bytes, request: stun.Message, client: UdpClient) -> None:
    reply = stun.parse_message(data)  # checks its FINGERPRINT
    assert reply.message_method == stun.Method.BINDING and reply.message_class == stun.Class.RESPONSE
    assert reply.transaction_id == request.transaction_id
    assert reply.attributes["XOR-MAPPED-ADDRESS"] == tuple(client.addr) == reply.attributes["MAPPED-ADDRESS"]
    assert reply.attributes["SOFTWARE"] == "specswarm"


def test_stun_drops_garbage_and_rate_limits_a_flood(target):
    """The STUN port (from the log, and the `stun` field `swarm status --json` shows): garbage, other STUN
    messages and oversized datagrams get no answer (one warning line about the malformed ones); a flood of
    Binding requests from one IP is answered up to the burst only; another IP is still answered meanwhile,
    and after a pause the flooder too, with its right XOR-MAPPED-ADDRESS."""
    status = subprocess.Popen([sys.executable, "-m", "swarm.cli", "status", "--model", str(target.model),
                               "--initial-peers", target.addr, "--json"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)

    async def main():
        server = ("127.0.0.1", target.stun_port)
        client = await udp_client()
        try:
            good = bytes(binding())
            bad_fingerprint = binding()
            bad_fingerprint.add_fingerprint()
            bad_fingerprint = bytes(bad_fingerprint)[:-1] + bytes([bytes(bad_fingerprint)[-1] ^ 0xFF])
            junk = [b"hello world", bytes(20), os.urandom(100), good[:-1], good + b"\x00",  # malformed: 5
                    good[:4] + b"\x00\x00\x00\x00" + good[8:],  # wrong magic cookie
                    bad_fingerprint,
                    bytes(binding(stun.Class.INDICATION)), bytes(binding(stun.Class.RESPONSE)),  # ignored: 3
                    bytes(binding(stun.Class.REQUEST, stun.Method.ALLOCATE)),
                    b"\x00\x01" + bytes(MAX_DATAGRAM - 1), os.urandom(60000)]  # oversized: 2
            for datagram in junk:
                client.transport.sendto(datagram, server)
            assert await drain(client, 0.5) == []
            warned = wait_for(target.log, "malformed datagram(s) dropped so far", 5)
            assert re.search(r"WARNING specswarm\.stun: STUN server: \d+ malformed datagram\(s\) dropped so far "
                             r"\(the last from 127\.0\.0\.1: ", warned), warned[-2000:]

            await asyncio.sleep(STUN_BURST / STUN_RATE + 0.1)  # the bucket is full again
            flood = [binding() for _ in range(STUN_BURST + 50)]
            t = time.monotonic()
            for i, request in enumerate(flood):
                client.transport.sendto(bytes(request), server)
                if i % 25 == 24:
                    await asyncio.sleep(0.005)  # (so that the peer's socket buffer does not overflow)
            sending = time.monotonic() - t
            answers = await drain(client, 0.7)
            assert STUN_BURST <= len(answers) <= STUN_BURST + STUN_RATE * sending + 1, (len(answers), sending)
            by_id = {r.transaction_id: r for r in flood}
            for data in answers:
                check_answer(data, by_id[stun.parse_message(data).transaction_id], client)

            for host in [h for h in get_host_addresses(use_ipv4=True, use_ipv6=False)][:1]:  # another IP
                other = await udp_client(host)
                request = binding()
                other.transport.sendto(bytes(request), server)
                check_answer(await asyncio.wait_for(other.replies.get(), 5), request, other)
                other.transport.close()
            await asyncio.sleep(1.0)  # tokens again
            request = binding()
            client.transport.sendto(bytes(request), server)
            check_answer(await asyncio.wait_for(client.replies.get(), 5), request, client)
        finally:
            client.transport.close()
    try:
        asyncio.run(main())
        out, err = status.communicate(timeout=60)
    finally:
        if status.poll() is None:
            status.kill()
            status.wait()
    assert status.returncode == 0, err
    (seen,) = json.loads(out)["peers"]
    assert (seen["peer_id"], seen["stun"], seen["reachability"]) == \
        (target.peer_id, f"stun:127.0.0.1:{target.stun_port}", "unknown")


# --- signed records ------------------------------------------------------------------------------------------

def test_forged_or_malformed_stun_records_are_refused():
    kp, other = create_new_key_pair(), create_new_key_pair()
    now = time.time()
    rec = PeerRecord("m", 0, 8, reachability="public", observed="203.0.113.7", stun="stun:203.0.113.7:31330",
                     issued=now, expires=now + 60)
    signed = rec.sign(kp)
    assert PeerRecord.verify(signed).stun == "stun:203.0.113.7:31330"
    fields = dataclasses.asdict(PeerRecord.verify(signed))

    tampered = signed.replace(b"stun:203.0.113.7:31330", b"stun:198.51.100.9:3478")
    with pytest.raises(RecordError, match="bad signature"):
        PeerRecord.verify(tampered)
    with pytest.raises(RecordError, match="bad signature"):  # our key and id, another key's signature
        PeerRecord.verify(_seal({**fields, "stun": "stun:198.51.100.9:3478"}, other.private_key))
    with pytest.raises(RecordError, match="public key does not match the peer id"):  # another's key, our id
        PeerRecord.verify(_seal({**fields, "public_key": other.public_key.serialize().hex()}, other.private_key))
    with pytest.raises(RecordError, match="claims peer"):
        dataclasses.replace(rec, peer_id=fields["peer_id"]).sign(other)
    body, _, sig = signed.rpartition(b"\n")
    with pytest.raises(RecordError, match="unsigned"):
        PeerRecord.verify(body + b"\n" + sig[:-2])

    for bad in ("stun:not-an-ip:99999", "http://x", "stun:" + "1" * 195, "stun:203.0.113.7:0",
                "stun:203.0.113.7:65536", "stun:203.0.113.7", "stun:stun.example.org:3478", "stun::3478",
                "turn:203.0.113.7:3478", "", 3478, ["stun:203.0.113.7:3478"]):
        with pytest.raises(RecordError, match=r"malformed: bad stun"):
            PeerRecord.verify(_seal({**fields, "stun": bad}, kp.private_key))  # correctly signed, all the same
        with pytest.raises(RecordError, match=r"malformed: bad stun"):
            dataclasses.replace(rec, stun=bad).sign(kp)  # nor does a peer publish one
    assert PeerRecord.verify(_seal({**fields, "stun": "stun:[2001:db8::7]:3478"}, kp.private_key)).stun == \
        "stun:[2001:db8::7]:3478"


# --- afterwards ----------------------------------------------------------------------------------------------

@pytest.mark.timeout(90)
def test_the_peer_still_serves_after_all_of_it(target):
    """Run last: the peer process is alive, answers Info, and a generation through it equals a local one;
    its log holds no traceback."""
    assert target.proc.proc.poll() is None
    assert asyncio.run(info_ok(target)) < 5000
    argv = ["generate", "--model", str(target.model), "--max-new-tokens", "8", "--prompt", PROMPT,
            "--dtype", "float32"]  # the launcher's peer's (a client's default, auto, may be bfloat16)
    runs = [subprocess.Popen([sys.executable, "-m", "swarm.cli", *argv, *where], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
            for where in (["--initial-peers", target.addr], ["--local"])]
    (remote, remote_err), (local, local_err) = [p.communicate(timeout=80) for p in runs]
    assert [p.returncode for p in runs] == [0, 0], (remote_err, local_err)
    assert remote == local and remote.startswith(PROMPT), (remote, local)
    assert f"route {target.peer_id}:0:8" in remote_err and "local" in local_err, (remote_err, local_err)
    assert target.proc.proc.poll() is None
    text = log_of(target)
    assert "Traceback" not in text, text[-5000:]
    errors = [line for line in text.splitlines() if " ERROR " in line or " CRITICAL " in line]
    assert errors == [], errors  # (e.g. "stream handler failed", "Task exception was never retrieved")
