"""peer.model.layers.one_query_attention (one query row, half precision on a CPU) gives SDPA's attention to the
dtype's rounding, with and without a mask and with grouped kv heads; a bfloat16 model decodes with it. Half-precision
blocks with a float32 KV cache (`BlockRange.cache_dtype`, what `load_draft` gives a CPU draft) compute every kind of
step (prefill, a chain token, a tree) at least as close to float32 as with their own dtype's cache."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from peer.model.layers import one_query_attention


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("heads,kv", [(9, 3), (4, 4), (8, 1)])
def test_it_is_sdpa(masked, heads, kv):
    g = torch.Generator().manual_seed(heads * 10 + kv)
    q, k, v = (torch.randn(1, h, n, 32, generator=g) for h, n in ((heads, 1), (kv, 50), (kv, 50)))
    mask = (torch.rand(1, 50, generator=g) > 0.3) if masked else None
    if masked:
        mask[0, -1] = True
    want = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask, enable_gqa=heads != kv)
    got = one_query_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask)
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    assert (got.double() - want).abs().max() < 2e-2
    sdpa = F.scaled_dot_product_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), attn_mask=mask, enable_gqa=heads != kv)
    assert (got.double() - want).abs().max() < 3 * (sdpa.double() - want).abs().max() + 1e-3  # as close as SDPA's


def test_a_bfloat16_model_decodes_as_its_float32_self_mostly(tiny):
    from swarm.decode.generate import LocalModel, generate

    path = tiny("llama2").path
    want = generate(LocalModel.load(path), [5, 17, 42, 99], 12, stop_at_eos=False).tokens
    got = generate(LocalModel.load(path, dtype="bfloat16"), [5, 17, 42, 99], 12, stop_at_eos=False).tokens
    assert got[:4] == want[:4]  # bfloat16 may part from float32 later (near-ties), not at once


def test_a_float32_cache_under_bfloat16_blocks(tiny):
    from peer.model import Checkpoint, StepLayout

    ckpt = Checkpoint(tiny("llama2").path)
    head = ckpt.load_head("float32")
    ref = ckpt.load_blocks(0, ckpt.config.num_hidden_layers, "float32")
    half = ckpt.load_blocks(0, ckpt.config.num_hidden_layers, "bfloat16")
    wide = ckpt.load_blocks(0, ckpt.config.num_hidden_layers, "bfloat16")
    wide.cache_dtype = torch.float32
    assert wide.new_cache(64).keys.dtype == torch.float32 and half.new_cache(64).keys.dtype == torch.bfloat16
    assert wide.bytes_per_token() == 2 * half.bytes_per_token()
    assert wide.view(0, 1).cache_dtype == torch.float32
    ids = torch.tensor([5, 17, 42, 99, 7, 3, 61, 8, 23, 11, 4, 90, 33])
    steps = [StepLayout(0, 6), StepLayout(6, 1), StepLayout(7, 1), StepLayout(8, 4, parents=(-1, 0, -1, 2)),
             StepLayout(9, 1, compact=(8, (0, 1)))]
    caches = {m: m.new_cache(64) for m in (ref, half, wide)}
    at = 0
    for layout in steps:
        x = head.embed(ids[at:at + layout.n])
        at += layout.n
        want, got_half, got_wide = (m(x, caches[m], layout) for m in (ref, half, wide))
        assert got_wide.dtype == torch.bfloat16 and got_wide.shape == want.shape
        err_wide, err_half = ((g.float() - want).abs().max().item() for g in (got_wide, got_half))
        assert err_wide <= 1.5 * err_half + 1e-3, (layout, err_wide, err_half)


def test_a_cpu_draft_gets_a_float32_cache(tiny):
    from swarm.decode.drafter import load_draft

    path = tiny("llama2").path
    assert load_draft(path).blocks.cache_dtype == torch.float32  # bfloat16 by default on a CPU
    assert load_draft(path, dtype="float32").blocks.cache_dtype is None
