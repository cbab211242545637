"""Verification at the last peer (issue 17): the last peer runs the LM head, verifies each round and returns
only its verdict. Greedy output identical to --local (chains and trees, push and client-mediated); sampling
exact (chi-square on a small vocabulary) and reproducible with a seed; a failover onto a last peer without a
head still exact (the client then computes the same verdicts); spot-checks compare verdicts with a replica and
catch a lying verifier; top-k verified at the peer as here; bad input refused while the peer keeps serving.

Real peers on loopback (the bundled tiny pair): A serves blocks 0:2, B 2:4 with the head, C 2:4 started with
--no-head.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from peer.model import StepLayout
from peer.model.sampling import RoundCheck, SamplingParams, check_round, sparse_q
from protocol import messages as m
from swarm.client.chain import ChainSession, RemoteError
from swarm.client.config import ClientConfig, auto_verify_at_peer
from swarm.client.integrity import verdict_distance, with_rollback
from swarm.client.swarm_model import SwarmModel
from swarm.decode.generate import generate
from swarm.decode.sampling import top_k_probs
from swarm.decode.speculative import SpecConfig
from swarm.decode.target import LocalModel
from swarm.bundled import TINY_DRAFT, TINY_MODEL
from swarm.launch import PeerProcess, start_peers

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from liar_peer import LIAR_ENTRY  # noqa: E402

PROMPT = [305, 291, 2015, 270, 574, 972, 8, 78, 294, 264, 298, 297]  # "def fibonacci(n):\n    if n"
N = 48


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    """The bundled code pair (its draft is accepted often), 4 blocks: A 0:2, B 2:4 with the head, C 2:4 without."""
    path, draft = TINY_MODEL, LocalModel.load(TINY_DRAFT)
    logs = tmp_path_factory.mktemp("logs")
    a, b = start_peers(path, [(0, 2), (2, 4)], log_dir=logs)
    c = PeerProcess(path, (2, 4), "--no-head", "--initial-peers", a.addr, log_file=logs / "no-head.log")
    peers = [a, b, c]
    reference = generate(LocalModel.load(path), PROMPT, N, stop_at_eos=False).tokens
    yield path, draft, peers, reference
    for p in peers:
        p.stop()


def client(path, peers, last, **config) -> SwarmModel:
    a = peers[0]
    route = f"{a.peer_id}:0:2,{last.peer_id}:2:4"
    return SwarmModel(path, [p.addr for p in peers], ClientConfig(**{"route": route, "timeout": 20, "verify_rate": 0,
                                                                     **config}))


@pytest.mark.parametrize("push,sealed", [(True, True), (False, True), (True, False)])
def test_greedy_verdicts_equal_local_chains_and_trees(swarm, push, sealed):
    path, draft, peers, reference = swarm
    model = client(path, peers, peers[1], push=push, sealed=sealed, verify_at_peer=True)
    try:
        assert model.peers[peers[1].peer_id].head and not model.peers[peers[2].peer_id].head
        probe = model.session(16, SamplingParams())
        assert probe.verdicts and probe.chain.verify is not None  # the last peer verifies: verdicts come back
        probe.close()
        for spec in (SpecConfig(k=4, pipeline=True), SpecConfig(k=3, tree_width=2, pipeline=False, ngram=True)):
            res = generate(model, PROMPT, N, draft=draft, spec=spec, stop_at_eos=False)
            assert res.tokens == reference, f"{spec.mode}: verdicts at the peer changed the output"
            assert res.rounds < N  # drafts were accepted (rounds of several tokens)
        assert generate(model.with_config(verify_at_peer=False), PROMPT, N, draft=draft, spec=SpecConfig(k=4),
                        stop_at_eos=False).tokens == reference
    finally:
        model.close()


def test_sampling_reproducible_and_the_same_wherever_verified(swarm):
    """Seeded sampling: the same tokens through the verifying peer in sealed push (the check in its onion layer)
    and client-mediated (in its own Step), through C (no head: the client runs the very verifier, same seeds) and
    through plaintext push (the check rides along the pushed steps)."""
    path, draft, peers, _ = swarm
    params, spec = SamplingParams(temperature=0.9, top_p=0.95), SpecConfig(k=4, pipeline=False)
    runs = []
    for last, extra in ((peers[1], {"push": True}), (peers[1], {"push": False}), (peers[2], {"push": True}),
                        (peers[1], {"push": True, "sealed": False})):  # sealed onion, own Step, fallback, plain push
        model = client(path, peers, last, verify_at_peer=True, **extra)
        try:
            runs.append(generate(model, PROMPT, N, params, draft=draft, spec=spec, seed=7, stop_at_eos=False).tokens)
        finally:
            model.close()
    assert runs[0] == runs[1] == runs[2] == runs[3]
    trees = SpecConfig(k=3, tree_width=2, pipeline=False)  # the draft model's own sampled trees
    tree_runs = []
    for last in (peers[1], peers[2]):  # verified at the peer, and here by the same verifier (C holds no head)
        model = client(path, peers, last, verify_at_peer=True)
        try:
            res = generate(model, PROMPT, N, params, draft=draft, spec=trees, seed=7, stop_at_eos=False)
            tree_runs.append(res.tokens)
            assert res.tree_rounds > 0
        finally:
            model.close()
    assert tree_runs[0] == tree_runs[1]
    model = client(path, peers, peers[1], verify_at_peer=True)
    try:
        other = generate(model, PROMPT, N, params, draft=draft, spec=spec, seed=8, stop_at_eos=False).tokens
    finally:
        model.close()
    assert other != runs[0]  # the seed matters


def test_top_k_is_verified_at_the_peer_as_here(swarm):
    """Top-k reaches the verifying peer (its Open's VerifyAt) and the peer filters the target by it: top-k 1 under
    temperature is the argmax, so the output is --local's greedy one (a peer that ignored top-k would sample other
    tokens); top-k 8 seeded gives the same tokens verified at B as verified here (C holds no head)."""
    path, draft, peers, reference = swarm
    spec = SpecConfig(k=4, pipeline=False)
    model = client(path, peers, peers[1], verify_at_peer=True)
    try:
        probe = model.session(16, SamplingParams(0.9, 0.95, 8))
        assert probe.chain.verify == m.VerifyAt(0.9, 0.95, 8)
        probe.close()
        assert generate(model, PROMPT, N, SamplingParams(0.9, 1.0, 1), draft=draft, spec=spec, seed=3,
                        stop_at_eos=False).tokens == reference
        at_peer = generate(model, PROMPT, N, SamplingParams(0.9, 0.95, 8), draft=draft, spec=spec, seed=7,
                           stop_at_eos=False).tokens
        assert model.peers[peers[1].peer_id].top_k  # B said its verifier honours top-k
        model.peers[peers[1].peer_id].top_k = False  # as a peer from before top-k: B only returns hidden states
        probe = model.session(16, SamplingParams(0.9, 0.95, 8))
        assert probe.chain.verify is None and probe.verdicts  # ... and this client judges the rounds itself
        probe.close()
        probe = model.session(16, SamplingParams(0.9, 0.95))
        assert probe.chain.verify is not None  # without top-k B still verifies
        probe.close()
        old_peer = generate(model, PROMPT, N, SamplingParams(0.9, 0.95, 8), draft=draft, spec=spec, seed=7,
                            stop_at_eos=False).tokens
    finally:
        model.close()
    model = client(path, peers, peers[2], verify_at_peer=True)
    try:
        here = generate(model, PROMPT, N, SamplingParams(0.9, 0.95, 8), draft=draft, spec=spec, seed=7,
                        stop_at_eos=False).tokens
    finally:
        model.close()
    assert at_peer == here == old_peer and at_peer != reference


def test_bad_input_is_refused_and_the_peer_keeps_serving(swarm):
    path, _, peers, _ = swarm
    model = client(path, peers, peers[1], push=False)
    try:
        hidden = torch.randn(3, 256)
        layout = StepLayout(0, 3)
        hot = m.VerifyAt(temperature=1.0)

        async def run(route, check=None, verify=hot):
            chain = ChainSession(model.dial, route, model.config, 256, verify)
            try:
                await chain.open(16)
                return await chain.step(hidden, layout, check)
            finally:
                await chain.close()

        def refused(route, check=None, verify=hot) -> str:
            with pytest.raises(RemoteError) as e:
                model.bg.run(run(route, check, verify))
            return e.value.code

        good = m.Check([5, 6], [[(5, 0.5), (7, 0.5)], [(6, 1.0)]], 1)
        assert refused(model.route[:1], verify=hot) == "no_head"  # A's blocks do not end the model
        no_head = [model.route[0], type(model.route[1])(peers[2].addr, peers[2].peer_id, (2, 4))]
        assert refused(no_head) == "no_head"  # C holds no head
        assert refused(model.route, verify=m.VerifyAt(1.0, 1.0, 0)) == "bad_request"  # top_k 0: off is no field
        assert refused(model.route, m.Check([5], [[(5, 1.0)]], 1)) == "bad_check"  # one draft for a 3-node step
        assert refused(model.route, m.Check([5, 4096], [[(5, 1.0)], [(4096, 1.0)]], 1)) == "bad_check"
        assert refused(model.route, m.Check([5, 6], [[(5, 1.5)], [(6, 1.0)]], 1)) == "bad_request"  # prob > 1
        assert refused(model.route, m.Check([5, 6], [[(7, 1.0)], [(6, 1.0)]], 1)) == "bad_request"  # draft not in q
        v = model.bg.run(run(model.route, good))  # and it still serves
        assert isinstance(v, m.Verdict) and len(v.argmax) == 3 and v.path[0] == 0 and v.token is not None
    finally:
        model.close()


def test_spot_checks_compare_the_verdicts_with_a_replica(swarm):
    """Every step checked: the last span's verdicts (B) against C's hidden states through the head here."""
    path, draft, peers, reference = swarm
    model = client(path, peers, peers[1], verify_at_peer=True, verify_rate=1.0)
    try:
        res = generate(model, PROMPT, N, draft=draft, spec=SpecConfig(k=4), stop_at_eos=False)
        report = model.audit.last
        assert res.tokens == reference and report["checks"] > 0 and report["mismatches"] == 0 and not report["liars"]
        assert report["unverified_spans"] == ["0:2"]  # A has no replica; 2:4 was checked
    finally:
        model.close()


def test_a_lying_verifier_is_caught_and_the_output_stays_exact(swarm):
    """A last peer with the head whose blocks lie (noise on every step, `scripts/liar_peer.py`): its first verdict
    (probation) disagrees with a replica's hidden states, a third opinion settles it, it is banned, the session
    re-routes, and the output equals --local."""
    path, draft, peers, reference = swarm
    liar = PeerProcess(path, (2, 4), "--initial-peers", peers[0].addr, "--lie-scale", "0.5", entry=LIAR_ENTRY)
    model = None
    try:
        model = SwarmModel(path, [p.addr for p in peers] + [liar.addr],
                           ClientConfig(timeout=20, verify_rate=1.0, verify_at_peer=True))
        rivals = [peers[1].peer_id, peers[2].peer_id]
        for q in rivals:  # route through the liar
            model.banned[q] = time.monotonic() + 600
        model.replan()
        for q in rivals:
            del model.banned[q]
        assert model.route[-1].peer_id == liar.peer_id and model.peers[liar.peer_id].head
        res = with_rollback(model, lambda cb: generate(model, PROMPT, N, draft=draft, spec=SpecConfig(k=4),
                                                       stop_at_eos=False, on_tokens=cb))
        assert res.tokens == reference
        assert liar.peer_id in model.banned and model.audit.accusations[0]["peer"] == liar.peer_id
    finally:
        if model is not None:
            model.close()
        liar.stop()


def test_failover_mid_generation_is_exact(swarm):
    """The verifying last peer dies mid-generation: the client fails over to C (no head), replays, computes the
    verdicts itself, and the output equals --local. (Last: it kills B.)"""
    path, draft, peers, reference = swarm
    model = client(path, peers, peers[1], verify_at_peer=True)
    model.config = replace(model.config, route=None)  # the failover may go anywhere
    count = [0]

    def kill_at_20(tokens):
        before = count[0]
        count[0] += len(tokens)
        if before < 20 <= count[0]:
            peers[1].kill()

    try:
        res = generate(model, PROMPT, N, draft=draft, spec=SpecConfig(k=4, pipeline=True), stop_at_eos=False,
                       on_tokens=kill_at_20)
        assert res.tokens == reference and model.failovers >= 1
        assert model.route[-1].peer_id == peers[2].peer_id
    finally:
        model.close()


# --- no peers: the verifier's law, the wire's checks, the rule --------------------------------------------

def chi2_critical(df: int, z: float = 3.09) -> float:
    """Wilson-Hilferty: the chi-square quantile at the normal quantile z (3.09: significance 0.001)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def joint_through_peer_verifier(n=3000, vocab=6, k=2, unnormalised=False, seed=0):
    """Two drafts from the draft's top-k renormalised, verified by the peer's `check_round` from (id, prob) pairs:
    the joint law of the first two committed tokens, beside the target's own. `unnormalised`: a client that sends
    the draft's raw top-k probabilities instead of those it sampled from (a biased verifier)."""
    g = torch.Generator().manual_seed(seed)
    p1, p2 = torch.softmax(torch.randn(vocab, generator=g) * 2, -1), torch.softmax(torch.randn(vocab, vocab, generator=g) * 2, -1)
    q1, q2 = torch.softmax(torch.randn(vocab, generator=g) * 2, -1), torch.softmax(torch.randn(vocab, vocab, generator=g) * 2, -1)
    k1, k2 = top_k_probs(q1, k), top_k_probs(q2, k)
    p3 = torch.full((vocab,), 1.0 / vocab)
    counts, params = torch.zeros(vocab, vocab), SamplingParams(temperature=1.0)
    for _ in range(n):
        x1 = int(torch.multinomial(k1, 1, generator=g))
        x2 = int(torch.multinomial(k2[x1], 1, generator=g))
        s1, s2 = (q1 * (k1 > 0), q2[x1] * (k2[x1] > 0)) if unnormalised else (k1, k2[x1])
        check = RoundCheck((x1, x2), (sparse_q(s1, x1), sparse_q(s2, x2)), int(torch.randint(0, 2**62, (), generator=g)))
        v = check_round(torch.stack([p1, p2[x1], p3]).log(), params, check)
        accepted = len(v.path) - 1
        first = x1 if accepted >= 1 else v.token
        second = x2 if accepted >= 2 else (v.token if accepted == 1 else int(torch.multinomial(p2[first], 1, generator=g)))
        counts[first, second] += 1
    expected = (p1[:, None] * p2) * n
    keep = expected >= 5
    stat = float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    return stat, chi2_critical(int(keep.sum()) - 1)


