"""Sampled draft trees are verified losslessly (`verify_tree`): the first committed token, and the first
two, follow the target's law whatever the siblings are (i.i.d. draws, draws without replacement,
deterministic n-gram candidates, a mix); greedy reduces to `verify_greedy_tree`; a chain of
deterministic drafts through `verify` is exact too; and the same chi-square check catches verifiers
with the classic tree bugs, so these tests can fail."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peer.model import sampling as core_sampling
from swarm.decode import sampling
from swarm.decode.sampling import draw_siblings, verify, verify_greedy_tree, verify_tree

V = 5  # a small vocabulary: 25 cells for the joint law of two tokens
SIGNIFICANCE = 1e-6  # a correct verifier fails a check with about this probability (seeds are fixed anyway)


def laws(seed=0):
    """The target's law (p1 of the first token, p2[a] of the second after a, p3 after two) and a draft that
    disagrees a lot with it (q1, q2[a])."""
    g = torch.Generator().manual_seed(seed)
    soft = lambda *shape: torch.softmax(torch.randn(*shape, generator=g) * 1.5, -1)
    return soft(V), soft(V, V), soft(V), soft(V), soft(V, V)


P1, P2, P3, Q1, Q2 = laws(1)


def chi_square_p_value(counts: torch.Tensor, expected: torch.Tensor) -> float:
    """Pearson's test of counts against expected counts (cells expected under 5 are pooled into one)."""
    counts, expected = counts.flatten().double(), expected.flatten().double()
    small = expected < 5
    if small.any():
        counts = torch.cat([counts[~small], counts[small].sum()[None]])
        expected = torch.cat([expected[~small], expected[small].sum()[None]])
    if bool(((expected == 0) & (counts > 0)).any()):
        return 0.0  # a token the target never gives
    keep = expected > 0
    stat = ((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    df = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2))


# --- trees: each builder draws one tree continuing the root and returns (tokens, parents, q) -------------
# A node's p depends only on its path: P1 at the root, P2[a] after a, P3 after two tokens.

def tree_iid(g):
    """Width 3, i.i.d. first tokens from Q1 (with replacement), each continued by one draw from Q2."""
    tokens, parents, q = [0], [-1], [None]
    firsts, qs = draw_siblings(Q1, 3, g)
    for a, qa in zip(firsts, qs):
        tokens += [a, sampling.draw(Q2[a], g)]
        parents += [0, len(tokens) - 2]
        q += [qa, Q2[a]]
    return tokens, parents, q


def tree_distinct(g):
    """Width 3, distinct first tokens (drawn without replacement), each continued by one draw from Q2."""
    tokens, parents, q = [0], [-1], [None]
    firsts, qs = draw_siblings(Q1, 3, g, replace=False)
    for a, qa in zip(firsts, qs):
        tokens += [a, sampling.draw(Q2[a], g)]
        parents += [0, len(tokens) - 2]
        q += [qa, Q2[a]]
    return tokens, parents, q


def tree_deterministic(g):
    """Only deterministic candidates (prompt-lookup continuations): 1 -> 3, 4 -> 0 and 2 -> {1, 3}."""
    return [0, 1, 3, 4, 0, 2, 1, 3], [-1, 0, 1, 0, 3, 0, 5, 5], [None] * 8


def tree_mix(g):
    """A sampled chain with two i.i.d. second tokens, beside an n-gram branch (deterministic 2 -> 0)
    and a third first-level sibling drawn from Q1 after it."""
    a = sampling.draw(Q1, g)
    seconds, qs = draw_siblings(Q2[a], 2, g)
    tokens = [0, a, *seconds, 2, 0, sampling.draw(Q1, g)]
    return tokens, [-1, 0, 1, 1, 0, 4, 0], [None, Q1, *qs, None, None, Q1]


def node_laws(tokens, parents) -> torch.Tensor:
    depth = [0] * len(tokens)
    for i in range(1, len(tokens)):
        depth[i] = depth[parents[i]] + 1
    return torch.stack([P1 if d == 0 else P2[tokens[i]] if d == 1 else P3 for i, d in enumerate(depth)])


