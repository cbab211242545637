"""What an emulated WAN looks like: one-way links between nodes, named profiles, latency matrices.

Node 0 is the client, nodes 1..n the peers; a `Link` (one direction, as the delay proxy emulates it)
is `swarm.bench.wan.proxy`'s. Standard library only; knows nothing of peers, the client or the protocol.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from swarm.bench.wan.proxy import Link


@dataclass(frozen=True)
class Profile:
    """Where nodes sit: one-way delay between two nodes, by region. Node 0 is the client."""

    name: str
    delay_ms: float  # between nodes of different regions (or all nodes, with one region)
    jitter_ms: float = 0.0
    mbit_s: float | None = None
    regions: tuple[int, ...] = ()  # region of node i (cycled); () = every node apart from every other
    near_ms: float = 0.5  # between nodes of the same region

    def link(self, src: int, dst: int) -> Link:
        if self.regions and self.regions[src % len(self.regions)] == self.regions[dst % len(self.regions)]:
            return Link(self.near_ms, self.jitter_ms * self.near_ms / self.delay_ms, self.mbit_s)
        return Link(self.delay_ms, self.jitter_ms, self.mbit_s)

    def matrix(self, n_peers: int) -> list[list[Link]]:
        return [[self.link(s, d) for d in range(n_peers + 1)] for s in range(n_peers + 1)]


PROFILES = {
    "loopback": Profile("loopback", 0.0),
    "lan": Profile("lan", 0.5, 0.05, 1000.0),
    "metro": Profile("metro", 5.0, 0.5, 500.0),
    "continental": Profile("continental", 25.0, 2.0, 100.0),
    "intercontinental": Profile("intercontinental", 80.0, 5.0, 50.0),
    # client in Europe; peers alternate US, Europe, US, ...: 40 ms across the Atlantic, 5 ms within a continent
    "heterogeneous": Profile("heterogeneous", 40.0, 3.0, 100.0, regions=(0, 1), near_ms=5.0),
}


def load_matrix(path: str | Path, jitter_ms: float = 0.0, mbit_s: float | None = None) -> list[list[Link]]:
    """A JSON latency matrix: one-way ms, [[client->client, client->p1, ...], [p1->client, ...], ...]."""
    rows = json.loads(Path(path).read_text())
    if not rows or any(len(r) != len(rows) for r in rows):
        raise ValueError(f"{path}: a latency matrix must be square (client first, then each peer)")
    return [[Link(float(ms), jitter_ms, mbit_s) for ms in row] for row in rows]


def as_matrix(links: list[list[Link]] | Profile | str, n_peers: int) -> list[list[Link]]:
    """A latency matrix for n peers from a matrix, a profile or a profile's name (checked for size)."""
    if isinstance(links, str):
        links = PROFILES[links]
    if isinstance(links, Profile):
        links = links.matrix(n_peers)
    if len(links) != n_peers + 1:
        raise ValueError(f"the latency matrix has {len(links)} nodes; {n_peers} peers need {n_peers + 1}")
    return links
