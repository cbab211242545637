"""Model configuration read from a Hugging Face `config.json`.

Knows the Llama family (Llama 2/3, TinyLlama, Mistral, Qwen2) and nothing about weights, caches or
the network. Accepts both the legacy layout (`rope_theta` + `rope_scaling`) and the transformers-5
layout (`rope_parameters`). Anything we cannot run exactly is refused here, with the reason.

The context is `max_position_embeddings`: no sequence (prompt plus reply) runs past it, whether the
model attends fully or through sliding windows: a window bounds what a token sees, not its RoPE
position, and positions beyond the context are outside the trained range. `ContextTooLong` says so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class ConfigError(ValueError):
    """The checkpoint's config.json describes a model this engine cannot run."""


class ContextTooLong(ValueError):
    """`length` tokens asked of a model (or a session) that holds `context`: "WHAT too long for this model (N > M)"."""

    def __init__(self, length: int, context: int, what: str = "prompt"):
        super().__init__(f"{what} too long for this model ({length} > {context})")
        self.length, self.context = length, context


@dataclass(slots=True)
class RopeConfig:
    theta: float = 10000.0
    type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position_embeddings: int = 8192  # llama3 only

    def __post_init__(self):
        if self.type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(f"rope type {self.type!r} is not supported (supported: {SUPPORTED_ROPE_TYPES})")
        if self.theta <= 0 or self.factor <= 0:
            raise ConfigError(f"rope theta and factor must be positive, got {self.theta}, {self.factor}")
        if self.type == "llama3" and not self.high_freq_factor > self.low_freq_factor > 0:
            raise ConfigError("llama3 rope scaling needs high_freq_factor > low_freq_factor > 0")

    @classmethod
    def from_hf(cls, raw: dict) -> "RopeConfig":
        params = dict(raw.get("rope_parameters") or {})
        legacy = raw.get("rope_scaling") or {}
        params = {**legacy, **params}
        theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
        kind = params.get("rope_type", params.get("type", "default"))
        kw = dict(theta=float(theta), type=kind)
        if kind in ("linear", "llama3"):
            kw["factor"] = float(params.get("factor", 1.0))
        if kind == "llama3":
            kw["low_freq_factor"] = float(params.get("low_freq_factor", 1.0))
            kw["high_freq_factor"] = float(params.get("high_freq_factor", 4.0))
            kw["original_max_position_embeddings"] = int(params.get("original_max_position_embeddings", 8192))
        return cls(**kw)


@dataclass(slots=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096  # the context: no sequence runs past it (sliding windows or not)
    rope: RopeConfig = field(default_factory=RopeConfig)
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    # One entry per layer: the sliding attention window, or None for full attention.
    sliding_windows: tuple = ()
    bos_token_id: int | None = None
    eos_token_ids: tuple = ()

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(f"model_type {self.model_type!r} is not supported (supported: {SUPPORTED_MODEL_TYPES})")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                              f"num_key_value_heads ({self.num_key_value_heads})")
        if not self.head_dim:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError("hidden_size must be divisible by num_attention_heads when head_dim is not given")
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if not self.sliding_windows:
            self.sliding_windows = (None,) * self.num_hidden_layers
        if len(self.sliding_windows) != self.num_hidden_layers:
            raise ConfigError("one sliding-window entry per layer is required")

    @classmethod
    def from_hf(cls, raw: dict) -> "ModelConfig":
        model_type = raw.get("model_type")
        if raw.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"hidden_act {raw.get('hidden_act')!r} is not supported (only silu / SwiGLU)")
        try:
            n_layers = int(raw["num_hidden_layers"])
            n_heads = int(raw["num_attention_heads"])
            kw = dict(
                model_type=model_type,
                vocab_size=int(raw["vocab_size"]),
                hidden_size=int(raw["hidden_size"]),
                intermediate_size=int(raw["intermediate_size"]),
                num_hidden_layers=n_layers,
                num_attention_heads=n_heads,
                num_key_value_heads=int(raw.get("num_key_value_heads") or n_heads),
                head_dim=int(raw.get("head_dim") or 0),
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
                max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                bos_token_id=raw.get("bos_token_id"),
            )
        except KeyError as e:
            raise ConfigError(f"config.json is missing required field {e.args[0]!r}") from None
        eos = raw.get("eos_token_id")
        kw["eos_token_ids"] = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        kw["rope"] = RopeConfig.from_hf(raw)
        if model_type == "qwen2":
            kw["qkv_bias"] = True  # Qwen2: bias on q/k/v projections only
        else:
            kw["qkv_bias"] = kw["o_bias"] = bool(raw.get("attention_bias", False))
            kw["mlp_bias"] = bool(raw.get("mlp_bias", False))
        kw["sliding_windows"] = _sliding_windows(raw, model_type, n_layers)
        return cls(**kw)

    @classmethod
    def from_dir(cls, path: str | Path) -> "ModelConfig":
        path = Path(path) / "config.json"
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"no config.json in {path.parent}; expected a Hugging Face model directory") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        return cls.from_hf(raw)


def _sliding_windows(raw: dict, model_type: str, n_layers: int) -> tuple:
    window = raw.get("sliding_window")
    if model_type == "qwen2" and not raw.get("use_sliding_window", False):
        window = None
    if not window:
        return (None,) * n_layers
    layer_types = raw.get("layer_types")
    if layer_types is None:
        first_sliding = int(raw.get("max_window_layers", 0)) if model_type == "qwen2" else 0
        layer_types = ["sliding_attention" if i >= first_sliding else "full_attention" for i in range(n_layers)]
    if len(layer_types) != n_layers:
        raise ConfigError("layer_types must have one entry per layer")
    return tuple(int(window) if t == "sliding_attention" else None for t in layer_types)
