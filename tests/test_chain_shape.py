"""Chain shape per route (swarm.client.route.choose_chain): push where peers are close to each other,
client-mediated where the client is closer to every peer than they are to one another; forced either
way by --push / --no-push."""

from __future__ import annotations

from swarm.client.route import PeerInfo, choose_chain, plan_route, route_ms


def peers(client_rtt: dict, between: dict) -> dict:
    spans = {"a": (0, 2), "b": (2, 4), "c": (4, 6)}
    return {pid: PeerInfo(pid, f"/ip4/127.0.0.1/tcp/1/p2p/{pid}", span, throughput=1000.0, rtt_ms=client_rtt[pid],
                          rtts=between.get(pid, {})) for pid, span in spans.items()}


def test_push_when_peers_are_close_to_each_other():
    swarm = peers({"a": 50, "b": 50, "c": 50}, {"a": {"b": 10}, "b": {"c": 10}})
    plan = choose_chain(swarm, 6)
    assert plan.push and plan.push_ms < plan.mediated_ms
    assert [p for p, _ in plan.route] == ["a", "b", "c"]
    # 25 (client->a) + 5 (a->b) + 5 (b->c) + 25 (c->client), plus the hops' overhead and 6 blocks of compute
    assert 60 < plan.push_ms < 70 and 150 < plan.mediated_ms < 160


def test_client_mediated_when_the_client_sits_between_them():
    # every peer is 20 ms from the client, but 150 ms from the next one (a heterogeneous WAN)
    swarm = peers({"a": 20, "b": 20, "c": 20}, {"a": {"b": 150}, "b": {"c": 150}})
    plan = choose_chain(swarm, 6)
    assert not plan.push and plan.mediated_ms < plan.push_ms


def test_forced_shape_and_forced_route():
    swarm = peers({"a": 20, "b": 20, "c": 20}, {"a": {"b": 150}, "b": {"c": 150}})
    assert choose_chain(swarm, 6, push=True).push
    route = [("a", (0, 2)), ("b", (2, 4)), ("c", (4, 6))]
    plan = choose_chain(swarm, 6, push=None, route=route)
    assert plan.route == route and not plan.push
    assert plan.push_ms == route_ms(swarm, route, True) and plan.mediated_ms == route_ms(swarm, route, False)


def test_each_shape_plans_its_own_route():
    # two replicas of the middle span: "b" is close to the client, "b2" close to its neighbours
    swarm = peers({"a": 30, "b": 5, "c": 30}, {"a": {"b": 200, "b2": 10}, "b2": {"c": 10}, "b": {"c": 200}})
    swarm["b2"] = PeerInfo("b2", "/ip4/127.0.0.1/tcp/1/p2p/b2", (2, 4), throughput=1000.0, rtt_ms=120,
                           rtts={"c": 10})
    assert [p for p, _ in plan_route(swarm, 6, push=True)] == ["a", "b2", "c"]
    assert [p for p, _ in plan_route(swarm, 6, push=False)] == ["a", "b", "c"]


def test_a_last_peer_that_can_verify_wins_when_verifying_here_costs_more():
    # two replicas of the last span: "c" is 6 ms closer, "v" holds the LM head (it can verify rounds itself)
    swarm = peers({"a": 50, "b": 50, "c": 50}, {"a": {"b": 10}, "b": {"c": 10, "v": 16}})
    swarm["v"] = PeerInfo("v", "/ip4/127.0.0.1/tcp/1/p2p/v", (4, 6), throughput=1000.0, rtt_ms=56, head=True)
    for push in (True, False):
        assert plan_route(swarm, 6, push)[-1][0] == "c"  # the client verifies anyway: the faster one
        assert plan_route(swarm, 6, push, headless_ms=20.0)[-1][0] == "v"  # 20 ms of LM head here: the verifier
        assert plan_route(swarm, 6, push, headless_ms=2.0)[-1][0] == "c"  # not worth the detour
    plan = choose_chain(swarm, 6, headless_ms=20.0)
    route = [("a", (0, 2)), ("b", (2, 4)), ("c", (4, 6))]
    assert plan.route[-1][0] == "v" and route_ms(swarm, route, True, 20.0) == route_ms(swarm, route, True) + 20.0
