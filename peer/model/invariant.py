"""Rows computed as if each were alone (batch invariance) on a CPU: a verification step of n tokens gives, bit for
bit, what n 1-token steps give, and a session's rows do not depend on the other sessions batched with them.

Why: greedy speculative decoding is exact when the target's verdict on each drafted token is the one plain
decoding reaches. A step of several rows rounds differently from a 1-row step in two places (`python
scripts/bench_bf16_rows.py`, SmolLM2's blocks 0:15 on the Intel build machine: 0 of 9 rows identical, float32
and bfloat16 alike): the linear layers (oneDNN picks its kernel, and with it the summation order, by the number
of rows) and the attention (SDPA's reduction order depends on the rows and keys beside a row). Float32's
differences are in the last bits and rarely move an argmax; bfloat16's do (7 of 10 greedy outputs differed from
plain greedy). The two remedies here:

- linears: `row_policy` probes once per weight shape, dtype and thread count which row counts [lo, hi] give
  every row of a call exactly as a call of `lo` rows gives it (that Intel machine, oneDNN's packed layout:
  bfloat16 1-32 rows; float32 2-32, a single row taking a kernel of its own in one layer); `RowPolicy.apply`
  then runs a call in chunks of lo..hi rows, a shorter one padded with zero rows. Where a layer's kernel
  has no useful span (`probe` says None), its blocks stay as they were (`BlockRange.make_invariant`; a peer warns).
- attention: `exact_attention` computes in float64 from the cache's values; its reduction-order differences
  (~1e-16 relative) reach the float32 / bfloat16 result only where a value lies that close to a rounding
  boundary of the narrower type (a 2^-24 / 2^-8 step): ~1e-9 / ~1e-14 of the elements. Not bit-exact by
  construction, then, but far rarer than the differences it replaces (every row identical in the tests, the
  benchmark and the WAN runs).

Cost (the same script, ms for blocks 0:15 at 1 / 9 / 17 rows after 150 positions, one thread, Intel machine):
bfloat16 17.9 / 18.3 / 20.6 as before, 18.0 / 21.0 / 24.8 as if alone; float32 24.0 / 30.5 / 36.3 and 26.7 / 33.7
/ 40.3 (not its default: `Checkpoint.load_blocks`). Knows torch tensors and callables on rows; nothing of blocks,
caches, sessions or models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

PROBE_ROWS = 32  # row counts probed: 1 .. PROBE_ROWS (a verification step's, a tree's; prefill runs in chunks)
MIN_SPAN = 8  # a policy must allow at least this many rows a call to be worth it
SCORES_AT_ONCE = 1 << 22  # exact_attention's float64 scores per matmul at most (32 MiB: a long prefill runs in chunks)


@dataclass(frozen=True, slots=True)
class RowPolicy:
    """Calls of lo..hi rows give every row as a call of `lo` rows does (a row-invariant span of a kernel)."""

    lo: int
    hi: int

    def apply(self, fn: Callable[[torch.Tensor], torch.Tensor], flat: torch.Tensor) -> torch.Tensor:
        """fn(flat) for flat [rows, in], each row computed as in a call of lo..hi rows: shorter calls padded with
        zero rows (dropped), longer ones split into nearly equal chunks."""
        m = flat.shape[0]
        if self.lo <= m <= self.hi:
            return fn(flat)
        if m < self.lo:
            return fn(torch.cat([flat, flat.new_zeros(self.lo - m, flat.shape[1])]))[:m]
        chunks = -(-m // self.hi)
        sizes = [m // chunks + (i < m % chunks) for i in range(chunks)]  # each >= lo: hi >= MIN_SPAN > 2 lo
        return torch.cat([fn(part) for part in flat.split(sizes)])


def probe(fn: Callable[[torch.Tensor], torch.Tensor], in_features: int, dtype: torch.dtype,
          max_rows: int = PROBE_ROWS) -> RowPolicy | None:
    """The widest row-invariant span of `fn` (rows [m, in_features] of `dtype` in, rows out), starting at 1 row or
    else at 2 (random rows, each compared bit for bit with its value in a call of `lo` rows); None when neither
    reaches MIN_SPAN rows."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(max_rows + 2, in_features, generator=g).to(dtype)
    best = None
    with torch.inference_mode():
        for lo in (1, 2):
            ref = torch.cat([fn(x[i:i + lo])[:1] for i in range(max_rows)])
            hi = lo - 1
            for m in range(lo, max_rows + 1):
                if not torch.equal(fn(x[:m]), ref[:m]):
                    break
                hi = m
            if hi >= MIN_SPAN and (best is None or hi > best.hi):
                best = RowPolicy(lo, hi)
            if best is not None and best.hi == max_rows:
                break
    return best


_POLICIES: dict[tuple, RowPolicy | None] = {}


def row_policy(key: tuple, fn: Callable[[torch.Tensor], torch.Tensor], in_features: int,
               dtype: torch.dtype) -> RowPolicy | None:
    """`probe`'s answer for a kernel, once per process for `key` (what picks the kernel: the weight's shape, dtype,
    layout) and torch's thread count."""
    key = (*key, torch.get_num_threads())
    if key not in _POLICIES:
        _POLICIES[key] = probe(fn, in_features, dtype)
    return _POLICIES[key]


def exact_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Attention of q [1, heads, n, d] against keys/values [1, kv heads, L, d] (grouped as SDPA's enable_gqa) in
    float64, returned in q's dtype. `mask` [n, L] (or broadcastable; True = may attend), or None: causal, row i
    seeing keys up to L - n + i (a 1-token step: every key)."""
    heads, n, d = q.shape[1], q.shape[2], q.shape[3]
    kv, length = keys.shape[1], keys.shape[2]
    group = heads // kv
    if mask is None and n > 1:
        mask = torch.ones(n, length, dtype=torch.bool, device=q.device).tril_(length - n)
    mask = mask.reshape(n, length) if mask is not None else None
    kt, v64 = keys.double().transpose(-1, -2), values.double()  # [1, kv, d, L], [1, kv, L, d]
    q64 = q.double().reshape(1, kv, group, n, d)
    out, chunk = [], max(1, SCORES_AT_ONCE // (heads * length))
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        rows = b - a
        # the group's query heads stacked as rows of one matmul against their kv head (no copies of the keys)
        scores = torch.matmul(q64[:, :, :, a:b].reshape(1, kv, group * rows, d), kt).mul_(1.0 / math.sqrt(d))
        if mask is not None:
            scores = scores.view(1, kv, group, rows, length).masked_fill_(~mask[a:b], float("-inf"))
        weights = torch.softmax(scores.view(1, kv, group * rows, length), dim=-1)
        out.append(torch.matmul(weights, v64).view(1, kv, group, rows, d))
    result = out[0] if len(out) == 1 else torch.cat(out, dim=3)
    return result.reshape(1, heads, n, d).to(q.dtype)
