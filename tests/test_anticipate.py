"""Drafting ahead during a round's flight (`swarm.decode.anticipate`): the drafts a later proposal takes are the
ones it would have drafted, the guesses' chances are a distribution, and greedy output stays plain greedy's."""

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import make_checkpoint
from swarm.decode.anticipate import Anticipator, outcomes, rank_chances
from swarm.decode.generate import LocalModel, generate
from swarm.decode.round_policy import CostModel
from swarm.decode.rounds import Round
from swarm.decode.sampling import SamplingParams
from swarm.decode.speculative import Drafter, SpecConfig, speculative_decode

PROMPT = [5, 17, 42, 99, 3, 250]
GREEDY = SamplingParams()


@pytest.fixture(scope="module")
def pair(tiny, tmp_path_factory):
    target = LocalModel.load(tiny("llama2").path)
    other = make_checkpoint(tmp_path_factory.mktemp("draft"), "llama2", seed=11, num_hidden_layers=2)
    return target, LocalModel.load(other.path)


class Delayed:
    """A target whose steps run in the background and take `delay` seconds more (a trip), as a swarm's do."""

    def __init__(self, run, delay: float):
        self.run, self.delay, self.pool = run, delay, ThreadPoolExecutor(1)
        self.overlaps, self.verdicts = True, run.verdicts

    def submit(self, hidden, layout, check=None):
        def step():
            time.sleep(self.delay)
            return self.run.submit(hidden, layout, check).result()
        return self.pool.submit(step)


def test_a_proposal_takes_the_drafts_drafted_ahead_for_its_context(pair):
    _, draft = pair
    context = PROMPT + [7]
    fresh, _ = Drafter(draft, 64).propose(context, 5, GREEDY)
    ahead = Drafter(draft, 64)
    assert ahead.anticipate(context, 3) == 3 and ahead.anticipate(PROMPT + [8], 2) == 2  # two guesses
    tokens, q = ahead.propose(context, 5, GREEDY)
    assert tokens == fresh and ahead.anticipated == 3  # three taken, two more drafted after them
    assert q.shape[0] == 5 and all(float(q[i, t]) == 1.0 for i, t in enumerate(tokens))
    assert len(ahead.top) == 5 and len(ahead.confidences) == 5
    again, _ = ahead.propose(context, 5, GREEDY)  # what was drafted ahead serves one proposal only
    assert again == fresh and ahead.anticipated == 0


def test_drafts_ahead_follow_the_policys_decisions_and_other_contexts_ignore_them(pair):
    _, draft = pair
    ahead = Drafter(draft, 64)
    ahead.anticipate(PROMPT + [7], 4)
    tokens, _ = ahead.propose(PROMPT + [7], 4, GREEDY, decide=lambda conf: (True, len(conf) < 2))
    assert len(tokens) == 2 and ahead.anticipated == 2
    ahead.anticipate(PROMPT + [7], 4)
    other, _ = ahead.propose(PROMPT + [9], 3, GREEDY)
    assert other == Drafter(draft, 64).propose(PROMPT + [9], 3, GREEDY)[0] and ahead.anticipated == 0
    ahead.anticipate(PROMPT + [7], 4)  # sampling never takes greedy drafts
    ahead.propose(PROMPT + [7], 3, SamplingParams(temperature=0.8))
    assert ahead.anticipated == 0


def test_the_verdicts_chances_are_a_distribution():
    policy = CostModel()
    rnd = Round([1, 2, 3, 4], 0, [2, 3, 4], sources=["model", "model", "ngram"], cells=[None, None, 5],
                confidences=[0.9, 0.4])
    probs = outcomes(policy, rnd)
    assert len(probs) == 4 and abs(sum(probs) - 1) < 1e-9 and min(probs) >= 0
    ranks = rank_chances(policy)
    assert ranks[0] == 0 and 0 < sum(ranks) <= 1 and len(ranks) == 8


@pytest.mark.parametrize("drafter", ["perfect", "random"])
def test_drafting_ahead_keeps_greedy_output_and_is_used(pair, drafter):
    target, draft = pair
    plain = generate(target, PROMPT, 24, stop_at_eos=False).tokens
    length = len(PROMPT) + 24 + 40
    model = target if drafter == "perfect" else draft
    results = {}
    for on in (True, False):
        run = Delayed(target.session(length), 0.03)
        results[on] = speculative_decode(target.head, run, Drafter(model, length), PROMPT, 24,
                                         SpecConfig(k_max=4, pipeline=False, ngram=False, anticipate=on))
        assert results[on].tokens == plain
    assert results[False].anticipated == 0
    if drafter == "perfect":  # every round is fully accepted; the draft guesses the target's next token right
        assert results[True].anticipated >= results[True].rounds // 2


def test_drafting_ahead_stops_when_the_verdict_is_in(pair):
    target, draft = pair
    drafter, policy = Drafter(draft, 64), CostModel()
    ahead = Anticipator(drafter, policy)
    drafts, _ = drafter.propose(PROMPT, 3, GREEDY)
    rnd = Round(PROMPT[-1:] + drafts, len(PROMPT) - 1, drafts, sources=["model"] * 3, cells=[None] * 3,
                confidences=list(drafter.confidences), top=list(drafter.top))
    before = drafter.tokens
    assert ahead.run(rnd, PROMPT, time.perf_counter() + 10, lambda: True) == 0 and drafter.tokens == before
    assert ahead.run(rnd, PROMPT, time.perf_counter() + 10, lambda: False) > 0 and drafter.tokens > before
