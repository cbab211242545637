"""A volunteer peer process: join the swarm, choose and load blocks, announce them, serve until stopped.

In order: start the libp2p node, answer other peers' dial-back checks and bind the direct TCP port;
find out whether peers can reach this one (peer/reachability.py: the --initial-peers dial it back on
fresh connections; one log line says the verdict and what to do about it) and tell others only
addresses they can use (--announce / --public-ip, else the verified or bound ones, never a wildcard;
when private, only `/p2p-circuit` addresses through relays); start the DHT (bootstrapping from
--initial-peers; Kademlia as a client when private); behind a NAT, reserve relay slots (peer/nat.py;
public peers relay by default, `P2PNode.start(relay=...)`, and answer STUN for the swarm), and answer
WebRTC offers of those who reach us through a relay (peer/paths.py); measure this machine's block throughput
(cached); plan memory (peer/memory.py: how many blocks fit, counted at --quant's size, and the KV cache
budget unless --cache-tokens was given; one log line); if no --blocks were given, take the span the swarm is
weakest on; announce it as "joining" (with the verdict and the address peers see
us at); load the blocks, and with the model's last block the head too (final norm and LM head, so that
clients may verify rounds here: peer/verify.py; not with --no-head; the memory plan reserves its bytes); serve inference streams (libp2p and the direct port); print the addresses
('listening on ...'; a warning if only loopback); announce "online" and keep the record fresh (free
cache, RTTs to the peers that serve the next blocks; the verdict, checked again every 10 minutes and
when peers see us at a new address); at each refresh, a peer that chose its own blocks moves to blocks no live
peer serves when the others still serve all of its own (peer/rebalance.py; not with --no-rebalance: `move` ends the
sessions on the old blocks, loads the new ones and announces them); log a summary line (sessions, tokens, refusals) every
--summary-every seconds; on Ctrl-C or SIGTERM announce "offline", log a last summary and leave.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import signal
import time
from dataclasses import dataclass, field, replace

import torch

from peer import set_threads
from peer.dht import SwarmDHT
from peer.memory import MemoryPlan, describe, free_memory, plan_memory
from peer.model import BlockRange, Checkpoint, KVCache, check_quant, parse_dtype
from peer.model.packed import packing_works
from peer.model import argmax
from peer.addrs import check_announce
from peer.batching import BatchSettings
from peer.p2p import DEFAULT_LISTEN, ListenError, P2PNode
from peer.reachability import MODES, Reachability, Verdict
from peer.record import PeerRecord
from peer.limits import Limits
from peer.nat import NatOptions, NatSupport
from peer.paths import Paths, PathSettings
from peer.relay import RelayLimits
from peer.server import BlockServer
from peer.rebalance import rebalance
from peer.throughput import block_throughput, choose_blocks
from peer.transport import INFERENCE_PROTOCOL, addr_of, dial, fetch_info, listen_tcp, parse_tcp_addr

log = logging.getLogger("specswarm.peer")


@dataclass
class PeerOptions:
    """How a volunteer runs; `swarm peer --help` says what each is. Checked when made (ValueError, one line)."""

    model: str
    blocks: tuple[int, int] | None = None  # None: choose where the swarm needs it
    num_blocks: int | None = None  # cap when choosing
    listen: list[str] | None = None  # None: 127.0.0.1 on any port, or all interfaces on `port`
    identity: str | None = None
    initial_peers: list[str] = field(default_factory=list)
    device: str = "cpu"
    dtype: str = "float32"
    limits: Limits = field(default_factory=Limits)
    threads: int | None = None
    direct: bool = True  # also accept inference streams on a direct TCP port (same host as libp2p)
    data_port: int | None = None  # None: port + 1 with `port`, else any
    record_ttl: float = 60.0
    announce: list[str] = field(default_factory=list)  # multiaddrs others dial (instead of the bound ones)
    public_ip: str | None = None  # announce the bound ports on this IP
    port: int | None = None  # listen on /ip4/0.0.0.0/tcp/PORT, direct data port PORT + 1: stable addresses
    summary_every: float = 60.0  # seconds between summary lines (0: only at shutdown)
    reachability: str = "auto"  # auto: ask peers to dial back; public / private: as said, not checked
    relay: bool = True  # act as a Circuit Relay v2 relay for peers behind NATs (useful when public)
    relay_limits: RelayLimits = field(default_factory=RelayLimits)
    nat: NatOptions = field(default_factory=NatOptions)  # relays to reserve on when private; STUN when public
    paths: PathSettings = field(default_factory=PathSettings)  # WebRTC, STUN, TURN for peers behind NATs
    quant: str = "none"  # "int8" / "nf4": weight-only int8 (half the bytes of bfloat16) or 4-bit NormalFloat (~0.27)
    auto_cache_tokens: bool = False  # size limits.cache_tokens from the memory left after the blocks (peer/memory.py)
    batching: BatchSettings = field(default_factory=BatchSettings)  # steps of different sessions run together
    head: bool = True  # holding the last block: also load the final norm and LM head, to verify rounds (peer/verify.py)
    rebalance: bool = True  # blocks chosen here (no `blocks`): move where no live peer serves (`move_to`)

    def __post_init__(self):
        if self.port is not None:
            if not 0 < self.port < 65535:
                raise ValueError(f"--port wants 1..65534 (the direct data port is PORT+1), got {self.port}")
            if self.listen:
                raise ValueError("give --port or --listen, not both (--port PORT is --listen /ip4/0.0.0.0/tcp/PORT)")
            self.listen = [f"/ip4/0.0.0.0/tcp/{self.port}"]
            self.data_port = self.port + 1 if self.data_port is None else self.data_port
        self.listen, self.data_port = list(self.listen or DEFAULT_LISTEN), self.data_port or 0
        if not 0 <= self.data_port < 65536:
            raise ValueError(f"--data-port wants 0..65535, got {self.data_port}")
        if self.summary_every < 0:
            raise ValueError(f"--summary-every wants seconds >= 0, got {self.summary_every}")
        check_announce(self.announce, self.public_ip)
        if self.reachability not in MODES:
            raise ValueError(f"--reachability wants one of {', '.join(MODES)}, got {self.reachability!r}")
        self.quant = check_quant(self.quant)


def parse_blocks(text: str) -> tuple[int, int]:
    try:
        a, b = (int(x) for x in text.split(":"))
    except ValueError:
        raise ValueError(f"--blocks wants START:END (end exclusive), got {text!r}") from None
    if not 0 <= a < b:
        raise ValueError(f"--blocks wants START:END with 0 <= START < END, got {text!r}")
    return a, b


def _port_of(maddr: str) -> int | None:
    parts = maddr.split("/")
    return int(parts[4]) or None if len(parts) > 4 and parts[3] == "tcp" and parts[4].isdigit() else None


def _host_of(maddr: str) -> str:
    parts = maddr.split("/")
    return parts[2] if len(parts) > 2 and parts[1] in ("ip4", "ip6", "dns4", "dns6", "dns") else "127.0.0.1"


def plan_blocks(ckpt: Checkpoint, opts: PeerOptions) -> MemoryPlan:
    """How many blocks to take and how many cache tokens to grant (peer/memory.py), with its one log line."""
    cfg, limits, dtype = ckpt.config, opts.limits, parse_dtype(opts.dtype)
    free = free_memory(opts.device)
    block_bytes = BlockRange.bytes_per_block(cfg, dtype, opts.quant)
    kv = KVCache.bytes_per_token(1, cfg.num_key_value_heads, cfg.head_dim, dtype)
    requested = opts.blocks[1] - opts.blocks[0] if opts.blocks else opts.num_blocks
    last = opts.blocks is None or opts.blocks[1] == cfg.num_hidden_layers  # (a span chosen later may end the model)
    head = head_bytes(cfg, dtype, opts.device) if opts.head and last else 0
    ceiling = limits.max_sessions * limits.max_session_tokens if opts.device.startswith("cuda") else None
    plan = plan_memory(free, block_bytes, kv, cfg.num_hidden_layers, requested,
                       None if opts.auto_cache_tokens else limits.cache_tokens,
                       min_cache_tokens=limits.max_session_tokens,
                       max_cache_tokens=ceiling or limits.cache_tokens, reserved_bytes=head)
    where = f"{opts.device} ({opts.dtype}" + (f", {opts.quant} weights)" if opts.quant != "none" else ")")
    log.info("%s", describe(plan, free, block_bytes, kv, where))
    return plan


async def choose_span(dht: SwarmDHT, ckpt: Checkpoint, n: int, throughput: float) -> tuple[int, int]:
    records = await dht.find(ckpt.model_id)
    span = choose_blocks(ckpt.config.num_hidden_layers, [((r.start, r.end), r.throughput) for r in records], n)
    log.info("the swarm has %d peers of this model; taking blocks [%d, %d) where it is weakest "
             "(%d blocks, %.0f tokens/s per block here)", len(records), *span, n, throughput)
    return span


def head_bytes(cfg, dtype: torch.dtype, device: str = "cpu") -> int:
    """Bytes of the head a last peer loads: the embedding table (the LM head too when tied), an untied LM head, the norm;
    a large float32 LM head's bfloat16 copy, which greedy verdicts may use (`peer.model.argmax`); a half-precision
    head's packed copy on a CPU, which computes its rows as if alone (`ModelHead.make_invariant`)."""
    tables = 1 if cfg.tie_word_embeddings else 2
    copy = argmax.copy_bytes(cfg.vocab_size, cfg.hidden_size, dtype)
    if dtype in (torch.bfloat16, torch.float16) and str(device).split(":")[0] == "cpu" and packing_works(dtype):
        copy += cfg.vocab_size * cfg.hidden_size * dtype.itemsize
    return (tables * cfg.vocab_size + 1) * cfg.hidden_size * dtype.itemsize + copy


