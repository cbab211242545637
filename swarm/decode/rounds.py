"""One speculative round: what it sends, where its drafts came from, and its verdict.

`draft_round` plans a round with the round policy and drafts it: the n-gram index proposes a
continuation first (free), the policy picks who drafts (the model, the proposal alone, both, or
neither: a plain step), the model drafts its chain or tree, and `fuse` grafts the proposal onto it
(an n-gram-only chain may get the index's runner-up as a sibling branch, `ngram_branch`):
the tokens the proposal shares with the model's first drafts are shared nodes ("both"), the rest a
branch where they part (a tree) or the chain's continuation when every model draft is
in the proposal (a chain: also when sampling, the n-gram drafts with one-hot q). `judge` verifies a
round against the target's logits (`sampling.verify` for a chain; for a tree `verify_greedy_tree`, or
`verify_tree` under sampling: exact because the model's sampled nodes precede the deterministic n-gram
siblings grafted after them)
and records its accepted path, from which the result counts each source's accepted tokens and the
policy learns.

Knows the model head (logits), the verifiers, the n-gram index and the round policy; the draft model
only through `drafter.Drafter`'s methods; nothing of peers, sockets or tokenizers.
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from peer.model import ModelHead, StepLayout
from swarm.decode.ngram import NgramIndex, Proposal, graft, is_chain, shared_path
from swarm.decode.round_policy import CostModel, RoundPlan
from swarm.decode.sampling import (RoundCheck, RoundVerdict, sparse_q, token_probs, verify, verify_greedy_tree,
                                   verify_tree)
from swarm.decode.sources import NgramCalibration, branch_length

if TYPE_CHECKING:
    from swarm.decode.drafter import Drafter
    from swarm.decode.speculative import SpecConfig


@dataclass
class Round:
    """A verification step: what was sent, and what verifying it and learning from it need."""

    ids: list[int]  # the last committed token, then the drafts (a tree: its nodes in order)
    start: int  # position of ids[0]
    drafts: list[int]
    qs: list[torch.Tensor | None] = field(default_factory=list)  # per draft: its draft distribution (None: one-hot)
    parents: list[int] | None = None  # a tree: every node's parent (node 0 = the last committed token)
    depth: int = 0  # drafted tokens on the longest path
    model_depth: int = 0  # the model's drafts on its longest path (a chain's: the first nodes)
    sources: list[str] = field(default_factory=list)  # per draft: "model", "ngram" or "both" (the two agreed)
    cells: list[int | None] = field(default_factory=list)  # per draft from the n-gram proposal: its calibration cell
    choice: str = "plain"  # who drafted: "model", "fused", "ngram", "branched" (the index's two branches) or "plain"
    path: list[int] = field(default_factory=lambda: [0])  # the accepted nodes, once judged
    confidences: list[float] = field(default_factory=list)  # of the model's chain drafts
    top: list[list[int]] = field(default_factory=list)
    draft_seconds: float = 0.0  # the model's
    draft_first: float | None = None  # seconds of the first draft step (a chain)
    anticipated: int = 0  # of the model's drafts, those drafted ahead during the previous round's flight
    ngram_seconds: float = 0.0
    future: Future | None = None
    sent_at: float = 0.0
    left_at: float = 0.0  # after the send call returned
    arrived_at: list[float] = field(default_factory=list)

    def layout(self, compact) -> StepLayout:
        return StepLayout(self.start, len(self.ids), tuple(self.parents) if self.parents else None, compact)

    def check(self, seed: int) -> RoundCheck:
        """What a verifier at the last peer needs of this sampled round: its drafts, each one's distribution as
        sparse (id, prob) pairs (the draft's top K; a deterministic draft's one pair), and a seed."""
        return RoundCheck(tuple(self.drafts), tuple(sparse_q(q, x) for x, q in zip(self.drafts, self.qs)), seed)


def draft_round(drafter: Drafter, ngram: NgramIndex | None, policy: CostModel, seq: list[int], room: int,
                spec: SpecConfig, generator: torch.Generator, tree_nodes: int | None = None,
                overlaps: bool = False) -> Round:
    """Plan and draft the round that continues `seq`, with at most `room` drafts on a path (the model's
    fewer where its session ends); a tree of at most `tree_nodes` drafts (None: any the config allows;
    0: chains only, near the end of the target's session or for a round sent ahead). `overlaps`: steps
    run in the background (a chain the policy would send a round ahead of stays a chain)."""
    t0 = time.perf_counter()
    proposal = ngram.propose(seq, min(room, spec.ngram_drafts)) if ngram is not None and room > 0 else Proposal()
    cells = [NgramCalibration.cell(s) for s in proposal.scores]
    rnd = Round([], len(seq) - 1, [], ngram_seconds=time.perf_counter() - t0)
    nodes = spec.slack if tree_nodes is None else tree_nodes
    fuse = nodes  # sibling branches: under sampling too (a sampled chain, then deterministic n-gram nodes)
    trees = spec.trees and nodes >= spec.tree_width * spec.draft_max  # the widest tree of the model's fits
    plan = policy.plan(min(room, drafter.room(len(seq))), spec.tree_width if trees else 1, cells, room, fuse > 0)
    if plan.source == "ngram":
        rnd.drafts, rnd.cells = proposal.tokens[:plan.ngram], list(cells[:plan.ngram])
        rnd.qs, rnd.sources, rnd.depth, rnd.choice = [None] * plan.ngram, ["ngram"] * plan.ngram, plan.ngram, "ngram"
        if spec.ngram_branch and spec.params.greedy and nodes > plan.ngram and ngram is not None and not (
                overlaps and policy.send_ahead(rnd, room - plan.ngram, True, probe=True)):
            ngram_branch(policy, rnd, ngram, seq, proposal, min(room, spec.ngram_drafts), nodes)
    elif plan.source == "model" and plan.k > 0:
        draft_model(drafter, policy, plan, seq, spec, generator, rnd)
        if proposal.tokens:
            fuse_proposal(policy, rnd, proposal, cells, fuse)
    rnd.ids = seq[-1:] + rnd.drafts
    return rnd


def ngram_branch(policy: CostModel, rnd: Round, ngram: NgramIndex, seq: list[int], proposal: Proposal, depth: int,
                 nodes: int) -> None:
    """Beside an n-gram-only chain, the index's runner-up where its walk had a choice (`NgramIndex.branch`), as
    long as `sources.branch_length` finds it pays: the round becomes a tree of at most `nodes` drafts and paths of
    at most `depth`."""
    found = ngram.branch(seq, proposal, len(rnd.drafts), depth)
    if found is None:
        return
    at, alt = found
    cells = [NgramCalibration.cell(s, against=not i) for i, s in enumerate(alt.scores)][:nodes - len(rnd.drafts)]
    j = branch_length(policy, rnd.cells, at, cells)
    if not j:
        return
    drafts, parents, _ = graft(rnd.drafts, list(range(-1, len(rnd.drafts) - 1)), rnd.drafts[:at] + alt.tokens[:j])
    rnd.drafts, rnd.parents = drafts, [-1] + [p + 1 for p in parents]
    rnd.qs += [None] * j
    rnd.sources += ["ngram"] * j
    rnd.cells += cells[:j]
    rnd.depth, rnd.choice = max(rnd.depth, at + j), "branched"


def draft_model(drafter: Drafter, policy: CostModel, plan: RoundPlan, seq: list[int], spec: SpecConfig,
                generator: torch.Generator, rnd: Round) -> None:
    """The model's drafts for `plan`: a greedy tree, or a chain whose length the policy decides token by token."""
    d0 = drafter.seconds
    if plan.tree:
        rnd.drafts, parents, rnd.qs = drafter.propose_tree(seq, plan.k, plan.width, spec.params, generator,
                                                           None if spec.params.greedy else spec.draft_top_k)
        rnd.parents = [-1] + [p + 1 for p in parents]
        rnd.depth = plan.k
    else:
        rnd.drafts, q = drafter.propose(seq, plan.k, spec.params, generator,
                                        lambda conf: policy.keep_drafting(conf, plan), spec.draft_top_k)
        rnd.qs, rnd.depth = list(q), len(rnd.drafts)
        rnd.confidences, rnd.top = list(drafter.confidences), list(drafter.top)
        rnd.draft_first = drafter.first_seconds if rnd.drafts else None
        rnd.anticipated = drafter.anticipated
    rnd.model_depth, rnd.choice = rnd.depth, "model"
    rnd.sources, rnd.cells = ["model"] * len(rnd.drafts), [None] * len(rnd.drafts)
    rnd.draft_seconds = drafter.seconds - d0


def fuse_proposal(policy: CostModel, rnd: Round, proposal: Proposal, cells: list[int], fuse: int) -> None:
    """Graft the n-gram proposal onto the model's drafts: its tokens along the model's tree become shared
    nodes ("both"); of the rest, the policy's `graft` picks how many to hang below them, a branch where
    the proposal parts from the model's drafts (only in a tree of at most `fuse` nodes) or the chain's
    continuation."""
    parents = [p - 1 for p in rnd.parents[1:]] if rnd.parents is not None else list(range(-1, len(rnd.drafts) - 1))
    path = shared_path(rnd.drafts, parents, proposal.tokens)
    for node, cell in zip(path, cells):
        rnd.sources[node], rnd.cells[node] = "both", cell
    against = len(path) < rnd.model_depth  # the next proposal token contradicts a model draft
    if against or rnd.parents is not None:  # a tree, however it was made
        cells = cells[:len(path) + max(0, fuse - len(rnd.drafts))]
    rest = list(cells[len(path):])
    if against and rest:  # where the proposal parts from the model, it is calibrated apart
        rest[0] = NgramCalibration.cell(proposal.scores[len(path)], against=True)
    chain = rnd.confidences if rnd.parents is None else None
    j = policy.graft(chain, rnd.model_depth, len(rnd.drafts), len(path), rest)
    rnd.choice = "fused" if path or j else "model"
    if not j:
        return
    drafts, parents, _ = graft(rnd.drafts, parents, proposal.tokens[:len(path) + j])
    rnd.drafts = drafts
    rnd.parents = None if is_chain(parents) else [-1] + [p + 1 for p in parents]
    rnd.qs += [None] * j
    rnd.sources += ["ngram"] * j
    rnd.cells += rest[:j]
    rnd.depth = max(rnd.depth, len(path) + j)


def chain_q(rnd: Round, vocab: int, like: torch.Tensor) -> torch.Tensor:
    """A chain's draft distributions [len(drafts), vocab]: the model's, one-hot for deterministic drafts."""
    rows = [q.to(like) if q is not None else torch.nn.functional.one_hot(torch.tensor(x), vocab).to(like)
            for x, q in zip(rnd.drafts, rnd.qs)]
    return torch.stack(rows) if rows else like.new_zeros(0, vocab)


def judge(head: ModelHead, rnd: Round, out: torch.Tensor | RoundVerdict, spec: SpecConfig,
          generator) -> tuple[int, list[int], int, tuple | None]:
    """(drafts accepted, the tokens the round commits, the target's own token among them, the
    compaction the next step needs); the accepted path is left in `rnd.path`. `out`: the step's final
    hidden states, or the verdict of a last peer that verified the round (`judge_verdict`)."""
    if isinstance(out, RoundVerdict):
        return judge_verdict(rnd, out, spec)
    if spec.params.greedy and spec.relaxed is None:  # the target's argmax is all greedy verification needs
        return judge_verdict(rnd, RoundVerdict(tuple(head.argmax(out).tolist())), spec)
    logits = head.logits(out)
    if rnd.parents is not None:
        if spec.params.greedy:
            rnd.path, extra = verify_greedy_tree(rnd.ids, rnd.parents, logits.argmax(-1).tolist())
        else:  # lossless: the model's sampled nodes come before the n-gram's deterministic siblings (node order)
            rnd.path, extra = verify_tree(rnd.ids, rnd.parents, [None] + list(rnd.qs),
                                          token_probs(logits, spec.params), generator)
        return len(rnd.path) - 1, [rnd.ids[i] for i in rnd.path[1:]] + [extra], extra, (rnd.start, tuple(rnd.path))
    soft = torch.softmax(logits.float(), -1) if spec.relaxed is not None and spec.params.greedy else None
    p = token_probs(logits, spec.params)
    accepted, extra = verify(rnd.drafts, chain_q(rnd, p.shape[-1], p), p, generator, spec.relaxed, soft)
    rnd.path = list(range(accepted + 1))
    return accepted, rnd.drafts[:accepted] + [extra], extra, None


def judge_verdict(rnd: Round, verdict: RoundVerdict, spec: SpecConfig) -> tuple[int, list[int], int, tuple | None]:
    """`judge` on a verdict from the last peer. Greedy: this client's own judge on the target's argmax (a chain
    accepts while its drafts equal it, a tree as `verify_greedy_tree`): the same answer as from the logits.
    Sampling: the peer's rejection sampling decided; its accepted path and next token are taken as they are."""
    if spec.params.greedy:  # a chain is the tree whose node i follows node i - 1
        parents = rnd.parents if rnd.parents is not None else list(range(-1, len(rnd.ids) - 1))
        path, extra = verify_greedy_tree(rnd.ids, parents, list(verdict.argmax))
    else:
        path, extra = list(verdict.path), verdict.token
    rnd.path = path
    new = [rnd.ids[i] for i in path[1:]] + [extra]
    return len(path) - 1, new, extra, (rnd.start, tuple(path)) if rnd.parents is not None else None
