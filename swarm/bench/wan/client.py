"""The client's side of an emulated WAN (swarm.bench.wan.proxy): a SwarmModel whose data plane crosses the proxies.

Kept apart from swarm/wan.py so the proxy process never imports torch.
"""

from __future__ import annotations

from dataclasses import replace

from peer.transport import dial

from swarm.client.route import Hop
from swarm.client.swarm_model import SwarmModel
from swarm.bench.wan.proxy import WanLayout


class WanSwarmModel(SwarmModel):
    """Routes name peer j by its link from peer j-1 (what peer j-1 pushes to); the client dials every
    peer over its own link. Needs the direct TCP data plane."""

    def __init__(self, layout: WanLayout, *args, **kwargs):
        self.layout = layout
        super().__init__(*args, **kwargs)

    async def _plan(self) -> list[Hop]:
        hops = await super()._plan()
        index = {addr: j + 1 for j, addr in enumerate(self.layout.direct)}
        return [replace(h, addr=self.layout.route_addr(index[h.addr])) for h in hops]

    async def dial(self, addr: str):  # SwarmModel.open_chain dials every hop through this
        return await dial(self.node, self.layout.client_addr(addr))

    def link_addr(self, i: int, j: int) -> str:
        """The proxy of the emulated link from route position i to j (0 = client, 1.. = hops)."""
        return self.layout.to_peer[(i, j)]
