"""Spot-checks: the client catches peers that return wrong hidden states, bans them and rolls back.

**How a check runs.** For a random fraction of steps (`ClientConfig.verify_rate`), plus every step of a
peer on probation (never yet checked: its first step is checked) or under suspicion, the client has one
span k of its route computed again by an independent replica and compares hidden states. In push mode
the client never sees a hop's input, and a replica needs the session's KV cache for that span, so the
check runs a **shadow route**: the primary route with hop k served by a replica (the other hops are the
same peers, in new sessions), opened lazily the first time span k is checked in a session and kept up to
date at check time by replaying, back to back, the steps it has not seen (`RemoteBlocks.history`, the
first span's inputs, is all a whole-route replay needs; runs of consecutive decode steps go as one
multi-position step, `merge_steps`: a catch-up of M tokens is one trip). The shadow returns the final
output of every step it replays (`ShadowChain.replay_all`), and each is compared with the output the
primary route gave for that step (`RemoteBlocks.outputs`): so one check verifies span k for every step
since the last one. A check is synchronous: the checked step's output reaches the decoder only after it;
steps sent behind it are released in order after it. Only one span is audited at random per session
(`audited`); a probation check of another span closes its shadow once it passes.

**Tolerance.** Honest peers differ: another dtype, int8 weights, another device. `distance` is the
largest relative difference of a step's rows, |a - b| / max(|a|, |b|) (0 equal, 2 opposite, inf for
nan); two computations of a span agree when it is at most `MARGIN` x (spread of one dtype + spread
of the other), the spreads measured (`SPREAD`) over honest bf16, fp16 and int8 spans; a peer announces
its activation dtype, so int8 weights are covered under every dtype. fp32 with fp32: 0.165. nf4 weights
are ~6x further off than int8's (`QUANT_SPREAD`): covering them under every dtype would make every check
blind, so a peer with nf4 weights announces "<dtype>+nf4" (a client of before this change finds that
name unknown and allows a bf16 spread: it would wrongly accuse such a peer); only the spans of nf4 peers
(or a client's own nf4 third opinion) get the wide tolerance: nf4 with fp32 0.73.

**Who lied.** A mismatch says one of the two computations of span k is wrong, not which: a third
opinion decides, by majority over the final outputs of the mismatching steps. It is another replica
of span k if one exists (a third route, the primary's shape), else the client itself: the spans
before k run client-mediated through the route's own peers in new sessions (their outputs are span
k's inputs), span k runs here from the checkpoint on disk (`Checkpoint.load_blocks`, only that span,
loaded on first need in the client's dtype and kept, one span at a time), and the spans after it
client-mediated again. Its cost: one more replay of every step so far through the other spans, the
span's weights in memory, and its compute for every step so far. The odd one out is the liar. When
the third agrees with neither (two liars on the span; or a peer of another span answering differently
in each session), nobody is banned: both peers of the mismatch become suspects (every step they serve
is checked, for `liar_ban_seconds`), the span is not checked again in this session and the output is
reported unverified. When it agrees with both, nobody is blamed.

**Rollback.** A liar is banned for `liar_ban_seconds`, with the reason recorded (`Auditor.accusations`;
no signed accusation is published to other clients). If only the checked step was wrong (it was not
released), the client re-plans without the liar, replays `history` into the new route and runs the step
again: the decoder never sees a wrong output. If outputs already released were wrong (an unchecked step,
or a peer that lied before the check), the step raises `Rollback` with a `Transcript` of the verified
steps before the first wrong one (or before the liar joined this session's route, when it was on an
earlier route of it whose steps no check covered); `with_rollback` runs the generation again on the new
route, where each step that matches the transcript is answered from it at once and replayed into the
route back to back (step by step, as failover replays: identical shapes give identical caches) before
the first new step: the rerun costs one replay, and the output is exactly that of an honest route.
Callers that do not use `with_rollback` (chat, the API) see `Rollback` as a failed generation.

**Verification at the last peer.** Such a session's route returns verdicts (the target's argmax after every node),
never the final hidden states. Checks still run shadow routes of hidden states (a verifying last peer is asked for
hidden states in a shadow session), and a verdict is compared with them through the head here
(`verdict_distance`: how far its tokens sit below the best logit of the replica's computation, relative to the
logits' spread, counted `VERDICT_STRICTNESS` = 10 times against the same tolerance: the tokens are the output): a last peer that reports tokens other than its computation's argmax is
caught like one that returns wrong hidden states; its sampled accept/reject decisions are not re-checked (they use
the seed the client sent, and the argmax shows whether its logits are honest).

**Unverified output.** A span of the route with no independent replica cannot be checked; the
session's `report()` lists such spans (`unverified_spans`), and `swarm generate` says so.

Here: the tolerance, `Transcript` / `Rollback` / `with_rollback`, `ShadowChain` and the `Auditor` (one per
client: who passed checks, suspects, accusations, the client's own span, the last session's report); the
per-session half (which steps, shadows, third opinions, acting) is `swarm.client.spotcheck.SessionAudit`.
Knows chains, the client's config and the model engine (for the local opinion); nothing of sampling,
drafts or tokenizers (`with_rollback` takes the generation as a callable).
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from peer.model import Checkpoint, StepLayout
from swarm.client.chain import ChainSession, RemoteError

log = logging.getLogger("specswarm.client")
FAILURES = (RemoteError, ConnectionError, EOFError, OSError, asyncio.TimeoutError)  # a hop failing: fail over
# The largest honest relative error (`distance`) of a route's final hidden states with one third of its blocks at
# this dtype against the route all in float32, measured on SmolLM2-135M (4 prompts x 24 tokens, each third in turn,
# wire float32 and bfloat16): bfloat16 0.068, float16 0.014, float32 + int8 weights 0.053, bfloat16 + int8 0.070
# (the bundled tiny model: under 0.014 for all). int8 weights hide behind any announced dtype, hence float16's.
SPREAD = {"float32": 0.055, "float16": 0.055, "bfloat16": 0.07}
# The same, one third of SmolLM2's blocks with nf4 weights (fp32 or bf16 activations, either wire): 0.421-0.423
# (int8 0.053-0.063 in that run). Announced as "<dtype>+nf4".
QUANT_SPREAD = {"nf4": 0.43}
MARGIN = 1.5
# A verdict's tokens ARE the greedy output: a near-tie flipped by rounding is all an honest peer may differ by, so
# its relative logit gap (`verdict_distance`) counts 10x against the same tolerance (fp32 peers: 0.0165 of the
# logits' spread). A liar that flips only closer ties than that is not caught; a stricter rule would accuse honest
# low-precision peers at real ties.
VERDICT_STRICTNESS = 10.0


def tolerance(a: str, b: str) -> float:
    """How far two honest computations of one span, at announced dtypes a and b, may differ (`distance`)."""
    return MARGIN * (spread(a) + spread(b))


def spread(announced: str) -> float:
    """The honest spread of a span at an announced dtype ("bfloat16", or "bfloat16+nf4" for nf4 weights); a name not
    known gets the widest of `SPREAD`."""
    _, _, quant = announced.partition("+")
    return QUANT_SPREAD[quant] if quant in QUANT_SPREAD else SPREAD.get(announced, max(SPREAD.values()))


def distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest relative difference of two outputs of one step, row by row: |a - b| / max(|a|, |b|)."""
    if a.shape != b.shape:
        return math.inf
    a, b = a.float().reshape(-1, a.shape[-1]), b.float().reshape(-1, b.shape[-1])
    scale = torch.maximum(a.norm(dim=-1), b.norm(dim=-1)).clamp_min(1e-12)
    d = ((a - b).norm(dim=-1) / scale).max().item()
    return d if math.isfinite(d) else math.inf


