"""The client's half of a model whose blocks live on peers: head and tokenizer here, blocks over libp2p.

`SwarmModel` has the same shape as `LocalModel` (`.head`, `.tokenizer`, `.session(max_length)`), so
`swarm.generate` and `swarm.speculative` drive either without knowing which.
"""

from __future__ import annotations

from pathlib import Path

from peer.model import Checkpoint
from peer.p2p import P2PNode
from peer.transport import dial, parse_tcp_addr

from .client import BackgroundLoop, ChainSession, Hop, RemoteBlocks, RemoteError, check_route
from .generate import load_tokenizer
from .routing import fetch_info, parse_route, peer_id_of, plan_route


def _host(maddr: str) -> str:
    parts = maddr.split("/")
    return parts[2] if len(parts) > 2 else "127.0.0.1"


class SwarmModel:
    def __init__(self, model_dir: str | Path, initial_peers: list[str], route: str | None = None,
                 push: bool = True, dtype: str = "float32", device: str = "cpu", wire_dtype: str = "float32",
                 timeout: float = 60.0, transport: str = "tcp"):
        if transport not in ("tcp", "libp2p"):
            raise ValueError(f"transport must be tcp or libp2p, got {transport!r}")
        if not initial_peers:
            raise ValueError("give at least one --initial-peers multiaddr")
        ckpt = Checkpoint(model_dir)
        self.head = ckpt.load_head(dtype, device)
        self.tokenizer = load_tokenizer(model_dir)
        self.model_id, self.push, self.wire_dtype, self.timeout = ckpt.model_id, push, wire_dtype, timeout
        self.transport = transport
        self.bg = BackgroundLoop()
        try:
            self.node = self.bg.run(P2PNode.start())
            self.route = self.bg.run(self._find_route(initial_peers, route, ckpt.config.num_hidden_layers))
        except BaseException:
            self.close()
            raise

    async def _find_route(self, initial_peers: list[str], spec: str | None, num_blocks: int) -> list[Hop]:
        addrs = {peer_id_of(a): a for a in initial_peers}
        for addr in initial_peers:
            await self.node.connect(addr)
        infos = {pid: await fetch_info(self.node, addr, self.timeout) for pid, addr in addrs.items()}
        want = self.model_id.rsplit("-", 1)[-1]
        for pid, info in infos.items():
            if info.model.rsplit("-", 1)[-1] != want:
                raise RemoteError("wrong_model", f"serves model {info.model}, but the client loaded {self.model_id}", pid)
        if self.transport == "tcp":  # dial the direct port on the host we already reach the peer at
            for pid, info in infos.items():
                if info.data_addr:
                    addrs[pid] = f"tcp://{_host(addrs[pid])}:{parse_tcp_addr(info.data_addr)[1]}"
        if spec:
            route = parse_route(spec, addrs)
            for hop in route:
                served = infos[hop.peer_id].blocks
                if hop.blocks != served:
                    raise ValueError(f"route item {hop}: that peer serves blocks {served[0]}:{served[1]}")
            check_route(route, num_blocks)
            return route
        return plan_route(infos, addrs, num_blocks)

    async def _dial(self, addr: str):
        return await dial(self.node, addr)

    def session(self, max_length: int) -> RemoteBlocks:
        chain = ChainSession(self._dial, self.route, self.push, self.wire_dtype, self.timeout)
        self.bg.run(chain.open(max_length))
        return RemoteBlocks(chain, self.bg, self.head.embed_tokens.weight.dtype)

    def close(self) -> None:
        node = getattr(self, "node", None)
        if node is not None:
            try:
                self.bg.run(node.close(), timeout=10)
            except Exception:  # noqa: BLE001
                pass
        self.bg.close()
