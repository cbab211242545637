"""A stream of frames shared by several tasks: the `Stream` interface, a send lock, session ids.

Used on both ends of a hop: the peer's server replies and pushes on channels, the client's chain
sends its steps on them. A channel sends and receives messages through a codec
(`protocol.sealing`: sealed or plaintext, one interface); it seals under its send lock, so the
counters of sealed frames rise in the order the frames leave.

Knows the codec interface; nothing about libp2p, sockets (a stream is anything with `send(bytes)`,
`recv() -> bytes` and `close()`), sessions' contents or models.
"""

from __future__ import annotations

import asyncio
import secrets
from typing import Callable, Protocol

from protocol import messages as m
from protocol.sealing import Codec


class Stream(Protocol):
    async def send(self, payload: bytes) -> None: ...
    async def recv(self) -> bytes: ...
    async def close(self) -> None: ...


class Channel:
    """A stream with a send lock: several tasks may send on the same stream. `client` names who is on
    the other end (for per-client quotas)."""

    def __init__(self, stream: Stream, name: str, client: str | None = None):
        self.stream, self.name, self.client = stream, name, client or name
        self._lock = asyncio.Lock()
        self.closed = False

    async def send(self, codec: Codec, msg: m.Message, onion: bytes | memoryview | Callable[[], bytes] = b"") -> None:
        """Seal `msg` (with `onion`: bytes, or a callable making them under the lock) and send it."""
        async with self._lock:
            await self.stream.send(codec.seal(msg, onion() if callable(onion) else onion))

    async def recv(self, codec: Codec) -> tuple[m.Message, memoryview]:
        """The next frame, opened with `codec`: (message, onion)."""
        return codec.open(await self.stream.recv())

    async def close(self) -> None:
        if not self.closed:
            self.closed = True
            try:
                await self.stream.close()
            except Exception:  # noqa: BLE001 - the other side may already be gone
                pass


def new_session_id() -> str:
    """A random 128-bit session id, as the 32 hex characters messages carry (one per hop and session)."""
    return secrets.token_hex(16)
