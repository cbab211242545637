"""An emulated WAN on this machine: `swarm peer` processes on 127.0.0.1 behind delay proxies.

`WanSwarm` starts one peer per span, asks each (Info) for its direct data port, puts a delay proxy
(`swarm.bench.wan.proxy`, in a child process) on every link a chain uses, and describes them in a
`WanLayout`. `model()` gives a plain `SwarmModel` whose `ClientConfig.addresses` is that layout, so
its data plane crosses the proxies; the client is not subclassed or patched.

Knows how to launch peers and proxies and how to configure a client. Must not know the client's
internals (routes, sessions, failover), decoding, or what the proxies do with bytes.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

from swarm.bench.wan.layout import WanLayout
from swarm.bench.wan.links import Profile, as_matrix
from swarm.bench.wan.proxy import Link, ProxyProcess


class WanSwarm:
    """N `swarm peer` processes on 127.0.0.1, one span each, behind delay proxies for every link a
    chain uses (client<->each peer, peer j-1 -> peer j). `model()` gives a client whose traffic
    crosses them. Use as a context manager."""

    def __init__(self, model_dir: str | Path, n_peers: int, links: list[list[Link]] | Profile | str,
                 log_dir: str | Path | None = None, threads: int = 1, dtype: str = "float32"):
        from peer.model import Checkpoint

        from swarm.launch import even_spans, start_peers

        links = as_matrix(links, n_peers)
        self.model_dir, self.links = str(model_dir), links
        self.spans = even_spans(Checkpoint(model_dir).config.num_hidden_layers, n_peers)
        self.dtype = dtype  # the peers' weights and activations, and by default the client's
        self.peers = start_peers(model_dir, self.spans, "--dtype", dtype, threads=threads, log_dir=log_dir)
        self.proxies = None
        try:
            self.layout = WanLayout(links, direct=self._data_addrs(self.initial_peers))
            pairs = [(0, j) for j in range(1, n_peers + 1)] + [(j - 1, j) for j in range(2, n_peers + 1)]
            spec = [dict(target=self.layout.direct[j - 1], up=asdict(links[s][j]), down=asdict(links[j][s]))
                    for s, j in pairs]
            self.proxies = ProxyProcess(spec)
            self.layout.to_peer = {pair: f"tcp://127.0.0.1:{port}" for pair, port in zip(pairs, self.proxies.ports)}
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _data_addrs(maddrs: list[str]) -> list[str]:
        from peer.transport import data_addrs

        addrs = data_addrs(maddrs)
        if not all(addrs):
            raise RuntimeError("every emulated peer needs its direct data port (do not pass --no-direct)")
        return addrs

    @property
    def initial_peers(self) -> list[str]:
        return [p.addr for p in self.peers]

    def config(self, base=None, **changes):
        """`base` (a `ClientConfig`; the defaults if None) with this WAN's address map, without DHT
        discovery (the peers are all known), and any `changes`."""
        from swarm.client.config import ClientConfig

        return replace(base or ClientConfig(), discovery=False, addresses=self.layout, **changes)

    def model(self, base=None, dtype: str | None = None, device: str = "cpu", **changes):
        """A `SwarmModel` whose data plane crosses this WAN's links (`config(base, **changes)`), its head in
        `dtype` (None: the peers')."""
        from swarm.client.swarm_model import SwarmModel

        return SwarmModel(self.model_dir, self.initial_peers, self.config(base, **changes), dtype=dtype or self.dtype,
                          device=device)

    def close(self) -> None:
        if self.proxies is not None:
            self.proxies.stop()
        for p in self.peers:
            p.stop()

    def __enter__(self) -> "WanSwarm":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
