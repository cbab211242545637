"""A peer killed with SIGKILL mid-generation: the client bans it, re-routes, replays, and the output is unchanged."""

import pytest

from swarm.client.config import ClientConfig
from swarm.decode.generate import generate
from swarm.decode.target import LocalModel
from swarm.launch import PeerProcess, start_peers
from swarm.client.swarm_model import SwarmModel

PROMPT = [3, 14, 15, 92, 65]


@pytest.mark.slow  # ~45 s pushed, more client-mediated; a single kill stays in the fast suite (below)
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


@pytest.mark.slow  # ~30 s (a single kill during decoding stays in the fast suite)
def test_failover_from_a_stale_route_whose_dead_peer_is_no_longer_known(tiny, tmp_path):
    """Two views of one client (as a chat has: push and client-mediated), over the direct TCP transport
    (the default). A routed peer is SIGKILLed; the first view fails over, and its fresh look at the swarm
    drops the dead peer (from `model.peers`: it answers neither the DHT's address nor Info). The second
    view's route still names that peer: opening it fails, the peer is unknown, and failover must count
    it as dead, ban it and re-route, the output still token-identical to LocalModel. (It used to ask the
    hop's tcp:// address through libp2p, which parsed it as a peer id: ValueError "Invalid character
    ':'", and the session ended.)"""
    path = tiny("llama2").path
    reference = generate(LocalModel.load(path), PROMPT, 60, stop_at_eos=False).tokens
    peers = start_peers(path, [(0, 3), (3, 6), (3, 6), (6, 8)], log_dir=tmp_path)
    model = None
    try:
        model = SwarmModel(path, [p.addr for p in peers], ClientConfig(timeout=20))
        mediated = model.with_config(push=False)  # its own route; the same peers and bans
        victim = model.route[1].peer_id
        assert mediated.route[1].peer_id == victim and mediated.route[1].addr.startswith("tcp://")

        def kill_at_20(tokens, count=[0]):
            count[0] += len(tokens)
            if count[0] == 20:
                next(p for p in peers if p.peer_id == victim).kill()

        assert generate(model, PROMPT, 60, stop_at_eos=False, on_tokens=kill_at_20).tokens == reference
        assert model.failovers >= 1 and victim not in model.peers and victim in model.banned
        assert mediated.route[1].peer_id == victim  # stale: planned before the peer died

        model.banned.clear()  # the ban ran out: only the probe can tell that the peer is dead
        out = generate(mediated, PROMPT, 60, stop_at_eos=False).tokens
        assert out == reference, "output changed after failing over from a stale route"
        assert mediated.failovers >= 1 and victim not in [h.peer_id for h in mediated.route]
        assert victim in model.banned
    finally:
        if model is not None:
            model.close()
        for p in peers:
            p.stop()


@pytest.mark.slow  # ~25 s (peers starting); scripts/churn.py's clients wait the same way
def test_a_failover_waits_for_blocks_nobody_serves_until_a_peer_returns(tiny, tmp_path, caplog):
    """The only peer of blocks [4, 8) is SIGKILLed mid-generation: with `route_wait` the failover looks again every
    second instead of failing with NoRoute, a new peer for [4, 8) joins a few seconds later, and the generation goes
    on through it, token-identical to LocalModel. Without `route_wait` (the default) the same gap fails at once."""
    import time

    from swarm.client.route import NoRoute

    path = tiny("llama2").path
    reference = generate(LocalModel.load(path), PROMPT, 40, stop_at_eos=False).tokens
    peers = start_peers(path, [(0, 4), (4, 8)], log_dir=tmp_path)
    model = None
    try:
        model = SwarmModel(path, [peers[0].addr], ClientConfig(timeout=20, route_wait=60))

        def kill_at_10(tokens, count=[0]):  # (spawned from this thread: a peer dies with the thread that started it)
            count[0] += len(tokens)
            if count[0] == 10:
                peers[1].kill()
                peers.append(PeerProcess(path, (4, 8), "--initial-peers", peers[0].addr, wait=False,
                                         log_file=tmp_path / "back.log"))  # it takes seconds to start

        with caplog.at_level("WARNING", logger="specswarm.client"):
            out = generate(model, PROMPT, 40, stop_at_eos=False, on_tokens=kill_at_10).tokens
        assert len(peers) == 3 and out == reference, "output changed after waiting for the swarm"
        assert model.failovers >= 1 and "looking again for up to" in caplog.text
        peers[2].wait_ready(5)
        assert model.route[-1].peer_id == peers[2].peer_id
        peers[-1].kill()
        impatient = model.with_config(route_wait=0.0)
        t0 = time.monotonic()
        with pytest.raises(NoRoute, match="do not cover blocks"):
            generate(impatient, PROMPT, 10, stop_at_eos=False)
        assert time.monotonic() - t0 < 20
    finally:
        if model is not None:
            model.close()
        for p in peers:
            p.stop()


def test_addresses_of_the_wrong_kind_fail_like_unreachable_peers():
    """dial and fetch_info take a direct tcp://HOST:PORT or a libp2p multiaddr ending in /p2p/<peer id>
    and parse neither as the other; anything else, and a reply that is not a message, fails with an
    error of the failover family (a peer to ban), never a parser's ValueError."""
    import asyncio

    from peer.p2p import P2PNode
    from peer.transport import BadAddress, dial, fetch_info, listen_tcp
    from swarm.client.swarm_model import FAILURES

    async def garbage(stream, name):  # a "peer" whose direct port answers Info with nonsense
        await stream.recv()
        await stream.send(b"\xff not a message")

    async def main():
        node = await P2PNode.start()
        server, direct = await listen_tcp(garbage, "127.0.0.1")
        try:
            wrong = ["tcp://127.0.0.1", "tcp://127.0.0.1:port", "127.0.0.1:80", node.peer_id, "/ip4/127.0.0.1/tcp/1",
                     "/ip4/127.0.0.1/tcp/1/p2p/not-a-peer-id", "/not/a/multiaddr/p2p/x", ""]
            for addr in wrong:
                for attempt in (dial(node, addr), fetch_info(node, addr, 5.0)):
                    with pytest.raises(BadAddress) as caught:
                        await attempt
                    assert isinstance(caught.value, FAILURES), addr
            with pytest.raises(BadAddress, match="no libp2p node"):
                await dial(None, node.addrs[0])
            with pytest.raises(ConnectionError, match="malformed reply"):
                await fetch_info(node, direct, 5.0)  # a direct address is dialled directly, not parsed as a peer id
        finally:
            server.close()
            await node.close()

    asyncio.run(main())
