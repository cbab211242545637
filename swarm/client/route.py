"""Choosing the chain of peers: the route with the lowest expected time per step, or an explicit one.

`plan_route` is Dijkstra over (block boundary, last peer). With push (peers hand hidden states to
the next peer), entering peer Y after peer X costs half the X->Y round trip (what X published, else
the client's RTT to Y as a stand-in), plus Y's compute for its blocks, plus a queueing penalty for a
loaded peer; finishing costs half the last peer's RTT back to the client. Client-mediated (the client
carries every hop, as Petals does), entering Y costs the client's whole round trip to Y. A peer may
serve any part of its span, so overlapping spans still route.

A client that verifies rounds at the last peer when it can (`headless_ms` > 0: its own cost of
verifying a round, the LM head over a round's nodes) charges a finishing peer without a head that much,
so a last peer that can verify wins unless another is faster by more than the client would spend.

`choose_chain` picks the chain's shape per route: it plans both and keeps the one whose predicted
step time (trip + compute) is lower, push on a tie. Push wins where peers are close to each other;
client-mediated where the client is closer to each peer than they are to one another (measured: a
heterogeneous 3-peer WAN, 171 vs 187 ms/token plain).
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field


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


class NoRoute(RuntimeError):
    """The known peers cannot make a chain (a gap in coverage, or an explicit route that does not fit);
    `missing`: the spans [a, b) no known peer serves, where that is why."""

    code = "no_route"

    def __init__(self, message: str, missing: list[tuple[int, int]] | None = None):
        super().__init__(f"{message} [no_route]")
        self.missing = list(missing or [])


def gaps(spans: list[tuple[int, int]], num_blocks: int) -> list[tuple[int, int]]:
    """The parts of [0, num_blocks) that none of `spans` covers, in order."""
    out, at = [], 0
    for a, b in sorted(spans):
        if a > at:
            out.append((at, min(a, num_blocks)))
        at = max(at, b)
    if at < num_blocks:
        out.append((at, num_blocks))
    return [(a, b) for a, b in out if a < b]


DEFAULT_MS_PER_BLOCK = 1.0  # when a peer has not published its throughput
HOP_OVERHEAD_MS = 0.3  # framing, (de)serialisation and scheduling per hop, measured on loopback


@dataclass
class PeerInfo:
    """What the client knows of a peer: where it is, what it serves, how fast and how far it is."""

    peer_id: str
    addr: str  # libp2p multiaddr (with /p2p/<id>)
    blocks: tuple[int, int]
    data_addr: str | None = None  # direct tcp://host:port, if offered
    throughput: float | None = None  # tokens per second through one block
    rtt_ms: float | None = None  # client <-> peer, measured by the client
    rtts: dict = field(default_factory=dict)  # peer -> other peers, as the peer published them
    load: float = 0.0  # fraction of its cache in use
    model: str = ""
    path: str | None = None  # how we reach it (peer/paths.py): direct, webrtc, webrtc-turn, relay; rtt_ms is on it
    head: bool = False  # it holds the LM head with the model's last block: rounds may be verified there
    top_k: bool = False  # ... and its verifier honours top-k sampling

    def ms_for(self, n_blocks: int) -> float:
        per_block = 1000.0 / self.throughput if self.throughput else DEFAULT_MS_PER_BLOCK
        return n_blocks * per_block * (1.0 + self.load)


def peer_id_of(maddr: str) -> str:
    if "/p2p/" not in maddr:
        raise ValueError(f"{maddr!r} must end in /p2p/<peer id> (copy the peer's 'listening on' line)")
    return maddr.rsplit("/p2p/", 1)[1]


def parse_route(spec: str, peers: dict[str, PeerInfo]) -> list[tuple[str, tuple[int, int]]]:
    """'PEER:A:B,PEER:B:C' -> [(peer id, span)]; PEER is a known peer's id or an unambiguous end of one."""
    route = []
    for item in spec.split(","):
        try:
            who, a, b = item.strip().rsplit(":", 2)
            span = (int(a), int(b))
        except ValueError:
            raise ValueError(f"route item {item!r} must be PEER:START:END") from None
        matches = [pid for pid in peers if pid == who or pid.endswith(who) or pid.startswith(who)]
        if not matches:  # the swarm's state (the peer left, or is not found yet), not a malformed route
            raise NoRoute(f"route item {item!r}: no known peer matches {who!r} (known: {', '.join(peers) or 'none'})")
        if len(matches) > 1:
            raise ValueError(f"route item {item!r}: more than one known peer matches {who!r} "
                             f"(known: {', '.join(peers)})")
        served = peers[matches[0]].blocks
        if not served[0] <= span[0] < span[1] <= served[1]:
            raise ValueError(f"route item {item!r}: that peer serves blocks {served[0]}:{served[1]}")
        route.append((matches[0], span))
    return route


