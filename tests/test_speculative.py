"""Speculative decoding (local target): greedy is token-identical to plain greedy in every mode, and
sampling reproduces the target's distribution (a chi-square test that catches a biased sampler)."""

import math

import pytest
import torch

from conftest import make_checkpoint
from swarm.decode.generate import LocalModel, generate
from swarm.decode.round_policy import CostModel
from swarm.decode.sampling import SamplingParams, token_probs
from swarm.decode.sampling import verify, verify_greedy_tree
from swarm.decode.speculative import Drafter, SpecConfig, speculative_decode


@pytest.fixture(scope="module")
def pair(tiny, tmp_path_factory):
    target = LocalModel.load(tiny("llama2").path)
    other = make_checkpoint(tmp_path_factory.mktemp("draft"), "llama2", seed=11, num_hidden_layers=2)
    return target, LocalModel.load(other.path)


PROMPT = [5, 17, 42, 99, 3, 250]


def run_spec(target, draft, cfg, n=40, prompt=PROMPT, eos=(), seed=0):
    length = len(prompt) + n + 2 * (cfg.k or cfg.k_max) + 2
    return speculative_decode(target.head, target.session(length), Drafter(draft, length), prompt, n, cfg, seed=seed,
                              eos_ids=eos)


MODES = {
    "k1": SpecConfig(k=1, pipeline=False), "k4": SpecConfig(k=4, pipeline=False), "k8": SpecConfig(k=8, pipeline=False),
    "adaptive": SpecConfig(pipeline=False), "pipelined-k4": SpecConfig(k=4, pipeline=True),
    "pipelined-adaptive": SpecConfig(pipeline=True), "auto-pipeline": SpecConfig(),
    "pipelined-depth4": SpecConfig(k=3, pipeline=True, pipeline_depth=4),
    "tree": SpecConfig(k=4, tree_width=3, pipeline=False), "tree-adaptive": SpecConfig(tree_width=2, pipeline=False),
}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("drafter", ["random", "perfect"])
def test_greedy_output_equals_plain_greedy(pair, mode, drafter):
    target, draft = pair
    plain = generate(target, PROMPT, 40, stop_at_eos=False).tokens
    res = run_spec(target, draft if drafter == "random" else target, MODES[mode])
    assert res.tokens == plain
    assert res.rounds == len(res.accepted_per_round) and sum(res.accepted_per_round) == res.accepted
    if drafter == "perfect":
        assert res.acceptance_rate == 1.0
        if mode in ("k4", "k8"):
            k = MODES[mode].k
            assert res.rounds == -(-40 // (k + 1))
        if mode == "pipelined-k4":  # every round after the first was sent ahead and used; none thrown away
            assert res.wasted_rounds == 0 and res.pipelined_hits == res.rounds - 1
    elif mode.startswith("pipelined"):
        assert res.wasted_rounds > 0 and res.trips == res.rounds + res.wasted_rounds


class Watched:
    """A target that counts its steps in flight: submitted after the last one whose result was asked for
    (exact while no round is thrown away: a thrown-away round's result is never asked for)."""

    def __init__(self, run):
        self.run, self.submitted, self.consumed, self.most = run, 0, 0, 0
        self.overlaps, self.verdicts = True, run.verdicts

    def submit(self, hidden, layout, check=None):
        future, watch, number = self.run.submit(hidden, layout, check), self, self.submitted + 1
        self.submitted = number
        self.most = max(self.most, number - self.consumed)
        real = future.result

        def result(*args, **kw):
            watch.consumed = max(watch.consumed, number)
            return real(*args, **kw)

        future.result = result
        return future


@pytest.mark.parametrize("depth", [2, 4])
def test_deeper_pipelines_keep_rounds_in_flight_and_the_output(pair, depth):
    target, draft = pair
    plain = generate(target, PROMPT, 24, stop_at_eos=False).tokens
    length = len(PROMPT) + 24 + 16
    for drafter in (target, draft):  # perfect drafts: every round sent ahead is used; random: most are thrown away
        watched = Watched(target.session(length))
        res = speculative_decode(target.head, watched, Drafter(drafter, length), PROMPT, 24,
                                 SpecConfig(k=3, pipeline=True, pipeline_depth=depth))
        assert res.tokens == plain
        if drafter is target:
            assert res.wasted_rounds == 0 and res.pipelined_hits == res.rounds - 1
            assert watched.most == depth  # the round awaited and depth - 1 sent ahead of it
        else:
            misses = res.rounds - res.pipelined_hits - 1
            assert res.wasted_rounds > (misses if depth > 2 else 0)  # deeper: a miss throws away several rounds
    with pytest.raises(ValueError, match="pipeline_depth"):
        SpecConfig(pipeline_depth=1)


def test_relaxed_greedy_accepts_more_and_is_marked_lossy(pair):
    """--relaxed judges drafts on the target's softmax even when decoding greedily (p itself is one-hot)."""
    target, draft = pair
    lossless = run_spec(target, draft, SpecConfig(k=4, pipeline=False))
    relaxed = run_spec(target, draft, SpecConfig(k=4, pipeline=False, relaxed=0.9))
    assert relaxed.acceptance_rate > lossless.acceptance_rate
    assert "lossy" in SpecConfig(relaxed=0.9).mode and "lossy" not in SpecConfig().mode


def test_stops_at_eos_like_plain_decoding(pair):
    target, draft = pair
    plain = generate(target, PROMPT, 40, stop_at_eos=False).tokens
    eos = plain[17]
    res = run_spec(target, target, SpecConfig(k=4, pipeline=True), eos=(eos,))
    assert res.tokens == plain[:plain.index(eos) + 1] and res.stopped_by == "eos"


def test_verify_greedy_and_tree():
    p = torch.zeros(4, 10)
    for row, tok in enumerate([3, 5, 7, 9]):
        p[row, tok] = 1.0
    q = torch.zeros(3, 10)
    assert verify([3, 5, 7], q + p[:3], p) == (3, 9)
    assert verify([3, 6, 7], torch.nn.functional.one_hot(torch.tensor([3, 6, 7]), 10).float(), p) == (1, 5)
    tokens = [1, 3, 4, 5, 9]  # node 0 = last token; 1 -> {3 (node1), 4 (node2)}; node1 -> 5 (node3); node2 -> 9
    parents = [-1, 0, 0, 1, 2]
    assert verify_greedy_tree(tokens, parents, [4, 0, 9, 0, 2]) == ([0, 2, 4], 2)
    assert verify_greedy_tree(tokens, parents, [3, 5, 0, 8, 0]) == ([0, 1, 3], 8)
    assert verify_greedy_tree(tokens, parents, [7, 0, 0, 0, 0]) == ([0], 7)


def timed_policy(trip, per_token, draft, latency=None, k_max=8):
    """A CostModel fed synthetic rounds: a step of n tokens takes trip + per_token * n seconds."""
    policy = CostModel(k_max=k_max, latency=latency)
    for n in (2, 5, 3, 9, 4, 7):
        policy.observe(n - 1, n - 1, n, trip + per_token * n, draft * (n - 1))
    return policy


def test_cost_model_fits_the_synthetic_timings():
    policy = timed_policy(0.050, 0.002, 0.001)
    c0, c1 = policy.verify_cost()
    assert c0 == pytest.approx(0.050) and c1 == pytest.approx(0.002) and policy.draft_cost == pytest.approx(0.001)
    assert policy.round_time(4) == pytest.approx(0.004 + 0.050 + 0.010)


def test_adaptive_k_long_over_a_wan_short_on_loopback():
    wan = timed_policy(trip=0.050, per_token=0.001, draft=0.001)  # a 50 ms trip dominates
    loopback = timed_policy(trip=0.0002, per_token=0.004, draft=0.002)  # no trip, every token costs
    assert wan.choose(a=0.7) >= 4
    assert loopback.choose(a=0.7) <= 2
    assert wan.choose(a=0.9) >= wan.choose(a=0.7) >= wan.choose(a=0.3)
    # the choice is the argmax of expected tokens per second, E(k) = (1 - a^(k+1)) / (1 - a) over T(k)
    k = wan.choose(a=0.7)
    assert all(wan.rate(k, 0.7) >= wan.rate(j, 0.7) for j in range(1, 9))
    assert wan.rate(k, 0.7) == pytest.approx((1 - 0.7 ** (k + 1)) / 0.3 / (0.001 * k + 0.050 + 0.001 * (k + 1)))


def test_dynamic_draft_length_follows_the_drafts_confidence():
    wan = timed_policy(trip=0.080, per_token=0.001, draft=0.001)
    loopback = timed_policy(trip=0.0002, per_token=0.004, draft=0.002)

    def drafted(policy, confidences, room=8):
        for i in range(1, len(confidences) + 1):
            keep, more = policy.draft_decision(confidences[:i], room)
            if not keep:
                return i - 1
            if not more:
                return i
        return len(confidences)

    assert drafted(wan, [0.9] * 8) == 8  # confident drafts, costly trip: draft all the way
    assert drafted(wan, [0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9], room=5) == 5
    assert drafted(loopback, [0.9, 0.9, 0.05, 0.9, 0.9]) <= 3  # a hesitant draft ends a cheap round
    assert drafted(loopback, [0.9] * 8) < drafted(wan, [0.9] * 8)
    assert drafted(loopback, [0.05] * 8) == 1  # at least one draft per round


def test_confidence_calibration_learns_from_verdicts():
    policy = CostModel()
    for _ in range(40):  # drafts at 0.95 are accepted, the one at 0.35 after them is rejected
        policy.observe(3, 2, 4, None, 0.0, [0.95, 0.95, 0.35])
    assert policy.alpha(0.95) > 0.85 and policy.alpha(0.35) < 0.15
    assert policy.acceptance == pytest.approx(2 / 3, abs=0.05)


def test_pipelining_pays_across_a_wan_not_on_loopback():
    wan = timed_policy(trip=0.080, per_token=0.001, draft=0.001, latency=0.078)
    loopback = timed_policy(trip=0.003, per_token=0.002, draft=0.002)
    assert wan.pipeline_pays(0.1, 4) and loopback.pipeline_pays(0.1, 4)  # unmeasured: explore both outcomes
    wan.explored = loopback.explored = 12  # exploration spent without a measurement: the priors decide
    assert wan.pipeline_pays(0.3, 4) and not loopback.pipeline_pays(0.3, 4)  # the known 78 ms trip; a guess
    for _ in range(3):  # measured: a hit hides the 80 ms trip, a miss costs the peers 3 ms of compute
        wan.observe_pipeline(saved=0.080)
        wan.observe_pipeline(lost=0.003)
        loopback.observe_pipeline(saved=0.001)  # on loopback the "trip" is the peers' compute, nothing to hide
        loopback.observe_pipeline(lost=0.008)
    assert wan.pipeline_pays(0.2, 4) and not wan.pipeline_pays(0.02, 4)
    assert not loopback.pipeline_pays(0.95, 4)  # saving less than the extra token it forgoes
    for _ in range(30):  # the network changed: pipelined hits now arrive later than a fresh round would
        wan.observe_pipeline(saved=-0.010)
    assert not wan.pipeline_pays(0.5, 4)


def test_trees_chosen_when_the_second_choice_often_rescues_a_costly_trip():
    wan = timed_policy(trip=0.080, per_token=0.0005, draft=0.0005)
    for _ in range(30):  # the target's token was the draft's second choice at every rejection
        wan.observe(4, 1, 5, None, 0.0, [0.6, 0.6, 0.6, 0.6], rescue_rank=1)
    w, d, tree_rate = wan.tree_plan(3, 8)
    assert w >= 2 and tree_rate > wan.rate(wan.choose())
    loopback = timed_policy(trip=0.0002, per_token=0.004, draft=0.002)
    assert loopback.tree_plan(3, 8)[2] < loopback.rate(loopback.choose())


def test_adaptive_k_prefers_long_drafts_when_trips_are_expensive():
    cheap, costly = CostModel(k_max=8), CostModel(k_max=8)
    for k in (4, 2, 4, 2):
        cheap.observe(k, k - 1, k + 1, 0.001 + 0.001 * (k + 1), 0.0005 * k)  # local: every token costs
        costly.observe(k, k - 1, k + 1, 0.100 + 0.001 * (k + 1), 0.0005 * k)  # a WAN trip dominates
    assert costly.choose() > cheap.choose()
    assert costly.choose() >= 4


# --- sampling is lossless: a chi-square test on the joint law of the first two tokens ----------------

def chi2_critical(df: int, alpha_z: float = 3.09) -> float:
    """Wilson-Hilferty: the chi-square quantile at the normal quantile z (3.09: significance 0.001)."""
    return df * (1 - 2 / (9 * df) + alpha_z * math.sqrt(2 / (9 * df))) ** 3


@pytest.fixture(scope="module")
def small_vocab(tmp_path_factory):
    import transformers

    def build(seed, layers):
        cfg = transformers.LlamaConfig(vocab_size=6, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                       num_attention_heads=4, num_key_value_heads=2, initializer_range=0.5)
        torch.manual_seed(seed)
        path = tmp_path_factory.mktemp(f"v6-{seed}")
        transformers.LlamaForCausalLM(cfg).save_pretrained(path)
        return LocalModel.load(path)

    return build(1, 2), build(2, 1)


def generate_logits(model, ids):
    session = model.session(len(ids))
    from peer.model import StepLayout

    return model.head.logits(session.submit(model.head.embed(torch.tensor(ids)), StepLayout(0, len(ids))).result())[-1]


def chi_square_stat(counts: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    keep = expected >= 5
    stat = float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    return stat, chi2_critical(int(keep.sum()) - 1)


def joint_of_verify(verify_fn, n=20000, vocab=6, seed=0):
    """Two draft tokens from q, verified against p by `verify_fn`: the joint law of the first two
    committed tokens, counted, beside what the target alone would give (p1(a) * p2(b | a))."""
    g = torch.Generator().manual_seed(seed)
    p1 = torch.softmax(torch.randn(vocab, generator=g) * 2, -1)
    p2 = torch.softmax(torch.randn(vocab, vocab, generator=g) * 2, -1)  # p2[a] = law of the 2nd token given a
    q1 = torch.softmax(torch.randn(vocab, generator=g) * 2, -1)  # a draft that disagrees a lot
    q2 = torch.softmax(torch.randn(vocab, vocab, generator=g) * 2, -1)
    p3 = torch.full((vocab,), 1.0 / vocab)
    counts = torch.zeros(vocab, vocab)
    for _ in range(n):
        x1 = int(torch.multinomial(q1, 1, generator=g))
        x2 = int(torch.multinomial(q2[x1], 1, generator=g))
        accepted, extra = verify_fn([x1, x2], torch.stack([q1, q2[x1]]), torch.stack([p1, p2[x1], p3]), g)
        first = x1 if accepted >= 1 else extra
        second = x2 if accepted >= 2 else (extra if accepted == 1 else None)
        if second is None:  # the round ended after one token: the next token comes from the target
            second = int(torch.multinomial(p2[first], 1, generator=g))
        counts[first, second] += 1
    return counts, (p1[:, None] * p2) * n


def test_rejection_sampling_reproduces_the_target_law():
    stat, critical = chi_square_stat(*joint_of_verify(verify))
    assert stat < critical, f"chi2 {stat:.1f} >= {critical:.1f} (significance 0.001): verify is biased"


def test_the_chi_square_test_catches_a_biased_sampler():
    """The classic bug: on rejection, resample from p instead of from norm(max(p - q, 0))."""

    def biased(drafts, q, p, generator=None, relaxed=None):
        for i, x in enumerate(drafts):
            if float(torch.rand((), generator=generator)) < min(1.0, float(p[i, x] / q[i, x])):
                continue
            return i, int(torch.multinomial(p[i], 1, generator=generator))
        return len(drafts), int(torch.multinomial(p[len(drafts)], 1, generator=generator))

    stat, critical = chi_square_stat(*joint_of_verify(biased))
    assert stat > critical, f"chi2 {stat:.1f} < {critical:.1f}: the test did not notice the bias"


@pytest.mark.parametrize("adaptive,top_k", [(False, None), (True, None), (False, 3)])
def test_end_to_end_sampling_follows_the_target(small_vocab, adaptive, top_k):
    """Whole speculative generations (drafter, target, verify): the first token's law is the target's.
    Adaptive: the cost model stops drafting at hesitant drafts (a rule that reads only the draft). Top-k:
    the target's law is its top-k distribution (the draft drafts from its own): never a token outside it."""
    target, draft = small_vocab
    params, prompt, n = SamplingParams(temperature=1.0, top_k=top_k), [1, 2, 3], 400
    expected = token_probs(generate_logits(target, prompt), params) * n
    counts = torch.zeros(6)
    length = len(prompt) + 8
    lengths = set()
    for seed in range(n):
        cfg = SpecConfig(k=None if adaptive else 2, k_max=2, pipeline=False, params=params)
        policy = timed_policy(trip=0.006, per_token=0.004, draft=0.002) if adaptive else None
        res = speculative_decode(target.head, target.session(length), Drafter(draft, length), prompt, 3, cfg,
                                 seed=seed, policy=policy)
        assert res.ks[0] == 2 or (adaptive and res.ks[0] >= 1)  # the first token went through draft + verify
        lengths.add(res.ks[0])
        counts[res.tokens[0]] += 1
    if adaptive:
        assert lengths == {1, 2}  # the draft length did depend on the draft's confidence
    assert counts[expected == 0].sum() == 0 and int((expected > 0).sum()) == (top_k or 6)
    stat, critical = chi_square_stat(counts, expected)
    assert stat < critical, f"chi2 {stat:.1f} >= {critical:.1f}"


def sampled_tree_joint(small_vocab, n=600):
    """The first two tokens of n sampled generations whose first round is the draft model's own tree (k=2,
    width 3), counted, beside the target's joint law times n; and how many rounds were trees."""
    target, draft = small_vocab
    params, prompt = SamplingParams(temperature=1.0), [1, 2, 3]
    p1 = torch.softmax(generate_logits(target, prompt), -1)
    p2 = torch.stack([torch.softmax(generate_logits(target, prompt + [a]), -1) for a in range(6)])
    counts, length, trees = torch.zeros(6, 6), len(prompt) + 12, 0
    cfg = SpecConfig(k=2, tree_width=3, pipeline=False, params=params, ngram=False)
    for seed in range(n):
        res = speculative_decode(target.head, target.session(length), Drafter(draft, length), prompt, 2, cfg,
                                 seed=seed)
        trees += res.tree_rounds
        counts[res.tokens[0], res.tokens[1]] += 1
    return counts, p1[:, None] * p2 * n, trees


def test_sampled_draft_trees_follow_the_target(small_vocab):
    """The draft model's own trees under sampling (first tokens drawn without replacement, each continued by
    draws): the first two committed tokens follow the target's joint law (chi-square, significance 0.001)."""
    counts, expected, trees = sampled_tree_joint(small_vocab)
    assert trees >= counts.sum()  # every first round was a sampled tree
    stat, critical = chi_square_stat(counts, expected)
    assert stat < critical, f"chi2 {stat:.1f} >= {critical:.1f}"


def test_the_check_catches_a_tree_drafter_that_declares_the_wrong_law(small_vocab, monkeypatch):
    """Siblings drawn without replacement but declared as drawn from the plain q: biased, and the test sees it."""
    import swarm.decode.drafter as drafter

    real = drafter.draw_siblings

    def declared_iid(q, width, generator=None, replace=True):
        tokens, _ = real(q, width, generator, replace)
        return tokens, [q] * len(tokens)

    monkeypatch.setattr(drafter, "draw_siblings", declared_iid)
    stat, critical = chi_square_stat(*sampled_tree_joint(small_vocab)[:2])
    assert stat > critical, f"chi2 {stat:.1f} < {critical:.1f}: the test did not notice the bias"


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=0.8)])
def test_a_draft_vocabulary_subset_drafts_only_its_ids_and_keeps_the_output(pair, params):
    """The draft's head over the first 48 ids and the context's: every draft lies there; greedy output is plain
    greedy's, token for token (sampling: the same seed gives a valid generation of the same length)."""
    target, draft = pair
    length = len(PROMPT) + 40 + 20
    spec = SpecConfig(k=4, pipeline=False, params=params, draft_vocab=48, ngram=False)
    drafter = Drafter(draft, length, spec.draft_vocab)
    seen = []
    real = drafter.propose

    def watched(context, *args, **kw):
        tokens, q = real(context, *args, **kw)
        seen.append((set(context), tokens))
        return tokens, q

    drafter.propose = watched
    res = speculative_decode(target.head, target.session(length), drafter, PROMPT, 40, spec)
    assert all(t < 48 or t in context for context, tokens in seen for t in tokens) and seen
    assert any(t >= 48 for t in PROMPT + res.tokens)  # the subset was a real restriction
    if params.greedy:
        assert res.tokens == generate(target, PROMPT, 40, stop_at_eos=False).tokens
    full = Drafter(draft, length, None)
    assert full.vocab.size is None and torch.equal(full.vocab.logits(torch.ones(draft.head.cfg.hidden_size)),
                                                   draft.head.logits(torch.ones(1, draft.head.cfg.hidden_size))[0])


