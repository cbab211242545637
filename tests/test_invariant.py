"""peer.model.invariant: rows computed as if alone. A row policy pads and splits calls without changing any row; the
probe finds a kernel's row-invariant span and refuses one that has none; float64 attention is SDPA's attention; and
half-precision blocks and heads loaded by default compute a verification step (chain or tree) and a batch of
sessions bit for bit as 1-token steps and single sessions do, so bfloat16 speculative greedy decoding is plain
bfloat16 greedy decoding token for token (it was not: README "bfloat16 everywhere")."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from peer.model import Checkpoint, StepLayout
from peer.model.invariant import RowPolicy, exact_attention, probe
from peer.model.packed import packing_works


def test_a_policy_pads_and_splits_without_changing_a_row():
    sizes = []

    def fn(x):
        sizes.append(len(x))
        return x * 2 + 1

    x = torch.randn(70, 5)
    policy = RowPolicy(2, 32)
    for m in (0, 1, 2, 9, 32, 33, 70):
        sizes.clear()
        assert torch.equal(policy.apply(fn, x[:m]), x[:m] * 2 + 1)
        assert all(2 <= s <= 32 for s in sizes)
    assert sizes == [24, 23, 23]  # 70 rows: three calls of nearly equal size


def test_the_probe_finds_where_a_kernel_depends_on_its_rows():
    def after(limit):  # rows round differently in calls of more than `limit` rows
        return lambda x: x * 3 + (1e-3 if len(x) > limit else 0.0)

    assert probe(after(20), 6, torch.float32) == RowPolicy(1, 20)
    assert probe(lambda x: x * 3 + (1e-3 if len(x) == 1 else 0.0), 6, torch.float32) == RowPolicy(2, 32)
    assert probe(after(4), 6, torch.float32) is None  # too narrow to be worth it: the layer stays as it was
    assert probe(lambda x: x + x.sum(0), 6, torch.float32) is None  # every row depends on the others


@pytest.mark.parametrize("kind", ["causal", "one row", "tree"])
@pytest.mark.parametrize("heads,kv", [(9, 3), (4, 4)])
def test_float64_attention_is_sdpa(kind, heads, kv):
    g = torch.Generator().manual_seed(heads + kv)
    n, length = (1 if kind == "one row" else 6), 40
    q, k, v = (torch.randn(1, h, m, 16, generator=g) for h, m in ((heads, n), (kv, length), (kv, length)))
    mask = None
    if kind == "tree":  # every row sees the prefix, itself and a random subset of the step's earlier rows
        mask = torch.ones(n, length, dtype=torch.bool).tril_(length - n) & (torch.rand(n, length, generator=g) > 0.4)
        mask[:, :length - n] = True
        mask[torch.arange(n), length - n + torch.arange(n)] = True
    want_mask = mask if mask is not None else torch.ones(n, length, dtype=torch.bool).tril_(length - n)
    want = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=want_mask,
                                          enable_gqa=heads != kv)
    got = exact_attention(q, k, v, mask)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert (got.double() - want).abs().max() < 1e-6


def _invariant_blocks(ckpt, dtype):
    blocks = ckpt.load_blocks(0, ckpt.config.num_hidden_layers, dtype)
    if blocks.invariant is None:
        pytest.skip(f"no {dtype} linear kernel here has a row-invariant span (the blocks run as before)")
    return blocks


bf16 = pytest.mark.skipif(not packing_works(torch.bfloat16), reason="no oneDNN bfloat16 packing here")


@bf16
@pytest.mark.parametrize("dtype", ["bfloat16", "float32-forced"])
def test_a_verification_step_is_its_1_token_steps_bit_for_bit(tiny, dtype):
    ckpt = Checkpoint(tiny("llama2").path)
    if dtype == "float32-forced":
        blocks = ckpt.load_blocks(0, ckpt.config.num_hidden_layers, "float32", invariant=True)
        if blocks.invariant is None:
            pytest.skip("no float32 linear kernel here has a row-invariant span")
        dtype = "float32"
    else:
        blocks = _invariant_blocks(ckpt, dtype)
    assert "attention in float64" in blocks.invariant
    head = ckpt.load_head(dtype)
    ids = torch.randint(0, ckpt.config.vocab_size, (60,), generator=torch.Generator().manual_seed(3))
    e = head.embed(ids)
    a, b = blocks.new_cache(64), blocks.new_cache(64)
    blocks(e[:39], a, StepLayout(0, 39))
    blocks(e[:40], b, StepLayout(0, 40))
    multi = blocks(e[39:57], a, StepLayout(39, 18))[1:]  # 17 rows after the prefix, as a round sends them
    single = torch.cat([blocks(e[40 + j:41 + j], b, StepLayout(40 + j, 1)) for j in range(17)])
    assert torch.equal(multi, single)
    if dtype == "bfloat16":  # (a float32 head's greedy tokens come from `argmax`'s per-candidate products instead)
        assert head.rows is not None
        assert torch.equal(head.logits(multi), torch.cat([head.logits(single[j:j + 1]) for j in range(17)]))


@bf16
def test_a_tree_and_a_batch_of_sessions_are_their_rows_alone(tiny):
    ckpt = Checkpoint(tiny("llama2").path)
    blocks = _invariant_blocks(ckpt, "bfloat16")
    e = ckpt.load_head("bfloat16").embed(torch.arange(10, 40))
    # a tree after 20 positions: nodes 0 -> 1 -> 2 and 0 -> 3 -> 4; each node against its path run as a chain
    parents = [-1, 0, 1, 0, 3]
    tree_cache = blocks.new_cache(32)
    blocks(e[:20], tree_cache, StepLayout(0, 20))
    tree = blocks(e[20:25], tree_cache, StepLayout(20, 5, parents=parents))
    for path in ([0, 1, 2], [0, 3, 4]):
        chain_cache = blocks.new_cache(32)
        blocks(e[:20], chain_cache, StepLayout(0, 20))
        for depth, node in enumerate(path):
            row = blocks(e[20 + node:21 + node], chain_cache, StepLayout(20 + depth, 1))
            assert torch.equal(row[0], tree[node])
    # two sessions in one batch: each as it is alone
    c1, c2, d1, d2 = (blocks.new_cache(32) for _ in range(4))
    for c in (c1, d1):
        blocks(e[:12], c, StepLayout(0, 12))
    for c in (c2, d2):
        blocks(e[5:25], c, StepLayout(0, 20))
    together = blocks.forward_batch([(e[12:15], c1, StepLayout(12, 3)), (e[25:26], c2, StepLayout(20, 1))])
    assert torch.equal(together[0], blocks(e[12:15], d1, StepLayout(12, 3)))
    assert torch.equal(together[1], blocks(e[25:26], d2, StepLayout(20, 1)))


@bf16
@pytest.mark.parametrize("tree", [False, True])
def test_bfloat16_speculative_greedy_is_plain_bfloat16_greedy(tiny, tmp_path_factory, tree):
    from conftest import make_checkpoint
    from swarm.decode.generate import LocalModel, generate
    from swarm.decode.speculative import SpecConfig

    target = LocalModel.load(tiny("llama2").path, dtype="bfloat16")
    if target.blocks.invariant is None:
        pytest.skip("no bfloat16 linear kernel here has a row-invariant span")
    other = make_checkpoint(tmp_path_factory.mktemp("draft"), "llama2", seed=11, num_hidden_layers=2)
    prompt = [5, 17, 42, 99, 3, 250]
    plain = generate(target, prompt, 48, stop_at_eos=False).tokens
    spec = SpecConfig(k=4, tree_width=3, pipeline=False) if tree else SpecConfig(k=8, pipeline=False)
    for draft in (target, LocalModel.load(other.path, dtype="bfloat16")):  # a perfect draft: every round full
        assert generate(target, prompt, 48, draft=draft, spec=spec, stop_at_eos=False).tokens == plain


def test_float32_and_drafts_stay_as_they_were(tiny):
    from swarm.decode.drafter import load_draft

    ckpt = Checkpoint(tiny("llama2").path)
    assert ckpt.load_blocks(0, 2).invariant is None and ckpt.load_head().rows is None  # float32: not by default
    draft = load_draft(tiny("llama2").path, quant="none")
    assert draft.blocks.invariant is None and draft.head.rows is None


def test_a_long_step_attends_in_chunks_of_queries_as_in_one(monkeypatch):
    from peer.model import invariant

    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, h, m, 16, generator=g) for h, m in ((4, 30), (2, 50), (2, 50)))
    whole = exact_attention(q, k, v, None)
    monkeypatch.setattr(invariant, "SCORES_AT_ONCE", 4 * 50 * 7)  # 7 query rows a matmul
    assert (exact_attention(q, k, v, None) - whole).abs().max() < 1e-6


def test_auto_dtype_is_bfloat16_only_on_a_cpu_with_bfloat16_instructions():
    from peer.model.checkpoint import auto_dtype
    from peer.model.packed import bfloat16_native, has_bfloat16_flags

    assert has_bfloat16_flags("processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16 amx_tile\n")
    assert has_bfloat16_flags("flags\t\t: fpu amx_bf16 amx_tile\n")
    assert not has_bfloat16_flags("flags\t\t: fpu sse2 avx2 avx512f avx512_vnni\nbugs\t\t: amx_bf16\n")
    assert auto_dtype("cuda") == auto_dtype("cuda:1") == "float32"
    assert auto_dtype("cpu") == ("bfloat16" if bfloat16_native() else "float32")


def test_the_cli_default_dtype_is_auto_and_speculation_stays_exact_in_it():
    """`swarm generate --local` with the default dtype (auto: bfloat16 on this CPU where it has the instructions):
    the JSON says which it took, and speculative greedy output is plain greedy output token for token."""
    import json
    import subprocess
    import sys

    from peer.model.checkpoint import auto_dtype

    def run(*flags):
        out = subprocess.run([sys.executable, "-m", "swarm.cli", "generate", "--model", "tiny", "--local", "--prompt",
                              "def fibonacci(n):", "--max-new-tokens", "40", "--ignore-eos", "--json", *flags],
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    plain, spec = run("--no-speculative"), run("--speculative")
    assert plain["dtype"] == spec["dtype"] == auto_dtype("cpu")
    assert spec["tokens"] == plain["tokens"] and spec["rounds"] < 40  # (rounds of several tokens)
