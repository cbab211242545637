"""How a client talks to the swarm: one `ClientConfig`, built once (from the CLI's flags, or in code).

Knows the client's own settings and the shape of an address map; nothing of sampling, drafts,
tokenizers or the command line. Every default is stated here and only here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from peer.paths import PathSettings

TRANSPORTS = ("tcp", "libp2p")
WIRE_DTYPES = ("float32", "bfloat16", "float16")


class AddressMap(Protocol):
    """Rewrites where the client and the peers reach each other (an emulated WAN puts a delay proxy
    on every link). `route_addr` names a peer, by its direct address, the way the hop before it on a
    chain must reach it; `dial_addr` is where the client itself dials a route address."""

    def route_addr(self, direct: str) -> str: ...

    def dial_addr(self, addr: str) -> str: ...


@dataclass(frozen=True, slots=True)
class ClientConfig:
    push: bool | None = None  # True: peers push hidden states to the next peer (n + 1 hops); False: client-mediated
    # (2n, as Petals); None: chosen per route from the predicted step time (swarm.client.route.choose_chain)
    wire_dtype: str = "float32"  # hidden states on the wire; float32 keeps outputs identical to --local
    transport: str = "tcp"  # "tcp": peers' direct data ports; "libp2p": libp2p streams
    sealed: bool = True  # per-hop encryption (protocol.crypto); False is for benchmarks only
    timeout: float = 60.0  # seconds to wait for a peer's answer
    ban_seconds: float = 60.0  # how long a peer that failed a step is left out of routes
    max_failovers: int = 5  # re-routes one step may try before giving up
    route_wait: float = 0.0  # seconds the first plan and a failover look again (every second) for a peer to cover
    # blocks that nobody serves (one joining, returning or moving) before giving up with NoRoute; the chat waits itself
    discovery: bool = True  # look for peers in the DHT, not only the initial peers
    route: str | None = None  # an explicit chain "PEER:A:B,PEER:B:C"; None: plan the fastest
    addresses: AddressMap | None = None  # an emulated WAN's link map; None: reach peers directly
    paths: PathSettings = PathSettings()  # peers behind NATs: WebRTC, STUN, TURN (peer/paths.py)
    # integrity spot-checks (swarm/client/integrity.py): the fraction of steps an independent replica recomputes
    # (besides every step of a peer on probation or under suspicion); 0 turns checks off
    verify_rate: float = 0.05
    verify_tolerance: float | None = None  # largest honest relative error; None: from the dtypes peers announce
    liar_ban_seconds: float = 3600.0  # how long a peer caught returning wrong hidden states is left out of routes
    # verification at the last peer (peer/verify.py): True: the route's last peer verifies speculative rounds and
    # answers with verdicts, not hidden states (this client computes the same verdicts itself where the last peer
    # holds no head); False: this client verifies; None: `auto_verify_at_peer` decides per route
    verify_at_peer: bool | None = None

    def __post_init__(self):
        if self.transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, got {self.transport!r}")
        if self.wire_dtype not in WIRE_DTYPES:
            raise ValueError(f"wire dtype must be one of {', '.join(WIRE_DTYPES)}, got {self.wire_dtype!r}")
        if self.timeout <= 0:
            raise ValueError(f"timeout must be positive, got {self.timeout}")
        if self.max_failovers < 0 or self.ban_seconds < 0 or self.route_wait < 0:
            raise ValueError("max_failovers, ban_seconds and route_wait must be >= 0")
        if not 0.0 <= self.verify_rate <= 1.0:
            raise ValueError(f"verify rate must lie in [0, 1], got {self.verify_rate}")
        if self.verify_tolerance is not None and not self.verify_tolerance > 0:
            raise ValueError(f"verify tolerance must be positive, got {self.verify_tolerance}")

    @property
    def where(self) -> str:
        return {True: "push", False: "client-mediated", None: "push or client-mediated"}[self.push]


WIDE_VOCABULARY = 64  # vocabulary / hidden size from which the head dominates a client's work (SmolLM2: 85)
HEAVY_HEAD = 64 * 2**20  # multiply-adds of the head per node from which a CPU client is too weak for it


def auto_verify_at_peer(offered: bool, vocab: int, hidden: int, device: str) -> bool:
    """The rule for `verify_at_peer=None`: verify at the last peer when it offers to and either the vocabulary is
    wide for the hidden size (vocab >= 64 x hidden: the head is most of the client's work and the hidden states the
    biggest thing on the wire back; SmolLM2-135M, Qwen2, Gemma) or the client runs on a CPU and the head costs at
    least 64 M multiply-adds a node (Llama-2-7B, Llama-3-8B). Small heads (the bundled tiny model) stay here."""
    return offered and (vocab >= WIDE_VOCABULARY * hidden or (device.startswith("cpu") and vocab * hidden >= HEAVY_HEAD))
