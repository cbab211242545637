"""Linear layers on a CPU with their weights kept in oneDNN's packed layout (float32 and bfloat16).

A speculative round's step runs a few rows (2-17) through every linear layer. torch's `F.linear` on a CPU
runs such small matrices poorly in float32: on this project's CPU (one thread, SmolLM2's 576 x 3072 layer)
1 row 0.22 ms, 4 rows 0.51, 9 rows 0.94; the same weights reordered once into oneDNN's blocked layout
(`torch.ops.mkldnn._reorder_linear_weight`, what torch.compile's CPU backend does when it freezes weights)
and run by `torch.ops.mkldnn._linear_pointwise` take 0.17 / 0.20 / 0.39 ms: 2.4x on a verification step,
the same on a 1-row step. Results are float32, within float32 rounding of `F.linear`'s (a different
summation order; measured against float64: 2-8e-6 against 1-3e-6 on outputs of ~5). bfloat16 gains too
(SmolLM2's 49152-wide head, 1 / 9 rows: 6.5 / 9.5 ms -> 3.1 / 4.4; the 576 x 3072 layer on 1 row 0.15 ->
0.07 ms, also ahead of torch's int8 kernel's 0.10).

`PackedLinear` replaces an `nn.Linear` (no copy is kept: the packed tensor is the weight; `weight` unpacks
one on demand) and says how many bytes it holds (`held_bytes`: state dicts do not carry it). `pack_linears`
packs the named layers of a module where that works (`packing_works`: a CPU whose torch has oneDNN and passes
a small trial against `F.linear` in that dtype; `SPECSWARM_PACKED=0` turns it off); `packed_product` packs a
loose weight (the certified argmax's bfloat16 copy of a head, the draft's head slice). `make_invariant` has a layer
compute every row as if alone (`invariant`: calls of a probed row-invariant span of rows). Peers' blocks and a
client's local blocks are packed alike (`Checkpoint.load_blocks`), so `--local` and the swarm compute the
same way. Knows torch's oneDNN ops and `nn.Linear`; nothing of blocks, caches or models.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import invariant


PACKABLE = (torch.float32, torch.bfloat16)


@functools.cache
def packing_works(dtype: torch.dtype = torch.float32) -> bool:
    """Whether this torch can pack `dtype` (float32, bfloat16) linear weights for oneDNN and the packed product
    matches F.linear's (to that dtype's rounding)."""
    if dtype not in PACKABLE or os.environ.get("SPECSWARM_PACKED", "1") == "0" or not torch.backends.mkldnn.is_available():
        return False
    try:
        g = torch.Generator().manual_seed(0)
        weight, bias, x = (torch.randn(*shape, generator=g).to(dtype) for shape in ((24, 40), (24,), (3, 40)))
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        got = torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "").float()
        tol = 1e-4 if dtype == torch.float32 else 5e-2
        return bool(torch.allclose(got, F.linear(x, weight, bias).float(), atol=tol, rtol=tol))
    except (AttributeError, RuntimeError):
        return False


@functools.cache
def bfloat16_native() -> bool:
    """Whether this CPU has bfloat16 instructions (AMX-BF16 or AVX512-BF16, by /proc/cpuinfo's flags) and this torch
    packs bfloat16 weights for oneDNN: where bfloat16 blocks run fast (a CPU without them emulates it)."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return has_bfloat16_flags(cpuinfo) and packing_works(torch.bfloat16)


def has_bfloat16_flags(cpuinfo: str) -> bool:
    """Whether /proc/cpuinfo's text lists a bfloat16 instruction set (amx_bf16, avx512_bf16) among its flags."""
    return any(re.search(r"\b(amx_bf16|avx512_bf16)\b", line) for line in cpuinfo.splitlines()
               if line.startswith("flags"))


class PackedLinear(nn.Module):
    """An `nn.Linear` (float32 or bfloat16, CPU) whose weight lives in oneDNN's packed layout."""

    quant = "none"

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach()
        if weight.dtype not in PACKABLE or weight.device.type != "cpu":
            raise ValueError(f"only float32 and bfloat16 CPU weights are packed, got {weight.dtype} on {weight.device}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), None)
        self.bias = linear.bias
        self.held_bytes = weight.nelement() * weight.element_size()  # (not in the state dict: `quant.state_bytes`)
        self.rows = None  # an `invariant.RowPolicy`: every row computed as if alone (`make_invariant`)

    @property
    def weight(self) -> torch.Tensor:
        """The weight as a dense tensor (unpacked anew on every read: for inspection, not for the forward)."""
        return self.packed.to_dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).contiguous()
        y = self._product(flat) if self.rows is None else self.rows.apply(self._product, flat)
        return y.reshape(*x.shape[:-1], self.out_features)

    def _product(self, flat: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(flat, self.packed, self.bias, "none", [], "")

    def make_invariant(self) -> bool:
        """Compute every row as if alone from now on, where this kernel has a row-invariant span (probed once per
        shape, dtype and thread count: `invariant.row_policy`); returns whether it has."""
        key = ("packed", self.in_features, self.out_features, self.packed.dtype, self.bias is not None)
        self.rows = invariant.row_policy(key, self._product, self.in_features, self.packed.dtype)
        return self.rows is not None

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, packed"


def pack_linears(module: nn.Module, names: list[str]) -> int:
    """Replace each named float32 or bfloat16 CPU `nn.Linear` of `module` by a `PackedLinear` (where
    `packing_works` for its dtype); returns how many were packed."""
    count = 0
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        linear = getattr(parent, child)
        if type(linear) is nn.Linear and linear.weight.device.type == "cpu" and packing_works(linear.weight.dtype):
            setattr(parent, child, PackedLinear(linear))
            count += 1
    return count


def packed_product(weight: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """x -> x @ weight.T for a weight kept apart from any layer (a head's bfloat16 copy, a slice of it): packed
    where that works for its dtype on a CPU, else F.linear."""
    if weight.device.type == "cpu" and packing_works(weight.dtype):
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
        linear.weight = nn.Parameter(weight.detach().contiguous(), requires_grad=False)
        return PackedLinear(linear)
    return lambda x: F.linear(x, weight)
