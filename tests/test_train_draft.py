"""scripts/train_draft.py's warm start (`--init`): a saved draft's own tensors come back exactly, and a draft of
another shape is refused in one line. Uses the bundled tiny target (4 blocks), no training."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import train_draft  # noqa: E402

from swarm.bundled import TINY_MODEL  # noqa: E402


@pytest.fixture(scope="module")
def target():
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(str(TINY_MODEL), dtype=torch.float32).eval()


def test_a_warm_start_loads_the_saved_drafts_own_tensors(target, tmp_path):
    trained, _ = train_draft.make_draft(target, 2, bottom=1)
    with torch.no_grad():
        for q in trained.parameters():
            if q.requires_grad:
                q.add_(torch.randn_like(q) * 0.01)  # as if trained: no longer the target's blocks
    train_draft.save_draft(trained, tmp_path / "first", {"step": 1})
    saved = train_draft.own_tensors(trained)  # what was written (bfloat16)

    fresh, _ = train_draft.make_draft(target, 2, bottom=1)
    assert any(not torch.equal(saved[k], v) for k, v in train_draft.own_tensors(fresh).items())
    origin = train_draft.warm_start(fresh, tmp_path / "first")
    assert "first" in origin
    again = train_draft.own_tensors(fresh)
    assert set(again) == set(saved) and all(torch.equal(again[k], saved[k]) for k in saved)
    emb = fresh.model.embed_tokens.weight
    assert not emb.requires_grad and torch.equal(emb, target.model.embed_tokens.weight)  # still the target's


def test_a_warm_start_refuses_a_draft_of_another_shape(target, tmp_path):
    three, _ = train_draft.make_draft(target, 3, bottom=1)
    train_draft.save_draft(three, tmp_path / "three", {"step": 1})
    two, _ = train_draft.make_draft(target, 2, bottom=1)
    with pytest.raises(SystemExit, match="do not match a draft of --layers 2 over --bottom 1"):
        train_draft.warm_start(two, tmp_path / "three")
    with pytest.raises(SystemExit, match="no layers.safetensors"):
        train_draft.warm_start(two, tmp_path / "nowhere")
