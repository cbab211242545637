"""The client's side of a chain of peers: open sessions along a route, run steps through it.

`ChainSession` opens one session per hop. In push mode (the default) the client sends a step to the
first peer only; each peer pushes its output to the next, and the last one answers the client:
n + 1 one-way hops. In client-mediated mode (`push=False`, as Petals does) the client carries the
hidden states from peer to peer itself: 2n hops. `swarm.remote` wraps sessions as the synchronous
`RunBlocks` that `swarm.generate` drives, with failover.

Knows the protocol and streams; knows nothing about libp2p (it gets a `dial(addr) -> stream`).
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from typing import Awaitable, Callable

import torch

from peer.model import StepLayout
from peer.server import Channel, Stream, new_session_id
from protocol import messages as m


class RemoteError(RuntimeError):
    """A peer refused or failed a request; `code` says why, `peer` says who."""

    def __init__(self, code: str, message: str, peer: str | None = None):
        super().__init__(f"{peer or 'peer'}: {message} [{code}]")
        self.code, self.peer = code, peer


@dataclass(frozen=True)
class Hop:
    addr: str  # where to dial the peer (a full multiaddr for libp2p)
    peer_id: str
    blocks: tuple[int, int]

    def __str__(self) -> str:
        return f"{self.peer_id}:{self.blocks[0]}:{self.blocks[1]}"


def check_route(route: list[Hop], num_blocks: int) -> None:
    """A route must cover [0, num_blocks) with consecutive spans."""
    at = 0
    for hop in route:
        if hop.blocks[0] != at:
            raise ValueError(f"route is not contiguous: {hop} starts at {hop.blocks[0]}, expected {at}")
        at = hop.blocks[1]
    if at != num_blocks:
        raise ValueError(f"route covers blocks [0, {at}) of {num_blocks}")


class ChainSession:
    def __init__(self, dial: Callable[[str], Awaitable[Stream]], route: list[Hop], push: bool = True,
                 wire_dtype: str = "float32", timeout: float = 60.0):
        self.dial, self.route, self.push = dial, route, push
        self.wire_dtype, self.timeout = wire_dtype, timeout
        self.ids = [new_session_id() for _ in route]
        self.channels: list[Channel] = []
        self.inbox: asyncio.Queue = asyncio.Queue()
        self._readers: list[asyncio.Task] = []
        self._step = 0

    async def open(self, max_length: int) -> None:
        streams = await asyncio.gather(*(self.dial(hop.addr) for hop in self.route))
        self.channels = [Channel(s, str(hop)) for s, hop in zip(streams, self.route)]
        self._readers = [asyncio.create_task(self._read(i, c)) for i, c in enumerate(self.channels)]
        for i, (hop, channel) in enumerate(zip(self.route, self.channels)):
            nxt = None
            if self.push and i + 1 < len(self.route):
                nxt = m.NextHop(self.route[i + 1].addr, self.ids[i + 1])
            await channel.send(m.Open(self.ids[i], max_length, hop.blocks, self.wire_dtype, nxt))
        pending = set(range(len(self.route)))
        while pending:
            i, msg = await self._next()
            if isinstance(msg, m.Opened):
                pending.discard(i)

    async def _read(self, i: int, channel: Channel) -> None:
        try:
            while True:
                await self.inbox.put((i, m.decode(await channel.stream.recv())))
        except Exception as e:  # noqa: BLE001 - EOF, reset, garbage: the hop is gone
            await self.inbox.put((i, m.Error("disconnected", f"connection lost: {e or type(e).__name__}",
                                             peer=str(self.route[i]))))

    async def _next(self) -> tuple[int, object]:
        try:
            i, msg = await asyncio.wait_for(self.inbox.get(), self.timeout)
        except asyncio.TimeoutError:
            raise RemoteError("timeout", f"no answer within {self.timeout:.0f} s") from None
        if isinstance(msg, m.Error):
            raise RemoteError(msg.code, msg.message, msg.peer or str(self.route[i]))
        return i, msg

    async def _result_from(self, hop: int, step: int) -> torch.Tensor:
        while True:
            i, msg = await self._next()
            if isinstance(msg, m.Result) and i == hop and msg.step == step:
                return msg.hidden
            # anything else is a stale answer to an abandoned step: drop it

    def _message(self, hop: int, step: int, hidden, layout: StepLayout, compact) -> m.Step:
        parents = list(layout.parents) if layout.parents is not None else None
        return m.Step(self.ids[hop], step, layout.start, hidden, parents, compact, self.wire_dtype)

    async def step(self, hidden: torch.Tensor, layout: StepLayout, compact=None) -> torch.Tensor:
        return await self.replay([(hidden, layout, compact)])

    async def replay(self, steps: list) -> torch.Tensor:
        """Run steps [(hidden, layout, compact)] in order, sent back to back; returns the last one's output.

        With one step this is a normal step. With many it rebuilds a fresh route's caches after a
        failover: the same steps with the same shapes give the same keys and values, bit for bit.
        """
        first = self._step + 1
        self._step += len(steps)
        if self.push:
            for n, (hidden, layout, compact) in enumerate(steps):
                await self.channels[0].send(self._message(0, first + n, hidden, layout, compact))
            return await self._result_from(len(self.route) - 1, self._step)
        inputs = [hidden for hidden, _, _ in steps]
        for i, channel in enumerate(self.channels):
            for n, (_, layout, compact) in enumerate(steps):
                await channel.send(self._message(i, first + n, inputs[n], layout, compact))
            inputs = [await self._result_from(i, first + n) for n in range(len(steps))]
        return inputs[-1]

    async def close(self) -> None:
        for sid, channel in zip(self.ids, self.channels):
            try:
                await channel.send(m.Close(sid))
            except Exception:  # noqa: BLE001
                pass
            await channel.close()
        for task in self._readers:
            task.cancel()


class BackgroundLoop:
    """An asyncio loop in its own thread, so synchronous generation code can call async network code."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="specswarm-client", daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float | None = None):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
