"""Which pipe carries inference traffic to an address.

A multiaddr (`/ip4/.../tcp/.../p2p/<id>`) is dialled over libp2p (Noise-encrypted, NAT-friendly,
slower per frame), or, when the node has `paths` (peer/paths.py) and the peer is only reachable
through a relay, over a WebRTC data channel where one can be made. A `tcp://host:port` address is a peer's direct data listener: plain asyncio TCP
with the same framing (fastest; see scripts/bench_transport.py). Peers offer their direct address
in their `InfoReply`; clients choose with `--transport`.

The two kinds never mix: `dial` and `fetch_info` take either, tell them apart by their form, and
refuse any other string with `BadAddress` rather than parse it as the other kind. Errors are of one
family: a peer that cannot be reached, does not answer, or answers nonsense raises ConnectionError
(BadAddress and "malformed reply" included), OSError, EOFError or asyncio.TimeoutError.
"""

from __future__ import annotations

import asyncio

from peer.tcp import DEFAULT_FRAME_TIMEOUT, TcpStream
from protocol import messages as m
from protocol.framing import DEFAULT_MAX_FRAME

INFERENCE_PROTOCOL = "/specswarm/inference/1.0.0"


class BadAddress(ConnectionError, ValueError):
    """A string that is neither a direct `tcp://HOST:PORT` nor a libp2p multiaddr `/.../p2p/<peer id>`:
    it reaches nobody. A ConnectionError to whoever dials it (a failover skips the peer), a ValueError
    to whoever wrote it."""


def is_direct(addr: str) -> bool:
    """A direct data-port address (`tcp://HOST:PORT`), as opposed to a libp2p multiaddr."""
    return addr.startswith("tcp://")


def addr_of(peer_id: str, addrs: list[str]) -> str | None:
    """The first of `addrs` (a discovery record's, say) that is a libp2p multiaddr of `peer_id` itself."""
    return next((a for a in addrs if a.startswith("/") and a.endswith(f"/p2p/{peer_id}")), None)


def parse_tcp_addr(addr: str) -> tuple[str, int]:
    try:
        if not is_direct(addr):
            raise ValueError
        host, port = addr.removeprefix("tcp://").rsplit(":", 1)
        return host.strip("[]"), int(port)
    except ValueError:
        raise BadAddress(f"bad direct address {addr!r}; expected tcp://HOST:PORT") from None


async def dial(node, addr: str, max_frame: int = DEFAULT_MAX_FRAME):
    """An inference stream to `addr`: the direct port for `tcp://HOST:PORT`, a libp2p stream (through
    `node`) for a multiaddr ending in /p2p/<peer id>; BadAddress for anything else."""
    if is_direct(addr):
        return await TcpStream.connect(*parse_tcp_addr(addr), max_frame=max_frame)
    if not (addr.startswith("/") and "/p2p/" in addr):
        raise BadAddress(f"cannot dial {addr!r}: expected tcp://HOST:PORT or a multiaddr ending in /p2p/<peer id>")
    if node is None:
        raise BadAddress(f"cannot dial {addr!r}: a libp2p address, and no libp2p node to dial it with")
    try:
        if node.paths is not None:  # peer/paths.py: relayed peers are reached over WebRTC where it pays
            return await node.paths.dial(addr)
        return await node.open_stream(addr, INFERENCE_PROTOCOL)
    except ValueError as exc:  # the multiaddr or its peer id does not parse
        raise BadAddress(str(exc)) from None


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
    """Ask a peer what it serves, at either kind of address (see `dial`); returns its reply and the
    round trip in ms. A reply that does not decode is a ConnectionError, like no reply."""
    loop = asyncio.get_running_loop()
    stream = await asyncio.wait_for(dial(node, addr), timeout)
    try:
        t0 = loop.time()
        await stream.send(m.encode(m.Info()))
        try:
            reply = m.decode(await asyncio.wait_for(stream.recv(), timeout))
        except ValueError as exc:  # ProtocolError, FrameTooLarge, a bad tensor: not a peer we can use
            raise ConnectionError(f"{addr} answered Info with a malformed reply: {exc}") from None
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
