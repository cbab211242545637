"""Where an emulated WAN's links are: the address map a client is given (`ClientConfig.addresses`).

One delay proxy per directed link a chain uses (`swarm.bench.wan.swarm` starts them): the client's
link to every peer, and the link from peer j-1 to peer j. A route names peer j by its link from the
node before it on the chain (what that node pushes to), and the client dials every peer over its own
link, whatever the route calls it. So in push mode a step crosses client->p1, p1->p2, ..., pn->client,
each with its own delay, and client-mediated mode crosses client<->pj for every j. The libp2p control
plane (Info, DHT) is not delayed: it is off the per-token path.

Standard library only. Knows addresses and the latency matrix; must not know sockets, peers'
processes, the client's code (it only fits the shape of `swarm.client.config.AddressMap`) or the protocol.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from swarm.bench.wan.proxy import Link


@dataclass
class WanLayout:
    """Proxy addresses of an emulated WAN: `to_peer[(src, j)]` reaches peer j (1-based) from node src
    (0 = the client); `direct[j - 1]` is peer j's own data address."""

    links: list[list[Link]]
    to_peer: dict[tuple[int, int], str] = field(default_factory=dict)
    direct: list[str] = field(default_factory=list)  # peers' own data addresses, in order

    def _peer(self, addr: str) -> int | None:
        """The peer (1-based) a direct or proxy address reaches, or None for an address not of this WAN."""
        if addr in self.direct:
            return self.direct.index(addr) + 1
        return next((j for (_, j), a in self.to_peer.items() if a == addr), None)

    def route_addr(self, direct: str) -> str:
        """How a chain names the peer at `direct`: through its link from the peer before it (the
        client's own link for peer 1). Addresses not of this WAN pass unchanged."""
        j = self._peer(direct)
        return direct if j is None else self.to_peer[(j - 1, j)]

    def dial_addr(self, addr: str) -> str:
        """What the client dials for a route address: its own link to the peer that address reaches."""
        j = self._peer(addr)
        return addr if j is None else self.to_peer[(0, j)]

    def link_addr(self, i: int, j: int) -> str:
        """The proxy of the link from node i to peer j (0 = the client, 1.. = the peers in chain order)."""
        return self.to_peer[(i, j)]

    def one_way_ms(self, src: int, dst: int) -> float:
        return self.links[src][dst].delay_ms