def load_head(ckpt: Checkpoint, span: tuple[int, int], opts: PeerOptions):
    """The head (final norm, LM head) when this peer holds the model's last block and may load it; else None."""
    if not opts.head or span[1] != ckpt.config.num_hidden_layers:
        return None
    head = ckpt.load_head(opts.dtype, opts.device, opts.quant)
    log.info("loaded the head (final norm and LM head, vocabulary %d): clients may verify rounds here "
             "(--no-head to refuse); greedy verdicts from %s", ckpt.config.vocab_size, head.decide_argmax())
    return head


def load_span(ckpt: Checkpoint, span: tuple[int, int], opts: PeerOptions, limits: Limits) -> BlockRange:
    t0 = time.perf_counter()
    blocks = ckpt.load_blocks(*span, opts.dtype, opts.device, opts.quant)
    log.info("loaded blocks [%d, %d) of %d (model %s) in %.1f s (%s, %s, quant %s): weights %.1f MiB; "
             "KV cache: %d tokens = %.1f MiB", *span, ckpt.config.num_hidden_layers, ckpt.model_id,
             time.perf_counter() - t0, opts.device, opts.dtype, opts.quant, blocks.weight_bytes() / 2**20,
             limits.cache_tokens, limits.cache_tokens * blocks.bytes_per_token() / 2**20)
    if blocks.invariant or (blocks.dtype != torch.float32 and blocks.device.type == "cpu"):
        log.log(logging.INFO if blocks.invariant else logging.WARNING, "every row computed as if alone: %s",
                blocks.invariant or f"no ({opts.dtype}: no row-invariant kernel span, or quantized): speculative "
                "greedy output may differ from plain decoding's in near-ties; --dtype float32 keeps that to last bits")
    return blocks


