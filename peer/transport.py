"""Which pipe carries inference traffic to an address.

A multiaddr (`/ip4/.../tcp/.../p2p/<id>`) is dialled over libp2p (Noise-encrypted, NAT-friendly,
slower per frame). A `tcp://host:port` address is a peer's direct data listener: plain asyncio TCP
with the same framing (fastest; see scripts/bench_transport.py). Peers offer their direct address
in their `InfoReply`; clients choose with `--transport`.
"""

from __future__ import annotations

import asyncio

from peer.tcp import DEFAULT_FRAME_TIMEOUT, TcpStream
from protocol import messages as m
from protocol.framing import DEFAULT_MAX_FRAME

INFERENCE_PROTOCOL = "/specswarm/inference/1.0.0"


def parse_tcp_addr(addr: str) -> tuple[str, int]:
    try:
        host, port = addr.removeprefix("tcp://").rsplit(":", 1)
        return host.strip("[]"), int(port)
    except ValueError:
        raise ValueError(f"bad direct address {addr!r}; expected tcp://HOST:PORT") from None


async def dial(node, addr: str, max_frame: int = DEFAULT_MAX_FRAME):
    if addr.startswith("tcp://"):
        return await TcpStream.connect(*parse_tcp_addr(addr), max_frame=max_frame)
    return await node.open_stream(addr, INFERENCE_PROTOCOL)


async def listen_tcp(handler, host: str, port: int = 0, max_frame: int = DEFAULT_MAX_FRAME,
                     frame_timeout: float | None = DEFAULT_FRAME_TIMEOUT):
    """Serve `await handler(stream, name)` for every direct connection; returns (server, its tcp:// address)."""

    async def on_connect(reader, writer):
        peer = writer.get_extra_info("peername")
        await handler(TcpStream(reader, writer, max_frame, frame_timeout), f"tcp:{peer[0]}:{peer[1]}" if peer else "tcp")

    server = await asyncio.start_server(on_connect, host, port)
    bound = server.sockets[0].getsockname()
    return server, f"tcp://{bound[0]}:{bound[1]}"


async def fetch_info(node, addr: str, timeout: float = 10.0) -> tuple[m.InfoReply, float]:
    """Ask a peer what it serves; returns its reply and the round trip in ms."""
    loop = asyncio.get_running_loop()
    stream = await asyncio.wait_for(node.open_stream(addr, INFERENCE_PROTOCOL), timeout)
    try:
        t0 = loop.time()
        await stream.send(m.encode(m.Info()))
        reply = m.decode(await asyncio.wait_for(stream.recv(), timeout))
        rtt_ms = 1000 * (loop.time() - t0)
    finally:
        await stream.close()
    if isinstance(reply, m.Error):
        raise ConnectionError(f"{addr} refused Info: {reply.message} [{reply.code}]")
    if not isinstance(reply, m.InfoReply):
        raise ConnectionError(f"{addr} answered Info with {type(reply).__name__}")
    return reply, rtt_ms


def data_addrs(maddrs: list[str], timeout: float = 30.0) -> list[str | None]:
    """The direct data-port address (`tcp://...`) each peer advertises, or None where it has none.
    Blocking: asks over a throwaway libp2p node (for scripts, tests and the WAN emulator)."""
    from peer.p2p import P2PNode  # the libp2p stack is heavy; only load it when asked

    async def ask():
        node = await P2PNode.start()
        try:
            return [(await fetch_info(node, a, timeout))[0].data_addr for a in maddrs]
        finally:
            await node.close()

    return asyncio.run(ask())
