"""A volunteer peer process: load a block range, join libp2p, serve inference sessions until stopped."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from dataclasses import dataclass, field

import torch

from peer.model import Checkpoint
from peer.p2p import P2PNode
from peer.server import BlockServer, Limits
from peer.transport import INFERENCE_PROTOCOL, dial, listen_tcp

log = logging.getLogger("specswarm.peer")


@dataclass
class PeerOptions:
    model: str
    blocks: tuple[int, int]
    listen: list[str] = field(default_factory=lambda: ["/ip4/127.0.0.1/tcp/0"])
    identity: str | None = None
    initial_peers: list[str] = field(default_factory=list)
    device: str = "cpu"
    dtype: str = "float32"
    limits: Limits = field(default_factory=Limits)
    threads: int | None = None
    direct: bool = True  # also accept inference streams on a direct TCP port (same host as libp2p)
    data_port: int = 0


def parse_blocks(text: str) -> tuple[int, int]:
    try:
        a, b = (int(x) for x in text.split(":"))
    except ValueError:
        raise ValueError(f"--blocks wants START:END (end exclusive), got {text!r}") from None
    return a, b


def _host_of(maddr: str) -> str:
    parts = maddr.split("/")
    return parts[2] if len(parts) > 2 and parts[1] in ("ip4", "ip6", "dns4", "dns6", "dns") else "127.0.0.1"


async def serve(opts: PeerOptions, ready: asyncio.Event | None = None) -> None:
    torch.set_num_threads(opts.threads or max(1, (os.cpu_count() or 2) // 2))
    t0 = time.perf_counter()
    ckpt = Checkpoint(opts.model)
    blocks = ckpt.load_blocks(*opts.blocks, opts.dtype, opts.device)
    cfg = ckpt.config
    log.info("loaded blocks [%d, %d) of %d of %s in %.1f s (%s, %s); KV cache: %d tokens = %.1f MiB",
             *opts.blocks, cfg.num_hidden_layers, ckpt.model_id, time.perf_counter() - t0, opts.device, opts.dtype,
             opts.limits.cache_tokens, opts.limits.cache_tokens * blocks.bytes_per_token() / 2**20)
    node = await P2PNode.start(opts.identity, opts.listen)
    server = BlockServer(blocks, ckpt.model_id, opts.limits, open_stream=lambda addr: dial(node, addr),
                         name=node.peer_id)
    node.set_stream_handler(INFERENCE_PROTOCOL, lambda stream: server.handle(stream, stream.remote_peer_id[-8:]))
    tcp_server = None
    if opts.direct:
        host = _host_of(node.addrs[0]) if node.addrs else "127.0.0.1"
        tcp_server, server.data_addr = await listen_tcp(server.handle, host, opts.data_port)
        log.info("direct inference streams on %s", server.data_addr)
    for addr in opts.initial_peers:
        try:
            await node.connect(addr)
        except Exception as e:  # noqa: BLE001 - a dead bootstrap peer must not stop this one
            log.warning("could not reach initial peer %s: %s", addr, e)
    for addr in node.addrs:
        print(f"listening on {addr}", flush=True)
    reaper = asyncio.get_running_loop().create_task(server.expire_idle(min(5.0, opts.limits.session_timeout / 2)))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread (tests)
            pass
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
    finally:
        log.info("shutting down: closing %d sessions", len(server.sessions))
        reaper.cancel()
        if tcp_server is not None:
            tcp_server.close()
        await server.close()
        await node.close()
