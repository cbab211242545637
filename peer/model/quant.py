"""Weight-only int8 quantization of linear layers (`--quant int8`): half the memory of bf16 weights.

`Int8Linear` keeps an int8 weight [out, in] and one scale per output channel (symmetric absmax,
round to nearest: w ~ q * scale, |q| <= 127) in the activation dtype, plus the bias as it was.
Activations stay in the model's dtype; only the weights are stored narrow. Its forward:

- on a CPU with bfloat16 activations: `torch._weight_int8pack_mm` (a fused int8 x bf16 kernel, faster
  than the bf16 matmul it replaces at decode sizes), once a probe showed it exists and agrees with
  the dequantized matmul;
- elsewhere (CUDA, CPU float32/float16): `F.linear(x, q.to(x.dtype)) * scale` (the gpt-fast form;
  on CUDA a compiler fuses it). On a CPU the int8pack kernel is several times slower than this for
  float32 and float16 activations in this torch (2.13; ~3x at one token, up to ~30x at 32 tokens, as
  measured on a 2-core AVX-512 machine), so it is not used there.

`quantize_linears(module, names)` turns the named `nn.Linear`s of a module into `Int8Linear`s (for
loading, on the meta device: the structure only, the checkpoint fills it); `quantize_weight` is the
quantizer itself (`Checkpoint.load_blocks` / `load_head` call it block by block while reading).
Knows tensors and `nn.Linear`; nothing of checkpoints, blocks, caches or the network.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

QUANTS = ("none", "int8")


def check_quant(quant: str | None) -> str:
    """`quant` as one of QUANTS ("none" for None); ValueError (one line) otherwise."""
    quant = quant or "none"
    if quant not in QUANTS:
        raise ValueError(f"unknown quantization {quant!r}; use one of {', '.join(QUANTS)}")
    return quant


def quantize_weight(weight: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A float weight [out, in] -> (int8 [out, in], scale [out] in `dtype`): w ~ q * scale per row.

    The scale is rounded to `dtype` first and q computed against that rounded scale, so q * scale is the
    closest the stored pair can come. An all-zero row gets scale 1 (and zeros)."""
    w = weight.detach().float()
    absmax = w.abs().amax(dim=1)
    scale = torch.where(absmax > 0, absmax / 127.0, torch.ones_like(absmax)).to(dtype)
    q = torch.round(w / scale.float()[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The float32 weight an (int8, scale) pair stands for."""
    return q.float() * scale.float()[:, None]


class Int8Linear(nn.Module):
    """y = x @ (q * scale)^T + bias, with q int8 [out, in] and scale [out]: an `nn.Linear` in a quarter of
    the bytes of float32 (half of bfloat16)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dtype=torch.float32, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.ones(out_features, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) \
            if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, dtype: torch.dtype | None = None) -> "Int8Linear":
        """Quantize a float `nn.Linear` (scale and bias in `dtype`, default: the linear's own)."""
        dtype = dtype or linear.weight.dtype
        out = cls(linear.in_features, linear.out_features, linear.bias is not None, dtype, linear.weight.device)
        if linear.weight.device.type != "meta":
            out.weight, out.scale = quantize_weight(linear.weight, dtype)
            if linear.bias is not None:
                out.bias = nn.Parameter(linear.bias.detach().to(dtype), requires_grad=False)
        return out

    @property
    def dtype(self) -> torch.dtype:
        """The activation dtype this layer computes in (its scales'), never int8."""
        return self.scale.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        scale = self.scale if self.scale.dtype == x.dtype else self.scale.to(x.dtype)
        if flat.device.type == "cpu" and _int8pack_works(x.dtype):
            y = torch._weight_int8pack_mm(flat.contiguous(), self.weight, scale)
        else:
            y = F.linear(flat, self.weight.to(x.dtype)) * scale
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"


CPU_INT8PACK_DTYPES = (torch.bfloat16,)  # where torch's CPU kernel is fast (float32 / float16: see the docstring)


@functools.cache
def _int8pack_works(dtype: torch.dtype) -> bool:
    """Whether `torch._weight_int8pack_mm` exists here, is fast for `dtype` and agrees with the dequantized matmul
    (probed once per dtype on a small random problem)."""
    if dtype not in CPU_INT8PACK_DTYPES or not hasattr(torch, "_weight_int8pack_mm"):
        return False
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(-127, 128, (48, 64), generator=gen, dtype=torch.int8)
    scale = (torch.rand(48, generator=gen) / 100 + 1e-3).to(dtype)
    x = torch.randn(3, 64, generator=gen).to(dtype)
    try:
        with torch.inference_mode():
            got = torch._weight_int8pack_mm(x, q, scale).float()
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    want = x.float() @ dequantize(q, scale).T
    return bool(torch.allclose(got, want, rtol=2e-2, atol=2e-2 * float(want.abs().max())))


def quantize_linears(module: nn.Module, names: list[str] | None = None, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace the `nn.Linear`s of `module` (those named, dotted paths, or every one) by `Int8Linear`s, in place.

    On the meta device this builds the structure a checkpoint is then loaded into. Returns `module`."""
    targets = names if names is not None else [n for n, m in module.named_modules() if isinstance(m, nn.Linear)]
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        linear = getattr(parent, child)
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{name} is a {type(linear).__name__}, not an nn.Linear")
        setattr(parent, child, Int8Linear.from_linear(linear, dtype))
    return module


def state_bytes(module: nn.Module) -> int:
    """Bytes of a module's weights (its state dict, shared tensors once): what it holds in memory."""
    seen, total = set(), 0
    for t in module.state_dict(keep_vars=True).values():
        key = (t.device.type, t.data_ptr()) if t.device.type != "meta" else id(t)
        if key not in seen:
            seen.add(key)
            total += t.nelement() * t.element_size()
    return total
