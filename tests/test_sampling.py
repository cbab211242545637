"""Sampling: greedy, temperature and top-p distributions, and seeded reproducibility end to end."""

import json
import subprocess
import sys

import pytest
import torch

from swarm.decode.sampling import SamplingParams, sample, token_probs


def test_greedy_is_argmax_one_hot():
    logits = torch.tensor([0.1, 2.0, -1.0, 1.9])
    assert sample(logits, SamplingParams()) == 1
    assert token_probs(logits, SamplingParams()).tolist() == [0.0, 1.0, 0.0, 0.0]


def test_temperature_and_top_p_distribution():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert torch.allclose(token_probs(logits, SamplingParams(1.0)), torch.tensor([0.5, 0.3, 0.15, 0.05]))
    # top_p 0.8: the smallest set reaching 0.8 is {0, 1}
    assert torch.allclose(token_probs(logits, SamplingParams(1.0, 0.8)), torch.tensor([0.625, 0.375, 0, 0]))
    # top_p below the top token's mass keeps only the top token
    assert torch.allclose(token_probs(logits, SamplingParams(1.0, 0.1)), torch.tensor([1.0, 0, 0, 0]))
    sharp = token_probs(logits, SamplingParams(0.5))
    assert sharp[0] > 0.5 and torch.isclose(sharp.sum(), torch.tensor(1.0))


def test_sampling_frequencies_follow_the_distribution():
    logits = torch.log(torch.tensor([0.6, 0.3, 0.1]))
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(torch.tensor([sample(logits, SamplingParams(1.0), g) for _ in range(4000)]), minlength=3)
    assert torch.allclose(counts / 4000, torch.tensor([0.6, 0.3, 0.1]), atol=0.03)


def test_bad_params_are_refused():
    for kw in (dict(temperature=-1), dict(top_p=0), dict(top_p=1.5)):
        with pytest.raises(ValueError):
            SamplingParams(**kw)


def run_cli(path, *extra):
    out = subprocess.run([sys.executable, "-m", "swarm.cli", "generate", "--model", str(path), "--local",
                          "--prompt", "for i in", "--max-new-tokens", "12", "--ignore-eos", "--json", *extra],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_seeded_sampling_is_reproducible(tiny):
    path = tiny("llama2").path
    a = run_cli(path, "--temperature", "1.0", "--seed", "7")
    b = run_cli(path, "--temperature", "1.0", "--seed", "7")
    c = run_cli(path, "--temperature", "1.0", "--seed", "8")
    assert a["tokens"] == b["tokens"]
    assert a["tokens"] != c["tokens"]


def test_cli_reports_bad_model_dir_clearly(tmp_path):
    out = subprocess.run([sys.executable, "-m", "swarm.cli", "generate", "--model", str(tmp_path / "none"),
                          "--local", "--prompt", "x"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "does not exist" in out.stderr


def test_random_draws_happen_on_the_generator_device(generator_elsewhere):
    """Issue 16's crash ("Expected a 'cpu' device type for generator but found 'cuda'"): a generator on one
    device, probabilities on another. Every draw of sampling and verification must be made on the generator's
    device. This machine has no GPU, so the generator here claims another device and torch's own draws are
    replaced by ones that check where they are made (conftest's `generator_elsewhere`)."""
    from swarm.decode import sampling

    gen, seen = generator_elsewhere
    p = torch.tensor([[0.2, 0.5, 0.3], [0.1, 0.6, 0.3]])  # CPU tensors, as the head or the draft gives them
    q = torch.tensor([[0.1, 0.8, 0.1]])
    sampling.sample(torch.tensor([0.1, 0.2, 0.3]), SamplingParams(temperature=1.0), gen)
    sampling.verify([1], q, p, gen)  # p/q < 1 for token 1: a uniform draw, then a residual draw
    assert seen and all(where == gen_device for _, where, gen_device in seen), seen
    assert {kind for kind, _, _ in seen} == {"rand", "multinomial"}
