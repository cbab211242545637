"""Issue 19: steps of different sessions computed together, in the engine and on a peer.

The engine: `BlockRange.forward_batch` against each session's own `forward` (chains of different
lengths, draft trees, compaction, different cache lengths, sliding windows, int8 weights). A batch of
one is bit for bit an unbatched step; in a larger batch a row's matmuls may round differently in the
last bits (the BLAS picks its kernel by the number of rows), so those are compared within 1e-5 of the
largest value. The scheduler: which steps form a batch, and how long its gathering window waits. The
client's head: overlapping `logits` calls from several threads share one matmul. A peer: concurrent sessions batched, their
greedy tokens equal to the local run's; a step refused in a batch fails its own session only.
"""

from __future__ import annotations

import asyncio
import copy
import threading
import time

import pytest
import torch
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

from peer.batching import Backlog, Batcher, BatchSettings
from peer.limits import Limits
from peer.model import CacheError, Checkpoint, ContextTooLong, StepLayout
from peer.model.batched import BatchedCalls
from peer.server import BlockServer, Session, _Refusal
from protocol import messages as m
from protocol import sealing
from peer.transport import dial, listen_tcp
from swarm.client.background import BackgroundLoop
from swarm.client.chain import ChainSession, RemoteError
from swarm.client.config import ClientConfig
from swarm.client.route import Hop
from swarm.decode.generate import LocalModel, generate
from conftest import stop_in_process

RTOL = 1e-5
TREE = (-1, 0, 0, 1, 1, 2, -1)


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool((a - b).abs().max() <= RTOL * max(1.0, float(b.abs().max())))


def prefilled(blocks, lengths, seed=0):
    """A cache per length, each holding that many random positions."""
    g = torch.Generator().manual_seed(seed)
    caches = []
    for n in lengths:
        cache = blocks.new_cache(96)
        if n:
            blocks(torch.randn(n, blocks.cfg.hidden_size, generator=g), cache, StepLayout(0, n))
        caches.append(cache)
    return caches


def rounds(lengths):
    """Three rounds of steps for sessions whose caches hold `lengths`: chains of 1..5 nodes, a tree, and a
    compaction of that tree, mixed across sessions."""
    first, second, third = [], [], []
    for i, n in enumerate(lengths):
        kind = i % 3
        if kind == 0:  # decode steps
            first.append(StepLayout(n, 1)), second.append(StepLayout(n + 1, 1)), third.append(StepLayout(n + 2, 1))
        elif kind == 1:  # a tree, then keep one of its paths and go on
            first.append(StepLayout(n, len(TREE), TREE))
            second.append(StepLayout(n + 3, 2, compact=(n, (0, 1, 3))))
            third.append(StepLayout(n + 5, 4))
        else:  # chains of several nodes, the last one rolled back
            first.append(StepLayout(n, 5)), second.append(StepLayout(n + 2, 3)), third.append(StepLayout(n + 5, 1))
    return [first, second, third]


@pytest.mark.parametrize("arch,quant", [("llama3", "none"), ("mistral", "none"), ("llama2", "int8")])
def test_forward_batch_equals_each_session_alone(tiny, arch, quant):
    blocks = Checkpoint(tiny(arch).path).load_blocks(0, 8, quant=quant)
    lengths = [0, 3, 9, 1, 14, 6]  # mistral's window is 8: some sessions attend past it
    batched = prefilled(blocks, lengths)
    alone = copy.deepcopy(batched)
    g = torch.Generator().manual_seed(1)
    for layouts in rounds(lengths):
        hidden = [torch.randn(lay.n, blocks.cfg.hidden_size, generator=g) for lay in layouts]
        outs = blocks.forward_batch([(h, c, lay) for h, c, lay in zip(hidden, batched, layouts)])
        for h, c, lay, out in zip(hidden, alone, layouts, outs):
            ref = blocks(h, c, lay)
            assert out.shape == ref.shape and close(out, ref), lay
    for a, b in zip(batched, alone):
        assert a.length == b.length
        assert close(a.keys[:, :, :, :a.length], b.keys[:, :, :, :b.length])
        assert close(a.values[:, :, :, :a.length], b.values[:, :, :, :b.length])


