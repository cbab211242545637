"""A peer's kept-open push streams to next peers (push mode), one per address, reused by every session.

The next peer answers on a push stream only with (plaintext) errors; each is handed to `on_error`,
which tells the owner of the session that pushed. Knows channels and the plaintext codec; nothing of
sessions, models or sockets (streams come from `open_stream(addr)`).
"""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable

from peer.channel import Channel, Stream
from protocol import messages as m
from protocol import sealing


class PushLinks:
    def __init__(self, open_stream: Callable[[str], Awaitable[Stream]] | None,
                 on_error: Callable[[m.Error], Awaitable[None]]):
        self.open_stream, self.on_error = open_stream, on_error
        self.links: dict[str, Channel] = {}  # next-peer address -> kept-open push stream
        self._locks: dict[str, asyncio.Lock] = {}

    async def get(self, addr: str) -> Channel:
        async with self._locks.setdefault(addr, asyncio.Lock()):
            link = self.links.get(addr)
            if link is None or link.closed:
                stream = await self.open_stream(addr)
                link = self.links[addr] = Channel(stream, f"push->{addr[-12:]}")
                asyncio.get_running_loop().create_task(self._drain(addr, link))
            return link

    def drop(self, addr: str) -> None:
        self.links.pop(addr, None)

    async def _drain(self, addr: str, link: Channel) -> None:
        replies = sealing.Plain(0)
        try:
            while True:
                reply, _ = await link.recv(replies)
                if isinstance(reply, m.Error) and reply.session:
                    await self.on_error(reply)
        except Exception:  # noqa: BLE001 - EOF or garbage: this link is done
            pass
        finally:
            link.closed = True
            if self.links.get(addr) is link:
                del self.links[addr]

    async def close(self) -> None:
        for link in list(self.links.values()):
            await link.close()
