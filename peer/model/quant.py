"""Weight-only quantization of linear layers: `--quant int8` (half the memory of bf16 weights) and
`--quant nf4` (4-bit NormalFloat, about 0.27 of bf16's).

`Int8Linear` keeps an int8 weight [out, in] and one scale per output channel (symmetric absmax,
round to nearest: w ~ q * scale, |q| <= 127) in the activation dtype, plus the bias as it was.
Activations stay in the model's dtype; only the weights are stored narrow. Its forward:

- on a CPU with bfloat16 activations: `torch._weight_int8pack_mm` (a fused int8 x bf16 kernel, faster
  than the bf16 matmul it replaces at decode sizes), once a probe showed it exists and agrees with
  the dequantized matmul;
- on CUDA: the same kernel where this torch has it for CUDA (2.9 and later) and a timing on the device (once
  per dtype, before any graph is captured: the first int8 step's warm-up runs it) finds it faster than
  dequantizing; not measured on a GPU yet;
- elsewhere (CPU float32/float16, CUDA without it): `F.linear(x, q.to(x.dtype)) * scale` (the gpt-fast
  form; a compiler would fuse it). On a CPU the int8pack kernel is several times slower than this for
  float32 and float16 activations in this torch (2.13; ~3x at one token, up to ~30x at 32 tokens, as
  measured on a 2-core AVX-512 machine), so it is not used there.

`Nf4Linear` (QLoRA's NormalFloat4, our own code) keeps a 4-bit code per weight, an index into `NF4`
(16 values: quantiles of a standard normal scaled to [-1, 1], with an exact 0), two codes per uint8
byte (element 2j in the low nibble, 2j + 1 in the high one): `weight` is uint8 [out, in / 2]; and one
absmax scale per group of `GROUP` (64) consecutive inputs of each output row, in the activation dtype:
`scale` [out, in / 64]. w ~ NF4[code] * scale, the code the nearest value to w / scale. No double
quantization of the scales (they cost 2 bytes per 64 weights in bf16: 0.53 bytes a weight in all).
in_features must be a multiple of 64 (ValueError naming the layer's shape otherwise). Its forward
dequantizes the whole weight to x's dtype (a 256-entry table of byte -> two values, times the scales)
and runs `F.linear`, on a CPU and on CUDA alike: simple and exact to the stored values, but each call
writes and reads a full-size float weight (2 bytes a weight in bf16) beside the matmul, so it is slower
than bf16 at decode sizes and its peak memory holds one layer's float weight; a fused 4-bit kernel
would avoid both (not done).

`quantize_linears(module, names, dtype, quant)` turns the named `nn.Linear`s of a module into
`Int8Linear`s or `Nf4Linear`s (for loading, on the meta device: the structure only, the checkpoint fills
it); `quantize_weight` / `quantize_nf4` are the quantizers themselves (`QUANTIZERS[quant]`; the
checkpoint calls them block by block while reading).
Knows tensors and `nn.Linear`; nothing of checkpoints, blocks, caches or the network.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

QUANTS = ("none", "int8", "nf4")
GROUP = 64  # nf4: inputs per absmax scale


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


def _nf4_table() -> torch.Tensor:
    """The 16 NormalFloat4 values, ascending: 8 positive and 7 negative quantiles of N(0, 1), evenly spaced in
    probability from 1 - (1/30 + 1/32) / 2 to 1/2 (the QLoRA construction: asymmetric, so 0 is exact), and 0;
    divided by the largest, so they span [-1, 1]."""
    top = 1 - 0.5 * (1 / 30 + 1 / 32)
    pos = torch.special.ndtri(torch.linspace(top, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(top, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    return (values / values.max()).float()


NF4 = _nf4_table()
NF4_ZERO = int((NF4 == 0).nonzero())  # the code of 0 (7)
_NF4_MIDPOINTS = (NF4[1:] + NF4[:-1]) / 2  # code i covers (mid[i-1], mid[i]]


def check_nf4_shape(out_features: int, in_features: int) -> None:
    """ValueError unless a weight [out, in] splits into nf4 groups (in_features a multiple of GROUP)."""
    if in_features % GROUP or in_features <= 0:
        raise ValueError(f"nf4 quantizes groups of {GROUP} inputs: a linear layer with weight [{out_features}, "
                         f"{in_features}] has in_features {in_features}, not a multiple of {GROUP}")


def quantize_nf4(weight: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A float weight [out, in] -> (packed codes uint8 [out, in / 2], scale [out, in / 64] in `dtype`).

    Each group of 64 inputs of a row gets scale = its absmax (rounded to `dtype` first; an all-zero group
    gets 1); each weight the code of the NF4 value nearest to w / scale. Rows are done in chunks, so the
    float temporaries stay small whatever the layer's size."""
    out_features, in_features = weight.shape
    check_nf4_shape(out_features, in_features)
    groups = in_features // GROUP
    mids = _NF4_MIDPOINTS.to(weight.device)
    packed = torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=weight.device)
    scale = torch.empty(out_features, groups, dtype=dtype, device=weight.device)
    step = max(1, (1 << 22) // in_features)
    for r in range(0, out_features, step):
        w = weight[r:r + step].detach().float().reshape(-1, groups, GROUP)
        absmax = w.abs().amax(dim=-1)
        s = torch.where(absmax > 0, absmax, torch.ones_like(absmax)).to(dtype)
        codes = torch.bucketize(w / s.float()[..., None], mids).to(torch.uint8).reshape(len(w), in_features)
        packed[r:r + step] = codes[:, 0::2] | (codes[:, 1::2] << 4)
        scale[r:r + step] = s
    return packed, scale


@functools.cache
def _nf4_pairs(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[256, 2]: the two NF4 values a packed byte stands for (low nibble first), in `dtype` on `device`."""
    byte = torch.arange(256)
    return torch.stack([NF4[byte & 15], NF4[byte >> 4]], dim=1).to(dtype=dtype, device=device)


def dequantize_nf4(packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight [out, in] in `dtype` a (packed codes, scale) pair stands for: NF4[code] * scale, each rounded
    to `dtype` (float32: exact to the stored values)."""
    out_features, in_features = packed.shape[0], 2 * packed.shape[1]
    values = _nf4_pairs(dtype, packed.device).index_select(0, packed.reshape(-1).to(torch.int32))
    values = values.view(out_features, in_features // GROUP, GROUP)
    return values.mul_(scale.to(dtype)[..., None]).view(out_features, in_features)


class _QuantLinear(nn.Module):
    """What Int8Linear and Nf4Linear share: the bias, the activation dtype, building from an `nn.Linear`."""

    quant = "none"

    def _init(self, in_features: int, out_features: int, bias: bool, dtype, device) -> None:
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) \
            if bias else None

    @staticmethod
    def quantizer(weight: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    @classmethod
    def from_linear(cls, linear: nn.Linear, dtype: torch.dtype | None = None):
        """Quantize a float `nn.Linear` (scales and bias in `dtype`, default: the linear's own)."""
        dtype = dtype or linear.weight.dtype
        out = cls(linear.in_features, linear.out_features, linear.bias is not None, dtype, linear.weight.device)
        if linear.weight.device.type != "meta":
            out.weight, out.scale = cls.quantizer(linear.weight, dtype)
            if linear.bias is not None:
                out.bias = nn.Parameter(linear.bias.detach().to(dtype), requires_grad=False)
        return out

    @property
    def dtype(self) -> torch.dtype:
        """The activation dtype this layer computes in (its scales'), never int8 or uint8."""
        return self.scale.dtype

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{self.quant}")


class Int8Linear(_QuantLinear):
    """y = x @ (q * scale)^T + bias, with q int8 [out, in] and scale [out]: an `nn.Linear` in a quarter of
    the bytes of float32 (half of bfloat16)."""

    quant = "int8"
    quantizer = staticmethod(quantize_weight)

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dtype=torch.float32, device=None):
        super().__init__()
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.ones(out_features, dtype=dtype, device=device))
        self._init(in_features, out_features, bias, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        scale = self.scale if self.scale.dtype == x.dtype else self.scale.to(x.dtype)
        if _int8pack_works(x.dtype, flat.device):
            y = torch._weight_int8pack_mm(flat.contiguous(), self.weight, scale)
        else:
            y = F.linear(flat, self.weight.to(x.dtype)) * scale
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)


class Nf4Linear(_QuantLinear):
    """y = x @ (NF4[codes] * scale)^T + bias, codes packed two per byte (uint8 [out, in / 2]) and one scale per
    64 inputs of a row ([out, in / 64]): an `nn.Linear` in ~0.27 of the bytes of bfloat16. The forward
    dequantizes the weight to x's dtype, then `F.linear` (the module docstring says what that costs)."""

    quant = "nf4"
    quantizer = staticmethod(quantize_nf4)

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dtype=torch.float32, device=None):
        super().__init__()
        check_nf4_shape(out_features, in_features)
        self.register_buffer("weight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scale", torch.ones(out_features, in_features // GROUP, dtype=dtype, device=device))
        self._init(in_features, out_features, bias, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = dequantize_nf4(self.weight, self.scale, x.dtype)
        return F.linear(x, weight, None if self.bias is None else self.bias.to(x.dtype))


LINEAR_CLASSES = {"int8": Int8Linear, "nf4": Nf4Linear}
QUANTIZERS = {q: cls.quantizer for q, cls in LINEAR_CLASSES.items()}  # quant -> (float weight, dtype) -> (weight, scale)


CPU_INT8PACK_DTYPES = (torch.bfloat16,)  # where torch's CPU kernel is fast (float32 / float16: see the docstring)


@functools.cache
def _int8pack_works(dtype: torch.dtype, device: torch.device = torch.device("cpu")) -> bool:
    """Whether `torch._weight_int8pack_mm` exists for `device`, agrees with the dequantized matmul (probed once per
    dtype and device on a small random problem) and is the faster: on a CPU for bfloat16 only (measured: see the
    docstring); on CUDA where a timing here (one 4096 x 4096 weight, one row) finds it faster than dequantizing."""
    device = torch.device(device)
    if device.type not in ("cpu", "cuda") or not hasattr(torch, "_weight_int8pack_mm"):
        return False
    if device.type == "cpu" and dtype not in CPU_INT8PACK_DTYPES:
        return False
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(-127, 128, (48, 64), generator=gen, dtype=torch.int8)
    scale = (torch.rand(48, generator=gen) / 100 + 1e-3).to(dtype)
    x = torch.randn(3, 64, generator=gen).to(dtype)
    try:
        with torch.inference_mode():
            got = torch._weight_int8pack_mm(x.to(device), q.to(device), scale.to(device)).float().cpu()
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    want = x.float() @ dequantize(q, scale).T
    agrees = bool(torch.allclose(got, want, rtol=2e-2, atol=2e-2 * float(want.abs().max())))
    return agrees and (device.type == "cpu" or _int8pack_faster_on_cuda(dtype, device))


def _int8pack_faster_on_cuda(dtype: torch.dtype, device: torch.device) -> bool:
    """Median of 20 calls each way, CUDA events: the fused kernel vs `F.linear(x, q.to(dtype)) * scale`."""
    q = torch.randint(-127, 128, (4096, 4096), dtype=torch.int8, device=device)
    scale = torch.full((4096,), 1e-3, dtype=dtype, device=device)
    x = torch.randn(1, 4096, dtype=dtype, device=device)
    ways = {"fused": lambda: torch._weight_int8pack_mm(x, q, scale),
            "dequantized": lambda: F.linear(x, q.to(dtype)) * scale}
    ms = {}
    with torch.inference_mode():
        for name, call in ways.items():
            times = []
            for _ in range(23):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                call()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            ms[name] = sorted(times[3:])[10]
    return ms["fused"] < ms["dequantized"]


def quantize_linears(module: nn.Module, names: list[str] | None = None, dtype: torch.dtype | None = None,
                     quant: str = "int8") -> nn.Module:
    """Replace the `nn.Linear`s of `module` (those named, dotted paths, or every one) by `Int8Linear`s or
    `Nf4Linear`s (`quant`; "none" changes nothing), in place. ValueError naming the layer if nf4 cannot split
    its inputs into groups of 64.

    On the meta device this builds the structure a checkpoint is then loaded into. Returns `module`."""
    quant = check_quant(quant)
    if quant == "none":
        return module
    cls = LINEAR_CLASSES[quant]
    targets = names if names is not None else [n for n, m in module.named_modules() if isinstance(m, nn.Linear)]
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        linear = getattr(parent, child)
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{name} is a {type(linear).__name__}, not an nn.Linear")
        try:
            setattr(parent, child, cls.from_linear(linear, dtype))
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
    return module


def announced_dtype(dtype: torch.dtype, quant: str) -> str:
    """What a peer announces as its dtype (clients size their spot-checks' tolerance by it): the activation dtype,
    with "+nf4" for nf4 weights, whose error is far wider than any dtype's; int8's hides within every dtype's."""
    return str(dtype).removeprefix("torch.") + ("+nf4" if quant == "nf4" else "")


def state_bytes(module: nn.Module) -> int:
    """Bytes of a module's weights (its state dict, shared tensors once, and what packed layers hold beside it,
    `held_bytes`): what it holds in memory."""
    seen, total = set(), sum(getattr(m, "held_bytes", 0) for m in module.modules())
    for t in module.state_dict(keep_vars=True).values():
        key = (t.device.type, t.data_ptr()) if t.device.type != "meta" else id(t)
        if key not in seen:
            seen.add(key)
            total += t.nelement() * t.element_size()
    return total
