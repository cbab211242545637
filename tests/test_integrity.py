"""Spot-checks against lying peers (swarm/client/integrity.py): a peer that adds noise to its outputs is caught by
an honest replica of its span and the client's own third opinion, banned, and every output stays identical to
--local; a peer that starts lying later is caught by the random checks and the generation rolled back; spans
with no replica make the output unverified; honest peers at another dtype are never accused.

One swarm of the bundled tiny model (4 blocks: spans 0:1, 1:3, 3:4) serves every test; each client is given
only the peers of its scenario (`discovery=False`). Liars are `scripts/liar_peer.py` processes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from swarm.bundled import TINY_DRAFT, TINY_MODEL
from swarm.client.config import ClientConfig
from swarm.client.integrity import distance, tolerance, with_rollback
from swarm.client.swarm_model import SwarmModel
from swarm.decode.generate import generate
from swarm.decode.speculative import SpecConfig
from swarm.decode.target import LocalModel
from swarm.launch import PeerProcess, stop_peers

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from liar_peer import LIAR_ENTRY  # noqa: E402

TOKENS = 8
PROMPTS = [[5 + i, 17, 99, 250 + 7 * i] for i in range(20)]


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    """Peers by role: first 0:1, honest 1:3, liar 1:3 (noise on every step), bf16 1:3 (honest), last 3:4,
    late 3:4 (honest until position 5, then noise)."""
    logs = tmp_path_factory.mktemp("integrity")
    path = str(TINY_MODEL)
    first = PeerProcess(path, (0, 1), log_file=logs / "first.log")
    boot = ("--initial-peers", first.addr)
    roles = {"honest": ((1, 3), ()), "liar": ((1, 3), ("--lie-scale", "0.5")), "bf16": ((1, 3), ("--dtype", "bfloat16")),
             "last": ((3, 4), ()), "late": ((3, 4), ("--lie-scale", "0.5", "--lie-from", "5"))}
    peers = {"first": first}
    try:
        for name, (span, extra) in roles.items():
            entry = LIAR_ENTRY if name in ("liar", "late") else ("-m", "swarm.cli")
            peers[name] = PeerProcess(path, span, *boot, *extra, entry=entry, log_file=logs / f"{name}.log", wait=False)
        for p in peers.values():
            p.wait_ready()
        yield peers
    finally:
        stop_peers(list(peers.values()))


@pytest.fixture(scope="module")
def reference():
    local = LocalModel.load(TINY_MODEL)
    return [generate(local, p, TOKENS, stop_at_eos=False).tokens for p in PROMPTS]


def client(swarm, names, **config) -> SwarmModel:
    return SwarmModel(TINY_MODEL, [swarm[n].addr for n in names], ClientConfig(discovery=False, timeout=20, **config))


def route_through(model: SwarmModel, *pids: str) -> None:
    """Re-plan so that the route goes through `pids` (their rivals for their spans left out for the planning only)."""
    spans = {model.peers[pid].blocks for pid in pids}
    rivals = [q for q, info in model.peers.items() if info.blocks in spans and q not in pids]
    for q in rivals:
        model.banned[q] = time.monotonic() + 600
    model.replan()
    for q in rivals:
        del model.banned[q]
    assert set(pids) <= {h.peer_id for h in model.route}


def run(model, prompt, **kw):
    return with_rollback(model, lambda cb: generate(model, prompt, TOKENS, stop_at_eos=False, on_tokens=cb, **kw))


def test_a_liar_beside_an_honest_replica_is_banned_and_every_output_is_exact(swarm, reference):
    """Spans 0:1 and 3:4 have one peer each, 1:3 an honest peer and a liar: the first generation routes through
    the liar, whose first step (probation) is checked against the honest replica, with the client's own copy of
    blocks 1:3 as the third opinion: banned at once, the step goes again on the honest peer. 20 generations,
    every one identical to --local; no replica is left for any span, so the output is reported unverified."""
    liar = swarm["liar"].peer_id
    model = client(swarm, ["first", "honest", "liar", "last"])
    try:
        route_through(model, liar)
        for i, prompt in enumerate(PROMPTS):
            assert run(model, prompt).tokens == reference[i], f"generation {i} differs from --local"
            if i == 0:
                assert liar in model.banned and model.audit.last["liars"] == [liar]
                [accusation] = model.audit.accusations
                assert accusation["peer"] == liar and accusation["blocks"] == "1:3" and "off by" in accusation["reason"]
                assert liar not in [h.peer_id for h in model.route]
        report = model.audit.last
        assert report["unverified"] and report["unverified_spans"] == ["0:1", "1:3", "3:4"]
        assert model.audit.passed.get(swarm["honest"].peer_id, 0) >= 1  # it agreed with the third opinion
    finally:
        model.close()


def test_speculative_decoding_through_a_late_liar_stays_exact(swarm, reference):
    """Pipelined speculative rounds (steps in flight behind a check, draft trees compacted), every step checked,
    through the liar on 3:4 that starts lying at position 5: caught on its first lie, while rounds sent behind
    the checked one wait, then go again on the new route. Identical to --local."""
    draft = LocalModel.load(TINY_DRAFT)
    late = swarm["late"].peer_id
    model = client(swarm, ["first", "honest", "last", "late"], verify_rate=1.0)
    try:
        route_through(model, late)
        for i in range(4):
            res = run(model, PROMPTS[i], draft=draft, spec=SpecConfig(pipeline=True))
            assert res.tokens == reference[i], f"generation {i} differs from --local"
            assert res.rounds > 1
        assert late in model.banned and model.audit.accusations[0]["peer"] == late
    finally:
        model.close()


def test_with_three_replicas_the_third_opinion_is_another_peer(swarm, reference):
    """Blocks 1:3 on the liar, an fp32 peer and a bf16 peer: the mismatch is settled by the third peer (majority),
    the client loads no blocks of its own."""
    liar = swarm["liar"].peer_id
    model = client(swarm, ["first", "honest", "liar", "bf16", "last"])
    try:
        route_through(model, liar)
        run(model, PROMPTS[0])
        assert liar in model.banned and "a third peer" in model.audit.accusations[0]["reason"]
        assert not model.audit._local and len(model.audit.accusations) == 1
    finally:
        model.close()


class EveryThird:
    """The auditor's dice, loaded: every third step is checked; the first candidate is always taken."""

    def __init__(self):
        self.n = 0

    def random(self) -> float:
        self.n += 1
        return 0.0 if self.n % 3 == 0 else 0.99

    def randrange(self, n: int) -> int:
        return 0