def joint_counts(build, n, seed=0, verifier=verify_tree):
    """Counts of the first two committed tokens over n rounds, beside the target's own law p1(a) p2(b | a)."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.zeros(V, V)
    for _ in range(n):
        tokens, parents, q = build(g)
        path, extra = verifier(tokens, parents, q, node_laws(tokens, parents), g)
        new = [tokens[i] for i in path[1:]] + [extra]
        if len(new) == 1:  # the round ended after one token: the next comes from the target itself
            new.append(sampling.draw(P2[new[0]], g))
        counts[new[0], new[1]] += 1
    return counts, P1[:, None] * P2 * n


TREES = {"iid": tree_iid, "distinct": tree_distinct, "deterministic": tree_deterministic, "mix": tree_mix}


@pytest.mark.parametrize("kind", list(TREES))
def test_sampled_tree_keeps_the_target_law(kind):
    counts, expected = joint_counts(TREES[kind], 4000)
    first = chi_square_p_value(counts.sum(1), expected.sum(1))
    both = chi_square_p_value(counts, expected)
    assert first > SIGNIFICANCE, f"{kind}: the first token's law is not the target's (p = {first:.2g})"
    assert both > SIGNIFICANCE, f"{kind}: the first two tokens' law is not the target's (p = {both:.2g})"


def test_trees_are_often_accepted_deep():
    """The check above looks at the second token only where a first-level draft was accepted and the
    level below was verified: make sure that happens (else the depth-2 part would test nothing)."""
    g = torch.Generator().manual_seed(1)
    depths = [len(verify_tree(*t, node_laws(*t[:2]), g)[0]) - 1 for t in (tree_iid(g) for _ in range(300))]
    assert depths.count(2) > 50 and depths.count(0) > 10


BIASES = {  # the classic tree bugs, put into the real verifier
    "residual not updated after a rejected sibling": lambda r, q, x: r,
    "sampled sibling rejected as if deterministic": lambda r, q, x: REAL_RESIDUAL(r, None, x),
}
REAL_RESIDUAL = core_sampling._residual


@pytest.mark.parametrize("bug", list(BIASES))
def test_the_check_catches_a_biased_tree_verifier(bug, monkeypatch):
    monkeypatch.setattr(core_sampling, "_residual", BIASES[bug])  # (the one implementation: peer.model.sampling)
    counts, expected = joint_counts(tree_iid, 4000)
    assert chi_square_p_value(counts, expected) < SIGNIFICANCE, f"the check did not notice: {bug}"


def test_the_check_catches_a_verifier_that_does_not_reset_at_the_accepted_child():
    """After accepting a first-level draft, the level below must be judged against p[c] (the target's law
    after c), not against the law the first level was judged by."""

    def stale(tokens, parents, q, p, generator):
        p = p.clone()
        p[[i for i in range(1, len(tokens)) if parents[i] == 0]] = p[0].clone()
        return verify_tree(tokens, parents, q, p, generator)

    counts, expected = joint_counts(tree_iid, 4000, verifier=stale)
    assert chi_square_p_value(counts, expected) < SIGNIFICANCE


def test_the_check_catches_draws_without_replacement_declared_as_iid():
    """Distinct siblings must be declared with their conditional laws (what draw_siblings returns), not q."""

    def plain_q(g):
        tokens, parents, q = tree_distinct(g)
        return tokens, parents, [Q1 if parents[i] == 0 else x for i, x in enumerate(q)]

    counts, expected = joint_counts(plain_q, 4000)
    assert chi_square_p_value(counts.sum(1), expected.sum(1)) < SIGNIFICANCE


def test_deterministic_chain_through_verify_is_exact():
    """Deterministic drafts (q one-hot at the token) through the chain verifier: accept w.p. p(x), on a
    rejection draw from p without x, which is exact."""
    g = torch.Generator().manual_seed(2)
    n, counts = 4000, torch.zeros(V, V)
    for i in range(n):
        drafts = [i % V, (3 * i + 1) % V]  # chosen without the target, varied
        q = torch.nn.functional.one_hot(torch.tensor(drafts), V).float()
        accepted, extra = verify(drafts, q, torch.stack([P1, P2[drafts[0]], P3]), g)
        new = drafts[:accepted] + [extra]
        if len(new) == 1:
            new.append(sampling.draw(P2[new[0]], g))
        counts[new[0], new[1]] += 1
    assert chi_square_p_value(counts, P1[:, None] * P2 * n) > SIGNIFICANCE


def test_draw_siblings():
    g = torch.Generator().manual_seed(3)
    tokens, qs = draw_siblings(Q1, 4000, g)
    assert all(x is Q1 for x in qs)  # i.i.d.: each was drawn from Q1 itself
    assert chi_square_p_value(torch.bincount(torch.tensor(tokens), minlength=V), Q1 * 4000) > SIGNIFICANCE
    tokens, qs = draw_siblings(torch.tensor([0.5, 0.0, 0.3, 0.2, 0.0]), 4, g, replace=False)
    assert sorted(tokens) == [0, 2, 3]  # distinct, and no more than the support
    for i, (x, qx) in enumerate(zip(tokens, qs)):
        assert torch.isclose(qx.sum(), torch.tensor(1.0)) and qx[x] > 0 and all(qx[y] == 0 for y in tokens[:i])


def test_verify_tree_refuses_mismatched_inputs():
    with pytest.raises(ValueError, match="one entry per node"):
        verify_tree([0, 1], [-1, 0], [None, Q1], P1[None])


@st.composite
def greedy_trees(draw):
    n = draw(st.integers(1, 12))
    vocab = draw(st.integers(2, 6))
    parents = [-1] + [draw(st.integers(0, i - 1)) for i in range(1, n)]
    tokens = [draw(st.integers(0, vocab - 1)) for _ in range(n)]
    argmax = [draw(st.integers(0, vocab - 1)) for _ in range(n)]
    kinds = [draw(st.sampled_from(["none", "one-hot", "random"])) for _ in range(n)]
    seed = draw(st.integers(0, 2 ** 16))
    return tokens, parents, argmax, kinds, vocab, seed


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(greedy_trees())
def test_greedy_reduces_to_verify_greedy_tree(case):
    tokens, parents, argmax, kinds, vocab, seed = case
    g = torch.Generator().manual_seed(seed)
    one_hot = lambda x: torch.nn.functional.one_hot(torch.tensor(x), vocab).float()
    q = [None if k == "none" else one_hot(t) if k == "one-hot" else torch.softmax(torch.randn(vocab, generator=g), -1)
         for t, k in zip(tokens, kinds)]
    state = g.get_state()
    assert verify_tree(tokens, parents, q, one_hot(argmax), g) == verify_greedy_tree(tokens, parents, argmax)
    assert torch.equal(g.get_state(), state)  # and without a single random draw


def test_tree_draws_happen_on_the_generator_device(generator_elsewhere):
    """As tests/test_sampling.py checks for `sample` and `verify` (issue 16): every draw of `verify_tree` and
    `draw_siblings` is made on the generator's device, whatever the probabilities' device."""

    gen, seen = generator_elsewhere
    q = torch.tensor([0.1, 0.8, 0.1])
    draw_siblings(q, 2, gen)
    draw_siblings(q, 2, gen, replace=False)
    p = torch.tensor([[0.2, 0.5, 0.3], [0.1, 0.6, 0.3], [0.3, 0.3, 0.4]])
    verify_tree([0, 1, 1], [-1, 0, 0], [None, q, q], p, gen)  # a uniform, then a residual draw
    assert seen and all(where == gen_device for _, where, gen_device in seen), seen
    assert {kind for kind, _, _ in seen} == {"rand", "multinomial"}
