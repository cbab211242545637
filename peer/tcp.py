"""Length-prefixed frames over a plain asyncio TCP connection.

The baseline our libp2p streams are measured against (scripts/bench_transport.py), and a test
transport. Same interface as `peer.p2p.P2PStream`: send(bytes), recv() -> bytes, close().
"""

from __future__ import annotations

import asyncio

from protocol.framing import DEFAULT_MAX_FRAME, HEADER_SIZE, header, parse_header


class TcpStream:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, max_frame: int = DEFAULT_MAX_FRAME):
        self.reader, self.writer, self.max_frame = reader, writer, max_frame
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
        try:
            head = await self.reader.readexactly(HEADER_SIZE)
            return await self.reader.readexactly(parse_header(head, self.max_frame))
        except asyncio.IncompleteReadError:
            raise EOFError("connection closed") from None

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass
