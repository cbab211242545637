"""Our engine against `transformers` on tiny random checkpoints of every supported architecture."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import ARCHS, make_checkpoint, make_legacy_config
from peer.model import Checkpoint, StepLayout


def run_whole(ckpt: Checkpoint, ids: torch.Tensor) -> torch.Tensor:
    head, blocks = ckpt.load_head(), ckpt.load_blocks(0, ckpt.config.num_hidden_layers)
    cache = blocks.new_cache(len(ids))
    return head.logits(blocks(head.embed(ids), cache, StepLayout(0, len(ids))))


def random_ids(vocab: int, n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", list(ARCHS))
def test_prefill_logits_match_transformers(tiny, arch):
    tc = tiny(arch)
    ckpt = Checkpoint(tc.path)
    ids = random_ids(ckpt.config.vocab_size, 24)  # longer than mistral's sliding window of 8
    with torch.no_grad():
        ref = tc.model(ids[None]).logits[0]
    assert (run_whole(ckpt, ids) - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("arch", list(ARCHS))
def test_incremental_decode_matches_transformers(tiny, arch):
    """Prefill 6 tokens, then feed 18 one at a time: every step's logits equal the full forward's."""
    tc = tiny(arch)
    ckpt = Checkpoint(tc.path)
    head, blocks = ckpt.load_head(), ckpt.load_blocks(0, 8)
    ids = random_ids(ckpt.config.vocab_size, 24, seed=2)
    with torch.no_grad():
        ref = tc.model(ids[None]).logits[0]
    cache = blocks.new_cache(24)
    out = [head.logits(blocks(head.embed(ids[:6]), cache, StepLayout(0, 6)))]
    for pos in range(6, 24):
        out.append(head.logits(blocks(head.embed(ids[pos:pos + 1]), cache, StepLayout(pos, 1))))
    assert (torch.cat(out) - ref).abs().max().item() < 1e-4


def test_legacy_rope_scaling_config(tmp_path):
    """Hub checkpoints spell llama3 scaling as rope_theta + rope_scaling; both spellings give the same model."""
    tc = make_checkpoint(tmp_path / "legacy", "llama3", seed=3)
    make_legacy_config(tc.path)
    raw = json.loads((tc.path / "config.json").read_text())
    assert "rope_scaling" in raw and "rope_parameters" not in raw
    ckpt = Checkpoint(tc.path)
    assert ckpt.config.rope.type == "llama3" and ckpt.config.rope.theta == 500000.0
    ids = random_ids(ckpt.config.vocab_size, 40)  # well past original_max_position_embeddings=16
    with torch.no_grad():
        ref = tc.model(ids[None]).logits[0]
    assert (run_whole(ckpt, ids) - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("arch", list(ARCHS))
def test_cli_greedy_tokens_equal_transformers_generate(tiny, arch):
    tc = tiny(arch)
    from tokenizers import Tokenizer

    prompt = "def fibonacci(n):\n    return"
    ids = Tokenizer.from_file(str(tc.path / "tokenizer.json")).encode(prompt).ids
    out = subprocess.run([sys.executable, "-m", "swarm.cli", "generate", "--model", str(tc.path), "--local",
                          "--prompt", prompt, "--max-new-tokens", "20", "--ignore-eos", "--json",
                          "--dtype", "float32"],  # transformers' float32 (the default, auto, may be bfloat16)
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    with torch.no_grad():
        ref = tc.model.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False,
                                eos_token_id=None, pad_token_id=0, min_new_tokens=20)[0, len(ids):].tolist()
    assert got["tokens"] == ref
    assert got["new_tokens"] == 20 and got["prompt_tokens"] == len(ids)
    assert got["seconds"] > 0 and got["tokens_per_s"] > 0 and isinstance(got["text"], str)


def test_low_precision_dtypes_track_fp32(tiny):
    tc = tiny("llama3")
    ckpt = Checkpoint(tc.path)
    ids = random_ids(ckpt.config.vocab_size, 16)
    ref = run_whole(ckpt, ids)
    for dtype in ("bfloat16", "float16"):
        head, blocks = ckpt.load_head(dtype), ckpt.load_blocks(0, 8, dtype)
        assert blocks.dtype == getattr(torch, dtype)
        cache = blocks.new_cache(16)
        logits = head.logits(blocks(head.embed(ids), cache, StepLayout(0, 16)))
        assert logits.dtype == torch.float32
        assert (logits - ref).abs().max().item() < 0.1, dtype
        assert (logits.argmax(-1) == ref.argmax(-1)).float().mean() > 0.8
