"""The emulated WAN's delay proxy, for real (sockets, clocks), and the simulator's formula on synthetic numbers."""

from __future__ import annotations

import asyncio
import os
import random
import threading
import time

import pytest

from swarm.bench.simulate import (ChainTimings, CostTable, expected_tokens_per_round, plain_ms_per_token,
                                  speculative_ms_per_token)
from swarm.bench.wan.layout import WanLayout
from swarm.bench.wan.links import PROFILES
from swarm.bench.wan.proxy import DelayProxy, Link, ProxyProcess

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
    assert plain_ms_per_token(t, 4, 9) == pytest.approx((step9_push + 3 * step1_push) / 4)
    step1_cm = 80.0 + 3.0 + 0.5  # client-mediated: sum of client RTTs
    assert plain_ms_per_token(t, 4, 1, push=False) == pytest.approx(step1_cm)


def test_speculative_prediction_formula():
    t = _timings()
    # 10 rounds of k=4 (5 tokens sent each), 40 drafted, 25 tokens committed, a 2-token prompt
    prefill = 60.0 + t.compute_ms(1) + t.head(1)  # no draft prefill cost in these timings
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


def test_fitted_cost_table_smooths_small_steps():
    t = CostTable.fitted({1: 11.0, 3: 14.0, 5: 10.0, 9: 13.0, 128: 48.0}, linear_upto=33)
    assert t.points[128] == 48.0
    small = [t.points[n] for n in (1, 3, 5, 9)]
    assert small == sorted(small) and max(small) - min(small) < 3.0  # one line, not the noise