def test_a_batch_of_one_is_exactly_forward(tiny):
    blocks = Checkpoint(tiny("llama3").path).load_blocks(2, 6)
    (a,), (b,) = prefilled(blocks, [5]), prefilled(blocks, [5])
    g = torch.Generator().manual_seed(2)
    for lay in (StepLayout(5, 1), StepLayout(6, len(TREE), TREE), StepLayout(8, 1, compact=(6, (0, 1))),
                StepLayout(9, 3)):
        h = torch.randn(lay.n, 64, generator=g)
        (out,) = blocks.forward_batch([(h, a, lay)])
        assert torch.equal(out, blocks(h, b, lay))
    assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_a_refused_step_fails_alone(tiny):
    blocks = Checkpoint(tiny("llama3").path).load_blocks(0, 8)
    caches = prefilled(blocks, [4, 4, 4])
    ref = copy.deepcopy(caches)
    g = torch.Generator().manual_seed(3)
    h = [torch.randn(2, 64, generator=g) for _ in range(3)]
    bad = StepLayout(7, 2)  # a gap: only 4 positions are cached
    outs = blocks.forward_batch([(h[0], caches[0], StepLayout(4, 2)), (h[1], caches[1], bad),
                                 (h[2][:1], caches[2], StepLayout(4, 2))])  # 1 row for 2 nodes
    assert isinstance(outs[1], CacheError) and "only 4 positions" in str(outs[1])
    assert isinstance(outs[2], CacheError) and "do not match" in str(outs[2])
    assert torch.equal(outs[0], blocks(h[0], ref[0], StepLayout(4, 2)))  # alone in its batch: exact
    assert caches[1].length == caches[2].length == 4 and torch.equal(caches[1].keys, ref[1].keys)
    with pytest.raises(CacheError, match="only 4 positions"):
        blocks(h[1], caches[1], bad)


class _Session:
    def __init__(self, name):
        self.id = name


def test_batches_form_in_arrival_order_within_the_cap():
    async def scenario():
        batcher = Batcher(BatchSettings(max_batch_tokens=8), live=lambda s: s.id != "gone")
        a, b, c, d, gone = (_Session(x) for x in ("a", "b", "c", "d", "gone"))
        order = [(a, 1), (b, 6), (a, 1), (gone, 1), (c, 4), (d, 1), (b, 1), (c, 20), (d, 1)]
        futures = [batcher.submit(s, torch.zeros(n, 4), StepLayout(0, n)) for s, n in order]
        batcher._task.cancel()  # (take batches by hand)
        names = []
        while batcher.queue:
            names.append([f"{j.session.id}{j.n}" for j in batcher.take()])
        await batcher.close()
        return names, futures

    names, futures = asyncio.run(scenario())
    # one step per session, at most 8 positions; c4 is passed over (then heads the next batch), and b's and a's
    # later steps never overtake their earlier ones; c20 is bigger than the cap: alone
    assert names == [["a1", "b6", "d1"], ["a1", "c4", "b1", "d1"], ["c20"]]
    assert futures[3].cancelled()  # a step of a session that is gone never runs
    assert not BatchSettings(batching=False).batching
    with pytest.raises(ValueError):
        BatchSettings(max_batch_tokens=0)


def test_the_gathering_window_is_bounded_by_recent_batches_and_ends_when_everyone_is_queued():
    """A step waits for the other sessions that stepped lately, at most `batch_wait_ms` and at most as long
    as recent batches took; it stops waiting as soon as every such session has a step queued, and does not
    wait at all (but every PROBE-th time) while recent windows gathered little."""
    async def waited(batch_seconds, late=None, sessions=2, gained=1.0):
        batcher = Batcher(BatchSettings(batch_wait_ms=1000), sessions=lambda: sessions)
        batcher.gained = gained
        batcher._task = asyncio.get_running_loop().create_future()  # (no scheduler: call _gather by hand)
        batcher.batch_seconds = batch_seconds
        a, b = _Session("a"), _Session("b")
        batcher._active[id(b)] = batcher._active[id(a)] = time.monotonic()  # both stepped lately
        batcher.submit(a, torch.zeros(1, 4), StepLayout(0, 1))
        if late is not None:
            asyncio.get_running_loop().call_later(late, batcher.submit, b, torch.zeros(1, 4), StepLayout(0, 1))
        t0 = time.monotonic()
        await batcher._gather()
        took, queued = time.monotonic() - t0, len(batcher.queue)
        if late is not None:
            assert batcher.gained == 0.2 * 1 + 0.8 * gained  # this window gathered one step
        batcher._task = None
        await batcher.close()
        return took, queued

    assert asyncio.run(waited(0.0))[0] < 0.01  # no batch yet: nothing to measure the window by
    took, queued = asyncio.run(waited(0.15))
    assert 0.12 < took < 0.5 and queued == 1  # b never came: the window closed after a recent batch's time
    took, queued = asyncio.run(waited(0.5, late=0.05))
    assert 0.04 < took < 0.3 and queued == 2  # b's step came: no reason to wait longer
    took, queued = asyncio.run(waited(0.5, sessions=1))
    assert took < 0.01  # b has closed: a alone never waits
    assert asyncio.run(waited(0.15, gained=0.3))[0] < 0.01  # recent windows gathered little: no wait
    assert BatchSettings().batch_wait_ms > 0  # the window is on by default