async def move(server: BlockServer, record: PeerRecord, dht: SwarmDHT, ckpt: Checkpoint, span: tuple[int, int],
               opts: PeerOptions, limits: Limits) -> None:
    """Serve `span` instead: announce it ("joining"), end the sessions on the old blocks (their clients fail over at
    once), load it (with the model's last block, the head too) and announce it online."""
    log.warning("moving to blocks [%d, %d): no live peer serves them, and other peers serve all of [%d, %d)",
                *span, record.start, record.end)
    record.start, record.end, record.state = *span, "joining"
    await dht.announce(record)
    await server.end_sessions(f"ended: this peer moves to blocks [{span[0]}, {span[1]})")
    server.blocks = server.head = None  # (the old weights freed before the new ones load; nothing runs between)
    server.blocks, server.head = load_span(ckpt, span, opts, limits), load_head(ckpt, span, opts)
    record.state, record.head = "online", server.head is not None
    await dht.announce(record)


async def measure_next_hops(node: P2PNode, found: list[PeerRecord], end: int) -> dict[str, float]:
    """RTT (ms) to the peers (of the records `found`) that serve block `end`: where our pushes would go."""
    rtts = {}
    for r in found:
        if r.start <= end < r.end and r.peer_id != node.peer_id and r.addrs:
            try:
                _, rtts[r.peer_id] = await fetch_info(node, r.addrs[0], 3.0)
            except (ConnectionError, OSError, asyncio.TimeoutError, EOFError):
                pass
    return rtts


