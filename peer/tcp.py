"""Length-prefixed frames over a plain asyncio TCP connection.

The baseline our libp2p streams are measured against (scripts/bench_transport.py), and a test
transport. Same interface as `peer.p2p.P2PStream`: send(bytes), recv() -> bytes, close().
"""

from __future__ import annotations

import asyncio

from protocol.framing import DEFAULT_MAX_FRAME, HEADER_SIZE, header, parse_header


DEFAULT_FRAME_TIMEOUT = 30.0  # seconds from a frame's first byte to its last (a slowloris sender is dropped)


class TcpStream:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, max_frame: int = DEFAULT_MAX_FRAME,
                 frame_timeout: float | None = DEFAULT_FRAME_TIMEOUT):
        self.reader, self.writer, self.max_frame, self.frame_timeout = reader, writer, max_frame, frame_timeout
        peer = writer.get_extra_info("peername")
        self.remote_host: str | None = str(peer[0]) if peer else None
        sock = writer.get_extra_info("socket")
        if sock is not None:
            import socket

            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    @classmethod
    async def connect(cls, host: str, port: int, max_frame: int = DEFAULT_MAX_FRAME) -> "TcpStream":
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer, max_frame)

    async def send(self, payload: bytes) -> None:
        self.writer.write(header(len(payload)) + payload)
        await self.writer.drain()

    async def recv(self) -> bytes:
        """The next frame. Waiting for a frame to start has no limit; once its first byte is here, the
        rest must follow within `frame_timeout` seconds (TimeoutError) or the sender is too slow."""
        try:
            first = await self.reader.readexactly(1)
            if self.frame_timeout is None:
                return await self._rest(first)
            return await asyncio.wait_for(self._rest(first), self.frame_timeout)
        except asyncio.IncompleteReadError:
            raise EOFError("connection closed") from None
        except asyncio.TimeoutError:
            raise TimeoutError(f"a frame took over {self.frame_timeout:.0f} s to arrive") from None

    async def _rest(self, first: bytes) -> bytes:
        head = first + await self.reader.readexactly(HEADER_SIZE - 1)
        return await self.reader.readexactly(parse_header(head, self.max_frame))

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass
