"""The Hugging Face `config.json` of a GGUF file's metadata (llama.cpp's key names) and tensor shapes.

Llama, Mistral and Qwen2 files: sizes, heads (a per-layer list only when every layer agrees), RMSNorm
epsilon, context length, tied embeddings (no `output.weight`), biases, Mistral's sliding window (a
llama file with `attention.sliding_window`), RoPE theta and scaling: linear from the metadata, llama3
recovered from the `rope_freqs` tensor in which llama.cpp stores it (`fit_llama3_rope`). What the
engine cannot run (other architectures, partial rotary, YaRN, ...) is a ConfigError.
Knows metadata keys; nothing of tensor data, tokenizers or files.
"""

from __future__ import annotations

import math

import numpy as np

from .config import ConfigError

ARCHS = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
ROPE_FREQS = "rope_freqs.weight"  # llama3 RoPE scaling, stored by llama.cpp as per-frequency factors


def hf_config(meta: dict, shapes: dict[str, tuple], rope_freqs: np.ndarray | None = None) -> dict:
    """The HF config.json of a GGUF's metadata and tensor shapes (HF order); ConfigError if we cannot run it."""
    arch = meta.get("general.architecture")
    if arch not in ARCHS:
        raise ConfigError(f"GGUF architecture {arch!r} is not supported (supported: {', '.join(ARCHS)})")

    def get(key, default=KeyError):
        value = meta.get(f"{arch}.{key}", default)
        if value is KeyError:
            raise ConfigError(f"GGUF metadata has no {arch}.{key}")
        if isinstance(value, list):  # per-layer values: fine when they are all the same
            if len(set(value)) != 1:
                raise ConfigError(f"per-layer values of {arch}.{key} ({sorted(set(value))}) are not supported")
            value = value[0]
        return value

    n_heads, n_layers, hidden = int(get("attention.head_count")), int(get("block_count")), int(get("embedding_length"))
    n_kv = get("attention.head_count_kv", n_heads)
    if min(n_heads, n_layers, hidden, n_kv) <= 0:
        raise ConfigError("GGUF metadata gives a zero or negative head count, block count or embedding length")
    head_dim = int(get("attention.key_length", hidden // n_heads))
    if int(get("attention.value_length", head_dim)) != head_dim:
        raise ConfigError("attention.value_length differs from attention.key_length: not supported")
    if int(get("rope.dimension_count", head_dim)) != head_dim:
        raise ConfigError(f"partial rotary embeddings (rope.dimension_count {get('rope.dimension_count')} of "
                          f"head_dim {head_dim}) are not supported")
    if "token_embd.weight" not in shapes:
        raise ConfigError("the GGUF has no token_embd.weight tensor")
    vocab_size = shapes["token_embd.weight"][0]
    window = get("attention.sliding_window", None)
    model_type = "mistral" if arch == "mistral" or (arch == "llama" and window) else arch
    config = {
        "architectures": [ARCHS[model_type]], "model_type": model_type, "hidden_act": "silu",
        "hidden_size": hidden, "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": n_layers, "num_attention_heads": n_heads, "num_key_value_heads": int(n_kv),
        "head_dim": head_dim, "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        "max_position_embeddings": int(get("context_length")), "vocab_size": vocab_size,
        "tie_word_embeddings": "output.weight" not in shapes,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "rope_theta": float(get("rope.freq_base", 10000.0)), "rope_scaling": _rope_scaling(get, rope_freqs, head_dim),
    }
    if model_type == "qwen2":
        config.update(use_sliding_window=False, sliding_window=None)
    elif model_type == "mistral":
        config["sliding_window"] = int(window) if window else None
    if model_type != "qwen2":
        config.update(_biases(shapes))
    elif "blk.0.attn_q.bias" not in shapes:
        raise ConfigError("a qwen2 GGUF without q/k/v biases is not a Qwen2 model we know")
    return config


def _biases(shapes: dict) -> dict:
    attn = ["blk.0.attn_q.bias" in shapes, "blk.0.attn_output.bias" in shapes]
    if attn[0] != attn[1]:
        raise ConfigError("biases on q/k/v without one on the output projection (or the reverse) are not supported")
    return {"attention_bias": attn[0], "mlp_bias": "blk.0.ffn_gate.bias" in shapes}


def _rope_scaling(get, rope_freqs: np.ndarray | None, head_dim: int) -> dict | None:
    kind = get("rope.scaling.type", "none") or "none"
    if rope_freqs is not None:
        return fit_llama3_rope(rope_freqs, float(get("rope.freq_base", 10000.0)), head_dim)
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
    if kind != "none":
        raise ConfigError(f"RoPE scaling {kind!r} is not supported (supported: none, linear, llama3)")
    return None


def fit_llama3_rope(factors: np.ndarray, theta: float, head_dim: int, original: int = 8192) -> dict | None:
    """The llama3 `rope_scaling` whose per-frequency factors are llama.cpp's `rope_freqs` (ConfigError if none is).

    Only old_context / low_freq_factor and old_context / high_freq_factor matter, so `original` is fixed."""
    factors = np.asarray(factors, dtype=np.float64).reshape(-1)
    if factors.shape[0] != head_dim // 2:
        raise ConfigError(f"rope_freqs has {factors.shape[0]} entries, expected head_dim / 2 = {head_dim // 2}")
    factor = float(factors.max())
    if np.allclose(factors, 1.0, rtol=0, atol=1e-6):
        return None
    u = original * theta ** (-np.arange(0, head_dim, 2) / head_dim) / (2 * math.pi)  # original / wavelength
    mid = (factors > 1 + 1e-6) & (factors < factor * (1 - 1e-6))
    scaled, ones = u[factors >= factor * (1 - 1e-6)], u[factors <= 1 + 1e-6]
    low_bound = float(scaled.max()) if scaled.size else float(u.min()) / 2  # low <= every scaled frequency's u
    high_bound = float(ones.min()) if ones.size else float(u.max()) * 2  # high >= every unscaled one's
    smooth = (1 / factors[mid] - 1 / factor) / (1 - 1 / factor)  # = (u - low) / (high - low) in between
    if mid.sum() >= 2:  # two points fix both bounds
        i, j = np.argmax(smooth), np.argmin(smooth)
        span = (u[mid][i] - u[mid][j]) / (smooth[i] - smooth[j])
        low = u[mid][i] - smooth[i] * span
    elif mid.sum() == 1:  # one point: any span that keeps the bounds between the neighbours agrees
        um, sm = float(u[mid][0]), float(smooth[0])
        span = 0.5 * min((um - low_bound) / sm if sm > 0 else math.inf,
                         (high_bound - um) / (1 - sm) if sm < 1 else math.inf)
        low = um - sm * span
    else:
        low, span = low_bound, high_bound - low_bound
    high = low + span
    if not (span > 0 and math.isfinite(span) and low > 0):
        _refuse_rope()
    for low_, high_ in ((round(low * 8) / 8, round(high * 8) / 8), (low, high)):  # the round values, if they fit
        scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": float(low_),
                   "high_freq_factor": float(high_), "original_max_position_embeddings": original}
        if high_ > low_ > 0 and np.allclose(llama3_factors(scaling, theta, head_dim), factors, rtol=1e-5, atol=0):
            return scaling
    _refuse_rope()


def _refuse_rope():
    raise ConfigError("rope_freqs does not follow llama3 RoPE scaling; this RoPE variant is not supported")


def llama3_factors(scaling: dict, theta: float, head_dim: int) -> np.ndarray:
    """What llama.cpp writes as `rope_freqs` for a llama3 `rope_scaling` (the divisor of each frequency)."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    u = scaling["original_max_position_embeddings"] * theta ** (-np.arange(0, head_dim, 2) / head_dim) / (2 * math.pi)
    smooth = np.clip((u - low) / (high - low), 0.0, 1.0)
    return 1 / ((1 - smooth) / factor + smooth)