async def serve(opts: PeerOptions, ready: asyncio.Event | None = None) -> None:
    set_threads(opts.threads)
    ckpt = Checkpoint(opts.model)
    node = await P2PNode.start(opts.identity, opts.listen, opts.limits.max_frame, opts.announce, opts.public_ip,
                               relay=opts.relay_limits if opts.relay else None)
    node.frame_timeout = opts.limits.frame_timeout or None
    node.paths = paths = Paths(node, opts.paths, opts.limits.max_frame)
    dht = tcp_server = server = record = plan = verdict = None
    tasks: list[asyncio.Task] = []
    nat = NatSupport(node, opts.nat, paths, opts.initial_peers, _host_of(opts.listen[0]), _port_of(opts.listen[0]))

    async def readdress(live: list[str]) -> None:  # relay slots lost or regained (node.reserve keeps them alive)
        if plan is not None and verdict.state == "private":
            await node.set_addrs(plan.addrs + live)
            if record is not None:
                await dht.announce(record)
    node.on_reservations = readdress

    async def behind_nat(verdict: Verdict) -> None:  # relay slots when private, STUN when public (peer/nat.py)
        found = await _find(dht, ckpt.model_id)
        await nat.update(verdict.state, plan.addrs, [(addr_of(r.peer_id, r.addrs), r.reachability, r.stun)
                                                     for r in found])
        if record is not None:
            record.stun = nat.stun_url
    try:
        reach = Reachability(node, opts.reachability, opts.initial_peers, bool(opts.announce or opts.public_ip))
        await reach.start()
        if opts.direct:  # bound before the check, so that helpers can dial it back too
            tcp_server, reach.data_port = await listen_direct(lambda s, name: _direct(reach.sniff(s), name, server),
                                                              opts)
        verdict = await reach.check()
        plan = reach.plan(verdict)
        await node.set_addrs(plan.addrs)
        log.log(logging.WARNING if verdict.state == "private" else logging.INFO, "%s", reach.describe(verdict, plan))
        dht = await SwarmDHT.start(node, opts.initial_peers, ttl=opts.record_ttl, reachable=plan.kad_server)
        await behind_nat(verdict)
        throughput = block_throughput(ckpt, opts.device, opts.dtype, quant=opts.quant)
        memory = plan_blocks(ckpt, opts)
        limits = replace(opts.limits, cache_tokens=memory.cache_tokens)
        span = opts.blocks or await choose_span(dht, ckpt, memory.blocks, throughput)
        record = PeerRecord(ckpt.model_id, *span, throughput=throughput, cache_tokens=limits.cache_tokens,
                            state="joining", reachability=verdict.state, observed=verdict.observed, stun=nat.stun_url,
                            moves=opts.blocks is None and opts.rebalance)
        await dht.announce(record)
        blocks = load_span(ckpt, span, opts, limits)
        server = BlockServer(blocks, ckpt.model_id, limits, open_stream=lambda addr: dial(node, addr),
                             name=node.peer_id, key_pair=node.key_pair, batching=opts.batching,
                             head=load_head(ckpt, span, opts))
        node.set_stream_handler(INFERENCE_PROTOCOL, lambda s: server.handle(s, s.remote_peer_id[-8:]))
        paths.serve(server.handle)  # WebRTC offers from clients and peers that reach us through a relay
        server.data_addr = plan.data_addr
        record.state, record.data_addr = "online", server.data_addr
        record.x25519 = server.static.public.hex()  # the signed record vouches for it too
        record.head = server.head is not None  # (loaded only with the model's last block)
        await dht.announce(record)
        print_addresses(node)
        loop = asyncio.get_running_loop()
        tasks.append(loop.create_task(server.expire_idle(min(5.0, opts.limits.session_timeout / 2))))
        if opts.summary_every > 0:
            tasks.append(loop.create_task(summaries(server, opts.summary_every)))

        async def apply(new: Verdict) -> None:  # a re-check changed the verdict
            nonlocal plan, verdict
            plan, verdict = reach.plan(new), new
            await node.set_addrs(plan.addrs + (nat.circuit_addrs() if new.state == "private" else []))
            await behind_nat(new)
            await dht.set_reachable(plan.kad_server)
            server.data_addr = record.data_addr = plan.data_addr
            record.reachability, record.observed = new.state, new.observed
            await dht.announce(record)
        tasks.append(loop.create_task(reach.watch(verdict, apply)))
        stop = stop_on_signals()
        if ready is not None:
            ready.set()
        while not stop.is_set():  # refresh what the record says, a little more often than it expires
            try:
                await asyncio.wait_for(stop.wait(), opts.record_ttl / 3)
            except asyncio.TimeoutError:
                found = await _find(dht, ckpt.model_id)  # one look at the swarm a refresh, for both uses
                record.rtts = await measure_next_hops(node, found, span[1])
                if record.moves and (new := await rebalance(dht, node, ckpt.model_id, ckpt.config.num_hidden_layers,
                                                            span, record.throughput, found, set(record.rtts))):
                    await move(server, record, dht, ckpt, new, opts, limits)
                    span = new
                    record.rtts = await measure_next_hops(node, await _find(dht, ckpt.model_id), span[1])
                record.cache_tokens = server.free_tokens
                await behind_nat(verdict)  # (re-)reserve relay slots that were lost
                await dht.announce(record)
    finally:
        await _shut_down(tasks, tcp_server, server, dht, paths, nat, node)


