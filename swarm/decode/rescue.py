"""How often a tree's other first candidates rescue a round whose first draft was rejected, by tree width.

A tree of width w sends the draft's w first candidates side by side; it commits more than a chain only
where the chain's first draft would have been rejected and another candidate is accepted. `Rescue`
keeps, for each width w, an exponential moving count of those rescues among the rejections seen (a
prior of one try: 30 % greedy, 15 % sampling, where nothing is known before trees are tried); the round
policy's tree arithmetic reads `rate(w)`.

Two ways to measure it, one `Rescue` each:
  - greedy: on every chain round, for free: where the target's token stands in the draft's top-8 list
    at the first rejection (rank r rescues every tree wider than r);
  - sampling: there is no such list (a sampled tree's candidates are drawn without replacement, and
    whether a later one is accepted depends on the residual draws of recursive rejection sampling),
    so only tree rounds measure it: their first sampled candidate rejected, which later one (if any)
    was accepted. `due` asks for a tree round now and then so that there are some: every
    `EXPLORE_FIRST` rounds until a few were seen, then every `EXPLORE_EVERY` (trees that stopped paying
    are then tried rarely, trees that started to pay are found again). The policy tries the cheapest
    tree that measures it: width 2, depth 2 (as many draft steps as a chain of 3).

`best_tree` is the tree arithmetic the round policy plans with (`round_policy.CostModel.tree_plan`).

Knows counts and the cost arithmetic of a tree (numbers it is given); nothing of tensors, models, rounds'
contents or clocks.
"""

from __future__ import annotations

PRIOR = 0.3  # one try at 30 % rescued (greedy)
SAMPLED_PRIOR = 0.15  # ... sampling (measured on SmolLM2's pair at temperature 0.7: 23 % at width 2)
EXPLORE_FIRST = 8  # sampling: rounds between trees tried only to measure them, until `SEEN` were seen ...
EXPLORE_EVERY = 64  # ... and afterwards
SEEN = 3.0


class Rescue:
    """Per tree width w >= 2: how often, among rounds whose first draft was rejected, a candidate of rank < w
    (0: the first) was accepted instead."""

    def __init__(self, memory: float = 0.95, prior: float = PRIOR):
        self.memory, self.prior = memory, prior
        self.hits: dict[int, float] = {}
        self.tries: dict[int, float] = {}

    def observe(self, rescued_by: int | None, candidates: int) -> None:
        """A first draft rejected; `rescued_by`: the rank of the candidate accepted instead (None: none of the
        `candidates` whose outcome is known, ranks 0 .. candidates - 1)."""
        m = self.memory
        for w in range(2, candidates + 1):
            self.tries[w] = m * self.tries.get(w, 0.0) + 1
            self.hits[w] = m * self.hits.get(w, 0.0) + (rescued_by is not None and rescued_by < w)

    def rate(self, w: int) -> float:
        """The chance that a tree of width w rescues a rejected first draft."""
        return min(1.0, (self.hits.get(w, 0.0) + self.prior) / (self.tries.get(w, 0.0) + 1.0))

    def due(self, rounds_since_tree: int) -> bool:
        """Sampling: try a tree this round only to measure it?"""
        return rounds_since_tree >= (EXPLORE_FIRST if self.tries.get(2, 0.0) < SEEN else EXPLORE_EVERY)


def sampled_tree_rescue(parents: list[int], sources: list[str], path: list[int]) -> tuple[int | None, int] | None:
    """What a sampled tree round tells `Rescue`: (the rank of the accepted first candidate, the model's first
    candidates), or None when it tells nothing (fewer than two model candidates, or the first one accepted).
    `parents`: every node's parent (node 0: the last committed token); `sources`: per draft, "ngram" for the
    n-gram index's nodes (siblings that are not the draft's candidates); `path`: the accepted nodes."""
    first = [i for i in range(1, len(parents)) if parents[i] == 0 and sources[i - 1] != "ngram"]
    if len(first) < 2 or (len(path) > 1 and path[1] == first[0]):
        return None
    return (first.index(path[1]) if len(path) > 1 and path[1] in first else None), len(first)


def best_tree(rescue: Rescue, a: float, width: int, depth: int, first: float, per_draft: float, c0: float,
              c1: float) -> tuple[int, int, float]:
    """The (width, depth) of a tree, 2..width and 1..depth, with the most expected tokens per second, and that rate.

    A tree of width w and depth d commits 1 + a_w (1 - a^d) / (1 - a) tokens on average (a: the chance a draft
    is accepted, a_w = a + (1 - a) * rescue.rate(w): that one of the w first candidates is) and takes
    first + per_draft * w (d - 1) seconds to draft and c0 + c1 (w d + 1) to verify."""
    best = (2, 1, 0.0)
    for w in range(2, width + 1):
        a_w = a + (1 - a) * rescue.rate(w)
        for d in range(1, depth + 1):
            seconds = first + per_draft * w * (d - 1) + c0 + c1 * (w * d + 1)
            rate = (1 + a_w * (1 - a ** d) / (1 - a)) / seconds
            if rate > best[2]:
                best = (w, d, rate)
    return best
