"""peer/paths.py: the path an inference stream takes to a peer, with real nodes on this machine.

A relay R, a peer P behind it (a slot on R; `Paths.serve` answers WebRTC offers), a client C whose `Paths`
dials P's circuit address: the stream is upgraded to a WebRTC data channel (where this machine has a
non-loopback interface: aioice never uses loopback) or stays on the relay, frames echo exactly either way,
later streams reuse the link, `--no-webrtc` keeps the relay; direct addresses stay direct. And the rules:
settings refuse bad URLs, STUN is learnt only from a record's own host.
"""

from __future__ import annotations

import asyncio
import os

import ifaddr
import pytest

from peer.p2p import P2PNode
from peer.paths import Paths, PathSettings, peer_id_at
from peer.relay import RelayLimits
from peer.transport import INFERENCE_PROTOCOL, dial
from protocol import messages as m

pytestmark = pytest.mark.timeout(60)
NON_LOOPBACK = any(not ip.is_IPv6 and not str(ip.ip).startswith("127.")
                   for adapter in ifaddr.get_adapters() for ip in adapter.ips)


async def serve_echo(stream, name: str = "") -> None:
    """What a peer's server does with an Info (paths ping with one), else an echo."""
    while True:
        frame = await stream.recv()
        try:
            is_info = isinstance(m.decode(frame), m.Info)
        except ValueError:
            is_info = False
        await stream.send(m.encode(m.InfoReply("model", (0, 1), 1, 1, "float32")) if is_info else frame)


async def swarm(settings: PathSettings):
    relay = await P2PNode.start(relay=RelayLimits())
    private, client = await P2PNode.start(), await P2PNode.start()
    private.paths = Paths(private, PathSettings())
    private.set_stream_handler(INFERENCE_PROTOCOL, lambda s: serve_echo(s))
    private.paths.serve(serve_echo)
    circuit = await private.reserve(relay.addrs[0])
    client.paths = Paths(client, settings)
    return relay, private, client, circuit


async def teardown(*nodes: P2PNode) -> None:
    for node in nodes:
        if node.paths is not None:
            await node.paths.close()
        await node.close()


async def echo(stream, size: int) -> None:
    payload = os.urandom(size)
    await stream.send(payload)
    assert await asyncio.wait_for(stream.recv(), 20) == payload


def test_relayed_peer_is_upgraded_where_it_can_be():
    async def main():
        relay, private, client, circuit = await swarm(PathSettings())
        try:
            stream = await dial(client, circuit)  # transport.dial goes through node.paths
            want = "webrtc" if NON_LOOPBACK else "relay"
            assert client.paths.path_of(private.peer_id) == want
            for size in (1, 2472, 70_000, 1 << 20):
                await echo(stream, size)
            again = await dial(client, circuit)  # a second stream: a new channel on the same link
            await echo(again, 100)
            assert client.paths.path_of(private.peer_id) == want
            assert len(client.paths.links) == (1 if NON_LOOPBACK else 0)
            await stream.close()
            await again.close()
        finally:
            await teardown(client, private, relay)
    asyncio.run(main())


def test_no_webrtc_keeps_the_relay_and_direct_stays_direct():
    async def main():
        relay, private, client, circuit = await swarm(PathSettings(webrtc=False))
        try:
            stream = await dial(client, circuit)
            await echo(stream, 5000)
            assert client.paths.path_of(private.peer_id) == "relay" and not client.paths.links
            relay.set_stream_handler(INFERENCE_PROTOCOL, lambda s: serve_echo(s))
            direct = await dial(client, relay.addrs[0])
            await echo(direct, 100)
            assert client.paths.path_of(relay.peer_id) == "direct"
        finally:
            await teardown(client, private, relay)
    asyncio.run(main())


def test_settings_and_stun_rules():
    with pytest.raises(ValueError):
        PathSettings(stun="http://example.org")
    with pytest.raises(ValueError):
        PathSettings(turn="turn:")
    assert PathSettings(stun="stun:203.0.113.10:3478").stun == "stun:203.0.113.10:3478"
    paths = Paths(node=None)
    pid = "12D3KooWC4SyERCb8fxEpALbwjLUfYzaBNnPN1WEivrmpGfx9r79"
    paths.learn_stun("stun:198.51.100.9:3478", [f"/ip4/203.0.113.10/tcp/31330/p2p/{pid}"])  # not its host
    assert paths.swarm_stun is None
    paths.learn_stun("stun:203.0.113.10:31330", [f"/ip4/203.0.113.10/tcp/31330/p2p/{pid}/p2p-circuit/p2p/x"])
    assert paths.swarm_stun is None  # a relay's host is not the peer's
    paths.learn_stun("stun:203.0.113.10:31330", [f"/ip4/203.0.113.10/tcp/31330/p2p/{pid}"])
    assert paths.swarm_stun == "stun:203.0.113.10:31330"
    assert peer_id_at(f"/ip4/1.2.3.4/tcp/1/p2p/{pid}") == pid
    with pytest.raises(ValueError):
        peer_id_at("/ip4/1.2.3.4/tcp/1")
