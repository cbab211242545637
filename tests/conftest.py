"""Tiny randomly initialised checkpoints, written by `transformers` itself, for every architecture we load.

Each fixture returns a `TinyCheckpoint`: the directory (config.json, *.safetensors, tokenizer.json)
and the in-memory `transformers` model that is our reference.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

SAMPLE_TEXT = (
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n"
    "The quick brown fox jumps over the lazy dog. Peers host blocks; clients draft tokens.\n"
    "for i in range(10):\n    print(i * i)\nclass Swarm:\n    def __init__(self):\n        self.peers = []\n"
)

COMMON = dict(hidden_size=64, intermediate_size=144, num_hidden_layers=8, num_attention_heads=4,
              initializer_range=0.08, max_position_embeddings=256, rms_norm_eps=1e-5)

# name -> (transformers config class name, model class name, overrides, save options)
ARCHS = {
    "llama2": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=4), {}),
    "llama3": ("LlamaConfig", "LlamaForCausalLM",
               dict(num_key_value_heads=2, tie_word_embeddings=True,
                    rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                                         high_freq_factor=4.0, original_max_position_embeddings=16)), {}),
    "tinyllama": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=1), dict(max_shard_size="150KB")),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(num_key_value_heads=2, sliding_window=8), {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=2, tie_word_embeddings=True), {}),
}


@dataclass
class TinyCheckpoint:
    path: Path
    model: "transformers.PreTrainedModel"
    arch: str


def make_tokenizer(vocab_size: int = 320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([SAMPLE_TEXT] * 4, trainer)
    return tok


def make_checkpoint(path: Path, arch: str, seed: int = 0, **overrides) -> TinyCheckpoint:
    cfg_cls, model_cls, arch_overrides, save_kw = ARCHS[arch]
    tok = make_tokenizer()
    kw = {**COMMON, **arch_overrides, **overrides, "vocab_size": tok.get_vocab_size(),
          "bos_token_id": 0, "eos_token_id": 1}
    config = getattr(transformers, cfg_cls)(**kw)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, **save_kw)
    tok.save(str(path / "tokenizer.json"))
    return TinyCheckpoint(path, model, arch)


def make_legacy_config(path: Path) -> None:
    """Rewrite a transformers-5 config.json the way older checkpoints (Llama 3 on the Hub) spell RoPE."""
    cfg = json.loads((path / "config.json").read_text())
    params = cfg.pop("rope_parameters")
    cfg["rope_theta"] = params.pop("rope_theta")
    if params.get("rope_type", "default") != "default":
        cfg["rope_scaling"] = params
    (path / "config.json").write_text(json.dumps(cfg, indent=2))


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """tiny(arch) -> TinyCheckpoint, built once per session."""
    built: dict[str, TinyCheckpoint] = {}

    def get(arch: str) -> TinyCheckpoint:
        if arch not in built:
            built[arch] = make_checkpoint(tmp_path_factory.mktemp(arch), arch)
        return built[arch]

    return get


@pytest.fixture
def generator_elsewhere(monkeypatch):
    """(generator, seen): a generator that claims another device (what a CUDA generator looks like to the
    code on a machine without one), with torch's random draws replaced by ones that record (kind, the
    device the draw is made on, the generator's device) in `seen`. Issue 16's crash was a CPU draw
    with a CUDA generator."""

    class OtherDevice:
        device = torch.device("meta")

    seen = []

    def rand(size, generator=None, device=None, **kw):
        seen.append(("rand", torch.device(device), generator.device))
        return torch.tensor(0.99)

    def multinomial(probs, n, generator=None, **kw):
        seen.append(("multinomial", probs.device, generator.device))
        return torch.tensor([1])

    real_to = torch.Tensor.to
    monkeypatch.setattr(torch, "rand", rand)
    monkeypatch.setattr(torch, "multinomial", multinomial)
    monkeypatch.setattr(torch.Tensor, "to", lambda t, *a, **k: torch.empty(t.shape, device="meta")
                        if a and a[0] == torch.device("meta") else real_to(t, *a, **k))
    return OtherDevice(), seen


def copy_of_tiny(path: Path) -> Path:
    """A copy of the bundled tiny model at `path` (weights linked, the small files copied: edit them freely)."""
    from swarm.bundled import TINY_MODEL

    path.mkdir()
    for f in TINY_MODEL.iterdir():
        if f.suffix == ".safetensors":
            (path / f.name).symlink_to(f)
        else:
            (path / f.name).write_bytes(f.read_bytes())
    return path


def stop_in_process(bg, listeners, servers) -> None:
    """Stop an in-process swarm of `BlockServer`s run on a `Background` loop: its listeners (asyncio servers
    must be closed on their own loop's thread), its servers, then the loop."""
    async def stop(listener):
        listener.close()

    for listener in listeners:
        bg.run(stop(listener))
    for server in servers:
        bg.run(server.close())
    bg.close()
