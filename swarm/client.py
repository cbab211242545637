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
    """Sessions on every hop of a route. Steps may overlap: each reply resolves the future of its
    (hop, step id); an error or a lost connection fails every pending step (the caller fails over)."""

    def __init__(self, dial: Callable[[str], Awaitable[Stream]], route: list[Hop], push: bool = True,
                 wire_dtype: str = "float32", timeout: float = 60.0):
        self.dial, self.route, self.push = dial, route, push
        self.wire_dtype, self.timeout = wire_dtype, timeout
        self.ids = [new_session_id() for _ in route]
        self.channels: list[Channel] = []
        self._readers: list[asyncio.Task] = []
        self._waiters: dict[tuple[int, object], asyncio.Future] = {}  # (hop, step id or "open") -> reply
        self._failed: RemoteError | None = None
        self._step = 0

    async def open(self, max_length: int) -> None:
        streams = await asyncio.gather(*(self.dial(hop.addr) for hop in self.route))
        self.channels = [Channel(s, str(hop)) for s, hop in zip(streams, self.route)]
        self._readers = [asyncio.create_task(self._read(i, c)) for i, c in enumerate(self.channels)]
        opened = [self._expect(i, "open") for i in range(len(self.route))]
        for i, (hop, channel) in enumerate(zip(self.route, self.channels)):
            nxt = None
            if self.push and i + 1 < len(self.route):
                nxt = m.NextHop(self.route[i + 1].addr, self.ids[i + 1])
            await channel.send(m.Open(self.ids[i], max_length, hop.blocks, self.wire_dtype, nxt))
        for fut in opened:
            await self._wait(fut)

    def _expect(self, hop: int, key) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        if self._failed is not None:
            fut.set_exception(self._failed)
        else:
            self._waiters[(hop, key)] = fut
        return fut

    def _fail(self, error: RemoteError) -> None:
        self._failed = self._failed or error
        for fut in self._waiters.values():
            if not fut.done():
                fut.set_exception(error)
        self._waiters.clear()

    async def _read(self, i: int, channel: Channel) -> None:
        try:
            while True:
                msg = m.decode(await channel.stream.recv())
                if isinstance(msg, m.Error):
                    self._fail(RemoteError(msg.code, msg.message, msg.peer or str(self.route[i])))
                    continue
                key = "open" if isinstance(msg, m.Opened) else msg.step if isinstance(msg, m.Result) else None
                fut = self._waiters.pop((i, key), None)
                if fut is not None and not fut.done():  # no waiter: a reply to an abandoned step
                    fut.set_result(getattr(msg, "hidden", None))
        except Exception as e:  # noqa: BLE001 - EOF, reset, garbage: the hop is gone
            self._fail(RemoteError("disconnected", f"connection lost: {e or type(e).__name__}", str(self.route[i])))

    async def _wait(self, fut: asyncio.Future):
        try:
            return await asyncio.wait_for(fut, self.timeout)
        except asyncio.TimeoutError:
            error = RemoteError("timeout", f"no answer within {self.timeout:.0f} s")
            self._fail(error)
            raise error from None

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
            last = self._expect(len(self.route) - 1, self._step)
            for n, (hidden, layout, compact) in enumerate(steps):
                await self.channels[0].send(self._message(0, first + n, hidden, layout, compact))
            return await self._wait(last)
        inputs = [hidden for hidden, _, _ in steps]
        for i, channel in enumerate(self.channels):
            futures = [self._expect(i, first + n) for n in range(len(steps))]
            for n, (_, layout, compact) in enumerate(steps):
                await channel.send(self._message(i, first + n, inputs[n], layout, compact))
            inputs = [await self._wait(f) for f in futures]
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
