"""Tensor codec: a descriptor (dtype, shape) plus the raw little-endian bytes.

On the wire a tensor may travel in a narrower dtype than it is computed in (fp16/bf16 halve the
bytes); `decode_tensor` checks everything a hostile sender controls (dtype name, rank, dimensions,
byte count) before it builds anything. Knows nothing about models or sockets.
"""

from __future__ import annotations

import math
import sys

import torch

WIRE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
MAX_RANK = 4


class TensorFormatError(ValueError):
    """A tensor descriptor or its bytes are malformed."""


def encode_tensor(t: torch.Tensor, wire_dtype: str | None = None) -> tuple[dict, bytes]:
    name = wire_dtype or str(t.dtype).removeprefix("torch.")
    if name not in WIRE_DTYPES:
        raise TensorFormatError(f"dtype {name!r} cannot travel on the wire (allowed: {sorted(WIRE_DTYPES)})")
    t = t.detach().to(device="cpu", dtype=WIRE_DTYPES[name]).contiguous()
    if sys.byteorder != "little":  # pragma: no cover - every platform we run on is little-endian
        raise TensorFormatError("big-endian hosts are not supported")
    return {"dtype": name, "shape": list(t.shape)}, t.view(torch.uint8).numpy().tobytes()


def decode_tensor(desc, data: bytes | memoryview, max_elements: int) -> torch.Tensor:
    if not isinstance(desc, dict):
        raise TensorFormatError("tensor descriptor must be an object")
    name, shape = desc.get("dtype"), desc.get("shape")
    if name not in WIRE_DTYPES:
        raise TensorFormatError(f"unknown tensor dtype {name!r}")
    if (not isinstance(shape, list) or not 1 <= len(shape) <= MAX_RANK
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= max_elements for d in shape)):
        raise TensorFormatError(f"bad tensor shape {shape!r}")
    count = math.prod(shape)
    if count > max_elements:
        raise TensorFormatError(f"tensor of {count} elements exceeds the limit of {max_elements}")
    dtype = WIRE_DTYPES[name]
    expected = count * torch.empty((), dtype=dtype).element_size()
    if len(data) != expected:
        raise TensorFormatError(f"tensor {name}{shape} needs {expected} bytes, got {len(data)}")
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).reshape(shape)
