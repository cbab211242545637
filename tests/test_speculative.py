"""Greedy speculative decoding (local) is token-identical to plain greedy decoding."""

import pytest
import torch

from conftest import make_checkpoint
from swarm.generate import LocalModel, generate
from swarm.speculative import Drafter, speculative_generate, verify_greedy


@pytest.fixture(scope="module")
def pair(tiny, tmp_path_factory):
    target = LocalModel.load(tiny("llama2").path)
    other = make_checkpoint(tmp_path_factory.mktemp("draft"), "llama2", seed=11, num_hidden_layers=2)
    return target, LocalModel.load(other.path)


PROMPT = [5, 17, 42, 99, 3, 250]


def spec(target, draft, k, n=40, prompt=PROMPT, eos=()):
    drafter = Drafter(draft, len(prompt) + n + k + 1)
    session = target.session(len(prompt) + n + k + 1)
    return speculative_generate(target.head, session, drafter, prompt, n, k, eos)


@pytest.mark.parametrize("k", [0, 1, 4, 8])
def test_random_draft_output_equals_plain_greedy(pair, k):
    target, draft = pair
    plain = generate(target, PROMPT, 40, stop_at_eos=False).tokens
    res = spec(target, draft, k)
    assert res.tokens == plain
    assert res.rounds == len(res.accepted_per_round) and sum(res.accepted_per_round) == res.accepted
    assert res.drafted <= k * res.rounds


@pytest.mark.parametrize("k", [1, 4, 8])
def test_perfect_draft_commits_k_plus_one_per_round(pair, k):
    target, _ = pair
    plain = generate(target, PROMPT, 40, stop_at_eos=False).tokens
    res = spec(target, target, k)  # the target drafting for itself is always right
    assert res.tokens == plain
    assert res.acceptance_rate == 1.0
    assert res.rounds == -(-40 // (k + 1))


def test_stops_at_eos_like_plain_decoding(pair):
    target, draft = pair
    plain = generate(target, PROMPT, 40, stop_at_eos=False).tokens
    eos = plain[17]  # pretend the 18th token is end-of-sequence
    res = spec(target, draft, 4, eos=(eos,))
    assert res.tokens == plain[:plain.index(eos) + 1] and res.stopped_by == "eos"


def test_verify_greedy():
    logits = torch.full((4, 10), -1.0)
    for row, tok in enumerate([3, 5, 7, 9]):
        logits[row, tok] = 1.0
    assert verify_greedy([3, 5, 7], logits) == (3, 9)
    assert verify_greedy([3, 6, 7], logits) == (1, 5)
    assert verify_greedy([0, 5, 7], logits) == (0, 3)
    assert verify_greedy([], logits[:1]) == (0, 3)
