"""Static-shape steps (what a CUDA graph captures), run eagerly on CPU against the eager step.

Padding to a bucket, writing keys and values by slot index and attending over the whole allocated cache
under a mask must give the eager step's hidden states and cache, for chains, trees, compaction, sliding
windows and every bucket. The capture itself runs on a GPU only (`scripts/gpu_check.sh`); its fallback
(a capture that fails runs eagerly from then on) is checked here.
"""

import logging

import pytest
import torch

from peer.model import Checkpoint, StepLayout
from peer.model import graphs
from peer.model.graphs import BUCKETS, bucket, spare_slots

TOL = 1e-5
TREE = (-1, 0, 0, 1, 1, 2, -1, 6, 7, 3)


def ids_of(n, vocab, seed=0):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def pair(tiny, arch):
    """(head, eager blocks, static blocks) of one checkpoint; the static range runs static steps without graphs."""
    ckpt = Checkpoint(tiny(arch).path)
    eager, static = ckpt.load_blocks(0, 8), ckpt.load_blocks(0, 8)
    eager.static_steps("off")
    assert static.static_steps("eager") is not None
    return ckpt.load_head(), eager, static


def test_buckets_and_spare_slots():
    assert [bucket(n) for n in (1, 2, 3, 5, 9, 17, 32)] == [1, 2, 4, 8, 16, 32, 32]
    assert bucket(33) is None
    for length in (1, 7, 64, 100, 4096):
        spare = spare_slots(length)
        assert spare >= BUCKETS[-1] - 1 and (length + spare) % graphs.ALIGN == 0


@pytest.mark.parametrize("arch", ["llama3", "mistral"])  # mistral: sliding window 8, shorter than the steps reach
def test_static_steps_equal_eager_steps(tiny, arch):
    head, eager, static = pair(tiny, arch)
    v = head.cfg.vocab_size
    c_eager, c_static = eager.new_cache(120), static.new_cache(120)
    assert c_eager.spare == 0 and c_static.spare == spare_slots(120)
    # a prefill (eager in both: over 32 nodes), then chains of every size, some padded, a rollback, a tree
    steps = [StepLayout(0, 40), StepLayout(40, 1), StepLayout(41, 3), StepLayout(44, 5), StepLayout(46, 17),
             StepLayout(63, 32), StepLayout(90, 2), StepLayout(92, len(TREE), TREE),
             StepLayout(95, 1, compact=(92, (0, 1, 3))), StepLayout(96, 8)]
    for k, layout in enumerate(steps):
        x = head.embed(ids_of(layout.n, v, seed=k))
        want, got = eager(x, c_eager, layout), static(x, c_static, layout)
        assert got.shape == want.shape
        assert (got - want).abs().max().item() < TOL, layout
        n = c_eager.length
        assert c_static.length == n
        assert (c_static.keys[:, :, :, :n] - c_eager.keys[:, :, :, :n]).abs().max().item() < TOL
        assert (c_static.values[:, :, :, :n] - c_eager.values[:, :, :, :n]).abs().max().item() < TOL
        # padding rows wrote only spare slots: the session's unused slots hold what the eager cache's hold
        # (zeros, or what a rolled-back step left there)
        assert (c_static.keys[:, :, :, n:120] - c_eager.keys[:, :, :, n:120]).abs().max().item() < TOL
    assert sorted(c_static.graphs) == [1, 2, 4, 8, 16, 32]  # every bucket got its static buffers


def test_batches_and_caches_without_spare_slots_run_eagerly(tiny):
    head, eager, static = pair(tiny, "llama3")
    v = head.cfg.vocab_size
    plain = eager.new_cache(64)  # made by the "off" range: no spare slots
    assert not static._static.accepts(plain, StepLayout(0, 3))  # no room for the padding row
    a, b = static.new_cache(64), static.new_cache(64)
    xa, xb = head.embed(ids_of(5, v, 1)), head.embed(ids_of(3, v, 2))
    outs = static.forward_batch([(xa, a, StepLayout(0, 5)), (xb, b, StepLayout(0, 3))])
    assert not a.graphs and not b.graphs  # a batch of two sessions ran eagerly
    ref = eager(xa, eager.new_cache(64), StepLayout(0, 5))
    assert (outs[0] - ref).abs().max().item() < 1e-4


def test_a_failed_capture_falls_back_to_eager_once(tiny, monkeypatch, caplog):
    head, eager, static = pair(tiny, "llama3")
    engine = static._static
    engine.capture = True  # as on a GPU, but the capture fails

    def fail(st, cache):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(engine, "_capture", fail)
    x = head.embed(ids_of(4, head.cfg.vocab_size, 3))
    c_static, c_eager = static.new_cache(32), eager.new_cache(32)
    with caplog.at_level(logging.WARNING):
        got = static(x, c_static, StepLayout(0, 4))
    assert "capture" in caplog.text and static._static is None
    assert (got - eager(x, c_eager, StepLayout(0, 4))).abs().max().item() < TOL
    got = static(x[:1], c_static, StepLayout(4, 1))  # later steps: eager, no second warning
    assert (got - eager(x[:1], c_eager, StepLayout(4, 1))).abs().max().item() < TOL


def test_cuda_mode_is_off_on_a_cpu_and_modes_are_checked(tiny):
    blocks = Checkpoint(tiny("llama3").path).load_blocks(0, 2)
    assert blocks.static_steps("cuda") is None  # no graphs on a CPU: the eager path, no spare slots
    assert blocks.new_cache(16).spare == 0
    with pytest.raises(ValueError, match="static-step mode"):
        blocks.static_steps("fast")
    with pytest.raises(ValueError, match="static-step mode"):
        graphs.set_default_mode("fast")


def test_no_cuda_graphs_flag_sets_the_process_default():
    from types import SimpleNamespace

    from swarm.flags import apply_device_args

    try:
        apply_device_args(SimpleNamespace(device="cpu", cuda_graphs=False))
        assert graphs.default_mode() == "off"
        apply_device_args(SimpleNamespace(device="cpu", cuda_graphs=True))
        assert graphs.default_mode() == "cuda"
    finally:
        graphs.set_default_mode("cuda")
