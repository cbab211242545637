"""Sampling: greedy, temperature, top-k and top-p distributions, and seeded reproducibility end to end."""

import json
import math
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


def test_top_k_keeps_the_k_likeliest_then_top_p_judges_what_is_left():
    logits = torch.log(torch.tensor([0.1, 0.4, 0.2, 0.3]))
    assert torch.allclose(token_probs(logits, SamplingParams(1.0, top_k=2)), torch.tensor([0, 4 / 7, 0, 3 / 7]))
    for k in (4, 5, 10**9):  # k >= vocab: every token stays
        assert torch.allclose(token_probs(logits, SamplingParams(1.0, top_k=k)), torch.tensor([0.1, 0.4, 0.2, 0.3]))
    # temperature first (the set is the same, the law is the tempered one's), row by row on a batch
    hot = token_probs(torch.stack([logits, logits.flip(0)]), SamplingParams(2.0, top_k=2))
    sqrt = torch.tensor([0.4, 0.3]).sqrt()
    assert torch.allclose(hot[0, [1, 3]], sqrt / sqrt.sum()) and hot[0, [0, 2]].sum() == 0
    assert torch.allclose(hot[1], hot[0].flip(0))
    # then top-p over the top-k law renormalised (Hugging Face's order): {1, 3, 2} is 4/9, 3/9, 2/9, and 0.75
    # of that mass needs {1, 3}; top-p first (0.4 + 0.3 < 0.75) would have kept three tokens
    assert torch.allclose(token_probs(logits, SamplingParams(1.0, 0.75, 3)), torch.tensor([0, 4 / 7, 0, 3 / 7]))
    assert token_probs(logits, SamplingParams(0.0, 1.0, 2)).tolist() == [0.0, 1.0, 0.0, 0.0]  # greedy stays greedy


def test_top_k_keeps_every_token_tied_with_the_kth():
    """Ties at the k-th value: all of them stay (Hugging Face's and vLLM's rule), never an arbitrary pick."""
    logits = torch.tensor([3.0, 1.0, 0.0, 1.0, 1.0])
    kept = token_probs(logits, SamplingParams(1.0, top_k=2))
    assert (kept > 0).tolist() == [True, True, False, True, True]
    assert torch.allclose(kept, torch.softmax(torch.tensor([3.0, 1.0, -math.inf, 1.0, 1.0]), -1))
    tied_top = token_probs(torch.tensor([2.0, 0.0, 2.0]), SamplingParams(1.0, top_k=1))
    assert tied_top.tolist() == [0.5, 0.0, 0.5]
    assert (token_probs(logits, SamplingParams(1.0, top_k=1)) > 0).tolist() == [True, False, False, False, False]


def test_sampling_frequencies_follow_the_distribution():
    logits = torch.log(torch.tensor([0.6, 0.3, 0.1]))
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(torch.tensor([sample(logits, SamplingParams(1.0), g) for _ in range(4000)]), minlength=3)
    assert torch.allclose(counts / 4000, torch.tensor([0.6, 0.3, 0.1]), atol=0.03)


def test_bad_params_are_refused():
    for kw in (dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-1), dict(top_k=2.0), dict(top_k=True),
               dict(top_k="3")):
        with pytest.raises(ValueError):
            SamplingParams(**kw)
    assert SamplingParams(1.0, top_k=0) == SamplingParams(1.0) and SamplingParams(1.0, top_k=0).top_k is None


def test_the_top_k_flag_reaches_the_sampling_parameters():
    from swarm.cli import build_parser
    from swarm.flags import sampling_params

    need = {"generate": ["--prompt", "x"]}
    for command in ("generate", "chat", "api"):
        args = build_parser().parse_args([command, "--model", "tiny", *need.get(command, []), "--temperature", "0.7",
                                          "--top-k", "40"])
        assert sampling_params(args) == SamplingParams(0.7, 1.0, 40)
    assert sampling_params(build_parser().parse_args(["generate", "--model", "tiny", "--prompt", "x"])).top_k is None
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--model", "tiny", "--prompt", "x", "--top-k", "-3"])


def run_cli(path, *extra):
    out = subprocess.run([sys.executable, "-m", "swarm.cli", "generate", "--model", str(path), "--local",
                          "--prompt", "for i in", "--max-new-tokens", "12", "--ignore-eos", "--json", *extra],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_seeded_sampling_is_reproducible(tiny):
    path = tiny("llama2").path
    a = run_cli(path, "--temperature", "1.0", "--seed", "7")
    b = run_cli(path, "--temperature", "1.0", "--seed", "7", "--top-k", "0")  # 0: top-k off
    c = run_cli(path, "--temperature", "1.0", "--seed", "8")
    assert a["tokens"] == b["tokens"] and a["top_k"] is None is b["top_k"]
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
