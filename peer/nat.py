"""What a serving peer does about NATs once it knows its reachability (peer/reachability.py).

Private: reserve a slot on up to `max_relays` relays (public peers that speak Circuit Relay v2 hop: the
--initial-peers first, then public peers from the swarm's records) and tell others the `/p2p-circuit`
addresses through them (the node keeps the reservations alive and re-dials a relay that went away; a
relay that refuses is asked again at the next `update`). Public: run a STUN server for the swarm (peer/stun.py) on UDP, at the same
port number as the libp2p TCP port by default, and publish its URL in the record; relaying itself is
the node's (P2PNode.start(relay=...)). Unknown: nothing to do (nobody could tell; the first peer of a
swarm).

Knows P2PNode's relay calls, the STUN server, Paths (to tell it the swarm's STUN servers) and address
strings; nothing of the DHT, records or models (peer/serve.py hands it what records say).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from peer.addrs import host_port

log = logging.getLogger("specswarm.nat")


@dataclass
class NatOptions:
    max_relays: int = 2  # relays a private peer reserves slots on (0: none; then nobody can reach it)
    stun: bool = True  # a public peer answers STUN binding requests for the swarm (UDP)
    stun_port: int | None = None  # None: the libp2p TCP port's number (any with an ephemeral one)

    def __post_init__(self):
        if self.max_relays < 0:
            raise ValueError(f"--max-relays wants a count >= 0, got {self.max_relays}")
        if self.stun_port is not None and not 0 <= self.stun_port < 65536:
            raise ValueError(f"--stun-port wants 0..65535, got {self.stun_port}")


class NatSupport:
    """`update` after every verdict (and record refresh); `circuit_addrs` for what to announce when private."""

    def __init__(self, node, opts: NatOptions, paths, bootstrap: list[str], bind_host: str, port: int | None):
        self.node, self.opts, self.paths, self.bootstrap = node, opts, paths, list(bootstrap)
        self.bind_host, self.port = bind_host, port
        self.stun_server = None
        self.stun_url: str | None = None
        self._tried: set[str] = set()

    async def update(self, state: str, addrs: list[str], peers: list[tuple[str | None, str, str | None]]) -> None:
        """`state`: our verdict; `addrs`: what the verdict lets us announce directly; `peers`: the swarm's
        (multiaddr, reachability, STUN URL) as their records say. Learns the swarm's STUN servers, reserves
        relay slots while private (and announces `addrs` + circuits when they change), runs the STUN server
        when we have a public address."""
        for addr, _, stun in peers:
            self.paths.learn_stun(stun, [addr] if addr else [])
        if state == "private":
            before = self.circuit_addrs()
            if len(before) < self.opts.max_relays:
                public = [a for a, reach, _ in peers if a and reach == "public"]
                if (after := await self.private(self.bootstrap + public)) != before:
                    await self.node.set_addrs(addrs + after)
        elif addrs:  # public, or unknown with addresses (the first peer of a swarm, --public-ip)
            if stun := await self.public(addrs, self.bind_host, self.port):
                self.paths.learn_stun(stun)

    def circuit_addrs(self) -> list[str]:
        """Our live `/p2p-circuit` addresses (none unless reserved)."""
        return list(self.node.reservations)

    async def private(self, candidates: list[str]) -> list[str]:
        """Reserve on relays among `candidates` (multiaddrs) until `max_relays` are held; our circuit addresses."""
        held = {a.split("/p2p-circuit")[0] for a in self.node.reservations}
        for maddr in candidates:
            if len(held) >= self.opts.max_relays:
                break
            if maddr in held or maddr.rsplit("/p2p/", 1)[-1] == self.node.peer_id or "/p2p-circuit" in maddr:
                continue
            try:
                circuit = await self.node.reserve(maddr)
            except (ConnectionError, OSError, ValueError, asyncio.TimeoutError) as exc:
                if maddr not in self._tried:
                    log.info("no relay slot on %s: %s", maddr, exc)
                self._tried.add(maddr)
                continue
            held.add(maddr)
            log.info("reachable through relay %s at %s", maddr.rsplit("/p2p/", 1)[-1][-8:], circuit)
        if not held:
            log.warning("no relay took a reservation (%d asked): clients cannot reach this peer until one does; it "
                        "retries with every record refresh (start a peer with a public address, or forward ports)",
                        len(candidates))
        return self.circuit_addrs()

    async def public(self, addrs: list[str], bind_host: str, libp2p_port: int | None) -> str | None:
        """Start the STUN server (once); its URL on the host of our first public address, or None."""
        if not self.opts.stun or self.stun_server is not None:
            return self.stun_url
        ip = next((hp[1] for hp in map(host_port, addrs) if hp and hp[0] in ("ip4", "ip6")), None)
        if ip is None:
            return None
        from peer.stun import StunServer

        port = self.opts.stun_port if self.opts.stun_port is not None else (libp2p_port or 0)
        try:
            self.stun_server = await StunServer.start(bind_host, port)
        except OSError as exc:
            log.warning("could not run a STUN server on udp %s:%s (%s); WebRTC peers will need --stun", bind_host,
                        port, exc.strerror or exc)
            return None
        self.stun_url = f"stun:{ip}:{self.stun_server.addr[1]}"
        log.info("answering STUN for the swarm on udp port %d (%s): peers behind NATs find their public "
                 "address with it", self.stun_server.addr[1], self.stun_url)
        return self.stun_url

    async def close(self) -> None:
        if self.stun_server is not None:
            self.stun_server.close()
