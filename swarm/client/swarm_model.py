"""The client's view of a model whose blocks live on peers: the head here, the blocks on the swarm.

`SwarmModel` has the shape `swarm.decode` drives (`.head`, `.session(max_length)`), like `LocalModel`.
It finds the model's peers (DHT records, looked up as a DHT client that leaves no trace in the
peers' routing tables, and the initial peers), plans the fastest route and, unless told, whether
peers push to each other or the client carries every hop (`choose_chain`), and keeps sessions alive when
peers die: `RemoteBlocks` keeps every step it sent; when a step fails it bans the peers that no longer
answer, plans a new route (waiting up to `route_wait` while some blocks have no live peer), replays the
steps (identical shapes, so identical caches) and retries; steps sent behind a failing one wait for it and go
again, in order. Outputs stay token-identical to an undisturbed run. Every failure of a dead, unknown or
unreachable hop (whatever its address says) is a failover failure (`FAILURES`), never a parser's error. Peers that answer but
compute wrong hidden states are caught by spot-checks (`swarm.client.integrity`, `swarm.client.spotcheck`):
with checks on, `RemoteBlocks` keeps every step's output beside its input, settles each step through its
`SessionAudit` before releasing it, and answers a rolled-back generation's verified steps from its transcript.
A session opened with sampling parameters may verify at the last peer (`verifies_at_peer`: the config, or the
auto rule `auto_verify_at_peer` for the route): its steps then yield `RoundVerdict`s, the last peer's (checked,
`swarm.client.verdicts`) or, on a route whose last peer holds no head, computed here with the same verifier.

Knows the protocol, peer transports and records, and routes; nothing of sampling, drafts or tokenizers.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path

import torch

from peer.dht import SwarmDHT
from peer.model import Checkpoint, StepLayout
from peer.model.sampling import RoundCheck, RoundVerdict, SamplingParams
from peer.p2p import P2PNode
from peer.paths import Paths
from peer.transport import addr_of, dial, fetch_info
from swarm.client.background import BackgroundLoop
from swarm.client.chain import ChainSession, RemoteError
from protocol import messages as m
from swarm.client.config import ClientConfig, auto_verify_at_peer
from swarm.client.integrity import FAILURES, Auditor
from swarm.client.route import Hop, NoRoute, PeerInfo, choose_chain, parse_route, peer_id_of, to_hops
from swarm.client.spotcheck import SessionAudit
from swarm.client.verdicts import checked, computed, wire_check

ROUND_NODES = 4  # a typical speculative round's nodes (what `_headless_ms` times the LM head on)
log = logging.getLogger("specswarm.client")


class SwarmModel:
    def __init__(self, model_dir: str | Path, initial_peers: list[str], config: ClientConfig = ClientConfig(),
                 dtype: str = "float32", device: str = "cpu", quant: str = "none"):
        if not initial_peers:
            raise ValueError("give at least one --initial-peers multiaddr")
        ckpt = Checkpoint(model_dir)
        self.head = ckpt.load_head(dtype, device, quant)  # quant "int8" / "nf4": an untied LM head quantized
        self.model_id, self.num_blocks = ckpt.model_id, ckpt.config.num_hidden_layers
        self.model_dir, self.weights = ckpt.path, (dtype, device, quant)  # (a span loaded here for a third opinion)
        self.initial_peers, self.config = list(initial_peers), config
        self.auto_push = config.push is None  # choose push or client-mediated per route (`_plan` sets config.push)
        self.peers: dict[str, PeerInfo] = {}
        self.banned: dict[str, float] = {}  # peer id -> monotonic time the ban ends
        self.dtypes: dict[str, str] = {}  # peer id -> the activation dtype it announces (checks' tolerance)
        self.audit = Auditor(self)  # spot-checks: who passed, suspects, liars caught, the last session's report
        self.failovers = 0
        self._head_ms: float | None = None  # the LM head over a round's nodes here, timed once (`_headless_ms`)
        self.dht = None
        self.bg = BackgroundLoop()
        try:
            self.node = self.bg.run(P2PNode.start())
            self.node.paths = self.paths = Paths(self.node, config.paths)  # peers behind NATs: WebRTC, relays
            if config.discovery:
                self.dht = self.bg.run(SwarmDHT.start(self.node, self.initial_peers, server=False))
            self.route = self.bg.run(self._plan(config.route_wait))
        except BaseException:
            self.close()
            raise

    def with_config(self, **changes) -> "SwarmModel":
        """A view of this client with some settings changed (e.g. push=False), sharing its node, peers and
        bans; it re-plans its route if how peers are reached changed. Close only the original."""
        view = copy.copy(self)
        view.config = replace(self.config, **changes)
        if "push" in changes:
            view.auto_push = changes["push"] is None
        if {"transport", "route", "addresses"} & set(changes) or ("push" in changes and view.auto_push):
            view.route = view.bg.run(view._plan())
        return view

    def replan(self) -> list[Hop]:
        """Look at the swarm again and plan a fresh route (NoRoute while some blocks have no usable peer)."""
        self.route = self.bg.run(self._plan())
        return self.route

    # --- knowing the swarm ------------------------------------------------------------------------
    async def _refresh(self) -> None:
        """Find the model's peers (DHT records plus the initial peers), ask each what it serves, time it."""
        records = {}
        if self.dht is not None:
            try:  # a record counts with a libp2p address of its own peer (what every PeerInfo.addr is)
                records = {r.peer_id: r for r in await self.dht.find(self.model_id)
                           if r.state == "online" and addr_of(r.peer_id, r.addrs)}
            except Exception as e:  # noqa: BLE001 - discovery failing must not hide the peers we know
                log.warning("DHT lookup failed: %s", e)
        for r in records.values():
            self.paths.learn_stun(r.stun, r.addrs)
        addrs = {peer_id_of(a): a for a in self.initial_peers}
        addrs.update({pid: p.addr for pid, p in self.peers.items()})
        addrs.update({pid: addr_of(pid, r.addrs) for pid, r in records.items()})

        async def ask(pid: str, addr: str):
            try:
                return pid, addr, await fetch_info(self.node, addr, min(self.config.timeout, 10.0))
            except FAILURES as e:
                log.info("peer %s is not answering: %s", pid[-8:], e)
                return pid, addr, None

        for pid, addr, answer in await asyncio.gather(*(ask(p, a) for p, a in addrs.items())):
            if answer is None:
                self.peers.pop(pid, None)
                continue
            info, rtt = answer
            self.dtypes[pid] = info.dtype
            if info.model != self.model_id:
                if pid in records or pid in self.peers:
                    continue
                raise RemoteError("wrong_model", f"serves model {info.model}, but the client loaded {self.model_id}", pid)
            rec = records.get(pid)
            load = 1.0 - info.free_cache_tokens / max(rec.cache_tokens, 1) if rec and rec.cache_tokens else 0.0
            self.peers[pid] = PeerInfo(pid, addr, info.blocks, info.data_addr, rtt_ms=rtt, model=info.model,
                                       throughput=rec.throughput if rec else None, rtts=dict(rec.rtts) if rec else {},
                                       load=max(0.0, min(load, 1.0)), path=self.paths.path_of(pid), head=info.head,
                                       top_k=info.top_k)

    def _usable(self) -> dict[str, PeerInfo]:
        return {pid: p for pid, p in self.peers.items() if self.banned.get(pid, 0) <= time.monotonic()}

    async def _plan(self, wait: float = 0.0) -> list[Hop]:
        """The fastest route over the peers found now; while none covers every block (NoRoute), look again every
        second for up to `wait` seconds (a failover waits `config.route_wait` for a peer to join or return)."""
        deadline = time.monotonic() + wait
        while True:
            await self._refresh()
            usable, cfg = self._usable(), self.config
            try:
                plan = choose_chain(usable, self.num_blocks, None if self.auto_push else cfg.push,
                                    parse_route(cfg.route, usable) if cfg.route else None, self._headless_ms())
                break
            except NoRoute as e:
                if time.monotonic() >= deadline:
                    raise
                log.warning("%s; looking again for up to %.0f s", e, deadline - time.monotonic())
                await asyncio.sleep(1.0)
        if self.auto_push:
            self.config = cfg = replace(cfg, push=plan.push)
            log.info("chain shape: %s (predicted step %.1f ms pushed, %.1f ms client-mediated)",
                     cfg.where, plan.push_ms, plan.mediated_ms)
        hops = to_hops(plan.route, usable, cfg.transport, self.num_blocks)
        # an emulated WAN (an address map): the hop before each peer reaches it through its link
        return hops if cfg.addresses is None else [replace(h, addr=cfg.addresses.route_addr(h.addr)) for h in hops]

    def _headless_ms(self) -> float:
        """What a round costs this client when the route's last peer cannot verify it: the LM head over a round's
        nodes (ROUND_NODES), timed once; 0 where rounds would be verified here anyway (`verify_at_peer` off, or
        the auto rule keeps them here). The route planner charges a headless last peer that much."""
        want, cfg = self.config.verify_at_peer, self.head.cfg
        if want is False or not (want or auto_verify_at_peer(True, cfg.vocab_size, cfg.hidden_size, self.weights[1])):
            return 0.0
        if self._head_ms is None:
            weight = self.head.norm.weight
            x = torch.zeros(ROUND_NODES, cfg.hidden_size, dtype=weight.dtype, device=weight.device)
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                self.head.logits(x).sum().item()  # (.item(): the work is done, on any device)
                times.append(time.perf_counter() - t0)
            self._head_ms = 1000 * sorted(times)[1]
        return self._head_ms

    async def _ban_failed(self, route: list[Hop], error: BaseException) -> None:
        """Ban the hops that do not answer; if all answer, the peer that reported the error.

        A hop is asked at its peer's libp2p address (`PeerInfo.addr`), not at the hop's own address (a
        direct one, or an address map's name for the link from the hop before); a hop whose peer we no
        longer know (a look at the swarm since the route was planned found it gone) is dead."""
        async def alive(hop: Hop) -> bool:
            if hop.peer_id not in self.peers:
                return False
            try:
                await fetch_info(self.node, self.peers[hop.peer_id].addr, 3.0)
                return True
            except FAILURES:
                return False

        dead = [hop.peer_id for hop, ok in zip(route, await asyncio.gather(*(alive(h) for h in route))) if not ok]
        if not dead and isinstance(error, RemoteError) and error.peer:
            dead = [hop.peer_id for hop in route if hop.peer_id == error.peer]
        for pid in dead:
            self.banned[pid] = time.monotonic() + self.config.ban_seconds
            log.warning("banned peer %s for %.0f s after: %s", pid[-8:], self.config.ban_seconds, error)

    # --- sessions ---------------------------------------------------------------------------------
    async def dial(self, addr: str):
        """Open an inference stream to a route address (through the address map, where there is one)."""
        return await dial(self.node, addr if self.config.addresses is None else self.config.addresses.dial_addr(addr))

    def verifies_at_peer(self, sampling: SamplingParams | None) -> bool:
        """Whether a session with these sampling parameters (None: plain decoding, no rounds) verifies at the last
        peer: as `config.verify_at_peer` says, or by `auto_verify_at_peer` for the current route."""
        want = self.config.verify_at_peer
        if sampling is None or want is False:
            return False
        last = self.peers.get(self.route[-1].peer_id) if self.route else None
        offered = last is not None and last.head
        if want and not offered:
            log.warning("--verify-at-peer: the route's last peer holds no LM head (--no-head, or an older peer); this "
                        "client computes the same verdicts itself from the hidden states")
        return want or auto_verify_at_peer(offered, self.head.cfg.vocab_size, self.head.cfg.hidden_size, self.weights[1])

    async def open_chain(self, max_length: int, verify: m.VerifyAt | None = None) -> ChainSession:
        """Sessions along the route; `verify`: the last hop verifies rounds, if it offers to and honours every
        sampling parameter (a peer from before top-k does not: then it sends hidden states, verified here)."""
        last = self.peers.get(self.route[-1].peer_id)
        verify = verify if last is not None and last.head and (verify is None or verify.top_k is None or last.top_k) \
            else None
        chain = ChainSession(self.dial, self.route, self.config, self.head.cfg.max_position_embeddings, verify)
        try:
            await chain.open(max_length)
        except BaseException:
            await chain.close()
            raise
        return chain

    async def recover(self, chain: ChainSession, error: BaseException, max_length: int, history: list,
                      verify: m.VerifyAt | None = None) -> ChainSession:
        """A step failed: ban dead peers, re-plan, open the new route and replay `history` into it."""
        await chain.close()
        failed = chain.route
        for _ in range(max(1, self.config.max_failovers)):
            await self._ban_failed(failed, error)
            self.failovers += 1
            self.route = await self._plan(self.config.route_wait)  # NoRoute when nothing is left
            log.warning("failover %d: new route %s; replaying %d steps", self.failovers,
                        " -> ".join(map(str, self.route)), len(history))
            new = None
            try:
                new = await self.open_chain(max_length, verify)
                if history:
                    await new.replay(history)
                return new
            except BaseException as e:  # a failure, or a cancel (the session was closed): never leak `new`
                if new is not None:
                    await new.close()
                if not isinstance(e, FAILURES):
                    raise
                failed, error = self.route, e
        raise error

    def session(self, max_length: int, sampling: SamplingParams | None = None) -> "RemoteBlocks":
        """Blocks over the swarm for one generation; `sampling`: its rounds may be verified at the last peer."""
        return RemoteBlocks(self, max_length, sampling)

    def close(self) -> None:
        """Close the DHT, then the node (even if the DHT would not close), then the loop, which first
        cancels and awaits whatever still runs on it. Close only the original, not a `with_config` view."""
        for part in (self.dht, getattr(self, "paths", None), getattr(self, "node", None)):
            if part is not None:
                try:
                    self.bg.run(part.close(), timeout=10)
                except Exception as e:  # noqa: BLE001 - closing goes on: the loop must still be closed
                    log.debug("closing %s failed: %r", type(part).__name__, e)
        self.bg.close()