def verdict_distance(argmax, logits: torch.Tensor) -> float:
    """How far a verdict's tokens (the argmax a last peer claims after each of a step's last rows) sit below the best
    logit of an independent computation, relative to its spread: max over rows of (best - claimed) / (best - mean).
    0 when the tokens are the argmax; about 1 for a typical token; honest near-ties give almost 0."""
    logits = logits.float()[-len(argmax):] if len(argmax) else logits.float()[:0]
    if logits.shape[0] != len(argmax) or any(not 0 <= t < logits.shape[-1] for t in argmax):
        return math.inf
    if not len(argmax):
        return 0.0
    best = logits.max(-1).values
    claimed = logits.gather(-1, torch.tensor(list(argmax), device=logits.device)[:, None])[:, 0]
    d = ((best - claimed) / (best - logits.mean(-1)).clamp_min(1e-6)).max().item()
    return d if math.isfinite(d) else math.inf


@dataclass
class Transcript:
    """A rolled-back session's verified steps, (input, layout, output) in order, for the rerun to answer from."""

    steps: list[tuple[torch.Tensor, StepLayout, torch.Tensor]]
    liars: list[str] = field(default_factory=list)
    rollbacks: int = 1


class Rollback(RuntimeError):
    """Outputs already handed to the decoder came from a peer now caught lying: generate again (`with_rollback`)."""

    def __init__(self, liar: str, transcript: Transcript):
        super().__init__(f"peer …{liar[-8:]} returned wrong hidden states; the generation must be rolled back to "
                         f"step {len(transcript.steps)} [rollback]")
        self.liar, self.transcript = liar, transcript


