"""`swarm status`: who serves which blocks of a model, how fast, how far from here, and what is missing.

Each peer's `reachability` (public, private, unknown: what its own dial-back check found) and `observed`
(the IP other peers see it at) come from its signed record; `reachable` is whether it answered us here,
`path` how (peer/paths.py: direct, webrtc, webrtc-turn or relay: the path a client here would use) and
`rtt_ms` the round trip of an Info request on that path.

It looks records up as a DHT client (`SwarmDHT.start(..., server=False)`): no peer keeps it in its
routing table once it has gone. `collect_status` does the same on a node and DHT that already run (a
`SwarmModel`'s, e.g. for `swarm api`'s map: the paths and RTTs are then the ones that client uses)."""

from __future__ import annotations

import asyncio
import time

from peer.dht import SwarmDHT
from peer.p2p import P2PNode
from peer.paths import Paths, PathSettings
from peer.rebalance import served_by
from peer.transport import addr_of, fetch_info


async def swarm_status(model_id: str, num_blocks: int, initial_peers: list[str], timeout: float = 5.0,
                       settings: PathSettings = PathSettings()) -> dict:
    node = await P2PNode.start()
    node.paths = paths = Paths(node, settings)
    try:
        dht = await SwarmDHT.start(node, initial_peers, server=False)  # looks up; leaves no trace
        try:
            return await collect_status(node, dht, model_id, num_blocks, timeout)
        finally:
            await dht.close()
    finally:
        await paths.close()
        await node.close()


async def collect_status(node: P2PNode, dht: SwarmDHT, model_id: str, num_blocks: int, timeout: float = 5.0) -> dict:
    """The status on a running node (with its `paths`) and DHT, which it leaves running."""
    paths = node.paths
    records = await dht.find(model_id, include_offline=True)
    for r in records:
        paths.learn_stun(r.stun, r.addrs)

    async def ping(addr: str):
        try:
            return (await fetch_info(node, addr, timeout))[1]
        except (ConnectionError, OSError, EOFError, asyncio.TimeoutError):
            return None

    live = [r for r in records if r.state != "offline" and addr_of(r.peer_id, r.addrs)]
    rtts = dict(zip((r.peer_id for r in live),
                    await asyncio.gather(*(ping(addr_of(r.peer_id, r.addrs)) for r in live))))
    peers = []
    for r in records:
        peers.append(dict(peer_id=r.peer_id, blocks=[r.start, r.end], state=r.state, throughput=r.throughput,
                          free_cache_tokens=r.cache_tokens, rtt_ms=rtts.get(r.peer_id), reachable=rtts.get(r.peer_id) is not None,
                          addrs=r.addrs, data_addr=r.data_addr, reachability=r.reachability, observed=r.observed,
                          path=paths.path_of(r.peer_id) if rtts.get(r.peer_id) is not None else None, stun=r.stun,
                          expires_in_s=round(r.expires - time.time(), 1)))
    coverage = served_by(num_blocks, [p["blocks"] for p in peers if p["state"] == "online" and p["reachable"]])
    gaps = _runs([b for b, n in enumerate(coverage) if n == 0])
    return dict(model=model_id, num_blocks=num_blocks, peers=peers, coverage=coverage, gaps=gaps,
                complete=not gaps)


def _runs(blocks: list[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    for b in blocks:
        if runs and runs[-1][1] == b:
            runs[-1][1] = b + 1
        else:
            runs.append([b, b + 1])
    return runs


def format_status(status: dict) -> str:
    lines = [f"model {status['model']}: {len(status['peers'])} peers, {status['num_blocks']} blocks",
             f"{'peer':<14} {'blocks':>7} {'state':<8} {'reach':<8} {'seen at':<15} {'path':<11} {'tok/s/block':>11} {'rtt ms':>7} "
             f"{'free cache':>10}  address"]
    for p in status["peers"]:
        rtt = f"{p['rtt_ms']:.1f}" if p["rtt_ms"] is not None else "-"
        lines.append(f"…{p['peer_id'][-12:]:<13} {p['blocks'][0]:>3}:{p['blocks'][1]:<3} {p['state']:<8} "
                     f"{p['reachability']:<8} {p['observed'] or '-':<15} {p.get('path') or '-':<11} {p['throughput']:>11.0f} {rtt:>7} "
                     f"{p['free_cache_tokens']:>10}  {p['addrs'][0] if p['addrs'] else '(none: not dialable)'}")
    cov = " ".join(str(n) for n in status["coverage"])
    lines.append(f"online peers per block: {cov}")
    if status["gaps"]:
        lines.append("GAPS: no reachable online peer serves blocks " +
                     ", ".join(f"{a}:{b}" for a, b in status["gaps"]) + " — generation is impossible until one joins")
    else:
        lines.append("every block is served")
    return "\n".join(lines)