class RemoteBlocks:
    """`RunBlocks` over the swarm for one generation; replays its history onto a new route on failure.

    Several steps may be in flight (pipelined speculation). If one fails, the oldest in-flight step
    fails over and retries; the younger ones wait for it and go again on the new route, in order (or,
    when the route did not change, fail over themselves once they are the oldest). History holds
    completed steps only, in order, which is what a new route must replay.
    """

    overlaps = True  # steps run on the client's background loop while the caller drafts

    def __init__(self, model: SwarmModel, max_length: int, sampling: SamplingParams | None = None):
        self.model, self.max_length = model, max_length
        self.sampling = sampling if model.verifies_at_peer(sampling) else None
        self.verdicts = self.sampling is not None  # steps answer with RoundVerdicts (verification at the last peer)
        top_k = sampling.top_k if sampling is not None and not sampling.greedy and sampling.top_k is not None \
            and sampling.top_k < model.head.cfg.vocab_size else None  # sent only where it cuts: see m.VerifyAt
        self.verify_at = m.VerifyAt(sampling.temperature, sampling.top_p, top_k) if self.verdicts else None
        self.history: list[tuple[torch.Tensor, StepLayout]] = []
        self.outputs: list[torch.Tensor] = []  # with checks on: each history step's output, as the route gave it
        self.audit = SessionAudit(self)
        self._inflight: list[int] = []
        self._sent = 0
        self._recovering: int | None = None  # the step failing over (it replays, then retries)
        self._held: set[int] = set()  # steps waiting to go strictly in order behind a failover
        self._turn = asyncio.Condition()  # notified whenever a step leaves the in-flight list
        self._tasks: set[asyncio.Task] = set()  # the steps running now (close cancels them)
        self.chain = model.bg.run(self._open())
        self.audit.rerouted()

    async def _open(self) -> ChainSession:
        try:
            return await self.model.open_chain(self.max_length, self.verify_at)
        except FAILURES as e:
            return await self.model.recover(ChainSession(None, self.model.route, self.model.config), e,
                                            self.max_length, [], self.verify_at)

    def submit(self, hidden: torch.Tensor, layout: StepLayout, check: RoundCheck | None = None) -> Future:
        """Send one step; the future holds its output in the head's dtype, or with `verdicts` its RoundVerdict
        (`check`: a sampled round's drafts and their distributions, for the verifier)."""
        if self.audit.transcript and not self._inflight:  # a rolled-back generation, run again: a verified step
            out = self.audit.answered(hidden, layout)
            if out is not None:
                self.history.append((hidden, layout))
                self.outputs.append(out)
                done: Future = Future()
                done.set_result(self._release(out, layout, check))
                return done
        self._sent += 1
        self._inflight.append(self._sent)
        return asyncio.run_coroutine_threadsafe(self._step(self._sent, hidden, layout, check), self.model.bg.loop)

    def _release(self, out, layout: StepLayout, check: RoundCheck | None):
        """What the decoder gets: hidden states in the head's dtype, or the round's verdict (the last peer's, else
        computed here from the hidden states with the same verifier)."""
        if not self.verdicts:
            return out.to(self.model.head.embed_tokens.weight.dtype)
        return out if isinstance(out, RoundVerdict) else computed(self.model.head, out, layout, check, self.sampling)

    async def _step(self, number: int, hidden, layout, check: RoundCheck | None = None):
        attempt = 0
        self._tasks.add(asyncio.current_task())
        try:
            while True:
                if self._recovering not in (None, number) or self._held:
                    await self._wait_turn(number)  # a failover is under way: no step may overtake its retry
                chain = self.chain
                try:
                    await self.audit.before_send(chain)
                    out = await chain.step(hidden, layout, wire_check(check) if chain.verify else None)
                    if isinstance(out, m.Verdict):
                        out = checked(out, self.model.head.cfg.vocab_size, layout, check, self.sampling,
                                      str(chain.route[-1].peer_id))
                    if self.audit.on and not await self.audit.settle(number, chain, hidden, layout, out):
                        continue  # a check replaced the route this step ran on: it goes again on the new one
                    self.history.append((hidden, layout))
                    if self.audit.on:
                        self.outputs.append(out)
                    return self._release(out, layout, check)
                except FAILURES as e:
                    if number != self._inflight[0]:
                        # an older step is failing over: let it finish, then go again, in order
                        await self._wait_turn(number)
                        continue
                    if attempt == self.model.config.max_failovers:
                        raise
                    attempt += 1
                    log.warning("step failed (%s); failing over", e)
                    self._recovering = number
                    self.chain = await self.model.recover(chain, e, self.max_length, self.history, self.verify_at)
                    self.audit.rerouted()
        finally:
            self._tasks.discard(asyncio.current_task())
            self._inflight.remove(number)
            self._held.discard(number)
            if self._recovering == number:
                self._recovering = None
            async with self._turn:
                self._turn.notify_all()

    async def _wait_turn(self, number: int) -> None:
        """Wait until every older step has finished (steps then go one by one, in order, until none waits)."""
        self._held.add(number)
        async with self._turn:
            await self._turn.wait_for(lambda: self._inflight[0] == number)
        self._held.discard(number)

    def close(self) -> None:
        try:
            self.model.bg.run(self._close(), timeout=10)
        except Exception:  # noqa: BLE001
            pass

    async def _close(self) -> None:
        """Cancel the steps still in flight (a generation stopped early, e.g. by Ctrl-C), then close the
        chain: closing under a live step would fail it, and a failed step fails over (a spurious
        re-route, with a new chain that nobody closes)."""
        steps = [t for t in self._tasks if not t.done()]
        for task in steps:
            task.cancel()
        await asyncio.gather(*steps, return_exceptions=True)
        await self.audit.close()
        await self.chain.close()
