"""Five peers that know only the first one choose their own blocks, cover the model, and serve a client
that knows only the first one; killing a routed peer fails over to a replica found through the DHT."""

import json
import os
import subprocess
import sys
import time

import pytest

from swarm.decode.generate import generate
from swarm.decode.target import LocalModel
from swarm.launch import PeerProcess
from swarm.client.swarm_model import SwarmModel


@pytest.fixture(scope="module")
def swarm5(tiny, tmp_path_factory):
    logs = tmp_path_factory.mktemp("discovery")
    old = os.environ.get("SPECSWARM_CACHE")
    os.environ["SPECSWARM_CACHE"] = str(logs / "cache")
    path = tiny("llama2").path
    peers = [PeerProcess(path, None, "--num-blocks", "3", "--record-ttl", "20", log_file=logs / "peer0.log")]
    try:
        for i in range(1, 5):  # one after another, as volunteers arrive
            peers.append(PeerProcess(path, None, "--num-blocks", "3", "--record-ttl", "20",
                                     "--initial-peers", peers[0].addr, log_file=logs / f"peer{i}.log"))
        yield path, peers
    finally:
        for p in peers:
            p.stop()
        if old is None:
            os.environ.pop("SPECSWARM_CACHE", None)
        else:
            os.environ["SPECSWARM_CACHE"] = old


def status(path, addr):
    out = subprocess.run([sys.executable, "-m", "swarm.cli", "status", "--model", str(path), "--initial-peers", addr,
                          "--json"], capture_output=True, text=True, timeout=120)
    return out.returncode, json.loads(out.stdout)


def test_five_peers_choose_blocks_that_cover_the_model(swarm5):
    path, peers = swarm5
    deadline = time.time() + 30  # records spread through the DHT asynchronously: wait for the last ones
    while True:
        code, st = status(path, peers[-1].addr)
        online = [p for p in st["peers"] if p["state"] == "online"]
        if (code == 0 and len(online) == 5) or time.time() > deadline:
            break
        time.sleep(2)
    assert code == 0 and st["complete"] and st["gaps"] == [], st
    assert len([p for p in st["peers"] if p["state"] == "online"]) == 5
    assert all(n >= 1 for n in st["coverage"]) and len(st["coverage"]) == 8
    spans = sorted(tuple(p["blocks"]) for p in st["peers"])
    assert all(b - a == 3 for a, b in spans)
    assert len(set(spans)) >= 3  # they spread out instead of piling onto one span


def test_client_with_one_initial_peer_generates_like_local(swarm5):
    path, peers = swarm5
    reference = generate(LocalModel.load(path), [7, 8, 9, 10], 40, stop_at_eos=False).tokens
    model = SwarmModel(path, [peers[0].addr])
    try:
        assert len(model.peers) == 5  # found through the DHT, not given
        assert generate(model, [7, 8, 9, 10], 40, stop_at_eos=False).tokens == reference
    finally:
        model.close()


def test_failover_to_a_replica_found_in_the_dht(swarm5):
    path, peers = swarm5
    reference = generate(LocalModel.load(path), [1, 2, 3], 120, stop_at_eos=False).tokens
    model = SwarmModel(path, [peers[0].addr])
    try:
        by_id = {p.peer_id: p for p in peers}

        def replaceable(pid):  # every block of its span is also served by someone else
            a, b = model.peers[pid].blocks
            return all(any(o.blocks[0] <= k < o.blocks[1] for q, o in model.peers.items() if q != pid) for k in range(a, b))

        victim = next(h.peer_id for h in model.route if h.peer_id != peers[0].peer_id and replaceable(h.peer_id))

        def kill_at_50(tokens, n=[0]):
            n[0] += len(tokens)
            if n[0] == 50:
                by_id[victim].kill()

        assert generate(model, [1, 2, 3], 120, stop_at_eos=False, on_tokens=kill_at_50).tokens == reference
        assert model.failovers >= 1 and victim not in [h.peer_id for h in model.route]
    finally:
        model.close()
    code, st = status(path, peers[0].addr)  # the dead peer is unreachable, not routed to
    assert [p["reachable"] for p in st["peers"] if p["peer_id"] == victim] in ([False], [])
