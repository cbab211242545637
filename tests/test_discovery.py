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


# --- rebalancing: a peer that chose its own blocks moves to blocks nobody serves ----------------------------
def test_move_to_closes_a_gap_and_opens_none():
    from peer.rebalance import move_to

    tp = 10.0
    assert move_to(8, (0, 4), [((0, 4), tp), ((4, 8), tp)]) is None  # every block has a peer: stay
    assert move_to(8, (0, 4), [((0, 4), tp)]) == (4, 8)  # a replica of ours; nobody serves [4, 8)
    assert move_to(8, (0, 4), [((4, 6), tp)]) is None  # leaving would uncover [0, 4)
    assert move_to(8, (0, 4), [((0, 2), tp), ((2, 4), tp), ((4, 6), tp)]) == (4, 8)  # covered by two others
    assert move_to(8, (0, 2), [((0, 2), tp), ((2, 4), tp), ((6, 8), tp)]) == (4, 6)  # the gap, as many blocks
    assert move_to(8, (2, 5), [((0, 5), tp), ((6, 8), tp)]) == (3, 6)  # the gap [5, 6) inside the weakest span
    assert move_to(8, (0, 4), []) is None  # alone: stay


def test_one_replica_at_a_time_moves_to_a_gap():
    from peer.rebalance import first_mover

    tp = 10.0
    spans = {"b": ((0, 4), tp), "a": ((0, 4), tp)}  # the only peer of [4, 8) died; either replica could move there
    assert first_mover(8, spans, {"a", "b"}) == "a"  # the same answer on both peers: only one moves
    assert first_mover(8, spans, {"b"}) == "b"  # a's blocks are fixed (--blocks): b's turn
    assert first_mover(8, spans | {"c": ((4, 6), tp)}, {"a", "b", "c"}) == "a"  # c is alone on [4, 6): stays
    assert first_mover(8, spans | {"c": ((4, 8), tp)}, {"a", "b", "c"}) is None  # no gap: nobody moves
    assert first_mover(8, {"a": ((0, 4), tp), "c": ((4, 8), tp)}, {"a", "c"}) is None  # leaving opens a gap


@pytest.mark.slow  # ~30 s: three peers start, one is SIGKILLed, a replica moves, a client generates
def test_a_replica_moves_to_the_blocks_of_a_peer_that_died(tiny, tmp_path):
    import re

    from swarm.client.config import ClientConfig

    path = tiny("llama2").path
    reference = generate(LocalModel.load(path), [7, 8, 9, 10], 30, stop_at_eos=False).tokens
    common = ("--num-blocks", "4", "--record-ttl", "6", "--summary-every", "0")
    peers = [PeerProcess(path, None, *common, log_file=tmp_path / "peer0.log")]
    model = None
    try:
        for i in (1, 2):
            peers.append(PeerProcess(path, None, *common, "--initial-peers", peers[0].addr,
                                     log_file=tmp_path / f"peer{i}.log"))
        logs = [tmp_path / f"peer{i}.log" for i in range(3)]
        spans = [re.search(r"loaded blocks \[(\d+), (\d+)\)", f.read_text()).groups() for f in logs]
        alone = next(i for i, s in enumerate(spans) if spans.count(s) == 1)  # the span one peer serves
        assert len(set(spans)) == 2, spans  # [0, 4) and [4, 8), one of them twice
        peers[alone].kill()
        gap = "moving to blocks [{}, {})".format(*spans[alone])
        deadline = time.monotonic() + 60
        while not any(gap in f.read_text() for i, f in enumerate(logs) if i != alone):
            assert time.monotonic() < deadline, "no replica moved to the dead peer's blocks"
            time.sleep(0.5)
        mover = next(i for i, f in enumerate(logs) if i != alone and gap in f.read_text())
        model = SwarmModel(path, [p.addr for i, p in enumerate(peers) if i != alone], ClientConfig(route_wait=30))
        assert generate(model, [7, 8, 9, 10], 30, stop_at_eos=False).tokens == reference
        assert peers[mover].peer_id in [h.peer_id for h in model.route]
        assert "moving to blocks" not in "".join(f.read_text() for i, f in enumerate(logs) if i not in (alone, mover))
    finally:
        if model is not None:
            model.close()
        for p in peers:
            p.stop()