def test_the_peer_verifier_follows_the_target_law():
    stat, critical = joint_through_peer_verifier()
    assert stat < critical, f"chi2 {stat:.1f} >= {critical:.1f} (significance 0.001): the peer's verifier is biased"


def test_the_chi_square_test_catches_a_biased_peer_verifier():
    stat, critical = joint_through_peer_verifier(unnormalised=True)
    assert stat > critical, f"chi2 {stat:.1f} < {critical:.1f}: the test did not notice the bias"


def test_wire_checks_and_verdicts():
    c = m.Check([3, 4], [[(3, 0.25), (9, 0.75)], [(4, 1.0)]], 2**62)
    step = m.decode(m.encode(m.Step("a" * 32, 1, 0, torch.zeros(3, 8), None, None, None, c)))
    assert step.check == c
    v = m.Verdict("a" * 32, 1, [1, 2, 3], [0, 1], 7)
    assert m.decode(m.encode(v)) == v
    assert m.decode(m.encode(m.Open("a" * 32, 9, (0, 2), verify=m.VerifyAt(0.5, 0.9)))).verify == m.VerifyAt(0.5, 0.9)
    assert m.decode(m.encode(m.Open("a" * 32, 9, (0, 2), verify=m.VerifyAt(0.5, 0.9, 40)))).verify.top_k == 40
    assert m.VerifyAt(0.5, 0.9).header() == {"temperature": 0.5, "top_p": 0.9}  # off: an older peer's own Open
    for top_k in (0, -1, 2.5, True, "8", 2**31, [3]):  # hostile top_k: refused, whatever else the Open says
        with pytest.raises(m.ProtocolError) as e:
            m.VerifyAt.parse({"temperature": 1.0, "top_p": 1.0, "top_k": top_k})
        assert e.value.code == "bad_request" and "top_k" in str(e.value)
    for bad in ({"drafts": [1], "q": [[[1, float("nan")]]], "seed": 1}, {"drafts": [1], "q": [[[1, 0.6], [1, 0.4]]], "seed": 1},
                {"drafts": [1], "q": [[[1, 0.9], [2, 0.9]]], "seed": 1}, {"drafts": [1], "q": [[]], "seed": 1},
                {"drafts": [1], "q": [[[1, 1.0]] * 65], "seed": 1}, {"drafts": [1] * 300, "q": [], "seed": 1},
                {"drafts": [1], "q": [[[1, 1.0]]], "seed": -1}, {"drafts": [1], "q": [[[1, True]]], "seed": 1}):
        with pytest.raises(m.ProtocolError):
            m.Check.parse(bad)
    with pytest.raises(m.ProtocolError):
        m.Verdict.parse({"session": "a" * 32, "step": 1, "argmax": [1], "path": [1], "token": 2}, None)
    with pytest.raises(m.ProtocolError):
        m.Open.parse({"session": "a" * 32, "max_length": 9, "blocks": [0, 2], "wire_dtype": "float32",
                      "verify": {"temperature": float("inf"), "top_p": 1.0}}, None)