def test_a_late_liar_is_caught_by_a_random_check_and_the_generation_rolled_back(swarm, reference):
    """The last span's peer answers honestly up to position 5 (so it passes its probation check on the prompt),
    then adds noise. Client-mediated. Steps 3 and 4 lie; the random check at step 4 catches it after step 3's
    output was released: the generation is rolled back to step 2 (the transcript answers those) and generated
    again on the honest peer; the output is identical to --local."""
    late = swarm["late"].peer_id
    model = client(swarm, ["first", "honest", "last", "late"], push=False, verify_rate=0.5)
    model.audit.rng = EveryThird()
    try:
        route_through(model, late)
        assert run(model, PROMPTS[0]).tokens == reference[0]
        report = model.audit.last
        assert report["rollbacks"] == 1 and report["liars"] == [late] and late in model.banned
        for i in (1, 2):
            assert run(model, PROMPTS[i]).tokens == reference[i]
    finally:
        model.close()


def test_honest_peers_at_different_dtypes_are_never_accused(swarm):
    """Blocks 1:3 on an fp32 peer and a bf16 peer, every step checked (rate 1), each as the route's peer in turn:
    not one mismatch at the default tolerance."""
    model = client(swarm, ["first", "honest", "bf16", "last"], verify_rate=1.0)
    try:
        assert model.dtypes[swarm["bf16"].peer_id] == "bfloat16"
        for who in ("honest", "bf16", "honest", "bf16"):
            route_through(model, swarm[who].peer_id)
            for prompt in PROMPTS[:3]:
                run(model, prompt)
                assert model.audit.last["checks"] >= TOKENS and model.audit.last["mismatches"] == 0
        assert not model.audit.accusations and not model.audit.suspects and not model.banned
    finally:
        model.close()


