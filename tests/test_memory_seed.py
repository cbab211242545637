"""The n-gram memory's seed: the file (swarm.registry), the script that writes it, the flags, and exactness."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from swarm.bundled import TINY_DRAFT, TINY_MODEL
from swarm.decode.generate import LocalModel, generate
from swarm.decode.ngram import NgramMemory
from swarm.decode.speculative import SpecConfig
from swarm.registry import memory_seed, own_memory, save_memory_seed

REPO = Path(__file__).resolve().parents[1]


def test_a_seed_file_round_trips_and_anything_else_is_refused(tmp_path):
    path = tmp_path / "seed.safetensors"
    assert save_memory_seed(path, [[5, 6, 7], [], [8]], {"model": "x"}) > 0
    assert memory_seed(path) == [[5, 6, 7], [8]] and memory_seed(path, vocab_size=9) == [[5, 6, 7], [8]]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        memory_seed(path, vocab_size=8)
    save_file({"tokens": torch.tensor([-1, 3, -7], dtype=torch.int32)}, str(tmp_path / "neg.safetensors"))
    save_file({"tokens": torch.zeros(2, 2, dtype=torch.int32)}, str(tmp_path / "2d.safetensors"))
    save_file({"other": torch.zeros(2, dtype=torch.int32)}, str(tmp_path / "other.safetensors"))
    save_file({"tokens": torch.zeros(2)}, str(tmp_path / "float.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    for name in ("neg", "2d", "other", "float", "junk"):
        with pytest.raises(ValueError):
            memory_seed(tmp_path / f"{name}.safetensors")
    assert memory_seed("tiny") == [] and own_memory("tiny") is None and memory_seed(str(TINY_MODEL)) == []


def test_the_default_model_ships_a_seed_of_its_own_token_ids():
    docs = memory_seed("smollm2-135m", vocab_size=49152)
    assert own_memory("smollm2-135m") is not None and len(docs) >= 100
    assert all(len(d) > 8 for d in docs) and sum(map(len, docs)) > 10_000


def test_commands_seed_their_memory_unless_told_not_to():
    from swarm.flags import add_decode_args, ngram_memory

    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m")
    add_decode_args(p, 16)
    assert ngram_memory(p.parse_args([])).seeded > 10_000
    assert ngram_memory(p.parse_args(["--no-memory-seed"])).seeded == 0
    assert ngram_memory(p.parse_args(["--no-ngram-memory"])).seeded == 0  # (no memory is read at all then)
    assert ngram_memory(p.parse_args(["--model", "tiny"])).seeded == 0  # a model with no seed: empty


def test_a_seeded_memory_drafts_from_its_seed_and_the_output_stays_plain_greedy():
    """A seed holding what the target says after this prompt: far fewer rounds, recalled drafts, the same
    tokens as plain greedy (and as speculation with an empty memory)."""
    target, draft = LocalModel.load(TINY_MODEL), LocalModel.load(TINY_DRAFT)
    prompt = [11, 73, 5, 190, 42, 8, 66, 131]
    plain = generate(target, prompt, 48, stop_at_eos=False).tokens
    spec = SpecConfig(pipeline=False)
    empty = generate(target, prompt, 48, draft=draft, spec=spec, stop_at_eos=False, memory=NgramMemory())
    memory = NgramMemory(seed=[[1, 2, 3], prompt + plain])
    seeded = generate(target, prompt, 48, draft=draft, spec=spec, stop_at_eos=False, memory=memory)
    assert empty.tokens == plain and seeded.tokens == plain
    assert seeded.recalled >= 16 and empty.recalled == 0 and seeded.rounds < empty.rounds and memory.seeded == len(plain) + 13


def test_the_seed_script_continues_code_headers_with_the_target(tmp_path):
    sys.path.insert(0, str(REPO / "scripts"))
    import seed_memory

    out = tmp_path / "tiny-seed.safetensors"
    assert seed_memory.main(["--model", str(TINY_MODEL), "--prompts", "3", "--new-tokens", "10", "--batch", "2",
                             "--threads", "1", "--out", str(out)]) == 0
    docs = memory_seed(out, vocab_size=LocalModel.load(TINY_MODEL).head.cfg.vocab_size)
    assert len(docs) == 3 and all(len(d) == 8 + 10 for d in docs)
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["documents"] == "3" and "look-alikes" in meta["source"] and "--prompts 3" in meta["command"]
    with pytest.raises(SystemExit):  # a model with no shipped seed needs --out
        seed_memory.parse_args(["--model", "tiny"])
