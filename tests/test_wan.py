"""The emulated WAN's delay proxy, for real (sockets, clocks) and on its schedule (jitter, bandwidth cap,
order), latency-matrix files (delay, jitter, bandwidth per link; missing fields said), and the
simulator's formulas and round-by-round replay on synthetic numbers."""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import re
import statistics
import threading
import time

import pytest

from swarm.bench.simulate import (ChainTimings, CostTable, RoundShape, expected_delay_ms, expected_tokens_per_round,
                                  plain_ms_per_token, speculative_ms_per_token, speculative_timeline_ms)
from swarm.bench.wan.layout import WanLayout
from swarm.bench.wan.links import PROFILES, load_matrix, parse_matrix
from swarm.bench.wan.proxy import DelayProxy, Link, Pipe, ProxyProcess, Wire

SLACK_MS = 25.0  # scheduling on a busy 2-core machine


async def _echo(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()


async def _with_proxy(link: Link, body):
    server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    proxy = await DelayProxy(server.sockets[0].getsockname()[:2], link).start()
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        return await body(reader, writer)
    finally:
        writer.close()
        await proxy.close()
        server.close()


async def _rtts(reader, writer, n=5, size=100):
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        writer.write(b"x" * size)
        await writer.drain()
        await reader.readexactly(size)
        out.append(1000 * (time.perf_counter() - t0))
    return out


def test_rtt_through_a_20ms_proxy():
    rtts = asyncio.run(_with_proxy(Link(20.0), _rtts))
    assert min(rtts) >= 40.0, rtts
    assert sorted(rtts)[len(rtts) // 2] < 40.0 + SLACK_MS, rtts


def test_byte_stream_intact_and_in_order_under_jitter():
    rng = random.Random(1)
    chunks = [os.urandom(rng.randint(1, 5000)) for _ in range(200)]

    async def body(reader, writer):
        async def send():
            for c in chunks:  # many small writes, with pauses, so the proxy sees many chunks
                writer.write(c)
                await writer.drain()
                if rng.random() < 0.2:
                    await asyncio.sleep(0.001)

        sender = asyncio.create_task(send())
        got = await reader.readexactly(sum(map(len, chunks)))
        await sender
        return got

    got = asyncio.run(_with_proxy(Link(2.0, jitter_ms=5.0), body))
    assert got == b"".join(chunks)


def test_bandwidth_cap_slows_a_big_transfer():
    data = os.urandom(1_000_000)

    async def body(reader, writer):
        t0 = time.perf_counter()
        writer.write(data)
        await writer.drain()
        got = await reader.readexactly(len(data))
        assert got == data
        return time.perf_counter() - t0

    capped = asyncio.run(_with_proxy(Link(0.0, mbit_s=20.0), body))  # 1 MB at 20 Mbit/s: 0.4 s each way
    free = asyncio.run(_with_proxy(Link(0.0), body))
    assert capped >= 0.4, capped
    assert free < capped / 2, (free, capped)


def test_proxy_process_serves_a_delayed_link():
    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(asyncio.start_server(_echo, "127.0.0.1", 0))
    port = server.sockets[0].getsockname()[1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    proxies = ProxyProcess([dict(target=f"tcp://127.0.0.1:{port}", up=dict(delay_ms=10.0), down=dict(delay_ms=5.0))])
    try:
        async def client():
            reader, writer = await asyncio.open_connection("127.0.0.1", proxies.ports[0])
            try:
                return await _rtts(reader, writer)
            finally:
                writer.close()

        rtts = asyncio.run(client())
        assert 15.0 <= min(rtts) and sorted(rtts)[2] < 15.0 + SLACK_MS, rtts
    finally:
        proxies.stop()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)


def test_route_names_each_peer_by_its_link_from_the_previous_node():
    direct = ["tcp://p:1", "tcp://p:2", "tcp://p:3"]
    layout = WanLayout(PROFILES["heterogeneous"].matrix(3),
                       to_peer={(0, 1): "tcp://a:1", (0, 2): "tcp://a:2", (0, 3): "tcp://a:3",
                                (1, 2): "tcp://b:2", (2, 3): "tcp://b:3"}, direct=direct)
    assert [layout.route_addr(d) for d in direct] == ["tcp://a:1", "tcp://b:2", "tcp://b:3"]
    # the client dials every peer over its own link, whatever the route calls it
    assert [layout.dial_addr(layout.route_addr(d)) for d in direct] == ["tcp://a:1", "tcp://a:2", "tcp://a:3"]
    assert [layout.dial_addr(d) for d in direct] == ["tcp://a:1", "tcp://a:2", "tcp://a:3"]
    assert layout.route_addr("tcp://elsewhere:9") == layout.dial_addr("tcp://elsewhere:9") == "tcp://elsewhere:9"
    assert layout.link_addr(1, 2) == "tcp://b:2"
    # heterogeneous: client (EU) - peer1 (US) far, peer1 - peer2 (EU) far, client - peer2 near
    assert layout.one_way_ms(0, 1) == 40.0 and layout.one_way_ms(1, 2) == 40.0 and layout.one_way_ms(0, 2) == 5.0


def test_layout_is_the_clients_address_map():
    import inspect

    from swarm.client.config import AddressMap

    for name in ("route_addr", "dial_addr"):  # the layout fits ClientConfig.addresses as it is, no subclass
        want = list(inspect.signature(getattr(AddressMap, name)).parameters)
        assert list(inspect.signature(getattr(WanLayout, name)).parameters) == want, name


def test_proxy_process_needs_only_the_standard_library():
    import subprocess
    import sys

    code = ("import sys, swarm.bench.wan.proxy; "
            "print(sorted(m for m in ('torch', 'numpy', 'peer', 'protocol', 'swarm.client', 'swarm.decode') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


# --- the simulator --------------------------------------------------------------------------------
def _timings() -> ChainTimings:
    compute = [CostTable({1: 2.0, 9: 4.0}), CostTable({1: 1.0, 9: 3.0})]  # 0.25 ms per extra token each
    return ChainTimings([10.0, 20.0, 30.0], [20.0, 60.0], compute, CostTable({1: 0.5, 9: 1.3}),
                        draft_ms_per_token=0.4, draft_ms_per_round=0.6)


def test_cost_table_interpolates_and_extrapolates():
    t = CostTable({1: 2.0, 9: 4.0, 17: 8.0})
    assert t(1) == 2.0 and t(5) == 3.0 and t(13) == 6.0 and t(33) == 16.0 and t(0) == 1.75


def test_plain_prediction_formula():
    t = _timings()
    step1_push = 60.0 + 3.0 + 0.5  # trip + compute(1) + head(1)
    step9_push = 60.0 + 7.0 + 1.3
    assert t.step(1) == pytest.approx(step1_push) and t.step(9) == pytest.approx(step9_push)
    prefill9 = 60.0 + 7.0 + 0.5  # the prompt's step: the LM head of its last position only
    assert plain_ms_per_token(t, 4, 9) == pytest.approx((prefill9 + 3 * step1_push) / 4)
    step1_cm = 80.0 + 3.0 + 0.5  # client-mediated: sum of client RTTs
    assert plain_ms_per_token(t, 4, 1, push=False) == pytest.approx(step1_cm)


def test_speculative_prediction_formula():
    t = _timings()
    # 10 rounds of k=4 (5 tokens sent each), 40 drafted, 25 tokens committed, a 2-token prompt
    prefill = 60.0 + t.compute_ms(1)  # the prompt but its last token, no LM head; no draft prefill cost here
    per_round = 60.0 + t.compute_ms(5) + t.head(5) + 4 * 0.4 + 0.6
    assert speculative_ms_per_token(t, 25, 2, 10, 50, 40) == pytest.approx((prefill + 10 * per_round) / 25)
    # pipelined: 4 hits skip the trip and their drafting at their turn; 4 + 3 rounds sent ahead were drafted,
    # and the 3 wasted ones also cost the peers' compute
    draft, compute = 4 * 0.4 + 0.6, t.compute_ms(5)
    expected = prefill + 10 * per_round - 4 * (60.0 + draft) + 7 * draft + 3 * compute
    assert speculative_ms_per_token(t, 25, 2, 10, 50, 40, pipelined_hits=4, wasted_rounds=3) == pytest.approx(
        expected / 25)
    assert expected_tokens_per_round(0.0, 4) == pytest.approx(1.0)
    assert expected_tokens_per_round(0.5, 2) == pytest.approx(1.75)
    assert expected_tokens_per_round(1.0, 4) == pytest.approx(5.0, rel=1e-4)


# --- the proxy's schedule: bandwidth cap and jitter per link -------------------------------------
def test_bandwidth_cap_queues_chunks_behind_earlier_ones_on_the_same_link():
    link, wire = Link(10.0, mbit_s=8.0), Wire()  # 8 Mbit/s: 1 MB a second
    a, b = Pipe(link, random.Random(0), wire), Pipe(link, random.Random(0), wire)  # two connections, one link
    assert a.schedule(0.0, 1_000_000) == pytest.approx(1.0 + 0.010)  # serialised, then the one-way delay
    assert b.schedule(0.0, 500_000) == pytest.approx(1.5 + 0.010)  # queued behind the first on the link
    assert a.schedule(5.0, 1000) == pytest.approx(5.0 + 0.001 + 0.010)  # the link idle again
    assert Pipe(Link(10.0), random.Random(0)).schedule(0.0, 1_000_000) == pytest.approx(0.010)  # no cap


def test_jitter_spreads_delays_but_never_reorders():
    busy = Pipe(Link(20.0, jitter_ms=5.0), random.Random(3))
    deliveries = [busy.schedule(i * 0.001, 100) for i in range(500)]  # a chunk a ms: jitter alone would reorder
    assert deliveries == sorted(deliveries)
    idle = Pipe(Link(20.0, jitter_ms=5.0), random.Random(4))
    delays = [1000 * (idle.schedule(float(i), 100) - i) for i in range(500)]  # far apart: nothing held back
    assert 4.0 < statistics.stdev(delays) < 6.0 and 19.0 < statistics.mean(delays) < 21.0 and min(delays) >= 0


# --- latency matrices ----------------------------------------------------------------------------
def test_matrix_links_carry_delay_jitter_and_bandwidth():
    data = {"defaults": {"mbit_s": 50}, "links": [
        [0, {"delay_ms": 25, "jitter_ms": 2, "mbit_s": 100}, 30],
        [{"delay_ms": 25, "jitter_ms": 2, "mbit_s": None}, None, {"delay_ms": 5, "jitter_ms": 1}],
        [{"delay_ms": 30, "jitter_ms": 0, "mbit_s": 20}, {"delay_ms": 5, "jitter_ms": 1, "mbit_s": 20}, 0]]}
    links, notes = parse_matrix(data, "m.json")
    assert links[0][1] == Link(25.0, 2.0, 100.0)
    assert links[1][0] == Link(25.0, 2.0, None)  # null: no cap, as given (not missing)
    assert links[0][2] == Link(30.0, 0.0, 50.0)  # a bare number is the delay; jitter by default, the file's cap
    assert links[1][2] == Link(5.0, 1.0, 50.0) and links[2][0] == Link(30.0, 0.0, 20.0)
    assert notes == ["m.json: no jitter_ms for client->peer2: using 0 ms (no jitter) (default)",
                     "m.json: no mbit_s for client->peer2, peer1->peer2: using 50 Mbit/s (the file's default)"]


def test_a_bare_delay_matrix_says_what_every_link_lacks(tmp_path, capsys):
    path = tmp_path / "m.json"
    path.write_text("[[0, 25], [25, 0]]")
    links = load_matrix(path)
    assert links[0][1] == links[1][0] == Link(25.0)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2, err  # one line per missing field, with the value used
    assert "jitter_ms" in err[0] and "all 2 links" in err[0] and "0 ms" in err[0]
    assert "mbit_s" in err[1] and "no bandwidth cap" in err[1]
    full = {"delay_ms": 1, "jitter_ms": 0.5, "mbit_s": 10}
    path.write_text(json.dumps([[0, full], [dict(full, mbit_s=None), 0]]))
    assert load_matrix(path)[1][0] == Link(1.0, 0.5, None)
    assert capsys.readouterr().err == ""  # nothing missing, nothing said


@pytest.mark.parametrize("data, says", [
    ([[0, {"delay": 3}], [1, 0]], "unknown field 'delay'"),
    ([[0, 1, 2], [1, 0, 3]], "square"),
    ([[0, -1], [1, 0]], "delay_ms must be a number >= 0"),
    ([[0, {"delay_ms": 1, "mbit_s": 0}], [1, 0]], "mbit_s must be a number > 0"),
    ([[0, "25"], [1, 0]], "delay_ms must be"),
    ({"links": [[0, 1], [1, 0]], "default": {}}, "defaults"),
])
def test_bad_matrices_are_refused_with_a_reason(data, says):
    with pytest.raises(ValueError, match=re.escape(says)):
        parse_matrix(data, "m.json")


# --- the simulator from links, and round by round --------------------------------------------------
def test_timings_from_links_use_each_links_delay_jitter_and_bandwidth():
    t = ChainTimings.from_links(PROFILES["continental"].matrix(2), [CostTable({1: 1.0})] * 2, bytes_per_token=1000)
    hop = expected_delay_ms(25.0, 2.0)
    assert 25.0 <= hop < 25.001
    assert t.trip(True) == pytest.approx(3 * hop) and t.trip(False) == pytest.approx(4 * hop)
    serial = 1000 * 8 / 100e6 * 1000  # ms per token per hop at 100 Mbit/s
    assert t.wire(10, True) == pytest.approx(3 * hop + 10 * 3 * serial)
    assert t.wire(10, False) == pytest.approx(4 * hop + 10 * 4 * serial)
    het = ChainTimings.from_links(PROFILES["heterogeneous"].matrix(2), [CostTable({1: 1.0})] * 2)
    assert het.trip(True) == pytest.approx(40 + 40 + 5, abs=0.01)  # client->p1, p1->p2, p2->client
    assert expected_delay_ms(25.0, 0.0) == 25.0
    assert expected_delay_ms(0.0, 3.0) == pytest.approx(3.0 / math.sqrt(2 * math.pi))  # never below zero


def test_timeline_of_rounds_not_sent_ahead_is_their_sum():
    t = _timings()
    total = speculative_timeline_ms(t, [RoundShape(5, 4)] * 10, 2)
    first_draft = 3 * 0.4  # the first round's catch-up is the draft's prefill (free here), then 3 steps
    expected = 60 + t.compute_ms(1) + first_draft + 9 * t.draft_ms(4) + 10 * (60 + t.compute_ms(5) + t.head(5))
    assert total == pytest.approx(expected)
    # the sum of rounds, but for the first round's catch-up step, which the draft's prefill replaces
    assert total == pytest.approx(speculative_ms_per_token(t, 25, 2, 10, 50, 40) * 25 - t.draft_ms(1))


def _flat(trip: float, compute: float) -> ChainTimings:
    return ChainTimings([trip / 3] * 3, [trip / 2] * 2, [CostTable({1: compute})], CostTable({1: 1.0}),
                        draft_ms_per_token=2.0, chain_compute={"push": CostTable({1: compute})})


def test_timeline_one_round_ahead_hides_only_what_overlaps():
    t, ahead = _flat(60.0, 0.0), RoundShape(2, 1)
    rounds = [RoundShape(2, 1, ahead=ahead), RoundShape(2, 1, hit=True, ahead=ahead), RoundShape(2, 1, hit=True)]
    # round 1 leaves at 0 and is back at 60; round 2 left at 2 (drafted meanwhile), back at 62; round 3 is
    # drafted and sent only during round 2's turn (at 63): back at 123, done at 124. Two trips for three rounds,
    # where a sum of rounds counts one (hits free of the trip): 60 + 2 + 3 x 1 + 2 x 2 = 69
    assert speculative_timeline_ms(t, rounds, 1) == pytest.approx(124.0)
    assert speculative_ms_per_token(t, 1, 1, 3, 6, 3, pipelined_hits=2) == pytest.approx(69.0)


def test_timeline_wasted_round_costs_only_the_chain_time_the_next_step_waits_for():
    plain = [RoundShape(2, 1), RoundShape(2, 1)]
    wasted = [RoundShape(2, 1, ahead=RoundShape(2, 1)), RoundShape(2, 1)]  # sent ahead, then thrown away
    wan = _flat(60.0, 10.0)  # the wire dominates: the thrown-away round's drafting and compute overlap it
    assert speculative_timeline_ms(wan, wasted, 1) == pytest.approx(speculative_timeline_ms(wan, plain, 1)) == 144.0
    lan = _flat(0.0, 10.0)  # no wire: the next step queues behind the thrown-away one on the chain
    assert speculative_timeline_ms(lan, plain, 1) == pytest.approx(24.0)
    assert speculative_timeline_ms(lan, wasted, 1) == pytest.approx(31.0)