def with_rollback(model, run: Callable, on_tokens: Callable | None = None,
                  on_rewind: Callable[[int], None] | None = None, attempts: int = 3):
    """`run(on_tokens)` (one generation), again on `Rollback` (at most `attempts` times), answering the verified
    steps from the transcript. `on_tokens` sees each token once; when a rerun's token i differs from the one it
    was shown, `on_rewind(i)` is called first (the tokens from i on it saw were wrong)."""
    audit = getattr(model, "audit", None)
    shown: list[int] = []
    for attempt in range(attempts + 1):
        got: list[int] = []

        def relay(tokens: list[int]) -> None:
            fresh = []
            for t in tokens:
                i = len(got)
                got.append(t)
                if i < len(shown):
                    if shown[i] == t:
                        continue
                    del shown[i:]
                    if on_rewind:
                        on_rewind(i)
                shown.append(t)
                fresh.append(t)
            if fresh and on_tokens:
                on_tokens(fresh)

        try:
            result = run(relay)
        except Rollback as e:
            if audit is None or attempt == attempts:
                raise
            audit.transcript = e.transcript
            log.warning("%s: generating again on a route without it (%d verified steps answered from the "
                        "transcript)", e, len(e.transcript.steps))
            continue
        if len(shown) > len(got):
            del shown[len(got):]
            if on_rewind:
                on_rewind(len(got))
        return result


MERGE_ROWS = 512  # at most this many positions in one merged replay step (a longer step stays as it is)


def merge_steps(steps: list[tuple[torch.Tensor, StepLayout]]) -> list[tuple[torch.Tensor, StepLayout, list[int]]]:
    """Runs of chain steps that each start where the one before ended (no tree, no compaction between them) as
    one step, with the row counts of the steps it holds: the same positions and cache, computed in one pass."""
    merged: list[tuple[torch.Tensor, StepLayout, list[int]]] = []
    for hidden, layout in steps:
        if merged and layout.parents is None and layout.compact is None:
            h, lay, sizes = merged[-1]
            if lay.parents is None and lay.start + lay.n == layout.start and lay.n + layout.n <= MERGE_ROWS:
                merged[-1] = (torch.cat([h, hidden], dim=-2), replace(lay, n=lay.n + layout.n), sizes + [layout.n])
                continue
        merged.append((hidden, layout, [layout.n]))
    return merged


class ShadowChain(ChainSession):
    """A ChainSession whose replays return every step's output (`ChainSession.replay` returns the last one).
    `replay_all` merges runs of consecutive chain steps (`merge_steps`): catching up on M decode steps is one
    M-position step (its rows round differently in the last bits: far inside any tolerance)."""

    seen = 0  # steps of the session's history this chain has run

    async def replay_all(self, steps: list[tuple[torch.Tensor, StepLayout]]) -> list[torch.Tensor]:
        merged = merge_steps(steps)
        outs = await self._replay_each([(h, lay) for h, lay, _ in merged])
        return [part for out, (_, _, sizes) in zip(outs, merged) for part in torch.split(out, sizes, dim=-2)]

    async def _replay_each(self, steps: list[tuple[torch.Tensor, StepLayout]]) -> list[torch.Tensor]:
        if not steps:
            return []
        first = self._step + 1
        self._step += len(steps)
        if self.config.push:
            futures = [self._expect(len(self.route) - 1, first + n) for n in range(len(steps))]
            for n, (hidden, layout) in enumerate(steps):
                await self._send_step(0, first + n, hidden, layout)
            return [await self._wait(f) for f in futures]
        inputs = [hidden for hidden, _ in steps]
        for i in range(len(self.channels)):
            futures = [self._expect(i, first + n) for n in range(len(steps))]
            for n, (_, layout) in enumerate(steps):
                await self._send_step(i, first + n, inputs[n], layout)
            inputs = [await self._wait(f) for f in futures]
        return inputs