def test_overlapping_calls_share_one_call_and_get_their_own_rows():
    started, release = threading.Event(), threading.Event()
    runs = []

    def fn(x):
        runs.append(len(x))
        if len(runs) == 1:  # hold the first call until the others have queued behind it
            started.set()
            release.wait(5)
        if (x < 0).any():
            raise ValueError("negative rows")
        return x * 2

    calls = BatchedCalls(fn)
    inputs = [torch.full((1, 3), 1.0), torch.full((2, 3), 2.0), torch.full((1, 1, 3), 3.0), torch.full((1, 3), 4.0)]
    outs = [None] * len(inputs)

    def call(i):
        try:
            outs[i] = calls(inputs[i])
        except ValueError as e:
            outs[i] = e

    first = threading.Thread(target=call, args=(0,))
    first.start()
    assert started.wait(5)
    rest = [threading.Thread(target=call, args=(i,)) for i in range(1, len(inputs))]
    for t in rest:
        t.start()
    while len(calls._queue) < len(rest):
        time.sleep(0.001)
    release.set()
    for t in [first, *rest]:
        t.join(5)
    assert runs == [1, 4]  # the first alone, then the three queued calls' 4 rows in one call
    for x, y in zip(inputs, outs):
        assert y.shape == x.shape and torch.equal(y, x * 2)
    assert (calls.calls, calls.batches) == (4, 2) and not calls._busy
    with pytest.raises(ValueError, match="negative"):  # a failure reaches its caller, and the next call runs
        calls(torch.full((1, 3), -1.0))
    assert torch.equal(calls(torch.ones(2)), torch.full((2,), 2.0))


def test_the_head_alone_is_exact_and_threads_at_once_agree(tiny):
    head = Checkpoint(tiny("llama3").path).load_head()
    g = torch.Generator().manual_seed(4)
    rows = [torch.randn(1 + i % 3, 64, generator=g) for i in range(12)]
    with torch.inference_mode():
        alone = [head.lm_head(head.norm(x)).float() for x in rows]
    assert all(torch.equal(head.logits(x), want) for x, want in zip(rows, alone))
    got = [None] * len(rows)
    barrier = threading.Barrier(len(rows))

    def call(i):
        barrier.wait()
        for _ in range(5):
            got[i] = head.logits(rows[i])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(rows))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert all(close(y, want) for y, want in zip(got, alone))
    assert copy.deepcopy(head).logits(rows[0]).shape == alone[0].shape  # a copy has its own, idle batcher


def test_a_sessions_replies_leave_in_order(tiny):
    """A step's reply waits for the reply to the session's step before it, whichever output is ready
    first (sealed counters and onion layers must leave in order; a reply task that first runs after its
    output is ready must not overtake an earlier one)."""
    blocks = Checkpoint(tiny("llama3").path).load_blocks(0, 8)

    class Owner:
        name = client = "owner"
        sent: list[int] = []

        async def send(self, codec, msg, onion=b""):
            self.sent.append(msg.step)

    async def scenario():
        server = BlockServer(blocks, "m", batching=BatchSettings(batching=False))
        futures = []
        server.batcher.submit = lambda *_: futures.append(asyncio.get_running_loop().create_future()) or futures[-1]
        owner, plain = Owner(), sealing.Plain()
        session = server.sessions["s"] = Session("s", blocks, blocks.new_cache(8), owner, plain, "float32", None)
        for step in (1, 2, 3):
            server._step(session, m.Step("s", step, step - 1, torch.zeros(1, 64)), memoryview(b""),
                         _Refusal(owner, plain), Backlog(100))
        for i in (2, 1):  # the later outputs first
            futures[i].set_result(torch.zeros(1, 64))
        await asyncio.sleep(0.05)
        early = list(owner.sent)
        futures[0].set_result(torch.zeros(1, 64))
        await asyncio.sleep(0.05)
        await server.close()
        return early, owner.sent

    early, sent = asyncio.run(scenario())
    assert early == [] and sent == [1, 2, 3]


