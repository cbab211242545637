"""A peer killed with SIGKILL mid-generation: the client bans it, re-routes, replays, and the output is unchanged."""

import pytest

from swarm.client.config import ClientConfig
from swarm.decode.generate import generate
from swarm.decode.target import LocalModel
from swarm.launch import PeerProcess, start_peers
from swarm.client.swarm_model import SwarmModel

PROMPT = [3, 14, 15, 92, 65]


@pytest.mark.parametrize("push", [True, False])
def test_kill_middle_peer_repeatedly(tiny, tmp_path, push):
    path = tiny("llama2").path
    reference = generate(LocalModel.load(path), PROMPT, 200, stop_at_eos=False).tokens
    peers = start_peers(path, [(0, 3), (3, 6), (3, 6), (6, 8)], log_dir=tmp_path)
    model = None
    try:
        model = SwarmModel(path, [p.addr for p in peers], ClientConfig(push=push, timeout=20))
        for run in range(3 if push else 2):
            by_id = {p.peer_id: p for p in peers}
            victim_id = model.route[1].peer_id
            spare = PeerProcess(path, (3, 6), log_file=tmp_path / f"spare{run}.log")  # keeps a replica around

            def kill_at_60(tokens, count=[0]):
                count[0] += len(tokens)
                if count[0] == 60:
                    by_id[victim_id].kill()

            failovers = model.failovers
            out = generate(model, PROMPT, 200, stop_at_eos=False, on_tokens=kill_at_60).tokens
            assert out == reference, f"run {run}: output changed after failover"
            assert model.failovers > failovers and model.route[1].peer_id != victim_id
            peers = [p for p in peers if p.peer_id != victim_id] + [spare]
            model.initial_peers.append(spare.addr)
    finally:
        if model is not None:
            model.close()
        for p in peers:
            p.stop()


def test_kill_middle_peer_during_speculative_decoding(tiny, tmp_path):
    """Adaptive greedy speculative decoding, pipelining forced so that rounds are in flight when the peer
    dies: the output still equals --local token for token. (scripts/failover_drill.py --speculative runs
    the default, cost-model-chosen pipelining, on the bundled pair.)"""
    from conftest import make_checkpoint
    from swarm.decode.speculative import SpecConfig

    path = tiny("llama2").path
    draft = LocalModel.load(make_checkpoint(tmp_path / "draft", "llama2", seed=11, num_hidden_layers=2).path)
    reference = generate(LocalModel.load(path), PROMPT, 120, stop_at_eos=False).tokens
    peers = start_peers(path, [(0, 3), (3, 6), (3, 6), (6, 8)], log_dir=tmp_path)
    model = None
    try:
        model = SwarmModel(path, [p.addr for p in peers], ClientConfig(timeout=20))
        by_id = {p.peer_id: p for p in peers}
        victim_id = model.route[1].peer_id
        count = [0]

        def kill_at_50(tokens):
            before = count[0]
            count[0] += len(tokens)
            if before < 50 <= count[0]:
                by_id[victim_id].kill()

        res = generate(model, PROMPT, 120, draft=draft, spec=SpecConfig(pipeline=True), stop_at_eos=False,
                       on_tokens=kill_at_50)
        assert res.tokens == reference, "output changed after a failover during speculative decoding"
        assert model.failovers >= 1 and model.route[1].peer_id != victim_id
        assert res.rounds > 1 and res.drafted > 0
    finally:
        if model is not None:
            model.close()
        for p in peers:
            p.stop()
