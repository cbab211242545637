"""The WebRTC data plane (issue 15): peer/webrtc.py (links, streams, signalling, hostile offers) and
peer/stun.py (the STUN server peers run). Real aiortc peer connections in one process, signalled over an
in-memory stream pair; no mocks. ICE needs a non-loopback interface (aioice never gathers loopback)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import statistics
import time

import pytest
from aioice import Connection, stun
from aioice.ice import get_host_addresses
from aiortc import RTCPeerConnection

from peer.stun import StunServer
from peer.webrtc import (CHUNK, MAX_SIGNAL, WINDOW, IceConfig, RtcAcceptor, RtcLink, check_sdp, connect, path_of,
                         SignalError)
from protocol.framing import FrameTooLarge, header

pytestmark = pytest.mark.timeout(60)
HOSTS = get_host_addresses(use_ipv4=True, use_ipv6=True)
IPV4 = [h for h in HOSTS if ":" not in h]
needs_iface = pytest.mark.skipif(not HOSTS, reason="no non-loopback network interface: aioice gathers no ICE "
                                                   "host candidates from loopback, so WebRTC cannot connect here")


# --- helpers -------------------------------------------------------------------------------------------------

class QueueStream:
    """One end of an in-memory signalling pair (the Stream interface); close() gives the other end EOF."""

    def __init__(self, inbox: asyncio.Queue, outbox: asyncio.Queue):
        self.inbox, self.outbox = inbox, outbox

    async def send(self, payload: bytes) -> None:
        self.outbox.put_nowait(bytes(payload))

    async def recv(self) -> bytes:
        item = await self.inbox.get()
        if item is None:
            raise EOFError("signalling closed")
        return item

    async def close(self) -> None:
        self.outbox.put_nowait(None)


def signal_pair() -> tuple[QueueStream, QueueStream]:
    a, b = asyncio.Queue(), asyncio.Queue()
    return QueueStream(a, b), QueueStream(b, a)


async def echo(stream) -> None:
    while True:
        try:
            frame = await stream.recv()
        except EOFError:
            return
        await stream.send(frame)


async def linked(acceptor: RtcAcceptor, peer: str | None = "client", **kw) -> tuple[RtcLink, RtcLink]:
    """(client link, server link) through `acceptor`."""
    ours, theirs = signal_pair()
    served = asyncio.ensure_future(acceptor.handle(theirs, peer))
    client = await connect(ours, IceConfig(), remote_peer_id="server", **kw)
    server = await served
    assert server is not None
    return client, server


async def offer_sdp() -> str:
    pc = RTCPeerConnection(IceConfig().configuration())
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    await pc.close()
    return sdp


async def ask(acceptor: RtcAcceptor, raw: bytes, peer: str = "hostile") -> dict:
    """Hand `raw` to the acceptor as an offer; its JSON reply."""
    ours, theirs = signal_pair()
    handled = asyncio.ensure_future(acceptor.handle(theirs, peer))
    await ours.send(raw)
    reply = json.loads(await asyncio.wait_for(ours.recv(), 10))
    assert await handled is None
    return reply


async def until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def payload(n: int, seed: int = 0) -> bytes:
    return bytes((i * 7 + seed) % 251 for i in range(min(n, 251))) * (n // 251) + bytes(n % 251) if n else b""


# --- streams -------------------------------------------------------------------------------------------------

@needs_iface
def test_frames_round_trip_exactly_over_a_host_pair():
    async def body():
        acceptor = RtcAcceptor(IceConfig(), echo)
        client, server = await linked(acceptor)
        assert client.path == server.path == "webrtc"
        assert client.pair[:2] == ("host", "host") and client.pair[2] == server.pair[3]
        stream = await client.open_stream()
        assert stream.remote_peer_id == "server" and stream.path == "webrtc"
        for n in (0, 1, 4096, 64 * 1024 + 1, 1 << 20):
            data = os.urandom(n)
            await stream.send(data)
            assert await stream.recv() == data, n
        # a bytearray and a memoryview are frames too
        await stream.send(memoryview(bytearray(b"view")))
        assert await stream.recv() == b"view"
        await client.close()
        await acceptor.close()

    asyncio.run(body())


@needs_iface
def test_concurrent_streams_both_ways_on_one_link():
    async def body():
        acceptor = RtcAcceptor(IceConfig(), echo)
        client, server = await linked(acceptor, on_stream=echo)

        async def talk(link: RtcLink, k: int) -> None:
            stream = await link.open_stream()
            frames = [payload(n, k) for n in (10, CHUNK - 4, CHUNK + 3, 100_000, 7)]
            sender = asyncio.ensure_future(asyncio.gather(*(stream.send(f) for f in frames)))  # pipelined
            got = [await stream.recv() for _ in frames]
            await sender
            assert got == frames
            await stream.close()

        await asyncio.gather(*(talk(client, k) for k in range(6)), talk(server, 99))  # the answerer opens one too
        await client.close()
        await acceptor.close()

    asyncio.run(body())


@needs_iface
def test_closing_gives_eof_after_the_frames_sent_before():
    async def body():
        seen: asyncio.Queue = asyncio.Queue()

        async def record(stream) -> None:
            while True:
                try:
                    seen.put_nowait(await stream.recv())
                except Exception as exc:  # noqa: BLE001
                    seen.put_nowait(exc)
                    return

        acceptor = RtcAcceptor(IceConfig(), record)
        client, server = await linked(acceptor)
        # a stream closed right after a send: the frame arrives, then EOF; the closer's recv is EOF at once
        stream = await client.open_stream()
        await stream.send(b"last words")
        await stream.close()
        assert await asyncio.wait_for(seen.get(), 5) == b"last words"
        assert isinstance(await asyncio.wait_for(seen.get(), 5), EOFError)
        with pytest.raises(EOFError):
            await stream.recv()
        with pytest.raises(BrokenPipeError):
            await stream.send(b"more")

        # closing the link: EOF on both sides, and the acceptor forgets the link
        stream = await client.open_stream()
        await stream.send(b"hello")
        assert await asyncio.wait_for(seen.get(), 5) == b"hello"
        await client.close()
        assert client.closed
        with pytest.raises(EOFError):
            await stream.recv()
        assert isinstance(await asyncio.wait_for(seen.get(), 10), EOFError)
        await asyncio.wait_for(server.wait_closed(), 10)
        assert not acceptor.links
        with pytest.raises(ConnectionError):
            await client.open_stream()

        # the answering side closing (e.g. the peer shutting down) ends the client's link and streams
        client, server = await linked(acceptor)
        stream = await client.open_stream()
        await acceptor.close()
        with pytest.raises(EOFError):
            await asyncio.wait_for(stream.recv(), 10)
        await asyncio.wait_for(client.wait_closed(), 10)

    asyncio.run(body())


@needs_iface
def test_oversized_and_slow_senders_are_cut_off():
    async def body():
        outcomes: asyncio.Queue = asyncio.Queue()

        async def handler(stream) -> None:
            await stream.recv()
            try:
                outcomes.put_nowait(await stream.recv())
            except Exception as exc:  # noqa: BLE001
                outcomes.put_nowait(exc)

        acceptor = RtcAcceptor(IceConfig(), handler, max_frame=1000, frame_timeout=0.3)
        client, _ = await linked(acceptor)

        stream = await client.open_stream()
        await stream.send(b"hi")
        await stream.send(b"x" * 1001)  # above the receiver's max_frame: refused from the header alone
        assert isinstance(await asyncio.wait_for(outcomes.get(), 5), FrameTooLarge)
        with pytest.raises(EOFError):  # the receiver reset the stream
            await asyncio.wait_for(stream.recv(), 5)

        stream = await client.open_stream()
        await stream.send(b"hi")
        stream.channel.send(header(100) + b"only ten b")  # a frame that never completes
        started = time.monotonic()
        assert isinstance(await asyncio.wait_for(outcomes.get(), 5), TimeoutError)
        assert 0.2 < time.monotonic() - started < 2

        await client.close()
        await acceptor.close()

    asyncio.run(body())


@needs_iface
def test_a_reader_that_does_not_read_stops_its_sender():
    async def body():
        got: list = []
        reading = asyncio.Event()

        async def slow_reader(stream) -> None:
            await reading.wait()
            while True:
                try:
                    got.append(await stream.recv())
                except Exception as exc:  # noqa: BLE001
                    got.append(exc)
                    return

        acceptor = RtcAcceptor(IceConfig(), slow_reader)
        client, _ = await linked(acceptor)
        stream = await client.open_stream()
        frames = [payload(200_000, k) for k in range(8)]  # 1.6 MB, far over the window

        async def send_all() -> None:
            for frame in frames:
                await stream.send(frame)

        sending = asyncio.ensure_future(send_all())
        await asyncio.sleep(0.5)
        assert not sending.done()  # waiting for credit: at most a frame and a window sent
        assert stream._sent <= 200_004 + WINDOW
        reading.set()
        await asyncio.wait_for(sending, 10)
        await stream.close()
        await until(lambda: len(got) == len(frames) + 1)
        assert got[:-1] == frames and isinstance(got[-1], EOFError)

        # a sender that ignores its credit (raw messages: whole frames, over a window to a reader who
        # does not read) gets the stream reset
        got.clear()
        reading.clear()
        stream = await client.open_stream()
        for _ in range(WINDOW // CHUNK + 2):
            stream.channel.send(header(CHUNK - 4) + bytes(CHUNK - 4))
        await asyncio.sleep(0.3)
        reading.set()
        await until(lambda: got)
        assert isinstance(got[0], ConnectionResetError) and "beyond its credit" in str(got[0])
        await client.close()
        await acceptor.close()

    asyncio.run(body())


@needs_iface
def test_cancelled_recv_and_send_keep_the_framing():
    async def body():
        acceptor = RtcAcceptor(IceConfig(), echo)
        client, _ = await linked(acceptor)
        stream = await client.open_stream()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(stream.recv(), 0.05)  # nothing came: nothing consumed
        big = os.urandom(1 << 20)
        sending = asyncio.ensure_future(stream.send(big))
        await asyncio.sleep(0.01)
        sending.cancel()  # the frame is still sent whole, before the next one
        await stream.send(b"after")
        assert await stream.recv() == big
        assert await stream.recv() == b"after"
        await client.close()
        await acceptor.close()

    asyncio.run(body())


@needs_iface
def test_round_trip_of_small_frames_is_fast():
    """A loose bound for a shared CI machine; the numbers themselves are printed (pytest -s)."""
    async def body():
        acceptor = RtcAcceptor(IceConfig(), echo)
        client, _ = await linked(acceptor)
        stream = await client.open_stream()
        data, times = os.urandom(4096), []
        for _ in range(100):
            started = time.perf_counter()
            await stream.send(data)
            await stream.recv()
            times.append(time.perf_counter() - started)
        median = statistics.median(times) * 1e3
        print(f"4 KB round trip over RtcStream (one process): median {median:.2f} ms")
        assert median < 20
        await client.close()
        await acceptor.close()

    asyncio.run(body())


# --- signalling and hostile offers ---------------------------------------------------------------------------

@needs_iface
def test_acceptor_refuses_hostile_offers_and_keeps_serving():
    async def body():
        acceptor = RtcAcceptor(IceConfig(), echo, max_links=3, max_links_per_peer=2, timeout=0.5)
        sdp = await offer_sdp()

        def offer(sdp_value, **extra) -> bytes:
            return json.dumps({"v": 1, "type": "offer", "sdp": sdp_value, **extra}).encode()

        candidate = next(line for line in sdp.splitlines() if line.startswith("a=candidate:"))
        parts = candidate.split()  # a=candidate:F 1 udp PRIORITY IP PORT typ host
        many = sdp.replace(candidate, "\r\n".join(" ".join(parts[:5] + [str(40000 + i)] + parts[6:])
                                                    for i in range(40)))
        assert many.count("a=candidate:") >= 40
        hostile = {
            b"x" * (MAX_SIGNAL + 1): ("too_large", "32768"),
            b"\xff\xfe not json": ("bad_request", "not JSON"),
            b"[" * 5000 + b"]" * 5000: ("bad_request", "not JSON"),
            b"[1, 2]": ("bad_request", "not a JSON object"),
            json.dumps({"v": 2, "type": "offer", "sdp": sdp}).encode(): ("bad_request", "version"),
            json.dumps({"v": 1, "type": "answer", "sdp": sdp}).encode(): ("bad_request", "expected"),
            json.dumps({"v": 1, "type": "error", "message": "hi"}).encode(): ("bad_request", "expected an offer"),
            offer(123): ("bad_request", "string"),
            offer("hello"): ("bad_request", "application"),
            offer("v=0\r\nm=application 9 UDP/DTLS/SCTP\r\n"): ("bad_request", "unparsable"),
            offer(sdp + sdp[sdp.index("m=application"):]): ("bad_request", "exactly one application"),
            offer(re.sub(r"a=ice-pwd:.*\r\n", "", sdp)): ("bad_request", "ICE credentials"),
            offer(re.sub(r"a=fingerprint:.*\r\n", "", sdp)): ("bad_request", "DTLS"),
            offer(many): ("bad_request", "candidates"),
            offer(sdp + "a=x\r\n" * 300): ("bad_request", "lines"),
            offer(sdp.replace(candidate, candidate.replace(parts[4], "evil.example"))): ("bad_request", "not an IP"),
            offer(sdp.replace(candidate, candidate.replace(parts[4], "127.0.0.1"))): ("bad_request", "loopback"),
        }
        for raw, (code, words) in hostile.items():
            reply = await ask(acceptor, raw)
            assert reply["v"] == 1 and reply["type"] == "error" and reply["code"] == code, (words, reply)
            assert words in reply["message"], (words, reply)

        # a signaller that says nothing is dropped after the acceptor's timeout
        ours, theirs = signal_pair()
        assert await acceptor.handle(theirs, "silent") is None
        assert json.loads(await ours.recv())["code"] == "timeout"

        # limits: two links per peer, three in all; a closed link is forgotten
        first, _ = await linked(acceptor, "peer-x")
        await linked(acceptor, "peer-x")
        reply = await ask(acceptor, offer(sdp), "peer-x")
        assert reply["code"] == "busy" and "at most 2" in reply["message"]
        await linked(acceptor, "peer-y")
        reply = await ask(acceptor, offer(sdp), "peer-z")
        assert reply["code"] == "busy" and "at most 3" in reply["message"]
        ours, theirs = signal_pair()
        asyncio.ensure_future(acceptor.handle(theirs, "peer-z"))
        with pytest.raises(ConnectionError, match="busy"):  # connect() reports a refusal clearly
            await connect(ours, IceConfig(), remote_peer_id="server")
        await first.close()
        await until(lambda: acceptor.count("peer-x") == 1)
        client, _ = await linked(acceptor, "peer-x")  # a good offer after all that
        stream = await client.open_stream()
        await stream.send(b"still serving")
        assert await stream.recv() == b"still serving"
        await acceptor.close()
        assert not acceptor.links

    asyncio.run(body())


@needs_iface
def test_connect_fails_clearly_without_an_answer_or_a_working_pair():
    async def body():
        ours, _theirs = signal_pair()  # nobody answers
        with pytest.raises(ConnectionError, match="timed out after 0.5 s waiting for the answer"):
            await connect(ours, IceConfig(), timeout=0.5, remote_peer_id="mute")

        ours, theirs = signal_pair()
        await theirs.close()
        with pytest.raises(ConnectionError, match="signalling stream closed"):
            await connect(ours, IceConfig(), remote_peer_id="gone")

        # an answer whose candidates lead nowhere: ICE times out, and the error names the candidates
        ours, theirs = signal_pair()

        async def bad_answerer() -> None:
            pc = RTCPeerConnection(IceConfig().configuration())
            offer = json.loads(await theirs.recv())
            from aiortc import RTCSessionDescription
            await pc.setRemoteDescription(RTCSessionDescription(offer["sdp"], "offer"))
            await pc.setLocalDescription(await pc.createAnswer())
            sdp = re.sub(r"(a=candidate:\S+ 1 udp \d+ \S+) \d+", r"\1 9", pc.localDescription.sdp)
            await pc.close()  # nothing listens on port 9 of these addresses now
            await theirs.send(json.dumps({"v": 1, "type": "answer", "sdp": sdp}).encode())

        answering = asyncio.ensure_future(bad_answerer())
        with pytest.raises(ConnectionError, match=r"timed out after 1 s connecting.*remote: host x"):
            await connect(ours, IceConfig(), timeout=1.0, remote_peer_id="dead")
        await answering

        # relay-only ICE whose TURN server does not answer: no candidate at all (aioice waits 5 s for it)
        relay_only = IceConfig.parse(None, "turn:127.0.0.1:9", "u", "p", turn_only=True)
        with pytest.raises(ConnectionError, match="no ICE candidate gathered.*TURN server did not answer"):
            await connect(signal_pair()[0], relay_only, timeout=8, remote_peer_id="relayed")

        ours, theirs = signal_pair()
        await theirs.send(json.dumps({"v": 1, "type": "answer", "sdp": "garbage"}).encode())
        with pytest.raises(ConnectionError, match="bad answer"):
            await connect(ours, IceConfig(), remote_peer_id="liar")

    asyncio.run(body())


def test_check_sdp_and_path_rules():
    with pytest.raises(SignalError, match="string"):
        check_sdp(None)
    assert path_of(("host", "host", None, None)) == "webrtc"
    assert path_of(("srflx", "prflx", None, None)) == "webrtc"
    assert path_of(("relay", "host", None, None)) == "webrtc-turn"
    assert path_of(("host", "relay", None, None)) == "webrtc-turn"
    assert path_of(None) == "webrtc"


# --- configuration -------------------------------------------------------------------------------------------

def test_ice_config_parse():
    assert IceConfig.parse().servers() == []  # empty, never None: aiortc would ask Google's STUN server
    assert IceConfig().configuration().iceServers == []
    cfg = IceConfig.parse("stun:203.0.113.10:3478", "turn:203.0.113.10:3478?transport=tcp", "u", "p")
    assert [s.urls for s in cfg.servers()] == ["stun:203.0.113.10:3478", "turn:203.0.113.10:3478?transport=tcp"]
    assert cfg.servers()[1].username == "u" and cfg.servers()[1].credential == "p"
    assert IceConfig.parse(["stun:stun.example.org"]).stun == ["stun:stun.example.org"]
    relay = IceConfig.parse(None, "turns:relay.example.org:5349", "u", "p", turn_only=True)
    assert relay.configuration().iceTransportPolicy.value == "relay"
    bad = [
        (("http://203.0.113.10",), "not a STUN URL"),
        (("stun:",), "stun:"),
        (("stun:203.0.113.10:99999",), "out of range"),
        (("stun:203.0.113.10:3478?transport=udp",), "transport"),
        (("stuns:203.0.113.10",), "not supported"),
        (("stun:[2001:db8::1]:3478",), "IPv6"),
        ((["stun:a.example", "stun:b.example"],), "single STUN server"),
        ((None, "turn:203.0.113.10:3478"), "user name and a password"),
        ((None, "turn:203.0.113.10:3478?transport=sctp", "u", "p"), "transport"),
        ((None, "stun:203.0.113.10:3478", "u", "p"), "not a TURN URL"),
        ((None, None, None, None, True), "needs a TURN server"),
    ]
    for args, words in bad:
        with pytest.raises(ValueError, match=re.escape(words)):
            IceConfig.parse(*args)


# --- STUN ----------------------------------------------------------------------------------------------------

class Client(asyncio.DatagramProtocol):
    def __init__(self):
        self.replies: asyncio.Queue = asyncio.Queue()

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.replies.put_nowait(data)


async def udp_client(host: str = "127.0.0.1") -> Client:
    _, client = await asyncio.get_running_loop().create_datagram_endpoint(Client, local_addr=(host, 0))
    return client


def binding(cls: stun.Class = stun.Class.REQUEST) -> stun.Message:
    return stun.Message(stun.Method.BINDING, cls)


def test_stun_server_answers_binding_requests_and_drops_the_rest():
    async def body():
        server = await StunServer.start("127.0.0.1", 0, rate=1.0, burst=10)
        client = await udp_client()
        request = binding()
        client.transport.sendto(bytes(request), server.addr)
        reply = stun.parse_message(await asyncio.wait_for(client.replies.get(), 5))  # checks the FINGERPRINT
        me = client.transport.get_extra_info("sockname")[:2]
        assert reply.message_class == stun.Class.RESPONSE and reply.transaction_id == request.transaction_id
        assert reply.attributes["XOR-MAPPED-ADDRESS"] == me == reply.attributes["MAPPED-ADDRESS"]
        assert reply.attributes["SOFTWARE"] == "specswarm"

        for junk in (b"hello world", bytes(20), bytes(request)[:-1] + b"\x00\x00\x00", bytes(request)[:-2],
                     bytes(binding(stun.Class.INDICATION)), b"\x00\x01" + bytes(1400)):
            client.transport.sendto(junk, server.addr)
        await asyncio.sleep(0.2)
        assert client.replies.empty()
        assert server.counters == {"answered": 1, "ignored": 1, "malformed": 4, "oversize": 1, "rate_limited": 0}

        # a flood from one address: what is left of the burst of 10 (6 were spent above), then 1 a second
        for _ in range(40):
            client.transport.sendto(bytes(binding()), server.addr)
        await asyncio.sleep(0.3)
        assert 4 <= client.replies.qsize() <= 6
        assert server.counters["rate_limited"] >= 34
        client.transport.close()
        server.close()

    asyncio.run(body())


@needs_iface
@pytest.mark.skipif(not IPV4, reason="aioice asks STUN servers from IPv4 host candidates only; none here")
def test_stun_server_gives_ice_a_srflx_candidate():
    async def body():
        server = await StunServer.start("0.0.0.0", 0)
        url = f"stun:{IPV4[0]}:{server.addr[1]}"
        # aioice's own client code
        conn = Connection(ice_controlling=True, stun_server=(IPV4[0], server.addr[1]), use_ipv6=False)
        await conn.gather_candidates()
        host = next(c for c in conn.local_candidates if c.type == "host" and c.host == IPV4[0])
        srflx = [c for c in conn.local_candidates if c.type == "srflx"]
        assert [(c.host, c.port, c.related_address) for c in srflx if c.related_port == host.port] == [
            (IPV4[0], host.port, IPV4[0])]
        await conn.close()

        # a link whose ICE uses it: the offer carries the srflx candidate, and it connects
        acceptor = RtcAcceptor(IceConfig.parse(url), echo)
        ours, theirs = signal_pair()
        served = asyncio.ensure_future(acceptor.handle(theirs, "client"))
        link = await connect(ours, IceConfig.parse(url))
        assert "typ srflx" in link.pc.localDescription.sdp and await served is not None
        assert link.path == "webrtc"
        stream = await link.open_stream()
        await stream.send(b"via stun")
        assert await stream.recv() == b"via stun"
        assert server.counters["answered"] >= 2
        await link.close()
        await acceptor.close()
        server.close()

    asyncio.run(body())
