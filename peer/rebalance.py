"""Rebalancing: where a serving peer that chose its own blocks should move, as Petals' servers move too.

`move_to`: a peer moves only when the live peers besides it leave some block with nobody at all and still serve
every block of its own span at least once: the move closes a gap and opens none. Thinner-but-served blocks are no
reason to move (each move ends the sessions on the peer's old blocks, whose clients fail over). The new span is
the one a joining peer would take (`choose_blocks`), of as many blocks as the old one.

`rebalance` judges on the other peers that answer now: records of the model from the DHT, each "online" one asked
for its Info (a SIGKILLed peer's record lingers until it expires) unless it answered the refresh's RTT probe just
now; a "joining" one is loading and counts unasked.
A peer that is the only one serving some of its blocks, by the records alone, asks nobody (the common case).
Two peers whose blocks overlap must not both leave them for the same gap: of the live peers that would move now and
say in their records that they move (`moves`), only the first by peer id does (`first_mover`; every peer computes the
same order from the same records); the others stay, and move only once it has gone from the records or views. It
also judges twice, a random 1-5 s apart, so that views that differ for a moment settle first (the mover announces
its new span as "joining" before it loads).

Knows records, the DHT lookup and the Info probe; nothing of loading blocks or serving sessions (peer/serve.py
moves).
"""

from __future__ import annotations

import asyncio
import logging
import random

from peer.dht import SwarmDHT
from peer.p2p import P2PNode
from peer.record import PeerRecord
from peer.throughput import choose_blocks
from peer.transport import addr_of, fetch_info

log = logging.getLogger("specswarm.peer")


def served_by(num_blocks: int, spans: list[tuple[int, int]]) -> list[int]:
    """How many of these spans hold each block."""
    count = [0] * num_blocks
    for a, b in spans:
        for i in range(max(0, a), min(b, num_blocks)):
            count[i] += 1
    return count


def move_to(num_blocks: int, own: tuple[int, int], others: list[tuple[tuple[int, int], float]]) -> tuple[int, int] | None:
    """The span (of as many blocks as `own`) to move to, given the other live peers' (span, throughput); None when
    every block has a peer or when moving would leave a block of `own` without one."""
    served = served_by(num_blocks, [s for s, _ in others])
    if all(served) or not all(served[i] for i in range(*own)):
        return None
    new = choose_blocks(num_blocks, others, own[1] - own[0])
    return new if not all(served[i] for i in range(*new)) else None


def first_mover(num_blocks: int, spans: dict[str, tuple[tuple[int, int], float]], movers: set[str]) -> str | None:
    """Given every live peer (id -> (span, throughput)) and which of them move, the one whose turn it is to move
    now: the first by id of the movers `move_to` would move; None when none would."""
    return min((p for p in movers if p in spans and
                move_to(num_blocks, spans[p][0], [v for q, v in spans.items() if q != p]) is not None), default=None)


async def rebalance(dht: SwarmDHT, node: P2PNode, model_id: str, num_blocks: int, span: tuple[int, int],
                    throughput: float, found: list[PeerRecord], answered: set[str]) -> tuple[int, int] | None:
    """Where this peer should move now, or None (see the module docstring). `found`: the swarm's records, just
    looked up (the second look looks up again); `answered`: peers that answered an Info probe just now (not asked
    again in the first look)."""
    new = None
    for attempt in range(2):
        if attempt:
            await asyncio.sleep(random.uniform(1.0, 5.0))
            answered = set()
            try:
                found = await dht.find(model_id)
            except Exception as e:  # noqa: BLE001 - a failed lookup must not stop serving; looked at again later
                log.warning("could not look up the swarm's peers to rebalance: %s", e)
                return None
        found = [r for r in found if r.peer_id != node.peer_id and r.addrs]
        if not all(served_by(num_blocks, [(r.start, r.end) for r in found])[i] for i in range(*span)):
            return None  # the only peer of some of its blocks, even counting records of peers that died: stay
        online = [r for r in found if r.state == "online" and r.peer_id not in answered]
        answers = await asyncio.gather(*(fetch_info(node, addr_of(r.peer_id, r.addrs), 3.0) for r in online),
                                       return_exceptions=True)
        live = [r for r in found if r.state == "joining" or r.peer_id in answered] + \
            [r for r, a in zip(online, answers) if not isinstance(a, BaseException)]
        new = move_to(num_blocks, span, [((r.start, r.end), r.throughput) for r in live])
        spans = {r.peer_id: ((r.start, r.end), r.throughput) for r in live} | {node.peer_id: (span, throughput)}
        movers = {r.peer_id for r in live if r.moves} | {node.peer_id}
        if new is None or first_mover(num_blocks, spans, movers) != node.peer_id:
            return None  # nothing to do, or another peer's turn
    return new