async def _shut_down(tasks, tcp_server, server, dht, paths, nat, node) -> None:
    """Stop serving (whatever of it had started): announce offline, close every part, the node last."""
    log.info("shutting down: announcing offline and closing")
    for task in tasks:
        task.cancel()
    if tcp_server is not None:
        tcp_server.close()
    if server is not None:
        log.info("summary: %s", server.summary(final=True))
        await server.close()
    if dht is not None:
        await dht.close("offline")
    await paths.close()
    await nat.close()
    await node.close()


async def _find(dht: SwarmDHT, model_id: str) -> list[PeerRecord]:
    try:
        return await dht.find(model_id)
    except Exception as exc:  # noqa: BLE001 - a failed lookup must not stop serving; tried again later
        log.warning("could not look up the swarm's peers: %s", exc)
        return []


async def _direct(stream, name: str, server: BlockServer | None) -> None:
    """A connection to the direct port: served once the blocks are loaded; before that only a dial-back
    probe is answered (the sniffer does it, then ends the stream), anything else is hung up on."""
    if server is not None:
        await server.handle(stream, name)
        return
    try:
        await asyncio.wait_for(stream.recv(), 10)
    except (EOFError, OSError, ValueError, asyncio.TimeoutError):
        pass
    finally:
        await stream.close()


async def listen_direct(handler, opts: PeerOptions):
    """The direct inference port, bound where libp2p listens (all interfaces for 0.0.0.0); `await
    handler(stream, name)` per connection. Returns (asyncio server, its port). Others are told it on the
    host of the first address they are told (`Reachability.plan`)."""
    bind = _host_of(opts.listen[0])
    try:
        tcp_server, bound = await listen_tcp(handler, bind, opts.data_port, opts.limits.max_frame,
                                             opts.limits.frame_timeout or None)
    except OSError as exc:
        why = ("address in use (is another peer running? choose another --data-port or --port)"
               if exc.errno == errno.EADDRINUSE else exc.strerror or str(exc))
        raise ListenError(f"could not listen on tcp://{bind}:{opts.data_port} for direct inference streams: {why}") \
            from None
    log.info("direct inference streams on %s", bound)
    return tcp_server, parse_tcp_addr(bound)[1]


def print_addresses(node: P2PNode) -> None:
    """The 'listening on' lines (what others dial: give one as --initial-peers; a private peer announces
    none, so where it listens: peers on its own network may dial that), and a warning when nobody else can."""
    for addr in node.addrs or node.bound:
        print(f"listening on {addr}", flush=True)
    loopback = set()
    for addr in node.bound:
        try:
            ip = ipaddress.ip_address(_host_of(addr))
        except ValueError:
            return
        if not ip.is_loopback:
            return
        loopback.add(str(ip))
    if loopback:
        log.warning("listening on %s only: other machines cannot reach this peer; use --port PORT (or --listen "
                    "/ip4/0.0.0.0/tcp/PORT), and --public-ip / --announce behind NAT", ", ".join(sorted(loopback)))


async def summaries(server: BlockServer, every: float) -> None:
    while True:
        await asyncio.sleep(every)
        log.info("summary: %s", server.summary())


def stop_on_signals() -> asyncio.Event:
    """An event set by Ctrl-C or SIGTERM (when this is the main thread)."""
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread (tests)
            pass
    return stop
