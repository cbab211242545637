"""Greedy tokens from a float32 LM head at about the cost of a bfloat16 one, with the float32 answer.

Greedy decoding and greedy verification need only the argmax of each row's logits, not the logits. On a CPU
with fast bfloat16 matmuls (SmolLM2's 49152 x 576 head on this project's CPU: float32 11 ms for one row and
24 ms for nine, bfloat16 7.5-9 ms for either, 3-4.5 packed for oneDNN: `packed`; on the Intel build machine with
AMX, float32 7.8 / 31 ms for 1 / 9 rows, certified 5.6 / 8.3 all told), `CertifiedArgmax` computes every logit in bfloat16 and bounds
how far each can be from the float32 logit: the inputs and weights are rounded to bfloat16 (relative error
u = 2^-8 each), the bfloat16 result too (u of itself), and both sides accumulate in float32 (about d * 2^-24
of the sum of |x_i w_i|); by Cauchy-Schwarz that sum is at most |x| |w_j|, so logit j lies within

    B_j = (2u + u^2 + 2(d + 2) 2^-24) |x| |w_j| + 1.01 u |low_j|

of its bfloat16 value. Every token whose upper bound reaches the largest lower bound is a candidate (the
float32 argmax is certainly among them; found in two passes over the row, its max and a comparison with one
bound for the whole row, then the exact bounds of the few near the top: on SmolLM2's logits about 3-11 of
49152), and their float32 logits decide, one small matrix-vector product per row. The answer is the float32 head's
argmax up to float32's own rounding, the same tolerance as a float32 verification step of several rows
against a 1-row step (a different BLAS kernel); ties go to the smaller id, as `torch.argmax`'s do.

Used only where it pays: a float32 head on a CPU, large enough (`MIN_WEIGHTS`), whose bfloat16 copy is not too
large (`MAX_COPY_BYTES`), and where a one-off timing finds bfloat16 at most 0.8x float32 (CPUs without
bfloat16 instructions emulate it and lose). Knows a weight matrix and hidden rows; nothing of models, sessions
or peers.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from .packed import packed_product

U = 2.0 ** -8  # bfloat16's unit roundoff
U32 = 2.0 ** -24  # float32's
MIN_WEIGHTS = 1 << 22  # smaller heads: not worth a timing or a copy
MAX_COPY_BYTES = 512 << 20  # the bfloat16 copy's bytes at most (a 128k x 2048 head's)
PAYS_BELOW = 0.8  # bfloat16 must take at most this share of float32's time


class CertifiedArgmax:
    """The exact argmax of `x @ weight.T` per row, from a bfloat16 copy of `weight` and a bound."""

    def __init__(self, weight: torch.Tensor):
        if weight.dtype != torch.float32 or weight.dim() != 2:
            raise ValueError(f"a certified argmax needs a float32 [vocab, d] weight, got {weight.dtype} {tuple(weight.shape)}")
        self.weight = weight
        # x -> x @ bfloat16(weight).T, in oneDNN's packed layout where that works (the only copy kept)
        self._product = packed_product(weight.detach().to(torch.bfloat16))
        self.norms = weight.detach().norm(dim=1)  # |w_j|, float32
        self.max_norm = float(self.norms.max())
        d = weight.shape[1]
        self.c_norm = 1.05 * (2 * U + U * U + 2 * (d + 2) * U32)  # (5 % slack over the bound's terms)
        self.c_self = 1.01 * U
        self.candidates = self.rows = 0  # counters: candidates examined in float32, rows answered

    @torch.inference_mode()
    def low(self, x: torch.Tensor) -> torch.Tensor:
        """The bfloat16 logits [rows, vocab] of x [rows, d]."""
        return self._product(x.to(torch.bfloat16))

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [rows, d] float32 (already normed): the argmax ids [rows] of x @ weight.T."""
        low = self.low(x)  # kept in bfloat16: a float copy of it costs ~25 %
        a = self.c_norm * x.norm(dim=1)  # B_j = a |w_j| + c_self |low_j|
        top = low.max(dim=1).values.float()
        # big (c = c_self) >= B_j of every token with |low_j| <= |top| + 2 big, the top token's and those within
        # 2 big of it: the top token's logit is >= top - big, so the argmax has low_j + B_j >= top - big, and a
        # token below top - 2 big cannot: low_j >= 0 gives B_j <= (1 - 2c) big; low_j < 0 gives low_j + B_j <=
        # (1 - c) low_j + a |w|max < (1 - c)(top - 2 big) + a |w|max <= top - big. The threshold is lowered by 2^-7
        # of itself before rounding to bfloat16 (which moves it by 2^-9 at most).
        big = (a * self.max_norm + self.c_self * top.abs()) / (1 - 2 * self.c_self)
        floor = top - 2 * big
        maybe = low >= (floor - floor.abs() * 2.0 ** -7).to(torch.bfloat16)[:, None]
        out = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
        for r in range(x.shape[0]):
            ids = maybe[r].nonzero()[:, 0]
            if len(ids) > 1:  # the exact bounds of the few left
                near = low[r, ids].float()
                bound = a[r] * self.norms[ids] + self.c_self * near.abs()
                ids = ids[near + bound >= (near - bound).max()]
            self.candidates += len(ids)
            out[r] = ids[0] if len(ids) == 1 else ids[F.linear(x[r:r + 1], self.weight[ids])[0].argmax()]
        self.rows += x.shape[0]
        return out


def copy_bytes(vocab: int, hidden: int, dtype: torch.dtype) -> int:
    """Bytes of the bfloat16 copy a certified argmax keeps of a [vocab, hidden] head in `dtype` (0: it keeps none:
    not float32, smaller than MIN_WEIGHTS, or a copy larger than MAX_COPY_BYTES)."""
    weights = vocab * hidden
    return 2 * weights if dtype == torch.float32 and MIN_WEIGHTS <= weights and 2 * weights <= MAX_COPY_BYTES else 0


def worth_it(weight: torch.Tensor, reps: int = 5) -> bool:
    """Whether a certified argmax pays for `weight` here: float32 on a CPU, at least MIN_WEIGHTS weights, a copy
    of at most MAX_COPY_BYTES, and bfloat16 at most PAYS_BELOW of float32's time on 1 and on 8 rows (medians).
    The whole matrix is timed (about 0.3 s once for SmolLM2's head): a slice small enough to stay in a cache
    hides what decides it, a large head's product is bound by memory (an 8192-row slice on the Intel build
    machine: bfloat16 0.72-0.84x float32 at 1-3 rows; the whole head: 0.41-0.45x, and 0.11x at 8 rows)."""
    if weight.device.type != "cpu" or weight.dim() != 2 or not copy_bytes(*weight.shape, weight.dtype):
        return False
    high = weight.detach()
    low = packed_product(high.to(torch.bfloat16))  # as `CertifiedArgmax.low` runs it
    with torch.inference_mode():
        for rows in (1, 8):
            x = torch.randn(rows, weight.shape[1])
            if median_seconds(lambda v: low(v.to(torch.bfloat16)).float(), x, reps) > PAYS_BELOW * \
                    median_seconds(lambda v: F.linear(v, high), x, reps):
                return False
    return True


def median_seconds(fn, x: torch.Tensor, reps: int = 5) -> float:
    """The median time of `reps` calls fn(x), after one call to warm up (one-off timings that pick a kernel)."""
    times = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return sorted(times[1:])[reps // 2]