class Swarm:
    """In-process peers on direct TCP (one background loop), reached by sealed `ChainSession`s."""

    def __init__(self, path, spans, settings: BatchSettings, limits: Limits = Limits()):
        self.bg, ckpt = BackgroundLoop(), Checkpoint(path)
        self.servers, self.hops, self.listeners = [], [], []
        for span in spans:
            kp = create_new_key_pair()
            pid = str(ID.from_pubkey(kp.public_key))
            server = BlockServer(ckpt.load_blocks(*span), ckpt.model_id, limits, lambda addr: dial(None, addr),
                                 pid, kp, batching=settings)
            listener, addr = self.bg.run(listen_tcp(server.handle, "127.0.0.1"))
            self.servers.append(server), self.listeners.append(listener), self.hops.append(Hop(addr, pid, span))
        self.head = ckpt.load_head()

    def open(self, max_length: int) -> ChainSession:
        chain = ChainSession(lambda addr: dial(None, addr), self.hops, ClientConfig(push=True, sealed=True, timeout=30))
        self.bg.run(chain.open(max_length))
        return chain

    def session(self, max_length: int, sampling=None):  # what generate() drives (hidden states back, never verdicts)
        chain, bg = self.open(max_length), self.bg

        class Run:
            overlaps, verdicts = True, False  # steps may be in flight together (pipelined speculation)

            def submit(self, hidden, layout, check=None):
                return asyncio.run_coroutine_threadsafe(chain.step(hidden, layout), bg.loop)

            def close(self):
                bg.run(chain.close())
        return Run()

    def close(self):
        stop_in_process(self.bg, self.listeners, self.servers)


PROMPTS = [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14], [20, 21], [30, 31, 32, 33, 34]]


def test_concurrent_sessions_are_batched_and_equal_local(tiny):
    """Four generations at once through two sealed push-mode peers: batches of several steps form on
    both peers, and every generation's greedy tokens are the local run's."""
    path = tiny("llama3").path
    local = LocalModel.load(path)
    reference = [generate(local, p, 16, stop_at_eos=False).tokens for p in PROMPTS]
    swarm = Swarm(path, [(0, 4), (4, 8)], BatchSettings(batch_wait_ms=100))
    got: dict[int, list[int]] = {}
    try:
        def run(i):
            got[i] = generate(swarm, PROMPTS[i], 16, stop_at_eos=False).tokens

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        stats = [s.stats for s in swarm.servers]
        lines = [s.summary() for s in swarm.servers]
    finally:
        swarm.close()
    assert [got.get(i) for i in range(len(PROMPTS))] == reference
    for st, line in zip(stats, lines):
        steps = len(PROMPTS) * 16  # a prefill and 15 decode steps per generation
        # unbatched: one batch a step; 4 sessions in lockstep: ~steps / 4. Another process on the 2 cores staggers the
        # sessions (37 batches for 64 steps seen beside a benchmark), so the bound proves batching, not its best case
        assert st.batched_steps == steps and st.batches < steps * 0.75 and st.largest_batch >= 3, line
        assert f"batches: {st.batches} for {steps} steps (mean {st.mean_batch:.1f}, largest {st.largest_batch})" in line


def test_a_session_over_its_limit_is_refused_while_the_batch_proceeds(tiny):
    path = tiny("llama3").path
    swarm = Swarm(path, [(0, 8)], BatchSettings(batch_wait_ms=300))
    try:
        chains = [swarm.open(12) for _ in range(4)]
        prefill = [swarm.head.embed(torch.tensor([3, 4, 5, 6])) for _ in chains]

        async def together(steps):
            return await asyncio.gather(*(c.step(h, lay) for c, (h, lay) in zip(chains, steps)), return_exceptions=True)

        swarm.bg.run(together([(h, StepLayout(0, 4)) for h in prefill]))
        x = swarm.head.embed(torch.tensor([7]))
        outs = swarm.bg.run(together([(x, StepLayout(4, 1)),
                                      (swarm.head.embed(torch.tensor([1] * 9)), StepLayout(4, 9)),  # past its 12
                                      (x, StepLayout(6, 1)),  # a gap: refused by its cache, inside the batch
                                      (x, StepLayout(4, 1))]))
        stats = swarm.servers[0].stats
        ref = LocalModel.load(path).session(12)
        ref.submit(prefill[0], StepLayout(0, 4)).result()
        want = ref.submit(x, StepLayout(4, 1)).result()
    finally:
        swarm.close()
    assert isinstance(outs[1], ContextTooLong) and "(13 > 12)" in str(outs[1])  # the peer's too_long
    assert isinstance(outs[2], RemoteError) and outs[2].code == "bad_step" and "only 4 positions" in str(outs[2])
    assert close(outs[0], want) and close(outs[3], want)
    assert stats.largest_batch == 4 and stats.batches == 2  # the prefills, then the refused step's batch of 3