class Auditor:
    """What one client knows of peers' honesty, shared by its sessions and `with_config` views."""

    def __init__(self, model):
        self.model = model
        self.passed: dict[str, int] = {}  # peer id -> checks passed (0: on probation)
        self.suspects: dict[str, float] = {}  # peer id -> monotonic time its suspicion ends
        self.accusations: list[dict] = []  # every liar caught: who, which blocks, why, when
        self.transcript: Transcript | None = None  # for the next session: a rolled-back one's verified steps
        self.last: dict = {}  # the last session's report
        self.stats = {"checks": 0, "steps_replayed": 0, "seconds": 0.0}
        self.rng = random.SystemRandom()  # which steps and spans are checked: not for peers to predict
        self._local: dict[tuple[int, int], object] = {}  # one span's blocks, for third opinions
        self._lock = asyncio.Lock()

    def tol(self, a: str, b: str) -> float:
        return self.model.config.verify_tolerance or tolerance(a, b)

    def off(self, a, b) -> float:
        """How far two outputs of one step are apart: `distance` of hidden states; where one is a verdict (a last
        peer that verifies rounds), `verdict_distance` against the other's logits; two verdicts: 0 or inf."""
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            return distance(a, b)
        if not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor):
            return 0.0 if a.argmax == b.argmax else math.inf
        verdict, hidden = (b, a) if isinstance(a, torch.Tensor) else (a, b)
        return VERDICT_STRICTNESS * verdict_distance(verdict.argmax, self.model.head.logits(hidden))

    def dtype_of(self, pid: str) -> str:
        return self.model.dtypes.get(pid, "?")

    def credit(self, *pids: str) -> None:
        for pid in pids:
            self.passed[pid] = self.passed.get(pid, 0) + 1

    def suspect(self, *pids: str) -> None:
        until = time.monotonic() + self.model.config.liar_ban_seconds
        for pid in pids:
            self.suspects[pid] = until
        log.warning("peers %s disagree on the same steps and no third opinion settles it: both are suspects "
                    "(every step they serve is checked)", ", ".join("…" + p[-8:] for p in pids))

    def accuse(self, pid: str, span: tuple[int, int], why: str) -> None:
        seconds = self.model.config.liar_ban_seconds
        self.model.banned[pid] = max(self.model.banned.get(pid, 0.0), time.monotonic() + seconds)
        self.accusations.append({"peer": pid, "blocks": f"{span[0]}:{span[1]}", "reason": why, "at": time.time()})
        log.warning("peer …%s returned wrong hidden states for blocks [%d, %d) (%s): banned for %.0f s",
                    pid[-8:], span[0], span[1], why, seconds)

    async def local_span(self, span: tuple[int, int]):
        """Blocks `span` in this process (the client's dtype, device and quant), loaded once; one span kept."""
        async with self._lock:
            if span not in self._local:
                self._local.clear()
                m = self.model
                self._local[span] = await asyncio.to_thread(Checkpoint(m.model_dir).load_blocks, *span, *m.weights)
                log.info("loaded blocks [%d, %d) here for a third opinion", *span)
            return self._local[span]


@dataclass
class Verdict:
    liar: str
    first_bad: int  # index (in the session's history) of the first step it got wrong


def run_span(blocks, xs: list[torch.Tensor], layouts: list[StepLayout], max_length: int) -> list[torch.Tensor]:
    cache = blocks.new_cache(max_length)
    return [blocks(x.to(blocks.device), cache, layout) for x, layout in zip(xs, layouts)]
