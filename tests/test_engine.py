"""Block ranges, rollback, draft trees and compaction: each checked against a plain sequential run."""

import pytest
import torch

from peer.model import CacheError, Checkpoint, KVCache, StepLayout

TOL = 1e-5


def ids_of(n, vocab, seed=0):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def engine(tiny):
    ckpt = Checkpoint(tiny("llama3").path)
    return ckpt, ckpt.load_head(), ckpt.load_blocks(0, 8)


def fresh_logits(head, blocks, ids):
    cache = blocks.new_cache(len(ids))
    return head.logits(blocks(head.embed(ids), cache, StepLayout(0, len(ids)))), cache


@pytest.mark.parametrize("cuts", [(0, 4, 8), (0, 3, 5, 8), (0, 1, 7, 8)])
def test_consecutive_ranges_equal_whole_model(engine, cuts):
    ckpt, head, whole = engine
    ids = ids_of(12, ckpt.config.vocab_size)
    ref, _ = fresh_logits(head, whole, ids)
    ranges = [ckpt.load_blocks(a, b) for a, b in zip(cuts, cuts[1:])]
    caches = [r.new_cache(16) for r in ranges]

    def run(hidden, layout):
        for r, c in zip(ranges, caches):
            hidden = r(hidden, c, layout)
        return head.logits(hidden)

    got = [run(head.embed(ids[:5]), StepLayout(0, 5))]
    got += [run(head.embed(ids[p:p + 1]), StepLayout(p, 1)) for p in range(5, 12)]
    assert (torch.cat(got) - ref).abs().max().item() < TOL


def test_rollback_truncates_what_follows(engine):
    """Run 12 tokens, start again at 7 with 5 different ones == a fresh run of those 12."""
    ckpt, head, blocks = engine
    v = ckpt.config.vocab_size
    first, other = ids_of(12, v, seed=1), ids_of(5, v, seed=2)
    cache = blocks.new_cache(12)
    blocks(head.embed(first), cache, StepLayout(0, 12))
    out = head.logits(blocks(head.embed(other), cache, StepLayout(7, 5)))
    want = torch.cat([first[:7], other])
    ref, ref_cache = fresh_logits(head, blocks, want)
    assert (out - ref[7:]).abs().max().item() < TOL
    assert cache.length == 12
    assert (cache.keys[:, :, :, :12] - ref_cache.keys).abs().max().item() < TOL


TREE = (-1, 0, 0, 1, 1, 2, 5, 6, -1, 8)  # two roots; paths of depth 1..4


def leaves(parents):
    return [i for i in range(len(parents)) if i not in parents]


def path_to(parents, node):
    path = []
    while node >= 0:
        path.append(node)
        node = parents[node]
    return path[::-1]


@pytest.mark.parametrize("arch", ["llama3", "mistral"])  # mistral: sliding window 8 < prefix + depth
def test_tree_pass_equals_sequential_run_of_every_path(tiny, arch):
    ckpt = Checkpoint(tiny(arch).path)
    head, blocks = ckpt.load_head(), ckpt.load_blocks(0, 8)
    v = ckpt.config.vocab_size
    prefix, nodes = ids_of(9, v, seed=3), ids_of(len(TREE), v, seed=4)
    cache = blocks.new_cache(32)
    blocks(head.embed(prefix), cache, StepLayout(0, 9))
    tree = head.logits(blocks(head.embed(nodes), cache, StepLayout(9, len(TREE), TREE)))
    for leaf in leaves(TREE):
        path = path_to(TREE, leaf)
        ref, _ = fresh_logits(head, blocks, torch.cat([prefix, nodes[path]]))
        assert (tree[path] - ref[9:]).abs().max().item() < TOL, path


@pytest.mark.parametrize("accepted_leaf", [4, 7, 9, 0])
def test_compaction_leaves_the_cache_of_the_accepted_path(engine, accepted_leaf):
    ckpt, head, blocks = engine
    v = ckpt.config.vocab_size
    prefix, nodes = ids_of(6, v, seed=5), ids_of(len(TREE), v, seed=6)
    cache = blocks.new_cache(32)
    blocks(head.embed(prefix), cache, StepLayout(0, 6))
    blocks(head.embed(nodes), cache, StepLayout(6, len(TREE), TREE))
    path = path_to(TREE, accepted_leaf)
    cache.compact(6, path)
    want = torch.cat([prefix, nodes[path]])
    assert cache.length == len(want)
    _, ref_cache = fresh_logits(head, blocks, want)
    assert (cache.keys[:, :, :, :len(want)] - ref_cache.keys).abs().max().item() < TOL
    assert (cache.values[:, :, :, :len(want)] - ref_cache.values).abs().max().item() < TOL
    # and decoding continues as if the accepted path had been run plainly
    nxt = ids_of(3, v, seed=7)
    got = head.logits(blocks(head.embed(nxt), cache, StepLayout(len(want), 3)))
    ref, _ = fresh_logits(head, blocks, torch.cat([want, nxt]))
    assert (got - ref[len(want):]).abs().max().item() < TOL


def test_compaction_rejects_paths_that_are_not_paths(engine):
    ckpt, head, blocks = engine
    cache = blocks.new_cache(32)
    nodes = ids_of(len(TREE), ckpt.config.vocab_size)
    blocks(head.embed(nodes[:3]), cache, StepLayout(0, 3))
    blocks(head.embed(nodes), cache, StepLayout(3, len(TREE), TREE))
    for bad in ([1], [0, 3, 2], [0, 5], [0, 1, 5], [10], [-1], [8, 1]):
        with pytest.raises(CacheError):
            cache.compact(3, bad)
    assert cache.length == 3 + len(TREE)  # a refused compaction changes nothing
    with pytest.raises(CacheError):
        cache.compact(20, [0])


def test_step_validation(engine):
    ckpt, head, blocks = engine
    cache = blocks.new_cache(8)
    x = head.embed(ids_of(4, ckpt.config.vocab_size))
    with pytest.raises(CacheError, match="only 0 positions"):
        blocks(x, cache, StepLayout(2, 4))  # a gap before the step
    with pytest.raises(CacheError, match="holds 8"):
        blocks(torch.cat([x, x, x]), cache, StepLayout(0, 12))  # beyond the session's length
    with pytest.raises(CacheError, match="do not match"):
        blocks(x, cache, StepLayout(0, 3))  # 4 rows for 3 nodes
    for parents in ((0, 0, 1, 2), (-1, 1, 0, 0), (-1, -2, 0, 1), (-1, 0)):
        with pytest.raises(CacheError):
            StepLayout(0, 4, parents)
    with pytest.raises(CacheError):
        StepLayout(-1, 1)


def test_bytes_per_token_accounting(engine):
    ckpt, _, blocks = engine
    cfg = ckpt.config
    per_token = 2 * 8 * cfg.num_key_value_heads * cfg.head_dim * 4
    assert blocks.bytes_per_token() == per_token
    assert blocks.new_cache(100).nbytes == 100 * per_token
    assert KVCache.bytes_per_token(4, 8, 128, torch.bfloat16) == 2 * 4 * 8 * 128 * 2