def test_the_auto_rule_and_verdict_distance():
    assert auto_verify_at_peer(True, 49152, 576, "cuda")  # SmolLM2: a wide vocabulary
    assert auto_verify_at_peer(True, 128256, 4096, "cpu") and not auto_verify_at_peer(True, 128256, 4096, "cuda")
    assert not auto_verify_at_peer(True, 4096, 256, "cpu")  # the bundled tiny pair: its head is cheap
    assert not auto_verify_at_peer(False, 49152, 576, "cpu")  # nobody offers it
    logits = torch.tensor([[0.0, 5.0, 1.0], [2.0, 0.0, 1.9]])
    assert verdict_distance((1, 0), logits) == 0.0
    assert 0 < verdict_distance((1, 2), logits) < 0.2  # a near-tie
    assert verdict_distance((0, 0), logits) > 1 and verdict_distance((1, 7), logits) == math.inf


def test_the_memory_plan_reserves_the_head():
    from peer.memory import plan_memory
    from peer.model import Checkpoint
    from peer.serve import head_bytes

    without = plan_memory(10_000_000, 1_000_000, 100, 100, requested_cache_tokens=1000)
    with_head = plan_memory(10_000_000, 1_000_000, 100, 100, requested_cache_tokens=1000, reserved_bytes=2_000_000)
    assert (without.blocks, with_head.blocks) == (7, 5) and "kept for the head" in with_head.reason
    cfg = Checkpoint(TINY_MODEL).config  # tied embeddings: one table serves as the LM head
    assert head_bytes(cfg, torch.float32) == (cfg.vocab_size + 1) * cfg.hidden_size * 4
