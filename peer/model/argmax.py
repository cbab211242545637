"""Greedy tokens from a float32 LM head at about the cost of a bfloat16 one, with the float32 answer.

Greedy decoding and greedy verification need only the argmax of each row's logits, not the logits. On a CPU
with fast bfloat16 matmuls (SmolLM2's 49152 x 576 head on the AMD EPYC build machine: float32 11 ms for one row
and 24 ms for nine, bfloat16 7.5-9 ms for either, 3-4.5 packed for oneDNN: `packed`; on the Intel one with AMX,
`scripts/bench_head_rows.py`: float32 8.5 / 29.6 ms for 1 / 9 rows, this way 5.7 / 7.9), `CertifiedArgmax` computes every logit in
bfloat16 and bounds how far each can be from the float32 logit: the inputs and weights are rounded to bfloat16
(relative error u = 2^-8 each), the bfloat16 result too (u of itself), and both sides accumulate in float32
(about d * 2^-24 of the sum of |x_i w_i|); by Cauchy-Schwarz that sum is at most |x| |w_j|, so logit j lies within

    B_j = (2u + u^2 + 2(d + 2) 2^-24) |x| |w_j| + 1.01 u |low_j|

of its bfloat16 value. Every token whose upper bound reaches the largest lower bound is a candidate (the
float32 argmax is certainly among them; found in two passes over the rows, their max and a comparison with one
bound per row, then the exact bounds of the few near the top: on SmolLM2's logits about 3-11 of 49152), and
their float32 logits decide: each candidate's own dot product, all rows' at once, so a row's token does not
depend on the other rows of its call (no batch variance between a 1-token step and a verification step). The
answer is the float32 head's argmax up to float32's own rounding (a BLAS kernel sums in another order); ties go
to the smaller id, as `torch.argmax`'s do.

Used only where it pays: a float32 head on a CPU, large enough (`MIN_WEIGHTS`), whose bfloat16 copy is not too
large (`MAX_COPY_BYTES`), and where a one-off timing finds bfloat16 at most 0.8x float32 (CPUs without
bfloat16 instructions emulate it and lose), for 1 row and for several apart (`worth_it`). Knows a weight
matrix and hidden rows; nothing of models, sessions or peers.
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
        rows, ids = maybe.nonzero().unbind(1)  # (row, token) pairs left, row by row
        near = low[rows, ids].float()  # their exact bounds now
        bound = a[rows] * self.norms[ids] + self.c_self * near.abs()
        best_low = torch.full((x.shape[0],), -torch.inf, device=x.device).scatter_reduce(0, rows, near - bound, "amax")
        keep = near + bound >= best_low[rows]
        rows, ids = rows[keep], ids[keep]
        self.candidates += len(ids)
        self.rows += x.shape[0]
        # float32 decides among every row's candidates, each logit a dot product of its own (the same whatever
        # else the step holds: no batch variance between a 1-row step and a verification step); a tie goes to
        # the smaller id, as torch.argmax's does
        exact = (x[rows] * self.weight[ids]).sum(-1)
        best = torch.full((x.shape[0],), -torch.inf, device=x.device).scatter_reduce(0, rows, exact, "amax")
        win = exact == best[rows]
        return torch.full((x.shape[0],), len(self.weight), dtype=torch.long, device=x.device).scatter_reduce(
            0, rows[win], ids[win], "amin")


def copy_bytes(vocab: int, hidden: int, dtype: torch.dtype) -> int:
    """Bytes of the bfloat16 copy a certified argmax keeps of a [vocab, hidden] head in `dtype` (0: it keeps none:
    not float32, smaller than MIN_WEIGHTS, or a copy larger than MAX_COPY_BYTES)."""
    weights = vocab * hidden
    return 2 * weights if dtype == torch.float32 and MIN_WEIGHTS <= weights and 2 * weights <= MAX_COPY_BYTES else 0


def worth_it(weight: torch.Tensor, reps: int = 7) -> tuple[bool, bool]:
    """Whether a certified argmax pays for `weight` here, (for 1 row, for several rows): float32 on a CPU, at least
    MIN_WEIGHTS weights, a copy of at most MAX_COPY_BYTES, and bfloat16 at most PAYS_BELOW of float32's time on 1
    row, and on 8 rows for the several (medians, the two taking turns so that load hits them alike). The two are
    decided apart: 1 row is the close call, 8 rows is not. The whole matrix is timed (about 0.4 s once for
    SmolLM2's head): a slice small enough to stay in a cache hides what decides it, a large head's product being
    bound by memory (`python scripts/bench_bf16_rows.py` on the Intel build machine: bfloat16 / float32 at 1 row
    0.77x for an 8192-row slice, 0.59x for the whole head; 8 rows 0.27x / 0.18x)."""
    if weight.device.type != "cpu" or weight.dim() != 2 or not copy_bytes(*weight.shape, weight.dtype):
        return False, False
    high = weight.detach()
    low = packed_product(high.to(torch.bfloat16))  # as `CertifiedArgmax.low` runs it
    pays = []
    with torch.inference_mode():
        for rows in (1, 8):
            x = torch.randn(rows, weight.shape[1])
            fast, slow = paired_medians(lambda v: low(v.to(torch.bfloat16)).float(), lambda v: F.linear(v, high), x, reps)
            pays.append(fast <= PAYS_BELOW * slow)
    return pays[0], pays[1]


def paired_medians(fn, gn, x: torch.Tensor, reps: int) -> tuple[float, float]:
    """The median seconds of fn(x) and of gn(x) over `reps` calls each, taking turns, after one call each to warm up."""
    times: tuple[list, list] = ([], [])
    for i in range(reps + 1):
        for f, ts in ((fn, times[0]), (gn, times[1])):
            t0 = time.perf_counter()
            f(x)
            if i:
                ts.append(time.perf_counter() - t0)
    return sorted(times[0])[reps // 2], sorted(times[1])[reps // 2]


def median_seconds(fn, x: torch.Tensor, reps: int = 5) -> float:
    """The median time of `reps` calls fn(x), after one call to warm up (one-off timings that pick a kernel)."""
    times = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return sorted(times[1:])[reps // 2]
