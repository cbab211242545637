"""The memory plan (peer/memory.py): blocks and KV cache budget from free memory, as a pure function; int8
blocks counted at half the bytes; what `swarm peer` makes of --cache-tokens given or not; the one log line."""

from __future__ import annotations

import logging

import pytest
import torch

from peer.limits import Limits
from peer.memory import MemoryPlan, describe, free_memory, plan_memory
from peer.model import BlockRange, KVCache, ModelConfig
from peer.serve import PeerOptions, plan_blocks
from swarm.cli import build_parser
from swarm.flags import dataclass_from_args

GiB, MiB = 1 << 30, 1 << 20
LLAMA_8B = ModelConfig.from_hf(dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8))
KV_8B = KVCache.bytes_per_token(1, 8, 128, torch.bfloat16)  # 4 KiB per block per token


def test_small_model_on_a_cpu_with_room_keeps_the_old_defaults():
    plan = plan_memory(16 * GiB, 14 * MiB, 3 * 1024, 30, min_cache_tokens=8192, max_cache_tokens=32768)
    assert plan == MemoryPlan(30, 32768, plan.reason) and "all 30 blocks fit" in plan.reason


def test_int8_blocks_are_half_the_bytes_and_twice_as_many_fit():
    bf16 = BlockRange.bytes_per_block(LLAMA_8B, torch.bfloat16)
    int8 = BlockRange.bytes_per_block(LLAMA_8B, torch.bfloat16, "int8")
    fp32 = BlockRange.bytes_per_block(LLAMA_8B, torch.float32)
    assert bf16 == 2 * (4096 * (4096 + 2 * 1024) + 4096 * 4096 + 3 * 4096 * 14336) + 2 * 2 * 4096
    assert 0.5 < int8 / bf16 < 0.501 and fp32 == 2 * bf16  # int8 weights, a bf16 scale per row, bf16 norms
    assert BlockRange.bytes_per_block(LLAMA_8B, torch.float32, "int8") < 0.251 * fp32
    kw = dict(min_cache_tokens=8192, max_cache_tokens=64 * 8192)
    a, b = plan_memory(12 * GiB, bf16, KV_8B, 32, **kw), plan_memory(12 * GiB, int8, KV_8B, 32, **kw)
    reserve = 32768 * KV_8B  # each block counted with room for the default cache beside it
    assert a.blocks == int(0.8 * 12 * GiB) // (bf16 + reserve) == 18 and b.blocks == 29
    a, b = (plan_memory(6 * GiB, size, KV_8B, 32, requested_cache_tokens=1024, **kw).blocks for size in (bf16, int8))
    assert (a, b) == (11, 23)  # a small cache: twice the blocks (and one more)


def test_gpu_cache_is_what_is_left_between_floor_and_ceiling():
    kw = dict(min_cache_tokens=8192, max_cache_tokens=64 * 8192)
    plan = plan_memory(100 * GiB, 218 * MiB, KV_8B, 32, **kw)  # all blocks fit with room to spare
    assert plan.blocks == 32 and plan.cache_tokens == 64 * 8192 and "capped" in plan.reason
    plan = plan_memory(16 * GiB, 218 * MiB, KV_8B, 32, **kw)
    left = int(0.8 * 16 * GiB) - 32 * 218 * MiB
    assert plan.blocks == 32 and plan.cache_tokens == left // (32 * KV_8B) == 49049
    assert plan.blocks * 218 * MiB + plan.cache_tokens * plan.blocks * KV_8B <= 0.8 * 16 * GiB
    assert "the memory left after the blocks" in plan.reason
    plan = plan_memory(7 * GiB, 436 * MiB, KV_8B, 32, **kw)  # fewer blocks, each with room for 32768 tokens
    assert plan.blocks == 10 and plan.cache_tokens >= 32768 and "10 of 32 blocks fit" in plan.reason


def test_short_memory_and_what_the_user_asked_for():
    kw = dict(min_cache_tokens=8192, max_cache_tokens=32768)
    short = plan_memory(100 * MiB, 436 * MiB, KV_8B, 32, **kw)
    assert (short.blocks, short.cache_tokens) == (1, 8192) and "memory is short" in short.reason
    asked = plan_memory(16 * GiB, 14 * MiB, 3 * 1024, 30, requested_blocks=50, requested_cache_tokens=100, **kw)
    assert (asked.blocks, asked.cache_tokens) == (30, 100) and "as asked" in asked.reason and "as given" in asked.reason
    over = plan_memory(1 * GiB, 436 * MiB, KV_8B, 32, requested_blocks=4, **kw)
    assert over.blocks == 4 and over.cache_tokens == 8192 and "more than 80% of free memory" in over.reason
    with pytest.raises(ValueError):
        plan_memory(GiB, 0, KV_8B, 32)
    line = describe(asked, 16 * GiB, 14 * MiB, 3 * 1024, "cpu (float32)")
    assert line.startswith("memory plan: 30 blocks, KV cache 100 tokens (") and "free 16.0 GiB on cpu (float32)" in line
    assert "14.0 MiB a block, 90.0 KiB a cache token over 30 blocks" in line
    assert free_memory("cpu") > 0


def test_peer_flags_leave_the_cache_to_the_plan_unless_given(tiny, monkeypatch, caplog):
    peer = build_parser()._subparsers._group_actions[0].choices["peer"]
    args = peer.parse_args([])
    assert args.cache_tokens is None and args.quant == "none" and dataclass_from_args(Limits, args) == Limits()
    assert peer.parse_args(["--cache-tokens", "64", "--quant", "int8"]).cache_tokens == 64
    with pytest.raises(ValueError, match="int4"):
        PeerOptions("m", quant="int4")
    from peer.model import Checkpoint

    ckpt = Checkpoint(tiny("llama2").path)
    monkeypatch.setattr("peer.serve.free_memory", lambda device: 100 * MiB)
    caplog.set_level(logging.INFO, "specswarm.peer")
    opts = PeerOptions("m", quant="int8", auto_cache_tokens=True, limits=Limits(max_session_tokens=64))
    plan = plan_blocks(ckpt, opts)
    block = BlockRange.bytes_per_block(ckpt.config, torch.float32, "int8")
    per_token = KVCache.bytes_per_token(1, ckpt.config.num_key_value_heads, ckpt.config.head_dim)  # 512 B
    assert plan.blocks == int(0.8 * 100 * MiB) // (block + 32768 * per_token) == 4  # the tiny model's KV cache is large
    assert plan.cache_tokens == 32768  # on a CPU: at most the budget of old
    assert "memory plan: 4 blocks, KV cache 32768 tokens (4 of 8 blocks fit" in caplog.text and "int8" in caplog.text
    given = plan_blocks(ckpt, PeerOptions("m", blocks=(2, 4), limits=Limits(cache_tokens=77)))
    assert (given.blocks, given.cache_tokens) == (2, 77)
