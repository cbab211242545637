"""Trees' worth (`swarm.decode.rescue`): greedy from the draft's top lists, under sampling from sampled tree
rounds, which the adaptive policy tries now and then; and a sampled generation that uses them."""

import pytest

from conftest import make_checkpoint
from swarm.decode.generate import LocalModel
from swarm.decode.rescue import EXPLORE_EVERY, EXPLORE_FIRST, PRIOR, SAMPLED_PRIOR, Rescue, sampled_tree_rescue
from swarm.decode.round_policy import CostModel, RoundTiming
from swarm.decode.sampling import SamplingParams
from swarm.decode.speculative import Drafter, SpecConfig, speculative_decode


def wan_policy(sampled: bool) -> CostModel:
    """An adaptive policy that measured an 80 ms trip, cheap tokens and cheap drafts (trees may pay)."""
    policy = CostModel(k_max=8)
    for n in (2, 5, 3, 9, 4, 7):
        policy.observe(n - 1, n - 1, n, 0.080 + 0.0005 * n, 0.0005 * (n - 1))
    policy.begin(sampled=sampled)
    return policy


class TreeRound:
    """What the policy reads of a round (`round_policy.RoundRecord`), for a width-w tree of depth 1 or a chain."""

    def __init__(self, width: int, path: list[int], sources=None):
        self.parents = [-1] + [0] * width if width > 1 else None
        self.drafts = list(range(10, 10 + width))
        self.ids = [1] + self.drafts
        self.depth = self.model_depth = 1
        self.sources = sources or ["model"] * width
        self.cells = [None] * width
        self.path = path
        self.ngram_seconds, self.confidences, self.top = 0.0, [0.5] if width == 1 else [], []
        self.draft_seconds, self.draft_first, self.anticipated = 0.001, 0.001, 0


def timing() -> RoundTiming:
    return RoundTiming(0.0, 0.001, 0.081, 0.082, False)


def chains(policy: CostModel, n: int) -> None:
    """n one-draft chain rounds, every other one accepted."""
    for i in range(n):
        policy.observe_round(TreeRound(1, [0, 1] if i % 2 else [0]), i % 2, 5, timing(), False, False)


def test_rescue_counts_by_width():
    r = Rescue()
    assert r.rate(2) == pytest.approx(PRIOR)
    for _ in range(40):
        r.observe(1, 8)  # the draft's second candidate was the target's token every time
    assert r.rate(2) > 0.95 and r.rate(8) > 0.95
    for _ in range(40):
        r.observe(3, 8)
    assert r.rate(2) < 0.3 and r.rate(4) > 0.95  # rank 3 rescues trees of width 4 and more, not 2
    r.observe(None, 3)  # a sampled tree of width 3: says nothing of wider trees
    assert r.tries[3] > r.tries[4]


def test_what_a_sampled_tree_round_tells():
    parents = [-1, 0, 1, 0, 3, 0, 5]  # three first candidates (nodes 1, 3, 5), each with one child
    sources = ["model"] * 6
    assert sampled_tree_rescue(parents, sources, [0, 1, 2]) is None  # the first candidate was accepted
    assert sampled_tree_rescue(parents, sources, [0, 3, 4]) == (1, 3)  # the second rescued the round
    assert sampled_tree_rescue(parents, sources, [0, 5]) == (2, 3)
    assert sampled_tree_rescue(parents, sources, [0]) == (None, 3)  # none was accepted
    grafted = parents + [0]  # an n-gram sibling: not one of the draft's candidates
    assert sampled_tree_rescue(grafted, sources + ["ngram"], [0, 7]) == (None, 3)
    assert sampled_tree_rescue([-1, 0, 0], ["model", "ngram"], [0, 2]) is None  # one model candidate only


def test_sampled_trees_are_tried_then_chosen_when_they_rescue_rounds():
    policy = wan_policy(sampled=True)
    plans = [policy.plan(8, tree_width=3) for _ in range(3)]
    assert all(not p.tree for p in plans)  # at the prior, chains pay more
    chains(policy, EXPLORE_FIRST)  # no tree for a while
    tried = policy.plan(8, tree_width=3)
    assert tried.tree and (tried.width, tried.k) == (2, 2)  # tried, only to measure it, at a chain of 3's draft cost
    policy.observe_round(TreeRound(3, [0, 2]), 1, 5, timing(), False, False)  # the second candidate rescued it
    assert policy.sampled_rescue.tries[3] == 1 and policy.sampled_rescue.rate(2) > PRIOR and policy.since_tree == 0
    for _ in range(30):  # and so every time
        policy.sampled_rescue.observe(1, 3)
    plan = policy.plan(8, tree_width=3)
    assert plan.tree and plan.width >= 2
    assert policy.rescue.tries == {}  # the greedy statistics were not touched


def test_sampled_trees_that_never_rescue_are_dropped_and_tried_rarely():
    policy = wan_policy(sampled=True)
    policy.observe_round(TreeRound(2, [0]), 0, 5, timing(), False, False)  # no candidate accepted
    for _ in range(30):
        policy.sampled_rescue.observe(None, 2)
    assert not policy.plan(8, tree_width=2).tree  # since_tree was reset by the tree round
    chains(policy, EXPLORE_FIRST)
    assert not policy.plan(8, tree_width=2).tree  # measured: now only every EXPLORE_EVERY rounds
    chains(policy, EXPLORE_EVERY - EXPLORE_FIRST)
    assert policy.plan(8, tree_width=2).tree


def test_greedy_rescues_come_from_chains_and_sampling_leaves_them_alone():
    greedy, sampled = wan_policy(sampled=False), wan_policy(sampled=True)
    for policy in (greedy, sampled):
        for _ in range(30):  # a chain's first draft rejected, the target's token its second choice
            policy.observe(4, 0, 5, None, 0.0, [0.6] * 4, rescue_rank=1)
    assert greedy.rescue.rate(2) > 0.9 and greedy.plan(8, tree_width=3).tree
    assert sampled.rescue.tries == {}  # under sampling a chain round has no top list: nothing learnt
    assert sampled.tree_plan(3, 8)[2] < greedy.tree_plan(3, 8)[2]  # its trees are judged at the prior alone
    assert sampled.sampled_rescue.rate(2) == pytest.approx(SAMPLED_PRIOR)


def test_an_adaptive_sampled_generation_drafts_trees(tmp_path):
    """The whole loop, sampling with trees allowed and k adaptive: tree rounds happen (tried to measure them,
    and kept where they pay), verified by the lossless tree sampler, and they teach the sampled statistics.
    (The law of the output is `test_speculative`'s chi-square tests; a sampled adaptive run is not reproducible
    by seed alone: its shapes follow measured times.)"""
    target = LocalModel.load(make_checkpoint(tmp_path / "t", "llama2", seed=3, num_hidden_layers=2).path)
    draft = LocalModel.load(make_checkpoint(tmp_path / "d", "llama2", seed=4, num_hidden_layers=1).path)
    prompt, n = [5, 17, 42, 99], 80
    cfg = SpecConfig(tree_width=3, pipeline=False, params=SamplingParams(temperature=0.8), ngram=False)
    length = len(prompt) + n + 2 * cfg.slack
    policy = wan_policy(sampled=False)  # the loop tells it that this generation samples
    res = speculative_decode(target.head, target.session(length), Drafter(draft, length), prompt, n, cfg, seed=7,
                             policy=policy)
    assert policy.sampled and len(res.tokens) == n and res.tree_rounds >= 1
    assert sum(policy.sampled_rescue.tries.values()) > 0 and policy.rescue.tries == {}
