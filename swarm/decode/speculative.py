"""Speculative decoding: a draft model proposes tokens, one trip through the target verifies them all.

One round, top to bottom (`speculative_decode`):
  1. plan: the round policy (`round_policy`) shapes the round: a chain of up to k drafts (how many is
     decided token by token while drafting) or a small greedy tree;
  2. draft: the `Drafter` catches its cache up with the committed sequence and drafts;
  3. send: the target runs [last committed token] + drafts in ONE step that starts at that token's
     position (the start rolls back whatever the previous round rejected: no extra trip, ever; a
     tree round's accepted path is compacted by the next step, `StepLayout.compact`);
  4. send ahead (pipelining, when the policy says it pays or it is forced): while this round is on the
     wire the next one is drafted and sent assuming this one is fully accepted; if it is not, the
     round sent ahead is thrown away (`wasted_rounds`; the next step overwrites its cache entries);
  5. verify: `sampling.verify` accepts drafts by rejection sampling (greedy is the one-hot case:
     accept while the draft equals the target's argmax) and adds one token of the target's own, so
     every round commits at least one token and the output distribution is the target's alone;
  6. commit and observe: the new tokens join the sequence; the policy learns from the round's timing.
Sampling (temperature > 0) drafts chains only: trees are verified greedily. `relaxed` acceptance
(opt-in, LOSSY) also accepts a draft whose target probability is close to the best one, judged on
the target's softmax (also when decoding greedily).

Near the end of the target's session (`max_length`: generate caps it at the model's context) rounds
shrink so that no step reaches past it: chains never hold more drafts than tokens are left to
generate, and trees give way to chains once the widest tree might not fit. The draft drafts only
within its own context and session; past them rounds carry no drafts (plain steps).

The target is any `RunBlocks` (local blocks or the chain of peers). Knows `ModelHead`, `RunBlocks`,
sampling and the round policy; nothing of peers, routes, failover, sockets or tokenizers.
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import torch

from peer.model import ModelHead, StepLayout
from swarm.decode.round_policy import CostModel, RoundTiming, make_policy
from swarm.decode.sampling import SamplingParams, draw, token_probs, verify, verify_greedy_tree
from swarm.decode.target import GenerationResult, LocalModel, RunBlocks, embed_step


@dataclass(frozen=True)
class SpecConfig:
    k: int | None = None  # None: adaptive
    k_max: int = 8
    tree_width: int = 1  # > 1: draft a tree with this many candidates for the first token (greedy only)
    pipeline: bool | None = None  # None: the cost model decides per round (pays when the trip dwarfs compute)
    relaxed: float | None = None  # LOSSY: accept near-best drafts (0 < tau < 1)
    params: SamplingParams = SamplingParams()

    def __post_init__(self):
        if self.k is not None and self.k < 1:
            raise ValueError(f"k must be at least 1 (or None: adaptive), got {self.k}")
        if self.k_max < 1 or self.tree_width < 1:
            raise ValueError(f"k_max and tree_width must be at least 1, got {self.k_max} and {self.tree_width}")
        if self.relaxed is not None and not 0 < self.relaxed < 1:
            raise ValueError(f"relaxed must be in (0, 1), got {self.relaxed}")

    @property
    def slack(self) -> int:
        """The most draft nodes one round may send (a tree of the widest shape)."""
        return max(self.k or 0, self.k_max) * max(1, self.tree_width)

    @property
    def trees(self) -> bool:
        """Trees are allowed: width > 1 and greedy (sampling drafts chains only)."""
        return self.tree_width > 1 and self.params.greedy

    def policy(self) -> CostModel:
        """A fresh round policy for this configuration (adaptive, or this fixed shape)."""
        return make_policy(self.k, self.k_max, self.tree_width, self.pipeline)

    @property
    def mode(self) -> str:
        kind = "tree" if self.tree_width > 1 else "chain"
        pipe = {True: "-pipelined", False: "", None: "-autopipeline"}[self.pipeline]
        return f"speculative-{kind}{pipe}{'-relaxed(lossy)' if self.relaxed else ''}"


class Drafter:
    """The draft model with its own cache, kept in step with whatever sequence it is asked to extend."""

    def __init__(self, model: LocalModel, max_length: int):
        self.model = model
        self.max_length = min(max_length, model.head.cfg.max_position_embeddings)  # never past its own context
        self.session = model.session(self.max_length)
        self.fed: list[int] = []  # tokens whose keys/values sit in the draft cache, in order
        self.confidences: list[float] = []  # of the last proposal's drafts
        self.top: list[list[int]] = []  # greedy: the draft's top-8 tokens at each of the last proposal's positions
        self.first_seconds = 0.0
        self.seconds = 0.0
        self.tokens = 0

    def room(self, length: int) -> int:
        """Drafts it can propose after a sequence of `length` tokens: all but the last one go through its cache."""
        return max(0, self.max_length + 1 - length)

    def _step(self, tokens: list[int], start: int) -> torch.Tensor:
        head = self.model.head
        ids = torch.tensor(tokens, dtype=torch.long, device=head.embed_tokens.weight.device)
        hidden = self.session.submit(head.embed(ids), StepLayout(start, len(tokens))).result()
        self.fed[start:] = tokens
        self.tokens += 1
        return head.logits(hidden[-1:])[0]

    def _logits_after(self, context: list[int]) -> torch.Tensor:
        keep, limit = 0, min(len(self.fed), len(context) - 1)  # re-run at least the last token
        while keep < limit and self.fed[keep] == context[keep]:
            keep += 1
        return self._step(context[keep:], keep)

    def propose(self, context: list[int], k: int, params: SamplingParams, generator: torch.Generator | None = None,
                decide: Callable[[list[float]], tuple[bool, bool]] | None = None) -> tuple[list[int], torch.Tensor]:
        """Up to k draft tokens continuing `context` and the draft distributions they were drawn from [k, vocab].

        `decide(confidences)` is asked after each token (its confidence: the draft's probability of
        it) whether to keep it and whether to draft another; without it, exactly k tokens. The
        confidences and (greedy) the draft's top-8 list at every position are left in
        `self.confidences` and `self.top`.
        """
        t0 = time.perf_counter()
        self.confidences, self.top = [], []
        logits = self._logits_after(context) if k > 0 else None
        self.first_seconds = time.perf_counter() - t0  # the catch-up step: paid once per round, whatever k
        tokens, probs = [], []
        for i in range(k):
            q = token_probs(logits, params)
            if params.greedy:
                token = int(logits.argmax())
                confidence = float(torch.softmax(logits.float(), -1)[token])
                self.top.append(logits.topk(min(8, logits.numel())).indices.tolist())
            else:
                token = draw(q, generator)
                confidence = float(q[token])
            keep, more = decide(self.confidences + [confidence]) if decide is not None else (True, True)
            if not keep:
                self.top = self.top[:len(tokens)]
                break
            tokens.append(token)
            probs.append(q)
            self.confidences.append(confidence)
            if not more:
                break
            if i < k - 1:
                logits = self._step([token], len(self.fed))
        self.seconds += time.perf_counter() - t0
        return tokens, torch.stack(probs) if probs else torch.empty(0)

    def propose_tree(self, context: list[int], depth: int, width: int) -> tuple[list[int], list[int]]:
        """Greedy tree: the `width` likeliest first tokens, each continued greedily to `depth` tokens.

        Returns (tokens, parents) with parents[i] = -1 for first-level nodes.
        """
        t0 = time.perf_counter()
        first = self._logits_after(context).topk(width).indices.tolist()
        tokens, parents = [], []
        for candidate in first:
            parent = -1
            token = candidate
            for d in range(depth):
                tokens.append(token)
                parents.append(parent)
                parent = len(tokens) - 1
                if d < depth - 1:
                    token = int(self._step([token], len(context) + d).argmax())
        self.seconds += time.perf_counter() - t0
        return tokens, parents


@dataclass
class Round:
    """A verification step: what was sent, and what verifying it and learning from it need."""

    ids: list[int]  # the last committed token, then the drafts (a tree: its nodes in order)
    start: int  # position of ids[0]
    drafts: list[int]
    q: torch.Tensor | None = None  # a chain: the draft's distributions [len(drafts), vocab]
    parents: list[int] | None = None  # a tree: every node's parent (node 0 = the last committed token)
    depth: int = 0  # drafted tokens on the longest path
    confidences: list[float] = field(default_factory=list)
    top: list[list[int]] = field(default_factory=list)
    draft_seconds: float = 0.0
    draft_first: float | None = None  # seconds of the first draft step (a chain)
    future: Future | None = None
    sent_at: float = 0.0
    left_at: float = 0.0  # after the send call returned
    arrived_at: list[float] = field(default_factory=list)

    def layout(self, compact) -> StepLayout:
        return StepLayout(self.start, len(self.ids), tuple(self.parents) if self.parents else None, compact)


@dataclass
class SpeculativeResult(GenerationResult):
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    accepted_per_round: list[int] = field(default_factory=list)
    ks: list[int] = field(default_factory=list)
    pipelined_hits: int = 0  # verification rounds that had been sent ahead and were used
    wasted_rounds: int = 0  # rounds sent ahead and thrown away after a rejection (compute spent for nothing)
    tree_rounds: int = 0
    policy: CostModel | None = field(default=None, repr=False)  # the round policy as the run left it

    @property
    def tokens_per_round(self) -> float:
        """Committed tokens per verification round whose verdict was used (thrown-away rounds excluded)."""
        return len(self.tokens) / self.rounds if self.rounds else 0.0

    @property
    def trips(self) -> int:
        """Every step sent through the target, used or thrown away."""
        return self.rounds + self.wasted_rounds

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    def stats(self) -> dict:
        return {"rounds": self.rounds, "tokens_per_round": round(self.tokens_per_round, 3),
                "wasted_rounds": self.wasted_rounds, "acceptance_rate": round(self.acceptance_rate, 4)}


def draft_round(drafter: Drafter, policy: CostModel, seq: list[int], room: int, spec: SpecConfig,
                generator: torch.Generator, chain_only: bool = False) -> Round:
    """Plan and draft the round that continues `seq`, with at most `room` drafts (fewer where the draft's
    session ends)."""
    room = min(room, drafter.room(len(seq)))
    plan = policy.plan(room, spec.tree_width if spec.trees and not chain_only else 1)
    d0 = drafter.seconds
    rnd = Round([], len(seq) - 1, [], depth=plan.k)
    if plan.tree:
        rnd.drafts, parents = drafter.propose_tree(seq, plan.k, plan.width)
        rnd.parents = [-1] + [p + 1 for p in parents]
    elif plan.k > 0:
        rnd.drafts, rnd.q = drafter.propose(seq, plan.k, spec.params, generator,
                                            lambda conf: policy.keep_drafting(conf, plan))
        rnd.depth, rnd.confidences, rnd.top = len(rnd.drafts), list(drafter.confidences), list(drafter.top)
        rnd.draft_first = drafter.first_seconds if rnd.drafts else None
    rnd.ids = seq[-1:] + rnd.drafts
    rnd.draft_seconds = drafter.seconds - d0
    return rnd


def send(run: RunBlocks, head: ModelHead, rnd: Round, compact=None) -> Round:
    rnd.sent_at = time.perf_counter()
    rnd.future = run.submit(embed_step(head, rnd.ids), rnd.layout(compact))
    rnd.future.add_done_callback(lambda _: rnd.arrived_at.append(time.perf_counter()))
    rnd.left_at = time.perf_counter()
    return rnd


def judge(head: ModelHead, rnd: Round, hidden: torch.Tensor, spec: SpecConfig,
          generator) -> tuple[int, list[int], int, tuple | None]:
    """(drafts accepted, the tokens the round commits, the target's own token among them, the
    compaction the next step needs)."""
    logits = head.logits(hidden)
    if rnd.parents is not None:
        path, extra = verify_greedy_tree(rnd.ids, rnd.parents, logits.argmax(-1).tolist())
        return len(path) - 1, [rnd.ids[i] for i in path[1:]] + [extra], extra, (rnd.start, tuple(path))
    soft = torch.softmax(logits.float(), -1) if spec.relaxed is not None and spec.params.greedy else None
    accepted, extra = verify(rnd.drafts, rnd.q, token_probs(logits, spec.params), generator, spec.relaxed, soft)
    return accepted, rnd.drafts[:accepted] + [extra], extra, None


def speculative_decode(head: ModelHead, run: RunBlocks, drafter: Drafter, prompt: list[int], max_new_tokens: int,
                       spec: SpecConfig = SpecConfig(k=4), *, seed: int = 0, eos_ids: tuple = (),
                       on_tokens: Callable[[list[int]], None] | None = None, policy: CostModel | None = None,
                       max_length: int | None = None) -> SpeculativeResult:
    """Decode speculatively: plan -> draft -> send (-> send ahead) -> verify -> commit -> observe.
    `policy`: a round policy to keep learning in (one from an earlier generation); else a fresh one.
    `max_length`: the length of `run`'s session, which no step may pass (None: it has room for
    max_new_tokens plus two rounds of `spec.slack`)."""
    if not prompt:
        raise ValueError("the prompt must contain at least one token")
    policy = policy if policy is not None else spec.policy()
    generator = torch.Generator(device=head.embed_tokens.weight.device).manual_seed(seed)
    result = SpeculativeResult(prompt_tokens=len(prompt), policy=policy)
    t_start = time.perf_counter()
    if len(prompt) > 1:  # the last prompt token travels with the first round
        run.submit(embed_step(head, prompt[:-1]), StepLayout(0, len(prompt) - 1)).result()
    seq, compact, ahead = list(prompt), None, None  # ahead: a round sent before the verdict on the one before
    policy.begin()
    while len(result.tokens) < max_new_tokens and result.stopped_by != "eos":
        left, began = max_new_tokens - len(result.tokens) - 1, time.perf_counter()
        hit = ahead is not None and ahead.start == len(seq) - 1 and ahead.ids[0] == seq[-1]
        narrow = max_length is not None and len(seq) + spec.slack > max_length  # the widest tree might not fit
        cur = ahead if hit else send(run, head, draft_round(drafter, policy, seq, left, spec, generator, narrow),
                                     compact)
        ahead, room = None, min(left - len(cur.drafts), drafter.room(len(seq) + len(cur.drafts)))
        if cur.parents is None and cur.drafts and policy.send_ahead(cur.confidences, room, run.overlaps):
            ahead = send(run, head, draft_round(drafter, policy, seq + cur.drafts, room, spec, generator, True))
        hidden = cur.future.result()
        accepted, new, extra, compact = judge(head, cur, hidden, spec, generator)
        sent_ahead = ahead
        if ahead is not None and accepted == len(cur.drafts):
            new = cur.drafts  # the round in flight verifies the next position itself
        for i, token in enumerate(new):
            if token in eos_ids:
                new, result.stopped_by = new[:i + 1], "eos"
                break
        if ahead is not None and (accepted < len(cur.drafts) or result.stopped_by == "eos"):
            ahead, result.wasted_rounds = None, result.wasted_rounds + 1  # the next step overwrites its cache
        new = new[:max_new_tokens - len(result.tokens)]
        timing = RoundTiming(began, cur.sent_at, cur.arrived_at[-1] if cur.arrived_at else time.perf_counter(),
                             time.perf_counter(), hit, sent_ahead.draft_seconds if sent_ahead else 0.0,
                             sent_ahead.left_at if sent_ahead else None)
        policy.observe_round(cur, accepted, extra, timing,
                             ahead is not None, result.stopped_by == "eos")
        result.pipelined_hits += hit
        result.tree_rounds += cur.parents is not None and not hit
        result.rounds, result.drafted, result.accepted = result.rounds + 1, result.drafted + cur.depth, result.accepted + accepted
        result.accepted_per_round.append(accepted)
        result.ks.append(cur.depth)
        seq += new
        result.tokens += new
        if on_tokens:
            on_tokens(new)
    result.seconds = time.perf_counter() - t_start
    return result