class CatchUps(Drafter):
    """A drafter that records how many tokens each proposal's catch-up step fed (the first proposal's: the prompt)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.catchups, self._catching = [], False

    def _logits_after(self, context):
        self._catching = True
        try:
            return super()._logits_after(context)
        finally:
            self._catching = False

    def _step(self, tokens, start):
        if self._catching:
            self.catchups.append(len(tokens))
        return super()._step(tokens, start)


def test_prefeed_makes_the_next_proposal_feed_one_token_and_draft_the_same(pair):
    target, draft = pair
    context, drafts = PROMPT + [7, 8], [11, 12, 13]
    fresh, fed = Drafter(draft, 64), CatchUps(draft, 64)
    fed.propose(PROMPT, 1, SamplingParams())  # the prompt is in
    assert fed.prefeed(context + drafts) == len(context + drafts) - len(PROMPT)
    assert fed.prefeed(context + drafts) == 0  # nothing new
    for accepted in (3, 1, 0):  # all drafts accepted, some, none: the next context ends in a token not drafted
        following = context + drafts[:accepted] + [99]
        want = fresh.propose(following, 4, SamplingParams())[0]
        fed.catchups.clear()
        assert fed.propose(following, 4, SamplingParams())[0] == want
        assert fed.catchups == [1]
        fed.prefeed(context + drafts)


@pytest.mark.parametrize("drafter", ["random", "perfect"])
def test_rounds_in_flight_prefeed_the_draft_and_keep_the_output(pair, drafter):
    target, draft = pair
    draft = draft if drafter == "random" else target
    plain = generate(target, PROMPT, 40, stop_at_eos=False).tokens
    length = len(PROMPT) + 40 + 20
    sizes = {}
    for prefeed in (True, False):
        counted = CatchUps(draft, length)
        res = speculative_decode(target.head, Watched(target.session(length)), counted, PROMPT, 40,
                                 SpecConfig(k=3, pipeline=False, prefeed=prefeed))
        assert res.tokens == plain
        sizes[prefeed] = counted.catchups[1:]  # after the prompt's
    assert sizes[True] and set(sizes[True]) == {1}  # every round's drafts went in during its flight
    if drafter == "perfect":  # without: a fully accepted chain's last draft waits for the next catch-up
        assert max(sizes[False]) == 2
