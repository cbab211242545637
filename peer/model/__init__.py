"""The model engine: one home for the blocks peers host and the head clients keep.

`Checkpoint(dir).load_blocks(a, b)` gives a `BlockRange` that runs steps of a session against its
`KVCache`; `Checkpoint(dir).load_head()` gives a `ModelHead` (embeddings, final norm, LM head).
`Checkpoint(file.gguf)` converts a llama.cpp GGUF once (`convert_gguf`) and loads the result.
Both loaders take `quant="int8"`: weight-only int8 linear layers (`Int8Linear`), half the bytes of bf16; or
`quant="nf4"`: 4-bit NormalFloat codes with a scale per 64 inputs (`Nf4Linear`), ~0.27 of the bytes of bf16.
`peer.model.sampling`: sampling distributions and the lossless verifiers, shared by the client's decoder and a
last peer that verifies rounds itself. `peer.model.argmax`: greedy tokens from a float32 LM head at about a
bfloat16 head's cost (a bfloat16 copy, a bound on its error, float32 for the few candidates; `ModelHead.argmax`).
`peer.model.packed`: float32 blocks on a CPU keep their linear weights in oneDNN's packed layout (`load_blocks`).
`peer.model.invariant`: half-precision blocks and heads on a CPU compute every row as if alone (a verification step
of n tokens is, bit for bit, n 1-token steps), so bfloat16 speculative greedy decoding is plain greedy decoding.
"""

from .blocks import BlockRange, ModelHead
from .cache import CacheError, KVCache, StepLayout
from .checkpoint import Checkpoint, CheckpointError, parse_dtype
from .quant import QUANTS, Int8Linear, Nf4Linear, check_quant
from .config import ConfigError, ContextTooLong, ModelConfig, RopeConfig
from .gguf import GGUFError, convert_gguf

__all__ = ["BlockRange", "ModelHead", "KVCache", "StepLayout", "CacheError", "Checkpoint", "CheckpointError",
           "parse_dtype", "ConfigError", "ContextTooLong", "ModelConfig", "RopeConfig", "GGUFError", "convert_gguf",
           "QUANTS", "Int8Linear", "Nf4Linear", "check_quant"]
