"""A peer killed with SIGKILL mid-generation: the client bans it, re-routes, replays, and the output is unchanged."""

import pytest

from swarm.generate import LocalModel, generate
from swarm.launch import PeerProcess, start_peers
from swarm.remote import SwarmModel

PROMPT = [3, 14, 15, 92, 65]


@pytest.mark.parametrize("push", [True, False])
def test_kill_middle_peer_repeatedly(tiny, tmp_path, push):
    path = tiny("llama2").path
    reference = generate(LocalModel.load(path), PROMPT, 200, stop_at_eos=False).tokens
    peers = start_peers(path, [(0, 3), (3, 6), (3, 6), (6, 8)], log_dir=tmp_path)
    model = None
    try:
        model = SwarmModel(path, [p.addr for p in peers], push=push, timeout=20)
        for run in range(3 if push else 2):
            by_id = {p.peer_id: p for p in peers}
            victim_id = model.route[1].peer_id
            spare = PeerProcess(path, (3, 6), log_file=tmp_path / f"spare{run}.log")  # keeps a replica around

            def kill_at_60(token, count=[0]):
                count[0] += 1
                if count[0] == 60:
                    by_id[victim_id].kill()

            failovers = model.failovers
            out = generate(model, PROMPT, 200, stop_at_eos=False, on_token=kill_at_60).tokens
            assert out == reference, f"run {run}: output changed after failover"
            assert model.failovers > failovers and model.route[1].peer_id != victim_id
            peers = [p for p in peers if p.peer_id != victim_id] + [spare]
            model.initial_peers.append(spare.addr)
    finally:
        if model is not None:
            model.close()
        for p in peers:
            p.stop()
