"""`CertifiedArgmax` (peer.model.argmax): greedy tokens from a bfloat16 copy of a float32 head plus a bound
must be the float32 head's argmax, on near-ties especially (where bfloat16 alone gets them wrong)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from peer.model import ModelHead, ModelConfig
from peer.model.packed import packing_works
from peer.model.argmax import CertifiedArgmax, worth_it


def near_ties(vocab=4096, d=64, rows=256, seed=0):
    """A head whose rows come in pairs a hair apart, and hidden states aimed between the two of a pair: each
    row's top two float32 logits differ by ~1e-4, well inside bfloat16's error."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(vocab, d, generator=g)
    twins = torch.randint(0, vocab // 2, (rows,), generator=g) * 2
    weight[twins + 1] = weight[twins] + 1e-4 * torch.randn(rows, d, generator=g)
    x = 3 * weight[twins] / weight[twins].norm(dim=1, keepdim=True) + 0.05 * torch.randn(rows, d, generator=g)
    return weight, x


def test_the_bound_holds_and_the_argmax_is_float32s():
    weight, x = near_ties()
    cert = CertifiedArgmax(weight)
    exact = F.linear(x, weight)
    low = cert.low(x).float()
    bound = cert.c_norm * x.norm(dim=1, keepdim=True) * cert.norms + cert.c_self * low.abs()
    assert ((low - exact).abs() <= bound).all()
    got = cert(x)
    # float32 itself is exact only to its rounding: a 1-row and a 256-row matmul may order an exact tie either
    # way (as a 1-token step and a verification step may); against float64 the token is within that of the best
    truth = F.linear(x.double(), weight.double())
    assert (truth.max(-1).values - truth.gather(1, got[:, None])[:, 0] <= 1e-5 * truth.abs().max(-1).values).all()
    top2 = exact.topk(2).values
    clear = (top2[:, 0] - top2[:, 1]) > 2e-6 * top2[:, 0].abs()
    assert clear.sum() > len(x) // 4 and torch.equal(got[clear], exact.argmax(-1)[clear])
    assert (low.argmax(-1) != exact.argmax(-1)).sum() > 10  # bfloat16 alone gets near-ties wrong: the test bites
    assert cert.rows == len(x) and cert.candidates >= 2 * len(x)  # every near-tie went to float32


def test_a_row_gets_the_same_token_alone_or_among_others():
    """No batch variance: on near-ties, each row's token is the same from a 256-row call, a 9-row call and alone
    (a verification step and a 1-token step must agree for greedy speculation to be plain greedy)."""
    weight, x = near_ties(seed=7)
    cert = CertifiedArgmax(weight)
    together = cert(x)
    assert torch.equal(torch.cat([cert(x[i:i + 9]) for i in range(0, len(x), 9)]), together)
    assert torch.equal(torch.cat([cert(x[i:i + 1]) for i in range(len(x))]), together)


def test_a_bound_too_tight_is_caught():
    weight, x = near_ties(seed=1)
    cert = CertifiedArgmax(weight)
    cert.c_norm = cert.c_self = 0.0  # trusts bfloat16 blindly
    assert not torch.equal(cert(x), F.linear(x, weight).argmax(-1))


def test_clear_winners_need_no_float32_and_random_heads_agree():
    g = torch.Generator().manual_seed(2)
    weight = torch.randn(8192, 128, generator=g)
    x = 4 * weight[:64] / weight[:64].norm(dim=1, keepdim=True)  # each row points at one token
    cert = CertifiedArgmax(weight)
    assert torch.equal(cert(x), torch.arange(64))
    assert cert.candidates == 64
    y = torch.randn(300, 128, generator=g)
    assert torch.equal(cert(y), F.linear(y, weight).argmax(-1))


def test_model_head_argmax_is_its_logits_argmax_either_way():
    cfg = ModelConfig(model_type="llama", vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_windows=(None,))
    torch.manual_seed(3)
    head = ModelHead(cfg)
    torch.nn.init.normal_(head.lm_head.weight)
    hidden = torch.randn(9, 64)
    want = head.logits(hidden).argmax(-1)
    assert torch.equal(head.argmax(hidden), want)
    assert head.certified is False  # a small head: not worth a copy
    head.certified = CertifiedArgmax(head.lm_head.weight)
    assert torch.equal(head.argmax(hidden), want)


def test_worth_it_only_for_large_float32_cpu_heads():
    assert worth_it(torch.randn(1000, 64)) == (False, False)  # too small
    assert worth_it(torch.randn(70000, 64).bfloat16()) == (False, False)  # not float32


def test_wide_norms_and_large_negative_logits():
    """Row norms spread 100x and hidden states scaled up (logits in the hundreds, most very negative): the
    one-bound-per-row preselection must still keep the float32 argmax."""
    g = torch.Generator().manual_seed(4)
    weight = torch.randn(6000, 96, generator=g) * torch.logspace(-1, 1, 6000)[torch.randperm(6000, generator=g)][:, None]
    cert = CertifiedArgmax(weight)
    for scale in (0.01, 1.0, 30.0):
        x = scale * torch.randn(200, 96, generator=g)
        exact = F.linear(x, weight)
        top2 = exact.topk(2).values
        clear = (top2[:, 0] - top2[:, 1]) > 2e-6 * top2[:, 0].abs()
        assert torch.equal(cert(x)[clear], exact.argmax(-1)[clear])


def test_greedy_decoding_through_a_certified_head_is_unchanged(tiny, tmp_path):
    """Plain and speculative greedy decoding (chain and tree rounds, verified by this client) with the certified
    argmax forced on give the tokens of the float32 logits' argmax."""
    from conftest import make_checkpoint
    from swarm.decode.generate import LocalModel, generate
    from swarm.decode.speculative import SpecConfig

    target = LocalModel.load(tiny("llama2").path)
    draft = LocalModel.load(make_checkpoint(tmp_path, "llama2", seed=11, num_hidden_layers=2).path)
    prompt = [5, 17, 42, 99, 3, 250]
    want = generate(target, prompt, 40, stop_at_eos=False).tokens
    assert target.head.certified is False  # the tiny head is too small to be worth it by itself
    target.head.certified = CertifiedArgmax(target.head.lm_head.weight)
    assert generate(target, prompt, 40, stop_at_eos=False).tokens == want
    for spec in (SpecConfig(k=4, pipeline=False), SpecConfig(k=4, tree_width=2, pipeline=False), SpecConfig()):
        assert generate(target, prompt, 40, draft=draft, spec=spec, stop_at_eos=False).tokens == want
    assert target.head.certified.rows > 40


def test_a_last_peer_reserves_the_copy_of_a_large_float32_head():
    from peer.serve import head_bytes

    def cfg(vocab, hidden):
        return ModelConfig(model_type="llama", vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden,
                           num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1,
                           tie_word_embeddings=True, sliding_windows=(None,))
    smol = cfg(49152, 576)
    assert head_bytes(smol, torch.float32) == (49152 + 1) * 576 * 4 + 49152 * 576 * 2
    assert head_bytes(smol, torch.bfloat16, "cuda") == (49152 + 1) * 576 * 2
    packed_copy = 49152 * 576 * 2 if packing_works(torch.bfloat16) else 0  # a bfloat16 head's rows as if alone
    assert head_bytes(smol, torch.bfloat16) == (49152 + 1) * 576 * 2 + packed_copy
    assert head_bytes(cfg(4096, 256), torch.float32) == (4096 + 1) * 256 * 4  # too small for a copy


def test_a_smollm2_sized_head_pays_for_several_rows_where_the_cpu_has_bfloat16():
    """A verification step's rows through a SmolLM2-sized head: bfloat16 ~0.2x float32 on a CPU with bfloat16
    instructions (`scripts/bench_bf16_rows.py`), so the decision for several rows must not hang on 1 row's close
    call (~0.6x)."""
    import os

    import pytest
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    if "avx512_bf16" not in flags and "amx_bf16" not in flags:
        pytest.skip("this CPU has no bfloat16 instructions")
    torch.manual_seed(5)
    assert worth_it(0.05 * torch.randn(49152, 576))[1]


def test_one_row_and_several_are_decided_apart(monkeypatch):
    """Where the copy pays for several rows only, 1-row calls take the float32 logits and several the certified
    path (and the other way round); both answer the logits' argmax."""
    from peer.model import blocks
    cfg = ModelConfig(model_type="llama", vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_windows=(None,))
    hidden = torch.randn(9, 64)
    for decided in ((False, True), (True, False)):
        torch.manual_seed(6)
        head = ModelHead(cfg)
        torch.nn.init.normal_(head.lm_head.weight)
        monkeypatch.setattr(blocks, "worth_it", lambda weight, d=decided: d)
        want = head.logits(hidden).argmax(-1)
        assert torch.equal(head.argmax(hidden[:1]), want[:1]) and torch.equal(head.argmax(hidden), want)
        assert isinstance(head.certified, CertifiedArgmax)
        assert head.certified.rows == (1 if decided[0] else 9)


def test_the_probe_times_the_head_as_the_runs_use_it(monkeypatch):
    """Greedy runs verify with `ModelHead.argmax`; the simulator's client head cost must be that one's."""
    from swarm.bench.probe import _head_costs
    cfg = ModelConfig(model_type="llama", vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_windows=(None,))
    head = ModelHead(cfg)
    calls = []
    real = head.argmax
    monkeypatch.setattr(head, "argmax", lambda h: calls.append(len(h)) or real(h))
    _head_costs(head, 1, greedy=False)
    assert calls == []
    costs = _head_costs(head, 1, greedy=True)
    assert sorted(set(calls)) == sorted(costs) and all(ms > 0 for ms in costs.values())
