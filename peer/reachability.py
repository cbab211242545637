"""Whether other peers can dial this one, found out by asking them (peer/dialback.py), and what follows.

Verdicts: `public` (some helper's fresh connection reached our libp2p port, proving our peer id),
`private` (at least one helper answered, and none got through), `unknown` (no helper answered: the
first peer of a swarm, helpers of an older version, or all refused). Helpers are the bootstrap peers at
start, later (`watch`: every RECHECK_EVERY s, and when identify's observed address changes) up to
MAX_HELPERS connected peers that speak the protocol. The direct data port counts as reached only when
its nonce came back to us (`delivered`, fed by `dialback.ProbeSniffer` on that port). `--reachability
public|private` skips the check.

Loopback: the verdict is about the swarm this peer joins. In a loopback swarm (bootstrap peers on
127.0.0.1, e.g. the test suite) a dial-back from 127.0.0.1 that succeeds makes the peer `public`, with
its loopback addresses: reachable by every peer of that swarm, which is all on this machine.

`plan` turns a verdict into what to tell others (peer/addrs.py `usable`): the verified addresses (or
those --announce/--public-ip give, which a volunteer may know better), the direct data address only
when that port is reachable, and the DHT mode (a private peer runs Kademlia as a client: peers must
not hand out contacts nobody can dial). `describe` says it in one line a volunteer can act on.

Knows P2PNode, the dial-back protocol and address rules; nothing of the DHT, records or models
(peer/serve.py applies a plan to them).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Sequence

from libp2p.peer.id import ID

from peer import dialback
from peer.addrs import host_port, scope, usable
from peer.p2p import P2PNode

log = logging.getLogger("specswarm.reachability")
MODES = ("auto", "public", "private")
VERDICTS = ("public", "private", "unknown")
RECHECK_EVERY, OBSERVE_EVERY, MAX_HELPERS = 600.0, 60.0, 3


@dataclass
class Verdict:
    state: str  # one of VERDICTS
    observed: str | None = None  # our IP as the helpers see it
    reached: list[str] = field(default_factory=list)  # verified /ipX/IP/tcp/PORT of the libp2p port
    data: bool | None = None  # the direct port: reached (its nonce came back), not, or None: not asked
    asked: int = 0
    answered: int = 0
    checked: bool = True  # False: set by --reachability, not found out
    port: int | None = None  # the libp2p port asked about

    def same(self, other: Verdict) -> bool:
        return (self.state, self.observed, self.reached, self.data) == \
            (other.state, other.observed, other.reached, other.data)


@dataclass
class Plan:
    addrs: list[str]  # multiaddrs to tell others (without /p2p/)
    data_addr: str | None  # tcp://HOST:PORT, or None: no direct port others could use
    kad_server: bool  # run Kademlia as a server (others may hand us out as a contact)


class Reachability:
    """One peer's reachability: serves dial-backs for others, checks its own, plans what to announce."""

    def __init__(self, node: P2PNode, mode: str = "auto", bootstrap: Sequence[str] = (), configured: bool = False,
                 data_port: int | None = None):
        if mode not in MODES:
            raise ValueError(f"--reachability wants one of {', '.join(MODES)}, got {mode!r}")
        self.node, self.mode, self.bootstrap, self.configured = node, mode, list(bootstrap), configured
        self.data_port = data_port  # set once the direct port is bound (None: there is none)
        self.initial = [a.split("/p2p/")[0] for a in node.addrs]  # what the flags (or the bound ports) say
        self.server = dialback.DialbackServer(node.host)
        self._delivered: set[bytes] = set()

    async def start(self) -> None:
        """Serve dial-back requests from now on (a trio handler: no asyncio hop)."""
        await self.node.run_trio(_set_handler, self.node, self.server.handle)

    def sniff(self, stream):
        """Wrap a direct-port stream so that a dial-back probe on it is answered and recorded."""
        return dialback.ProbeSniffer(stream, self._delivered.add)

    def libp2p_port(self) -> int | None:
        """The libp2p port helpers dial: the announced one (--announce/--public-ip), else the bound one."""
        for addr in (self.initial if self.configured else []) + [a.split("/p2p/")[0] for a in self.node.bound]:
            hp = host_port(addr)
            if hp is not None and hp[0] in ("ip4", "ip6", "dns", "dns4", "dns6"):
                return hp[2]
        return None

    async def check(self, helpers: Sequence[str] | None = None) -> Verdict:
        """Ask `helpers` (peer ids; None: the bootstrap peers, connected here first) to dial us back."""
        port = self.libp2p_port()
        if self.mode != "auto":
            return Verdict(self.mode, checked=False, port=port)
        if helpers is None:
            helpers = await self._connect_bootstrap()
        ports = {"libp2p": port} if port else {}
        if self.data_port:
            ports["data"] = self.data_port
        if not helpers or not port:
            return Verdict("unknown", port=port)
        nonces = {h: os.urandom(dialback.NONCE_BYTES) for h in helpers[:MAX_HELPERS]}
        answers = await asyncio.gather(*(self._ask(h, n, ports) for h, n in nonces.items()))
        verdict = Verdict("unknown", asked=len(nonces), port=port)
        for (helper, nonce), answer in zip(nonces.items(), answers):
            if answer is None:
                continue
            verdict.answered += 1
            ip = answer["observed"]
            verdict.observed = verdict.observed or ip
            if answer["results"].get("libp2p") == "ok":
                addr = f"/ip{6 if ':' in ip else 4}/{ip}/tcp/{port}"
                verdict.reached += [addr] if addr not in verdict.reached else []
            if "data" in ports:
                verdict.data = bool(verdict.data) or nonce in self._delivered
            self._delivered.discard(nonce)
        if verdict.answered:
            verdict.state = "public" if verdict.reached else "private"
        if verdict.reached:
            verdict.observed = host_port(verdict.reached[0])[1]
        return verdict

    async def _ask(self, helper: str, nonce: bytes, ports: dict[str, int]) -> dict | None:
        try:
            return await self.node.run_trio(dialback.ask, self.node.host, ID.from_base58(helper), nonce, ports)
        except dialback.DialbackError as exc:
            log.info("peer %s did not check our reachability [%s]: %s", helper, exc.code, exc)
        except BaseException as exc:  # noqa: BLE001 - an older peer (no such protocol), gone, too slow
            if isinstance(exc, (KeyboardInterrupt, SystemExit, asyncio.CancelledError)):
                raise
            log.debug("peer %s did not answer a dial-back request: %r", helper, exc)
        return None

    async def _connect_bootstrap(self) -> list[str]:
        peers = []
        for addr in self.bootstrap:
            try:
                peers.append(await self.node.connect(addr))
            except (ConnectionError, ValueError) as exc:
                log.debug("bootstrap peer %s: %s", addr, exc)
        return list(dict.fromkeys(peers))

    def plan(self, verdict: Verdict) -> Plan:
        """What to tell others, given `verdict` (module docstring)."""
        state = verdict.state
        candidates = self.initial if (self.configured or state != "public" or not verdict.checked) else verdict.reached
        addrs = usable(candidates, self.bootstrap, state)
        data = None
        if self.data_port and addrs and verdict.data is not False:
            host = host_port(addrs[0])[1]
            data = f"tcp://[{host}]:{self.data_port}" if ":" in host else f"tcp://{host}:{self.data_port}"
        return Plan(addrs, data, state != "private")

    def describe(self, verdict: Verdict, plan: Plan) -> str:
        """The one line a volunteer reads about it."""
        port, dp = verdict.port, self.data_port
        told = " ".join(plan.addrs) or "no address"
        if not verdict.checked:
            what = "PUBLIC" if verdict.state == "public" else "PRIVATE"
            tail = "announcing " + told if verdict.state == "public" else (
                "announcing " + told + ", DHT as a client; clients reach it through a relay, and WebRTC where the "
                "NATs allow")
            return f"reachability: {what} (--reachability {verdict.state}: not checked) — {tail}"
        if verdict.state == "public":
            where = f"{verdict.observed}:{port}"
            local = "; a loopback swarm: this machine only" if scope(verdict.observed) == "loopback" else ""
            line = (f"reachability: PUBLIC — peers reach you at {where} (dialled back by {len(verdict.reached)} of "
                    f"{verdict.answered} peers asked{local})")
            if self.configured:
                line += f"; announcing {told} as --announce/--public-ip say"
            if verdict.data is False:
                line += (f"; but your direct port {dp} is NOT reachable: clients will use slower libp2p streams — "
                         f"forward TCP port {dp} too")
            return line
        if verdict.state == "private":
            ports = f"{port}-{dp}" if dp == (port or 0) + 1 else f"{port}" + (f" and {dp}" if dp else "")
            hosts = sorted({host_port(a)[1] for a in self.node.bound if host_port(a)})
            listen = " ".join([h for h in hosts if scope(h) != "loopback"] or hosts) or "?"
            given = (f" (--announce/--public-ip say {' '.join(self.initial)}: nobody got through; --reachability "
                     "public overrides this check)") if self.configured else ""
            return (f"reachability: PRIVATE — you are behind a NAT or firewall: {verdict.answered} peer(s) could not "
                    f"dial you back at {verdict.observed}:{port} (you listen on {listen}){given}; clients will reach "
                    f"this peer through a relay, and over WebRTC where the NATs allow hole punching — for direct "
                    f"connections (fastest) forward TCP port(s) {ports} to this machine; DHT as a client")
        why = ("no --initial-peers: the first peer of a new swarm" if not self.bootstrap else
               f"none of the {verdict.asked} peers asked answered (older versions?)" if verdict.asked else
               "no bootstrap peer could be reached")
        return f"reachability: UNKNOWN — no peer could check ({why}); announcing {told} as configured"

    async def watch(self, current: Verdict, apply: Callable[[Verdict], Awaitable[None]],
                    every: float = RECHECK_EVERY, observe_every: float = OBSERVE_EVERY) -> None:
        """Check again every `every` s, and when the IPs peers observe us at change; `await apply(v)` and
        log the new line when the verdict changes (an unknown one changes nothing). Runs until cancelled."""
        if self.mode != "auto":
            return
        seen, due = await self.node.observed_ips(), time.monotonic() + every
        while True:
            await asyncio.sleep(min(observe_every, every))
            ips = await self.node.observed_ips()
            if ips == seen and time.monotonic() < due:
                continue
            seen, due = ips, time.monotonic() + every
            verdict = await self.check(await self.node.run_trio(_dialback_peers, self.node, self.bootstrap))
            if verdict.state == "unknown" or verdict.same(current):
                continue
            await apply(verdict)
            current = verdict
            log.info("%s", self.describe(verdict, self.plan(verdict)))


async def _set_handler(node: P2PNode, handler) -> None:
    node.host.set_stream_handler(dialback.PROTOCOL, handler)


async def _dialback_peers(node: P2PNode, bootstrap: Sequence[str]) -> list[str]:
    """Connected peers whose identify lists the dial-back protocol; bootstrap peers first."""
    host, first = node.host, {a.rsplit("/p2p/", 1)[-1] for a in bootstrap}
    out = []
    for peer in host.get_connected_peers():
        try:
            protocols = host.get_peerstore().get_protocols(peer) or []
        except Exception:  # noqa: BLE001 - not identified yet
            protocols = []
        if dialback.PROTOCOL in protocols:
            out.append(str(peer))
    return sorted(out, key=lambda p: p not in first)
