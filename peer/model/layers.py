"""The transformer block of the Llama family: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU.

Numerics follow the reference implementation (norms and rotary tables in fp32, cast back to the
activation dtype) so that our logits match `transformers`. q/k/v and gate/up projections are fused
into one matmul each.

A block runs the new rows of one or several sessions at once (`Segment`: where each session's rows
sit in the batch, and its cache): norms, rotary and every linear layer on all rows together (the
weights are read once per batch), attention per session against its own cache (SDPA; one query row in
half precision on a CPU: `one_query_attention`, SDPA being slow there; a float32 cache under half-precision
activations, a CPU draft's: float32 SDPA, faster still; `Attention.exact`: in float64, every row as if alone,
`invariant.exact_attention`). `forward_static` runs
one session's rows at static shapes (a step padded to a size bucket, attention over the whole allocated
cache under a mask): what `graphs.StaticSteps` captures as a CUDA graph. Knows nothing about
checkpoints files, sessions' owners or the network.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .cache import KVCache
from .config import ModelConfig, RopeConfig
from .invariant import exact_attention


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope.type == "linear":
        return inv_freq / rope.factor
    if rope.type == "llama3":
        # Long wavelengths are slowed down by `factor`, short ones kept, the band between interpolated.
        old_len = rope.original_max_position_embeddings
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / rope.low_freq_factor, inv_freq / rope.factor, inv_freq)
        smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        blended = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= old_len / rope.high_freq_factor) & (wavelen <= old_len / rope.low_freq_factor)
        return torch.where(medium, blended, scaled)
    return inv_freq


def rope_tables(inv_freq: torch.Tensor, positions: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [n, head_dim] for integer `positions` [n], computed in fp32."""
    freqs = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


HALF = (torch.bfloat16, torch.float16)


def one_query_attention(q, keys, values, mask) -> torch.Tensor:
    """Attention of one query row per head, q [1, heads, 1, d], against keys/values [1, kv heads, L, d] (grouped:
    query head h reads kv head h // (heads / kv heads), as SDPA's enable_gqa), under `mask` [1, L] (True = may
    attend) or None: two matmuls and a float32 softmax. For half precision on a CPU, where torch's SDPA kernel
    is slow for a single query (SmolLM2's 9 heads, bfloat16, one thread: 0.23 ms at 200 keys and 1.2 ms at 1000,
    against 0.08 / 0.13 this way): every token a draft proposes, and a plain bfloat16 step."""
    heads, kv, d = q.shape[1], keys.shape[1], q.shape[-1]
    scores = torch.matmul(q.reshape(1, kv, heads // kv, d), keys.transpose(-1, -2)).float() / math.sqrt(d)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1).to(values.dtype)
    return torch.matmul(weights, values).reshape(1, heads, 1, d)


@dataclass(frozen=True, slots=True)
class Segment:
    """One session's rows `[offset, offset + n)` of a batch, and where they go: its cache, from `start`.
    `masks` maps each sliding window to the boolean mask of those rows (None: no mask needed)."""

    offset: int
    n: int
    cache: KVCache
    start: int
    masks: dict


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, window: int | None):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.window = window
        self.exact = False  # attention in float64, every row as if alone (`invariant.exact_attention`)
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, q_dim + 2 * kv_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(q_dim, cfg.hidden_size, bias=cfg.o_bias)

    def _qkv(self, x, cos, sin):
        """Queries, keys, values [1, heads, rows, head_dim] of x [1, rows, hidden], rotated to their positions."""
        n = x.shape[1]
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        q, k, v = self.qkv_proj(x).split([q_dim, kv_dim, kv_dim], dim=-1)
        q = q.view(1, n, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(1, n, self.n_kv, self.head_dim).transpose(1, 2)
        v = v.view(1, n, self.n_kv, self.head_dim).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(self, x, cos, sin, segments: list[Segment], layer: int) -> torch.Tensor:
        """x [1, rows, hidden]: every segment's rows; cos, sin [rows, head_dim] at their positions."""
        n, q_dim = x.shape[1], self.n_heads * self.head_dim
        q, k, v = self._qkv(x, cos, sin)
        if len(segments) == 1:  # one session: the whole tensors, exactly as an unbatched step
            out = self._attend(q, k, v, segments[0], layer)
        else:
            sizes = [s.n for s in segments]
            parts = zip(q.split(sizes, dim=2), k.split(sizes, dim=2), v.split(sizes, dim=2), segments)
            out = torch.cat([self._attend(*part, layer) for part in parts], dim=2)
        return self.o_proj(out.transpose(1, 2).reshape(1, n, q_dim))

    def _attend(self, q, k, v, seg: Segment, layer: int) -> torch.Tensor:
        """One session's queries against its cache (after writing its new keys and values there)."""
        keys, values = seg.cache.write(layer, seg.start, k, v)
        mask = seg.masks[self.window]
        if self.exact:
            return exact_attention(q, keys, values, mask)
        if q.shape[2] == 1 and q.dtype in HALF and keys.dtype == q.dtype and q.device.type == "cpu":
            return one_query_attention(q, keys, values, mask)
        causal = mask is None and seg.n > 1 and seg.start == 0  # a plain prefill
        # (a float32 cache under half-precision activations, `BlockRange.cache_dtype`: the queries are widened too)
        return F.scaled_dot_product_attention(q.to(keys.dtype), keys, values, attn_mask=None if causal else mask,
                                              is_causal=causal, enable_gqa=self.n_kv != self.n_heads).to(q.dtype)

    def forward_static(self, x, cos, sin, cache: KVCache, layer: int, slots, mask) -> torch.Tensor:
        """One session's step at static shapes (what a CUDA graph captures): the rows' keys and values go to
        cache slots `slots` [rows] (`index_copy_`), the queries attend to every allocated slot of the cache
        under `mask` [rows, allocated slots] (True = may attend). No shape or branch depends on the step."""
        n, q_dim = x.shape[1], self.n_heads * self.head_dim
        q, k, v = self._qkv(x, cos, sin)
        keys, values = cache.keys[layer], cache.values[layer]
        keys.index_copy_(2, slots, k)
        values.index_copy_(2, slots, v)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=self.n_kv != self.n_heads)
        return self.o_proj(out.transpose(1, 2).reshape(1, n, q_dim))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, cfg.sliding_windows[layer_index])
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, segments: list[Segment], layer: int) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, segments, layer)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_static(self, x, cos, sin, cache: KVCache, layer: int, slots, masks: dict) -> torch.Tensor:
        """`forward` for one session at static shapes (`Attention.forward_static`); masks maps windows to masks."""
        x = x + self.self_attn.forward_static(self.input_layernorm(x), cos, sin, cache, layer, slots,
                                              masks[self.self_attn.window])
        return x + self.mlp(self.post_attention_layernorm(x))
