"""Lazy loading: a block range reads its own tensors and nothing else; bad checkpoints fail clearly."""

import json

import pytest
import torch

import peer.model.checkpoint as checkpoint_module
from conftest import make_checkpoint
from peer.model import Checkpoint, CheckpointError, ConfigError, StepLayout


class ReadSpy:
    """Wraps safetensors.safe_open and records every tensor actually read."""

    def __init__(self, monkeypatch):
        self.read: list[str] = []
        real = checkpoint_module.safe_open
        spy = self

        class Opened:
            def __init__(self, *a, **kw):
                self._cm = real(*a, **kw)

            def __enter__(self):
                self._f = self._cm.__enter__()
                return self

            def __exit__(self, *exc):
                return self._cm.__exit__(*exc)

            def keys(self):
                return self._f.keys()

            def get_tensor(self, name):
                spy.read.append(name)
                return self._f.get_tensor(name)

            def get_slice(self, name):
                spy.read.append(name)
                return self._f.get_slice(name)

        monkeypatch.setattr(checkpoint_module, "safe_open", Opened)


@pytest.mark.parametrize("arch", ["llama2", "tinyllama"])  # one file; 11 shards
def test_blocks_4_to_8_read_no_other_tensor(tiny, monkeypatch, arch):
    tc = tiny(arch)
    spy = ReadSpy(monkeypatch)
    ckpt = Checkpoint(tc.path)
    assert spy.read == []  # opening reads headers only
    blocks = ckpt.load_blocks(4, 8)
    layers = {int(name.split(".")[2]) for name in spy.read}
    assert layers == {4, 5, 6, 7}
    assert all(name.startswith("model.layers.") for name in spy.read)
    assert len(spy.read) == len(set(spy.read)) == 4 * 9  # each tensor once
    # and those blocks compute what the same blocks of the reference compute
    hidden = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    ours = blocks(hidden, blocks.new_cache(5), StepLayout(0, 5))
    with torch.no_grad():
        model = tc.model.model
        pos = torch.arange(5)[None]
        emb = model.rotary_emb(hidden[None], pos)
        ref = hidden[None]
        for layer in model.layers[4:8]:
            ref = layer(ref, attention_mask=None, position_ids=pos, position_embeddings=emb)
            ref = ref[0] if isinstance(ref, tuple) else ref
    assert (ours - ref[0]).abs().max().item() < 1e-4


def test_head_reads_only_embeddings_norm_and_lm_head(tiny, monkeypatch):
    for arch, expected in (("llama2", {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}),
                           ("qwen2", {"model.embed_tokens.weight", "model.norm.weight"})):  # qwen2: tied
        spy = ReadSpy(monkeypatch)
        head = Checkpoint(tiny(arch).path).load_head()
        assert set(spy.read) == expected
        if arch == "qwen2":
            assert head.lm_head.weight.data_ptr() == head.embed_tokens.weight.data_ptr()


def test_missing_and_malformed_checkpoints_fail_with_a_reason(tmp_path):
    tc = make_checkpoint(tmp_path / "m", "llama2")
    with pytest.raises(CheckpointError, match="does not exist"):
        Checkpoint(tmp_path / "nowhere")
    cfg = json.loads((tc.path / "config.json").read_text())
    for field, value, message in (("model_type", "gpt2", "not supported"), ("hidden_act", "gelu", "silu"),
                                  ("num_key_value_heads", 3, "multiple")):
        (tc.path / "config.json").write_text(json.dumps({**cfg, field: value}))
        with pytest.raises(ConfigError, match=message):
            Checkpoint(tc.path)
    (tc.path / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 9}))
    with pytest.raises(CheckpointError, match="missing"):
        Checkpoint(tc.path).load_blocks(8, 9)
    (tc.path / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 100}))
    with pytest.raises(CheckpointError, match="shape"):
        Checkpoint(tc.path).load_blocks(0, 1)
    (tc.path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="block range"):
        Checkpoint(tc.path).load_blocks(6, 9)
