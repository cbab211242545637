"""The swarm map behind `GET /api/swarm`: `swarm status --json`'s data, looked up at most every `ttl` seconds.

Once the engine's `SwarmModel` is open (with its DHT), the lookup runs on that client's own node, on
its background loop (`swarm.client.status.collect_status`): no second libp2p node, and the paths and
round trips shown are the ones this API's generations use. Before that (the swarm does not cover the
model yet), or with `--no-dht`, it starts a node of its own for each lookup (`swarm_status`), as
`swarm status` does. With `--local` there is no swarm: every block is "in this process". Concurrent
requests share one lookup.

Knows the client's status helpers and asyncio; nothing of HTTP, sampling or tokenizers.
"""

from __future__ import annotations

import asyncio
import time

from peer.paths import PathSettings
from swarm.client.status import collect_status, swarm_status


class SwarmMap:
    def __init__(self, engine, model_id: str, num_blocks: int, initial_peers: list[str],
                 settings: PathSettings = PathSettings(), local: bool = False, ttl: float = 2.0,
                 timeout: float = 3.0):
        self.engine, self.model_id, self.num_blocks = engine, model_id, num_blocks
        self.initial_peers, self.settings, self.local = initial_peers, settings, local
        self.ttl, self.timeout = ttl, timeout
        self._data: dict | None = None
        self._at = 0.0
        self._lock: asyncio.Lock | None = None

    def _empty(self, **extra) -> dict:
        return dict(model=self.model_id, num_blocks=self.num_blocks, peers=[], coverage=[0] * self.num_blocks,
                    gaps=[[0, self.num_blocks]], complete=False, **extra)

    async def get(self) -> dict:
        self._lock = self._lock or asyncio.Lock()
        async with self._lock:
            if self._data is None or time.monotonic() - self._at > self.ttl:
                self._data = await self._lookup()
                self._at = time.monotonic()
            return self._data

    async def _lookup(self) -> dict:
        if self.local:
            return dict(model=self.model_id, num_blocks=self.num_blocks, peers=[], coverage=[1] * self.num_blocks,
                        gaps=[], complete=True, local=True)
        model = self.engine.model
        try:
            if model is not None and getattr(model, "dht", None) is not None:
                work = collect_status(model.node, model.dht, self.model_id, self.num_blocks, self.timeout)
                future = asyncio.run_coroutine_threadsafe(work, model.bg.loop)
                try:
                    return await asyncio.wait_for(asyncio.wrap_future(future), self.timeout + 10)
                except BaseException:
                    future.cancel()
                    raise
            if not self.initial_peers:
                return self._empty(error="no --initial-peers to look the swarm up from")
            return await asyncio.wait_for(swarm_status(self.model_id, self.num_blocks, self.initial_peers,
                                                       self.timeout, self.settings), self.timeout + 20)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - the map says what went wrong; the API goes on
            return self._empty(error=f"could not look the swarm up: {type(e).__name__}: {e}")

    async def close(self) -> None:
        self._data = None
