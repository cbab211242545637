"""peer/p2p.py: two libp2p nodes on 127.0.0.1 talking length-prefixed frames from asyncio."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import threading
import time

import pytest

from peer.p2p import P2PNode, load_or_create_identity
from protocol import framing

pytestmark = pytest.mark.timeout(30)
ECHO = "/specswarm/test-echo/1"


async def echo(stream) -> None:
    while True:
        await stream.send(await stream.recv())  # EOFError when the client closes ends the handler


def run(coro_fn, *args, **kw):
    """Start a server node (echo handler) and a client node, run coro_fn(server, client), close both."""
    async def main():
        server = await P2PNode.start(**kw)
        client = await P2PNode.start()
        server.set_stream_handler(ECHO, echo)
        try:
            return await coro_fn(server, client, *args)
        finally:
            await client.close()
            await server.close()
    return asyncio.run(main())


def p2p_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("p2p-trio")]


def test_addrs_and_echo_sizes():
    async def body(server, client):
        assert server.peer_id != client.peer_id
        (addr,) = server.addrs
        assert addr.startswith("/ip4/127.0.0.1/tcp/") and addr.endswith(f"/p2p/{server.peer_id}")
        assert int(addr.split("/")[4]) > 0  # the port actually bound, not 0
        assert await client.connect(addr) == server.peer_id
        stream = await client.open_stream(server.peer_id, ECHO)
        assert stream.remote_peer_id == server.peer_id
        for size in (0, 1, 1024, 64 * 1024, 1024 * 1024):
            payload = os.urandom(size)
            await stream.send(payload)
            assert await stream.recv() == payload
        await stream.close()
    run(body)


def test_wildcard_listen_reports_dialable_addresses():
    async def body():
        server = await P2PNode.start(listen=["/ip4/0.0.0.0/tcp/0"])
        client = await P2PNode.start()
        try:
            assert server.addrs and not any("/0.0.0.0/" in a for a in server.addrs)
            local = [a for a in server.addrs if a.startswith("/ip4/127.0.0.1/")]
            assert local and await client.connect(local[0]) == server.peer_id
        finally:
            await client.close()
            await server.close()
    asyncio.run(body())


def test_open_stream_by_multiaddr_and_concurrent_streams():
    async def body(server, client):
        first = await client.open_stream(server.addrs[0], ECHO)  # dials on demand

        async def talk(i: int) -> None:
            stream = first if i == 0 else await client.open_stream(server.peer_id, ECHO)
            for j in range(5):
                payload = os.urandom(1000 * i + j) + bytes([i])
                await stream.send(payload)
                assert await stream.recv() == payload
            await stream.close()
        await asyncio.gather(*(talk(i) for i in range(8)))
        assert await client.run_trio(n_connections, client, server.peer_id) == 1  # eight streams, one connection
    run(body)


async def n_connections(node: P2PNode, peer: str | None = None) -> int:  # runs in the node's trio thread
    from libp2p.peer.id import ID
    return len(node.host.get_network().get_connections(ID.from_base58(peer) if peer else None))


async def _async(value):
    return value


def test_connect_reuses_the_connection():
    async def body(server, client):
        await client.connect(server.addrs[0])
        t = time.perf_counter()
        assert await client.connect(server.addrs[0]) == server.peer_id
        assert time.perf_counter() - t < 0.05
        assert await client.run_trio(n_connections, client) == 1
    run(body)


def test_identity_file(tmp_path):
    path = tmp_path / "keys" / "peer.key"
    first = load_or_create_identity(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = load_or_create_identity(path)
    assert again.public_key.serialize() == first.public_key.serialize()
    assert load_or_create_identity(None).public_key.serialize() != first.public_key.serialize()

    async def twice():
        ids = []
        for _ in range(2):
            node = await P2PNode.start(identity=path)
            ids.append(node.peer_id)
            await node.close()
        return ids
    a, b = asyncio.run(twice())
    assert a == b

    bad = tmp_path / "bad.key"
    bad.write_bytes(b"not a key")
    with pytest.raises(ValueError, match="bad.key"):
        load_or_create_identity(bad)


def test_oversize_frame_is_refused_before_reading_the_body():
    async def body(server, client):
        got: asyncio.Future = asyncio.get_running_loop().create_future()

        async def strict(stream):
            try:
                await stream.recv()
            except BaseException as exc:
                got.set_result(exc)
                raise
        server.set_stream_handler("/strict", strict)
        stream = await client.open_stream(server.addrs[0], "/strict")
        # Announce 3 GiB and send no body: the receiver must refuse from the header alone.
        await client.run_trio(stream._s.write, framing.header(3 << 30))
        exc = await asyncio.wait_for(got, 5)
        assert isinstance(exc, framing.FrameTooLarge)
        # An honest frame just over the limit is refused too (and the sender learns the stream is dead).
        stream2 = await client.open_stream(server.peer_id, ECHO)
        await stream2.send(b"x" * 2048)
        with pytest.raises((ConnectionResetError, EOFError)):
            await stream2.recv()
    run(body, max_frame=1024)


def test_remote_close_gives_eof():
    async def body(server, client):
        async def hang_up(stream):
            await stream.send(b"bye")  # the node closes the stream when the handler returns
        server.set_stream_handler("/bye", hang_up)
        stream = await client.open_stream(server.addrs[0], "/bye")
        assert await stream.recv() == b"bye"
        with pytest.raises(EOFError):
            await asyncio.wait_for(stream.recv(), 5)
    run(body)


def test_peer_going_away_gives_eof_not_a_hang():
    async def body(server, client):
        stream = await client.open_stream(server.addrs[0], ECHO)
        await stream.send(b"ping")
        assert await stream.recv() == b"ping"
        pending = asyncio.ensure_future(stream.recv())
        await asyncio.sleep(0.05)
        await server.close()
        with pytest.raises((EOFError, ConnectionError)):
            await asyncio.wait_for(pending, 5)
    run(body)


def test_cancelled_recv_keeps_the_frame():
    async def body(server, client):
        async def slow(stream):
            await stream.recv()
            await asyncio.sleep(0.3)
            await stream.send(b"late")
            await stream.send(b"later")
            await stream.recv()
        server.set_stream_handler("/slow", slow)
        stream = await client.open_stream(server.addrs[0], "/slow")
        await stream.send(b"go")
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(stream.recv(), 0.05)
        assert await stream.recv() == b"late"
        assert await stream.recv() == b"later"
    run(body)


def test_errors_reach_the_caller():
    async def body(server, client):
        with pytest.raises(ConnectionError, match="stream"):  # no handler for this protocol
            await asyncio.wait_for(client.open_stream(server.addrs[0], "/nobody-home/1"), 10)
        with pytest.raises(ValueError, match="not a peer address"):
            await client.connect("/ip4/127.0.0.1/tcp/1")

        async def boom():
            raise KeyError("from trio")
        with pytest.raises(KeyError, match="from trio"):
            await client.run_trio(boom)
        assert await client.run_trio(_async, 7) == 7  # the node survived
    run(body)


def test_dial_to_nothing_fails_fast():
    async def body(server, client):
        with socket.socket() as s:  # a port nobody listens on
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dead = f"/ip4/127.0.0.1/tcp/{port}/p2p/{server.peer_id}"
        with pytest.raises(ConnectionError, match="could not connect"):
            await asyncio.wait_for(client.connect(dead), 10)
    run(body)


def test_restart_on_the_same_port_and_identity(tmp_path):
    async def body():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        listen = [f"/ip4/127.0.0.1/tcp/{port}"]
        server = await P2PNode.start(identity=tmp_path / "id.key", listen=listen)
        server.set_stream_handler(ECHO, echo)
        client = await P2PNode.start()
        try:
            addr = server.addrs[0]
            stream = await client.open_stream(addr, ECHO)
            await stream.send(b"one")
            assert await stream.recv() == b"one"
            await server.close()  # the server side closes first: its sockets linger in TIME_WAIT
            with pytest.raises((EOFError, ConnectionError)):
                await asyncio.wait_for(stream.recv(), 5)
            with pytest.raises(ConnectionError):  # nobody there now
                await client.open_stream(server.peer_id, ECHO)
            server = await P2PNode.start(identity=tmp_path / "id.key", listen=listen)
            server.set_stream_handler(ECHO, echo)
            assert server.addrs[0] == addr
            stream = await client.open_stream(server.peer_id, ECHO)  # redials despite the failure above
            await stream.send(b"two")
            assert await stream.recv() == b"two"
        finally:
            await client.close()
            await server.close()
    asyncio.run(body())


def test_listen_address_in_use():
    async def body():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            s.listen()
            port = s.getsockname()[1]
            with pytest.raises(OSError, match="address in use"):
                await P2PNode.start(listen=[f"/ip4/127.0.0.1/tcp/{port}"])
        node = await P2PNode.start()
        port = int(node.addrs[0].split("/")[4])
        try:  # libp2p listens with SO_REUSEPORT: a second node on the port must still be refused
            with pytest.raises(OSError, match="address in use"):
                await P2PNode.start(listen=[f"/ip4/127.0.0.1/tcp/{port}"])
        finally:
            await node.close()
    before = len(p2p_threads())
    asyncio.run(body())
    assert len(p2p_threads()) == before


def test_close_is_clean_and_idempotent():
    before = set(threading.enumerate())

    async def body():
        a = await P2PNode.start()
        b = await P2PNode.start()
        b.set_stream_handler(ECHO, echo)
        stream = await a.open_stream(b.addrs[0], ECHO)
        await stream.send(b"x")
        assert await stream.recv() == b"x"
        await a.close()
        await a.close()
        await b.close()
        with pytest.raises(ConnectionError):
            await stream.send(b"y")
        await stream.close()  # harmless after the node is gone
    asyncio.run(body())
    left = [t for t in set(threading.enumerate()) - before if t.is_alive()]
    assert left == []