def _hop_ms(peers: dict[str, PeerInfo], prev: str | None, nxt: PeerInfo, push: bool) -> float:
    """Reaching `nxt` after `prev` (None: from the client): half a round trip when pushed, the client's
    whole round trip when it carries the hop itself."""
    if not push:
        return (nxt.rtt_ms or 0.0) + 2 * HOP_OVERHEAD_MS
    rtt = peers[prev].rtts.get(nxt.peer_id) if prev else None
    rtt = rtt if rtt is not None else (nxt.rtt_ms or 0.0)
    return rtt / 2 + HOP_OVERHEAD_MS


def plan_route(peers: dict[str, PeerInfo], num_blocks: int, push: bool = True,
               headless_ms: float = 0.0) -> list[tuple[str, tuple[int, int]]]:
    """The cheapest chain covering [0, num_blocks), as [(peer id, span)], for this chain shape. `headless_ms`:
    what a step costs the client when the last peer holds no LM head (rounds verified here, not there)."""
    tie = itertools.count()
    queue = [(0.0, next(tie), 0, None, ())]
    best: dict[tuple[int, str | None], float] = {}
    while queue:
        cost, _, at, last, path = heapq.heappop(queue)
        if at == num_blocks:
            return list(path)
        if best.get((at, last), float("inf")) < cost:
            continue
        for info in peers.values():
            a, b = info.blocks
            if not a <= at < b or info.peer_id == last:
                continue
            for end in range(at + 1, b + 1):
                c = cost + _hop_ms(peers, last, info, push) + info.ms_for(end - at)
                if end == num_blocks:
                    c += _finish_ms(info, push, headless_ms)
                if c < best.get((end, info.peer_id), float("inf")):
                    best[(end, info.peer_id)] = c
                    heapq.heappush(queue, (c, next(tie), end, info.peer_id, path + ((info.peer_id, (at, end)),)))
    covered = sorted(p.blocks for p in peers.values())
    raise NoRoute(f"the known peers do not cover blocks [0, {num_blocks}) "
                  f"(they serve {', '.join(f'{a}:{b}' for a, b in covered) or 'nothing'})", gaps(covered, num_blocks))


def route_ms(peers: dict[str, PeerInfo], route: list[tuple[str, tuple[int, int]]], push: bool,
             headless_ms: float = 0.0) -> float:
    """Predicted time of one step along `route` (trip + compute), pushed or client-mediated."""
    total, prev = 0.0, None
    for pid, (a, b) in route:
        total += _hop_ms(peers, prev, peers[pid], push) + peers[pid].ms_for(b - a)
        prev = pid
    return total + (_finish_ms(peers[prev], push, headless_ms) if prev else 0.0)


def _finish_ms(last: PeerInfo, push: bool, headless_ms: float) -> float:
    """After the last peer: its way back to the client when pushed (half its RTT; client-mediated, `_hop_ms`
    counted the whole), and the client's own verification when that peer holds no LM head."""
    return ((last.rtt_ms or 0.0) / 2 if push else 0.0) + (0.0 if last.head else headless_ms)


@dataclass(frozen=True)
class ChainPlan:
    """A planned chain: its route, its shape, and the predicted step time of both shapes (ms)."""

    route: list[tuple[str, tuple[int, int]]]
    push: bool
    push_ms: float
    mediated_ms: float


def choose_chain(peers: dict[str, PeerInfo], num_blocks: int, push: bool | None = None,
                 route: list[tuple[str, tuple[int, int]]] | None = None, headless_ms: float = 0.0) -> ChainPlan:
    """The route and chain shape with the lowest predicted step time; `push` True/False forces the
    shape, `route` forces the route (both shapes are still predicted, for the log). `headless_ms` (the
    client's cost of verifying a round itself) makes a last peer that can verify rounds worth that much."""
    pushed = route or plan_route(peers, num_blocks, True, headless_ms)
    mediated = route or plan_route(peers, num_blocks, False, headless_ms)
    push_ms, mediated_ms = route_ms(peers, pushed, True, headless_ms), route_ms(peers, mediated, False, headless_ms)
    if push is None:
        push = push_ms <= mediated_ms
    return ChainPlan(pushed if push else mediated, push, push_ms, mediated_ms)


def to_hops(route: list[tuple[str, tuple[int, int]]], peers: dict[str, PeerInfo], transport: str,
            num_blocks: int) -> list[Hop]:
    hops = []
    for pid, span in route:
        info = peers[pid]
        addr = info.addr
        if transport == "tcp" and info.data_addr:  # the direct port, on the host we reach the peer at
            host = addr.split("/")[2] if addr.startswith("/") else "127.0.0.1"
            addr = f"tcp://{host}:{info.data_addr.rsplit(':', 1)[1]}"
        hops.append(Hop(addr, pid, span))
    check_route(hops, num_blocks)
    return hops