def test_generate_json_says_who_lied_and_that_the_output_is_unverified(swarm, reference):
    """`swarm generate --json` through the liar's swarm: the text is --local's, `unverified` is true (no span
    keeps a replica), the integrity report names the liar; without --json a warning line says so."""
    from swarm.text import load_tokenizer

    addrs = [swarm[n].addr for n in ("first", "honest", "liar", "last")]
    out = subprocess.run([sys.executable, "-m", "swarm.cli", "generate", "--model", str(TINY_MODEL), "--prompt",
                          "def fibonacci(n):", "--max-new-tokens", "8", "--ignore-eos", "--no-dht", "--json",
                          "--initial-peers", *addrs], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    prompt = load_tokenizer(TINY_MODEL).encode("def fibonacci(n):").ids
    assert got["tokens"] == generate(LocalModel.load(TINY_MODEL), prompt, 8, stop_at_eos=False).tokens
    assert got["unverified"] is True and got["integrity"]["liars"] == [swarm["liar"].peer_id]
    assert got["integrity"]["unverified_spans"] == ["0:1", "1:3", "3:4"]
    assert out.stderr.splitlines() == [line for line in out.stderr.splitlines() if "banned for 3600 s" in line]
    text = subprocess.run([sys.executable, "-m", "swarm.cli", "generate", "--model", str(TINY_MODEL), "--prompt",
                           "def fibonacci(n):", "--max-new-tokens", "8", "--ignore-eos", "--no-dht",
                           "--initial-peers", *addrs], capture_output=True, text=True, timeout=120)
    assert text.returncode == 0, text.stderr
    assert text.stdout == "def fibonacci(n):" + got["text"] + "\n"
    assert "WARNING: output unverified: blocks 0:1, 1:3, 3:4 had no independent replica" in text.stderr


def test_distance_and_tolerance():
    a = torch.randn(3, 64)
    assert distance(a, a) == 0.0 and distance(a, -a) == pytest.approx(2.0)
    assert distance(a, a[:2]) == float("inf") and distance(a, a * float("nan")) == float("inf")
    assert distance(a, a + 0.01 * a.norm(dim=-1, keepdim=True) * torch.nn.functional.normalize(torch.randn(3, 64), dim=-1)) \
        == pytest.approx(0.01, rel=0.05)
    assert tolerance("float32", "float32") < tolerance("float32", "bfloat16") < tolerance("bfloat16", "bfloat16")
    assert tolerance("float32", "mystery") == tolerance("bfloat16", "float32")


def test_the_odd_one_out_is_banned_and_three_apart_makes_suspects():
    """The third opinion's verdicts, without a network: the one the other two agree against is banned; when all three
    are apart nobody is, both become suspects and the span unverified; when the third is near both, nobody is blamed."""
    import asyncio
    from types import SimpleNamespace

    from swarm.client.integrity import Auditor
    from swarm.client.route import Hop
    from swarm.client.spotcheck import SessionAudit

    def verdict(p_off: float, s_off: float):
        model = SimpleNamespace(config=ClientConfig(), banned={}, dtypes={"P": "float32", "R": "float32"})
        model.audit = Auditor(model)
        audit = SessionAudit(SimpleNamespace(model=model, history=[], outputs=[]))
        truth = [torch.randn(2, 16) for _ in range(3)]
        off = lambda xs, d: [x + d * x.norm(dim=-1, keepdim=True) / 4 for x in xs]  # noqa: E731 - distance ~ d

        async def third(route, k, steps, exclude):
            return truth, "float32", True

        audit._third_opinion = third
        route = [Hop("a", "A", (0, 1)), Hop("b", "P", (1, 3))]
        got = asyncio.run(audit._adjudicate(route, 1, [None] * 3, off(truth, p_off), 1, off(truth[1:], s_off), "R"))
        return got, model, audit

    got, model, _ = verdict(0.5, 0.0)
    assert got.liar == "P" and got.first_bad == 1 and "P" in model.banned and model.audit.passed == {"R": 1}
    got, model, _ = verdict(0.0, 0.5)
    assert got.liar == "R" and "R" in model.banned and "P" not in model.banned
    got, model, audit = verdict(0.5, -0.5)
    assert got is None and not model.banned and set(model.audit.suspects) == {"P", "R"}
    assert (1, 3) in audit.unverified and (1, 3) in audit.given_up
    got, model, audit = verdict(0.1, -0.1)  # each within 0.165 of the third, 0.2 apart from each other
    assert got is None and not model.banned and not model.audit.suspects and (1, 3) not in audit.unverified
