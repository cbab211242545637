"""The bundled code model pair (`--model tiny`): loads through our engine, generates Python, and runs through
real peers."""

import json
import subprocess
import sys

import pytest

from swarm.bundled import TINY_DRAFT, TINY_MODEL
from swarm.launch import even_spans, start_peers

PROMPT = "def fibonacci(n):"


def generate(*args):
    out = subprocess.run([sys.executable, "-m", "swarm.cli", "generate", "--model", "tiny", "--prompt", PROMPT,
                          "--max-new-tokens", "48", "--json", *args], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_bundled_pair_is_small_and_complete():
    total = 0
    for d in (TINY_MODEL, TINY_DRAFT):
        for name in ("config.json", "model.safetensors", "tokenizer.json"):
            assert (d / name).exists(), f"{d / name} is missing"
        total += sum(f.stat().st_size for f in d.iterdir())
    assert total <= 64 * 2**20
    assert (TINY_MODEL / "tokenizer.json").read_bytes() == (TINY_DRAFT / "tokenizer.json").read_bytes()


def test_local_generation_on_tiny_writes_python():
    got = generate("--local")  # --model tiny: the bundled target
    assert got["new_tokens"] > 0 and got["text"].strip()
    text = PROMPT + got["text"]
    assert any(word in text for word in ("return", "if ", "for ", "n -", "n-", "=")), text


@pytest.fixture(scope="module")
def bundled_swarm(tmp_path_factory):
    from peer.model import Checkpoint

    spans = even_spans(Checkpoint(TINY_MODEL).config.num_hidden_layers, 3)
    peers = start_peers(TINY_MODEL, spans, log_dir=tmp_path_factory.mktemp("bundled"))
    yield peers
    for p in peers:
        p.stop()


@pytest.mark.parametrize("flags", [["--no-speculative"], ["--no-speculative", "--no-push"], [], ["--k", "4", "--no-push"]])
def test_three_bundled_peers_equal_local(bundled_swarm, flags):
    local = generate("--local")
    remote = generate("--initial-peers", bundled_swarm[0].addr, *flags)
    assert remote["tokens"] == local["tokens"]
    assert len(remote["route"]) == 3
    if "--no-speculative" not in flags:  # speculative is the default through the swarm, with tiny's own draft
        assert remote["mode"].startswith("speculative") and remote["tokens_per_round"] > 1.0
