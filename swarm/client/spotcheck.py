"""One session's spot-checks (`SessionAudit`): which steps to check, the shadow routes, third opinions, acting.

The design (shadow routes, tolerance, who lied, rollback, unverified output) is in `swarm.client.integrity`;
this module is its per-session half, driven by `RemoteBlocks`: `answered` (a step the rolled-back session
verified), `before_send` (replay those into the route), `settle` (after a step: check it, maybe re-route
or roll back), `rerouted` (a new chain: at the start and after a failover), `close` (the report).

In a session that verifies at the last peer, the primary route's outputs are verdicts (the target's argmax after
every node), never the final hidden states; the shadows and third opinions still return hidden states, and
`Auditor.off` compares a verdict with them (how far its tokens sit below the best logit, `integrity`).

Knows chains, routes, the client's config and the model engine; nothing of sampling, drafts or tokenizers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from peer.model import StepLayout, parse_dtype
from peer.model.quant import announced_dtype
from swarm.client.chain import ChainSession
from swarm.client.integrity import FAILURES, Rollback, ShadowChain, Transcript, Verdict, run_span
from swarm.client.route import Hop, to_hops

if TYPE_CHECKING:
    from swarm.client.swarm_model import RemoteBlocks

log = logging.getLogger("specswarm.client")
Steps = list[tuple[torch.Tensor, StepLayout]]


class SessionAudit:
    def __init__(self, rb: "RemoteBlocks"):
        self.rb, self.model, self.auditor = rb, rb.model, rb.model.audit
        self.on = self.model.config.verify_rate > 0
        self.shadows: dict[int, ShadowChain] = {}
        self.shadow_route: list[Hop] | None = None  # the route the shadows were built beside
        self.audited: tuple[int, int] | None = None  # the span this session audits at random
        self.given_up: set[tuple[int, int]] = set()  # spans whose mismatch no third opinion settled
        self.unverified: set[tuple[int, int]] = set()  # spans (of routes used) that had no replica to check them
        self.skip: set[str] = set()  # replicas that failed to serve a check in this session
        self.since = 0  # history index from which `rb.outputs` came from the current chain
        self.segments: list[tuple[int, frozenset]] = []  # (first history index, peers) of each route used
        self.checks = self.mismatches = 0
        t, self.auditor.transcript = self.auditor.transcript, None
        self.transcript = t.steps if t else []
        self.liars, self.rollbacks = (list(t.liars), t.rollbacks) if t else ([], 0)
        self.unsent = 0  # steps answered from the transcript that the route has not run yet
        self._flush: asyncio.Future | None = None
        self.dead: Rollback | None = None

    # --- a rolled-back generation, run again ------------------------------------------------------
    def answered(self, hidden: torch.Tensor, layout: StepLayout) -> torch.Tensor | None:
        """The output the rolled-back session verified for this step, if it is that step (same input and layout)."""
        i = len(self.rb.history)
        if i < len(self.transcript):
            h, lay, out = self.transcript[i]
            if lay == layout and h.shape == hidden.shape and torch.equal(h, hidden):
                self.unsent += 1
                return out
        self.transcript = []
        return None

    async def before_send(self, chain: ChainSession) -> None:
        """Before the first new step: replay the steps answered from the transcript into the route, back to back."""
        if self.dead is not None:
            raise self.dead
        if self.unsent and self._flush is None:
            steps, self.unsent = self.rb.history[-self.unsent:], 0
            self._flush = asyncio.ensure_future(chain.replay(steps))
            self.since = len(self.rb.history)
        if self._flush is not None:
            await asyncio.shield(self._flush)

    def rerouted(self) -> None:
        """The chain was replaced (failover or a liar): its outputs start here; the shadows are stale."""
        self._flush, self.unsent, self.since, route = None, 0, len(self.rb.history), self.rb.chain.route
        self.segments.append((self.since, frozenset(h.peer_id for h in route)))
        if self.on:
            self.unverified |= {h.blocks for k, h in enumerate(route) if not self._replicas(route, k)}

    # --- checking a step ---------------------------------------------------------------------------
    async def settle(self, number: int, chain: ChainSession, hidden: torch.Tensor, layout: StepLayout,
                     out: torch.Tensor) -> bool:
        """After step `number` ran on `chain`: True to release its output; False when it must go again (a check
        replaced the route, before or under it). Raises `Rollback` when released outputs were wrong."""
        rb = self.rb
        async with rb._turn:  # in order: an older step's check may replace the route this one ran on
            await rb._turn.wait_for(lambda: rb._inflight[0] == number)
        if self.dead is not None:
            raise self.dead
        if chain is not rb.chain:
            return False
        for k in self._due(chain.route):
            t0 = time.perf_counter()
            try:
                verdict = await self._check(k, chain.route, rb.history + [(hidden, layout)], rb.outputs + [out])
            finally:
                self.auditor.stats["seconds"] += time.perf_counter() - t0  # a shadow's opening and adjudication too
            if verdict is not None and verdict.liar == chain.route[k].peer_id:
                await self._act(number, chain, verdict)
                return False
        return True

    def _replicas(self, route: list[Hop], k: int) -> list[str]:
        hop = route[k]
        return [pid for pid, p in self.model._usable().items()
                if pid != hop.peer_id and pid not in self.skip and p.blocks[0] <= hop.blocks[0]
                and hop.blocks[1] <= p.blocks[1]]

    def _due(self, route: list[Hop]) -> list[int]:
        """The hops to check at this step: those on probation or under suspicion, else the audited span at random."""
        if not self.on:
            return []
        a, now = self.auditor, time.monotonic()
        checkable = [k for k, h in enumerate(route) if h.blocks not in self.given_up and self._replicas(route, k)]
        self.unverified |= {h.blocks for k, h in enumerate(route) if k not in checkable}
        due = [k for k in checkable if a.passed.get(route[k].peer_id, 0) == 0
               or a.suspects.get(route[k].peer_id, 0.0) > now]
        spans = [route[k].blocks for k in checkable]
        if checkable and self.audited not in spans:
            self.audited = spans[a.rng.randrange(len(spans))]
        if not due and checkable and a.rng.random() < self.model.config.verify_rate:
            due = [checkable[spans.index(self.audited)]]
        return due

    async def _check(self, k: int, route: list[Hop], steps: Steps, outs: list[torch.Tensor]) -> Verdict | None:
        """Bring span k's shadow up to date and compare; on a mismatch, ask a third opinion. The liar, if one is found."""
        if self.shadow_route is not route:
            await self.close_shadows()
            self.shadow_route = route
        shadow = self.shadows.get(k) or await self._open_shadow(route, k)
        if shadow is None:
            return None
        first = max(shadow.seen, self.since)
        try:
            got = (await shadow.replay_all(steps[shadow.seen:]))[first - shadow.seen:]
        except FAILURES as e:
            log.info("a check of blocks %s could not run (%s); skipping that replica", route[k].blocks, e)
            self.skip.add(shadow.route[k].peer_id)
            await self._drop_shadow(k)
            return None
        self._count(len(steps) - shadow.seen)
        shadow.seen = len(steps)
        p, r, a = route[k].peer_id, shadow.route[k].peer_id, self.auditor
        tol = a.tol(a.dtype_of(p), a.dtype_of(r))
        bad = next((i for i, (o, g) in enumerate(zip(outs[first:], got)) if not a.off(o, g) <= tol), None)
        if bad is None:
            a.credit(p, r)
            if route[k].blocks != self.audited and a.suspects.get(p, 0.0) <= time.monotonic():
                await self._drop_shadow(k)  # a probation check passed: only spans checked again keep their shadow
            return None
        self.mismatches += 1
        await self._drop_shadow(k)
        return await self._adjudicate(route, k, steps, outs, first + bad, got[bad:], r)

    def _count(self, replayed: int) -> None:
        self.checks += 1
        self.auditor.stats["checks"] += 1
        self.auditor.stats["steps_replayed"] += replayed

    async def _adjudicate(self, route: list[Hop], k: int, steps: Steps, outs: list[torch.Tensor], j: int,
                          s_outs: list[torch.Tensor], r: str) -> Verdict | None:
        """The primary (P) and the shadow (S) disagree on span k from step j on: a third opinion (T) decides by
        majority: the odd one out lies (banned). When T agrees with neither (two liars on the span, or another span's
        peer answering differently in each session) nobody is banned: both become suspects, the output unverified.
        When T agrees with both (P and S just too far apart), nobody is blamed. The liar, on the route or not."""
        a, p, span = self.auditor, route[k].peer_id, route[k].blocks
        third = await self._third_opinion(route, k, steps, {p, r})
        if third is None:
            return self._unsettled(span, p, r)
        t_outs, t_dtype, own = third
        off = {pid: max(a.off(x, y) for x, y in zip(mine, t_outs[j:])) for pid, mine in ((p, outs[j:]), (r, s_outs))}
        ok = {pid: off[pid] <= a.tol(a.dtype_of(pid), t_dtype) for pid in (p, r)}
        if ok[p] and ok[r]:
            a.credit(p, r)
            self.given_up.add(span)  # within reach of a third computation each: no one to blame, no use re-judging
            return None
        if not ok[p] and not ok[r]:
            return self._unsettled(span, p, r)
        liar, honest = (r, p) if ok[p] else (p, r)
        judge = "this client's own computation" if own else "a third peer"
        a.accuse(liar, span, f"{'on the route' if liar == p else 'checking it'}: off by {off[liar]:.3g} from both the "
                             f"other peer and {judge}, over {len(outs) - j} step(s)")
        self.liars.append(liar)
        a.credit(honest)
        return Verdict(liar, j)

    def _unsettled(self, span: tuple[int, int], p: str, r: str) -> None:
        self.auditor.suspect(p, r)
        self.given_up.add(span)
        self.unverified.add(span)
        return None

    async def _third_opinion(self, route: list[Hop], k: int, steps: Steps, exclude: set[str]):
        """Every step's final output with span k computed by a third party: (outputs, its dtype, whether it is this
        client's own computation), or None."""
        others = [pid for pid in self._replicas(route, k) if pid not in exclude]
        try:
            if others:
                pid = others[self.auditor.rng.randrange(len(others))]
                chain = await self._open_variant(route, k, pid, self.model.config)
                if chain is None:
                    return None
                try:
                    return await chain.replay_all(steps), self.auditor.dtype_of(pid), False
                finally:
                    await chain.close()
            own = announced_dtype(parse_dtype(self.model.weights[0]), self.model.weights[2])  # as a peer's
            return await self._local_opinion(route, k, steps), own, True
        except FAILURES as e:
            log.warning("no third opinion on blocks %s: %s", route[k].blocks, e)
        except (MemoryError, ValueError, RuntimeError) as e:  # the span cannot be loaded or run here
            log.warning("no third opinion on blocks %s: cannot run them here: %s", route[k].blocks, e)
        return None

    async def _local_opinion(self, route: list[Hop], k: int, steps: Steps) -> list[torch.Tensor]:
        """Spans before k client-mediated through the route's peers (new sessions), span k here, then the rest."""
        cfg, layouts = replace(self.model.config, push=False), [lay for _, lay in steps]
        xs = await self._mediated(route[:k], cfg, steps) if k else [h for h, _ in steps]
        blocks = await self.auditor.local_span(route[k].blocks)
        ys = await asyncio.to_thread(run_span, blocks, xs, layouts, self.rb.max_length)
        if k + 1 < len(route):
            return await self._mediated(route[k + 1:], cfg, list(zip(ys, layouts)))
        wire = parse_dtype(cfg.wire_dtype)  # as a last peer would have sent them
        return [y.to(wire) for y in ys]

    async def _mediated(self, hops: list[Hop], cfg, steps: Steps) -> list[torch.Tensor]:
        chain = ShadowChain(self.model.dial, hops, cfg, self.model.head.cfg.max_position_embeddings)
        try:
            await chain.open(self.rb.max_length)
            return await chain.replay_all(steps)
        finally:
            await chain.close()

    async def _open_variant(self, route: list[Hop], k: int, pid: str, cfg) -> ShadowChain | None:
        """A new chain over `route` with hop k served by `pid` (the other hops the same), opened."""
        pairs = [(h.peer_id, h.blocks) for h in route]
        pairs[k] = (pid, route[k].blocks)
        try:
            hop = to_hops(pairs, self.model.peers, cfg.transport, self.model.num_blocks)[k]
        except (KeyError, ValueError):  # a peer of the route no longer known
            return None
        if cfg.addresses is not None:
            hop = replace(hop, addr=cfg.addresses.route_addr(hop.addr))
        hops = list(route)
        hops[k] = hop
        chain = ShadowChain(self.model.dial, hops, cfg, self.model.head.cfg.max_position_embeddings)
        try:
            await chain.open(self.rb.max_length)
        except BaseException:
            await chain.close()
            raise
        return chain

    async def _open_shadow(self, route: list[Hop], k: int) -> ShadowChain | None:
        replicas = self._replicas(route, k)
        now = time.monotonic()
        trusted = [pid for pid in replicas if self.auditor.suspects.get(pid, 0.0) <= now] or replicas
        pid = trusted[self.auditor.rng.randrange(len(trusted))]
        try:
            shadow = await self._open_variant(route, k, pid, self.model.config)
        except FAILURES as e:
            log.info("could not open a check of blocks %s on …%s: %s", route[k].blocks, pid[-8:], e)
            self.skip.add(pid)
            return None
        if shadow is not None:
            self.shadows[k] = shadow
        return shadow

    async def _drop_shadow(self, k: int) -> None:
        shadow = self.shadows.pop(k, None)
        if shadow is not None:
            await shadow.close()

    async def close_shadows(self) -> None:
        for k in list(self.shadows):
            await self._drop_shadow(k)

    # --- acting on a liar on the route -------------------------------------------------------------
    async def _act(self, number: int, chain: ChainSession, verdict: Verdict) -> None:
        """The route's own peer lied: re-route and let the step go again, or, if outputs it gave were already
        released (or it was on an earlier route of this session), roll back."""
        rb = self.rb
        earlier = zip(self.segments, self.segments[1:])  # routes this session ran steps on before this one
        j = min([verdict.first_bad] + [s for (s, peers), (end, _) in earlier if end > s and verdict.liar in peers])
        if j < len(rb.history):
            self.model.route = await self.model._plan()  # the rerun's route (NoRoute if nobody else serves it)
            steps = [(h, lay, o) for (h, lay), o in zip(rb.history[:j], rb.outputs[:j])]
            self.dead = Rollback(verdict.liar, Transcript(steps, list(self.liars), self.rollbacks + 1))
            raise self.dead
        rb._recovering = number
        rb.chain = await self._reroute(chain)
        self.rerouted()

    async def _reroute(self, chain: ChainSession) -> ChainSession:
        rb, model = self.rb, self.model
        await chain.close()
        new = None
        try:
            model.route = await model._plan()
            new = await model.open_chain(rb.max_length, rb.verify_at)
            if rb.history:
                await new.replay(rb.history)
            return new
        except FAILURES as e:
            if new is not None:
                await new.close()
            return await model.recover(ChainSession(None, model.route, model.config), e, rb.max_length, rb.history,
                                       rb.verify_at)

    # --- the end -----------------------------------------------------------------------------------
    async def close(self) -> None:
        await self.close_shadows()
        self.auditor.last = self.report()

    def report(self) -> dict:
        """What this session's checks found: `unverified` when some span of a route it used could not be checked."""
        spans = self.unverified if self.on else {h.blocks for h in self.rb.chain.route}
        return {"verify_rate": self.model.config.verify_rate, "checks": self.checks, "mismatches": self.mismatches,
                "liars": list(self.liars), "rollbacks": self.rollbacks,
                "unverified_spans": [f"{a}:{b}" for a, b in sorted(spans)], "unverified": bool(spans)}
