"""Where a round's drafts come from: the draft model, the n-gram index, both in one tree, or neither.

The round policy (`round_policy.CostModel`) decides it every round from what it measured, with the
same arithmetic it shapes chains with: a round commits E = 1 + sum_i P_i tokens (P_i: the chance that
the path to depth i is accepted) and costs T = draft time + c_0 + c_1 * (nodes + 1); the choice with
the most tokens per second E / T wins (`choose_source`), before the model drafts anything:
  - plain: no drafts, E = 1, T = c_0 + c_1 (what plain decoding does);
  - n-gram only: a prefix of the index's proposal (drafting it is free), P_i = b_1 * ... * b_i;
  - the model (chain or tree, as the policy would shape it alone), P_i = a^i;
  - the model and the n-gram proposal as sibling branches: a greedy tree accepts the longer of the
    two accepted runs, so P_i >= max(P_model_i, P_ngram_i) (the two are correlated: that bound is
    the estimate), for c_1 per n-gram node more.
b_i, the chance that an n-gram draft is accepted, is calibrated online (`NgramCalibration`) by the
draft's score: the n-gram order matched, whether that continuation always followed it, and whether it
was recalled from earlier generations (`NgramMemory`) rather than found in this text. A draft
at the point where the proposal parts from the model's draft is calibrated apart ("against": there
at most one of the two is right). The model is made to draft when it sat out 1, 2, 4, ... and then
every `EXPLORE_EVERY` rounds in a row, so that its acceptance and costs stay measured.

An n-gram-only round may carry a second branch of the index's (`NgramIndex.branch`: the runner-up where
the proposal's walk had a choice), beside its chain: `branch_length` decides how much, the same way
(the chain's E and T, the branch's nodes hung below the chance of their parent's path).

After the model has drafted, `graft_length` decides how much of the proposal joins its tree (the
part that agrees with the model's first tokens is shared for free; the rest is a branch where they
part, or the chain's continuation when the model's drafts are all in the proposal): the prefix that
maximises E / T, each node worth the chance of its path.

Knows seconds, acceptance, confidences and n-gram scores; nothing of tensors, models or peers.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from swarm.decode.ngram import Score

if TYPE_CHECKING:
    from swarm.decode.round_policy import CostModel, RoundPlan, RoundRecord

EXPLORE_EVERY = 64  # rounds without the model before it drafts once more, to keep its numbers fresh
ORDERS = (1, 2, 3, 4, 6, 8)  # n-gram orders are calibrated in these buckets (each up to the next)
PRIOR = (0.25, 0.45, 0.65, 0.8, 0.85, 0.9)  # acceptance of a proposal whose continuation always followed
SPLIT = 0.6  # ... and the share of that when others followed too
AGAINST = 0.75  # ... and the share of that where the proposal contradicts the model's draft
RECALLED = 0.8  # ... and the share of that for a continuation recalled from earlier generations


class NgramCalibration:
    """The chance that an n-gram draft is accepted, by cell: order bucket x (this text, or recalled)
    x (alone, or against the model's draft) x (continuation always followed, or not). Each cell an
    exponential moving count with a prior of two tries."""

    CELLS = len(ORDERS) * 8

    def __init__(self, memory: float = 0.97):
        self.memory = memory
        self.prior = [PRIOR[c // 8] * (1 if c % 2 == 0 else SPLIT) * (AGAINST if c % 4 >= 2 else 1)
                      * (RECALLED if c % 8 >= 4 else 1) for c in range(self.CELLS)]
        self.hits = [2.0 * p for p in self.prior]
        self.tries = [2.0] * self.CELLS

    @staticmethod
    def cell(score: Score, against: bool = False) -> int:
        bucket = max(i for i, low in enumerate(ORDERS) if score.order >= low)
        return 8 * bucket + 4 * score.recalled + 2 * against + (score.count < score.total)

    @staticmethod
    def recalled(cell: int) -> bool:
        """Whether the cell's drafts were recalled from earlier generations."""
        return cell % 8 >= 4

    @staticmethod
    def alone(cell: int) -> int:
        return cell - (cell % 4 >= 2) * 2

    def alpha(self, cell: int) -> float:
        return self.hits[cell] / self.tries[cell]

    def observe(self, cell: int, accepted: bool) -> None:
        m = self.memory
        self.hits[cell] = m * self.hits[cell] + accepted + (1 - m) * 2.0 * self.prior[cell]
        self.tries[cell] = m * self.tries[cell] + 1 + (1 - m) * 2.0


def chain_outlook(probs: list[float], m: int) -> tuple[float, float]:
    """A chain of drafts with conditional acceptance `probs`: (its expected tokens E = 1 + sum_i P_i, and P_m: the
    chance that its first m drafts are all accepted)."""
    e, p, p_m = 1.0, 1.0, 1.0
    for i, b in enumerate(probs):
        p *= b
        e += p
        p_m = p if i < m else p_m
    return e, p_m


def best_prefix(probs: list[float], p0: float, e: float, t: float, c1: float) -> tuple[int, float, float]:
    """The prefix of a chain of drafts (conditional acceptance `probs`, hung below a path accepted with
    probability p0) that maximises (e + its expected tokens) / (t + c1 per node): (length, E, T)."""
    best, p, e_j, t_j = (0, e, t), p0, e, t
    for j, b in enumerate(probs, 1):
        p *= b
        e_j, t_j = e_j + p, t_j + c1
        if e_j * best[2] > best[1] * t_j:
            best = (j, e_j, t_j)
    return best


def model_outlook(policy: CostModel, shape: RoundPlan, room: int) -> tuple[list[float], float]:
    """What the model alone is expected to do this round: P_i at each depth (at the mean acceptance) and T."""
    c0, c1 = policy.verify_cost()
    a = min(policy.acceptance, 0.999)
    if shape.tree:
        w, d, rate = policy.tree_plan(shape.width, shape.k)
        seconds = policy.draft_time(1) + policy.draft_cost * w * (d - 1) + c0 + c1 * (w * d + 1)
        first = (rate * seconds - 1) * (1 - a) / (1 - a ** d)  # E = 1 + a_w (1 - a^d) / (1 - a)
        return [first * a ** i for i in range(d)], seconds
    k = policy.choose(room=room)
    return [a ** i for i in range(1, k + 1)], policy.round_time(k)


def choose_source(policy: CostModel, shape: RoundPlan, cells: list[int], ngram_room: int,
                  fuse: bool) -> RoundPlan:
    """The round's plan: `shape` (the model's plan) with its source, plain, n-gram or model (the
    model drafts; `graft_length` adds the proposal afterwards where it pays). `cells`: the calibration
    cells of the n-gram proposal's tokens; `fuse`: sibling branches are allowed (greedy)."""
    c0, c1 = policy.verify_cost()
    betas = [policy.ngram.alpha(c) for c in cells[:ngram_room]]
    options = [(1.0, c0 + c1, replace(shape, k=0, width=1, source="plain"))]
    if betas:
        j, e, t = best_prefix(betas, 1.0, 1.0, c0 + c1 + policy.ngram_seconds, c1)
        if j:
            options.append((e, t, replace(shape, k=0, width=1, source="ngram", ngram=j)))
    if shape.k > 0:
        model, seconds = model_outlook(policy, shape, shape.k)
        options.append((1 + sum(model), seconds, shape))
        if betas and fuse:  # sibling branches (a chain may still be continued by the proposal, not counted here)
            probs, p = [], 1.0
            for b in betas:
                p *= b
                probs.append(p)
            depth = max(len(model), len(probs))
            pad = lambda xs: xs + [0.0] * (depth - len(xs))  # noqa: E731
            both = [max(x, y) for x, y in zip(pad(model), pad(probs))]
            extra = sum(y > x for x, y in zip(pad(model), pad(probs)))
            options.append((1 + sum(both), seconds + c1 * extra, shape))
    e, t, plan = max(options, key=lambda o: o[0] / o[1])
    if plan.source != "model" and shape.k > 0 and policy.idle >= min(EXPLORE_EVERY, 2 ** policy.recalls):
        policy.recalls += 1
        return shape  # the model has not drafted for a while: measure it again (often at first, then rarely)
    return plan


def graft_length(policy: CostModel, confidences: list[float] | None, depth: int, nodes: int, shared: int,
                 cells: list[int]) -> int:
    """How many of the proposal's tokens after the `shared` ones already in the model's tree (of `depth`
    drafts on its longest path and `nodes` in all; `confidences` of a chain's drafts, None for a tree)
    to hang below them: the prefix that maximises E / T. `cells`: those tokens' calibration cells (the
    first one "against" where it contradicts a model draft)."""
    if not cells:
        return 0
    c0, c1 = policy.verify_cost()
    a = min(policy.acceptance, 0.999)
    probs = [policy.alpha(c) for c in confidences] if confidences is not None else [a] * depth
    e, p_shared = chain_outlook(probs, shared)
    t = policy.draft_time(depth if confidences is not None else 1) + c0 + c1 * (nodes + 1)
    return best_prefix([policy.ngram.alpha(c) for c in cells], p_shared, e, t, c1)[0]


def branch_length(policy: CostModel, cells: list[int], at: int, branch: list[int]) -> int:
    """How many tokens of an n-gram branch (calibration cells `branch`, the first "against": where it parts
    from the chain only one of the two can be right) to hang beside node `at` of an n-gram-only chain
    (`cells`): the prefix that maximises E / T, each node worth the chance of its path."""
    c0, c1 = policy.verify_cost()
    e, p_parent = chain_outlook([policy.ngram.alpha(c) for c in cells], at)
    t = c0 + c1 * (len(cells) + 1) + policy.ngram_seconds
    return best_prefix([policy.ngram.alpha(c) for c in branch], p_parent, e, t, c1)[0]


def model_verdict(rnd: RoundRecord, extra: int) -> tuple[int, int | None]:
    """(the model's drafts on the accepted path, the rank of the target's token in the model's top list
    where its chain was first rejected, None if not in it or nothing was rejected)."""
    ok = sum(rnd.sources[i - 1] != "ngram" for i in rnd.path[1:])
    target = rnd.ids[rnd.path[ok + 1]] if len(rnd.path) > ok + 1 else extra  # an n-gram branch's token, or the extra
    if rnd.confidences and ok < rnd.model_depth and ok < len(rnd.top) and target in rnd.top[ok]:
        return ok, rnd.top[ok].index(target)
    return ok, None


def observe_ngram(policy: CostModel, rnd: RoundRecord) -> None:
    """Every n-gram draft of a verified round that was judged (its parent accepted) calibrates its cell;
    the model's absence is counted (`EXPLORE_EVERY`)."""
    accepted = set(rnd.path)
    for i, cell in enumerate(rnd.cells, 1):
        parent = rnd.parents[i] if rnd.parents is not None else i - 1
        if cell is not None and parent in accepted:
            policy.ngram.observe(cell, i in accepted)
    policy.ngram_seconds += 0.2 * (rnd.ngram_seconds - policy.ngram_seconds)
    policy.idle = 0 if rnd.model_depth else policy.idle + 1
