"""peer.model.packed: float32 linear layers in oneDNN's packed layout compute what `F.linear` does (to float32
rounding), hold the same bytes, and blocks loaded packed give the unpacked blocks' outputs and greedy tokens."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from peer.model import Checkpoint, StepLayout
from peer.model import packed
from peer.model.packed import PackedLinear, pack_linears, packing_works

pytestmark = pytest.mark.skipif(not packing_works(), reason="this torch has no oneDNN packing (or SPECSWARM_PACKED=0)")


@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_is_f_linear(bias):
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 200, bias=bias)
    p = PackedLinear(lin)
    for shape in ((1, 96), (7, 96), (1, 5, 96)):
        x = torch.randn(*shape)
        want = F.linear(x, lin.weight, lin.bias)
        assert p(x).shape == want.shape
        assert torch.allclose(p(x), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(p.weight, lin.weight.detach()) and p.held_bytes == 96 * 200 * 4


def test_float16_and_quantized_layers_stay_as_they_are():
    from peer.model.quant import Int8Linear

    q = Int8Linear(8, 8)
    mod = torch.nn.Sequential(torch.nn.Linear(8, 8).half(), torch.nn.Linear(8, 8), torch.nn.Linear(8, 8).bfloat16(), q)
    assert pack_linears(mod, ["0", "1", "2", "3"]) == (2 if packing_works(torch.bfloat16) else 1)
    assert type(mod[0]) is torch.nn.Linear and type(mod[1]) is PackedLinear and mod[3] is q


@pytest.mark.skipif(not packing_works(torch.bfloat16), reason="no oneDNN bfloat16 packing here")
def test_packed_bfloat16_is_f_linear_to_its_rounding():
    torch.manual_seed(1)
    lin = torch.nn.Linear(128, 300).bfloat16()
    p = PackedLinear(lin)
    x = torch.randn(9, 128).bfloat16()
    want = F.linear(x, lin.weight, lin.bias).float()
    assert p(x).dtype == torch.bfloat16
    assert (p(x).float() - want).abs().max() <= 2 ** -7 * want.abs().max()


def test_packed_blocks_equal_unpacked_ones(tiny, monkeypatch):
    ckpt = Checkpoint(tiny("llama2").path)
    n = ckpt.config.num_hidden_layers
    blocks = ckpt.load_blocks(0, n)
    assert {type(blocks.get_submodule(name)) for name in blocks.linear_names()} == {PackedLinear}
    monkeypatch.setenv("SPECSWARM_PACKED", "0")
    packed.packing_works.cache_clear()
    try:
        plain = ckpt.load_blocks(0, n)
    finally:
        packed.packing_works.cache_clear()
    assert not any(isinstance(m, PackedLinear) for m in plain.modules())
    assert blocks.weight_bytes() == plain.weight_bytes()
    head = ckpt.load_head()
    ids = torch.arange(30) % ckpt.config.vocab_size
    outs = []
    for b in (blocks, plain):
        cache = b.new_cache(64)
        prefill = b(head.embed(ids[:20]), cache, StepLayout(0, 20))
        step = b(head.embed(ids[20:]), cache, StepLayout(20, 10))  # a verification-sized step
        outs.append(torch.cat([prefill, step]))
    assert torch.allclose(outs[0], outs[1], rtol=1e-4, atol=1e-4 * float(outs[1].abs().max()))
    assert torch.equal(head.logits(outs[0]).argmax(-1), head.logits(outs[1]).argmax(-1))


def test_the_benchmark_runs_on_the_tiny_model():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "scripts/bench_packed.py", "--model", "tiny", "--blocks", "0", "2",
                          "--rows", "1", "3", "--reps", "2", "--prompt", "8"], cwd=root, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines() if line.strip().startswith(("1 |", "3 |"))]
    assert len(lines) == 2 and all("x |" in line for line in lines)
    bad = subprocess.run([sys.executable, "scripts/bench_packed.py", "--model", "tiny", "--blocks", "0", "99"],
                         cwd=root, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "--blocks must lie in" in bad.stderr and "Traceback" not in bad.stderr
