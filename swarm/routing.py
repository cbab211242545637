"""Choosing the chain of peers: an explicit `--route`, or a chain built from what the known peers serve.

Discovery through the DHT arrives later; for now the client asks each initial peer what it serves
(an `Info` request) and chains spans that start where the previous one ended, preferring the peer
that reaches furthest.
"""

from __future__ import annotations

import asyncio

from peer.transport import INFERENCE_PROTOCOL
from protocol import messages as m

from .client import Hop, RemoteError, check_route


def peer_id_of(maddr: str) -> str:
    if "/p2p/" not in maddr:
        raise ValueError(f"{maddr!r} must end in /p2p/<peer id> (copy the peer's 'listening on' line)")
    return maddr.rsplit("/p2p/", 1)[1]


def parse_route(spec: str, addrs: dict[str, str]) -> list[Hop]:
    """'PEER:A:B,PEER:B:C' -> hops; PEER is a peer id, or an unambiguous end of one, of a known peer."""
    route = []
    for item in spec.split(","):
        try:
            who, a, b = item.strip().rsplit(":", 2)
            span = (int(a), int(b))
        except ValueError:
            raise ValueError(f"route item {item!r} must be PEER:START:END") from None
        matches = [pid for pid in addrs if pid == who or pid.endswith(who) or pid.startswith(who)]
        if len(matches) != 1:
            raise ValueError(f"route item {item!r}: {'no' if not matches else 'more than one'} known peer "
                             f"matches {who!r} (known: {', '.join(addrs) or 'none'})")
        route.append(Hop(addrs[matches[0]], matches[0], span))
    return route


def plan_route(infos: dict[str, m.InfoReply], addrs: dict[str, str], num_blocks: int) -> list[Hop]:
    route, at = [], 0
    while at < num_blocks:
        options = [(info.blocks[1], pid) for pid, info in infos.items() if info.blocks[0] == at]
        if not options:
            have = ", ".join(f"{pid[-8:]}:{i.blocks[0]}:{i.blocks[1]}" for pid, i in infos.items()) or "nothing"
            raise RemoteError("no_route", f"no known peer serves a span starting at block {at} (known: {have})")
        end, pid = max(options)
        route.append(Hop(addrs[pid], pid, (at, end)))
        at = end
    check_route(route, num_blocks)
    return route


async def fetch_info(node, addr: str, timeout: float = 10.0) -> m.InfoReply:
    stream = await node.open_stream(addr, INFERENCE_PROTOCOL)
    try:
        await stream.send(m.encode(m.Info()))
        reply = m.decode(await asyncio.wait_for(stream.recv(), timeout))
    finally:
        await stream.close()
    if isinstance(reply, m.Error):
        raise RemoteError(reply.code, reply.message, addr)
    if not isinstance(reply, m.InfoReply):
        raise RemoteError("bad_reply", f"expected InfoReply, got {type(reply).__name__}", addr)
    return reply
