"""peer/record.py and peer/dht.py: signed discovery records, and 5 in-process peers finding each other over Kademlia."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time

import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID
from libp2p.records.record import make_signed_put_record

from peer import dht as dht_module
from peer import record as record_module
from peer.dht import SwarmDHT
from peer.record import MAX_RECORD_BYTES, PeerRecord, RecordError, provider_key, record_key
from peer.p2p import P2PNode

pytestmark = pytest.mark.timeout(40)
MODEL = "m-abc"


def peer_id_of(key_pair) -> str:
    return str(ID.from_pubkey(key_pair.public_key))


def make_record(key_pair, **kw) -> PeerRecord:
    now = time.time()
    fields = dict(model=MODEL, start=0, end=4, addrs=[f"/ip4/127.0.0.1/tcp/4001/p2p/{peer_id_of(key_pair)}"],
                  data_addr="tcp://127.0.0.1:5001", throughput=12.5, cache_tokens=4096, x25519="ab" * 32,
                  rtts={"12D3KooWother": 3.5}, issued=now, expires=now + 60)
    return PeerRecord(**{**fields, **kw})


def signed_fields(key_pair, **kw) -> dict:
    """A valid record's fields as signed, with `kw` changed (to seal bad records by hand)."""
    good = PeerRecord.verify(make_record(key_pair).sign(key_pair))
    return {**dataclasses.asdict(good), **kw}


# records, no network


def test_record_round_trip():
    kp = create_new_key_pair()
    rec = make_record(kp)
    data = rec.sign(kp)
    assert len(data) < 2048
    back = PeerRecord.verify(data)
    assert back == dataclasses.replace(rec, peer_id=peer_id_of(kp), public_key=kp.public_key.serialize().hex())
    assert back.blocks == range(0, 4) and back.state == "online" and back.rtts == {"12D3KooWother": 3.5}
    minimal = PeerRecord(model=MODEL, start=3, end=5, expires=time.time() + 5, x25519=None)
    assert PeerRecord.verify(minimal.sign(kp)).data_addr is None
    assert PeerRecord.verify(make_record(kp, moves=True).sign(kp)).moves is True
    older = signed_fields(kp)
    del older["moves"]  # a record from before the field: verifies, a peer that does not move
    assert PeerRecord.verify(record_module._seal(older, kp.private_key)).moves is False
    with pytest.raises(RecordError, match="claims peer"):  # sign() will not sign for another peer
        make_record(kp, peer_id=peer_id_of(create_new_key_pair())).sign(kp)


def test_record_rejections():
    kp, other = create_new_key_pair(), create_new_key_pair()
    good = make_record(kp).sign(kp)
    body = good.rpartition(b"\n")[0]
    seal = record_module._seal
    cases = {
        # signed by another key than the one the peer id hashes from
        "forged (other key)": (seal(signed_fields(kp, public_key=other.public_key.serialize().hex()),
                                    other.private_key), "does not match the peer id"),
        "forged (other signer)": (seal(signed_fields(kp), other.private_key), "bad signature"),
        "unsigned": (body, "unsigned"),
        "unsigned, empty signature": (body + b"\n", "unsigned"),
        "tampered (end 4 -> 5)": (good.replace(b'"end":4', b'"end":5'), "bad signature"),
        "tampered (one bit)": (good[:20] + bytes([good[20] ^ 1]) + good[21:], ""),
        "expired": (make_record(kp, issued=time.time() - 100, expires=time.time() - 1).sign(kp), "expired"),
        "expires too late": (make_record(kp, expires=time.time() + 10 * record_module.MAX_TTL).sign(kp), "too far"),
        "garbage": (os.urandom(300), ""),
        "empty": (b"", "unsigned"),
        "not JSON": (b"hello\n" + b"00" * 64, "not JSON"),
        "JSON list": (seal([1, 2], kp.private_key), "not a JSON object"),
        "deep JSON": (b"[" * 5000 + b"]" * 5000 + b"\n" + b"00" * 64, "malformed"),
        "oversized": (good + b" " * MAX_RECORD_BYTES, "oversized"),
        "not bytes": ("a string", "not bytes"),
    }
    bad_fields = {"start": "0", "end": 0, "state": "zombie", "throughput": "fast", "cache_tokens": -1,
                  "version": 1.5, "model": "", "data_addr": 5, "addrs": ["not a multiaddr"], "x25519": "zz",
                  "rtts": {"p": "1"}, "expires": None, "peer_id": True, "moves": 1}
    for name, value in bad_fields.items():
        cases[f"bad {name}"] = (seal(signed_fields(kp, **{name: value}), kp.private_key), f"bad {name}")
    missing = signed_fields(kp)
    del missing["state"]
    cases["missing field"] = (seal(missing, kp.private_key), "missing")
    cases["start >= end"] = (seal(signed_fields(kp, start=4, end=4), kp.private_key), "empty block range")
    for name, (data, reason) in cases.items():
        with pytest.raises(RecordError, match=reason or None):
            PeerRecord.verify(data)
            pytest.fail(f"accepted: {name}")
    assert PeerRecord.verify(good)  # still fine
    with pytest.raises(RecordError, match="expired"):
        PeerRecord.verify(good, now=time.time() + 61)
    with pytest.raises(RecordError, match="oversized"):  # sign() refuses too
        make_record(kp, rtts={f"{i:0100d}": 1.0 for i in range(200)}).sign(kp)
    with pytest.raises(RecordError, match="bad state"):
        make_record(kp, state="zombie").sign(kp)


# a live swarm


def run_swarm(body, n: int = 5, ttl: float = 120.0):
    """n nodes, each bootstrapping to node 0 only; run body(nodes, dhts); close everything."""
    async def main():
        nodes = list(await asyncio.gather(*(P2PNode.start() for _ in range(n))))
        dhts = [await SwarmDHT.start(nodes[0], ttl=ttl)]
        try:
            dhts += await asyncio.gather(*(SwarmDHT.start(node, [nodes[0].addrs[0]], ttl=ttl) for node in nodes[1:]))
            return await body(nodes, dhts)
        finally:
            await asyncio.gather(*(d.close() for d in dhts))
            await asyncio.gather(*(node.close() for node in nodes))
    return asyncio.run(main())


async def poll(find, ok, within: float = 10.0):
    """find() until ok(result), at most `within` seconds; the last result."""
    deadline = time.monotonic() + within
    while True:
        result = await find()
        if ok(result) or time.monotonic() > deadline:
            return result
        await asyncio.sleep(0.1)


def ranges(records) -> dict[str, tuple[int, int]]:
    return {r.peer_id: (r.start, r.end) for r in records}


def test_find_sees_every_announcer(monkeypatch):
    async def body(nodes, dhts):
        client = dhts[4]
        spans = [(0, 4), (2, 6), (4, 8), (0, 8)]
        for i, (start, end) in enumerate(spans):
            t0 = time.perf_counter()
            await dhts[i].announce(PeerRecord(model=MODEL, start=start, end=end, throughput=10.0 + i,
                                              cache_tokens=1000 * i, data_addr=f"tcp://127.0.0.1:{7000 + i}"))
            print(f"announce {i}: {(time.perf_counter() - t0) * 1000:.0f} ms")
        expected = {nodes[i].peer_id: spans[i] for i in range(4)}
        t0 = time.perf_counter()
        found = await poll(lambda: client.find(MODEL), lambda recs: ranges(recs) == expected, within=5)
        print(f"first complete find after {(time.perf_counter() - t0) * 1000:.0f} ms")
        assert ranges(found) == expected
        for i, rec in enumerate(sorted(found, key=lambda r: [n.peer_id for n in nodes].index(r.peer_id))):
            assert (rec.throughput, rec.cache_tokens) == (10.0 + i, 1000 * i)
            assert rec.data_addr == f"tcp://127.0.0.1:{7000 + i}"
            assert rec.state == "online" and rec.addrs == nodes[i].addrs and rec.model == MODEL
            assert rec.expires - rec.issued == pytest.approx(120.0) and rec.version == record_module.PROTOCOL_VERSION
        for _ in range(3):
            t0 = time.perf_counter()
            assert ranges(await client.find(MODEL)) == expected
            print(f"find: {(time.perf_counter() - t0) * 1000:.0f} ms")
        assert ranges(await client.find(MODEL, range(6, 8))) == {nodes[2].peer_id: (4, 8), nodes[3].peer_id: (0, 8)}
        assert set(ranges(await client.find(MODEL, range(0, 1)))) == {nodes[0].peer_id, nodes[3].peer_id}
        assert await client.find("no-such-model") == []
        with monkeypatch.context() as patch:  # as in a swarm of over 20 nodes: one lookup per record
            patch.setattr(dht_module, "BUCKET_SIZE", 0)
            assert ranges(await client.find(MODEL)) == expected
        # a peer moving to another model leaves this one at once; a new range replaces the old (newest wins)
        await dhts[3].announce(PeerRecord(model="other-model", start=0, end=2))
        await dhts[1].announce(PeerRecord(model=MODEL, start=6, end=10))
        expected = {nodes[0].peer_id: (0, 4), nodes[1].peer_id: (6, 10), nodes[2].peer_id: (4, 8)}
        for d in (client, dhts[1], dhts[3]):  # a client, the announcer itself, the peer that left
            assert ranges(await d.find(MODEL)) == expected
        assert ranges(await dhts[0].find("other-model")) == {nodes[3].peer_id: (0, 2)}
    run_swarm(body)


def test_live_dht_refuses_bad_values():
    async def body(nodes, dhts):
        victim, attacker, client = dhts[1], dhts[3], dhts[4]
        vkp, akp = nodes[1].key_pair, nodes[3].key_pair
        await victim.announce(PeerRecord(model=MODEL, start=0, end=4))
        vkey = record_key(MODEL, nodes[1].peer_id)
        akey = record_key(MODEL, nodes[3].peer_id)
        now = time.time()
        fake_victim = signed_fields(vkp, state="offline", public_key=akp.public_key.serialize().hex(),
                                    issued=now + 1, expires=now + 60)
        bad = {
            "forged (attacker key)": (vkey, record_module._seal(fake_victim, akp.private_key)),
            "forged (victim key, attacker signature)": (
                vkey, record_module._seal(signed_fields(vkp, state="offline", issued=now + 1), akp.private_key)),
            "unsigned": (vkey, make_record(vkp, state="offline", issued=now + 1).sign(vkp).rpartition(b"\n")[0]),
            "garbage": (vkey, os.urandom(200)),
            "record under another peer's key": (vkey, make_record(akp, issued=now + 1).sign(akp)),
            "record under another model's key": (record_key("other", nodes[3].peer_id), make_record(akp).sign(akp)),
            "expired": (akey, make_record(akp, issued=now - 100, expires=now - 1).sign(akp)),
            "oversized": (akey, make_record(akp).sign(akp) + b" " * MAX_RECORD_BYTES),
            "not our namespace": ("/other/x", b"anything"),
            "no namespace": ("plain-key", b"anything"),
        }
        honest = [nodes[i].host.get_id() for i in (0, 1, 2, 4)]

        async def raw_put(key: str, value: bytes) -> list[bool]:  # a PUT_VALUE straight to each honest peer
            record = make_signed_put_record(key.encode(), value, akp.private_key)
            store = attacker.dht.value_store
            return [await store._store_at_peer(peer, key.encode(), value, record=record) for peer in honest]

        async def stored(d: SwarmDHT, key: str):
            record = d.dht.value_store.get(key.encode())
            return record and record.value

        for name, (key, value) in bad.items():
            assert await nodes[3].run_trio(raw_put, key, value) == [False] * 4, name
            for i in (0, 1, 2, 4):
                assert await nodes[i].run_trio(stored, dhts[i], key) != value, (name, i)

        # A malicious peer serves anything it likes: find() must still not believe it.
        async def plant() -> None:
            attacker.dht.value_store.put(vkey.encode(), bad["forged (attacker key)"][1])
            attacker.dht.value_store.put(akey.encode(), bad["expired"][1])
            await attacker._provide_trio(provider_key(MODEL, int(time.time() // dht_module.EPOCH)))
        await nodes[3].run_trio(plant)
        for d in (client, dhts[0]):
            found = await d.find(MODEL, include_offline=True)
            assert ranges(found) == {nodes[1].peer_id: (0, 4)}
            assert found[0].state == "online"
    run_swarm(body)


def test_close_goes_offline_and_vanished_peers_expire(monkeypatch):
    ttl = 4.0
    monkeypatch.setattr(dht_module, "EPOCH", ttl)  # provider keys roll over during the test, too

    async def body(nodes, dhts):
        client, closing, vanishing = dhts[4], dhts[1], dhts[2]
        await closing.announce(PeerRecord(model=MODEL, start=0, end=4))
        await vanishing.announce(PeerRecord(model=MODEL, start=4, end=8))
        both = {nodes[1].peer_id: (0, 4), nodes[2].peer_id: (4, 8)}
        assert ranges(await poll(lambda: client.find(MODEL), lambda recs: ranges(recs) == both)) == both
        first = {r.peer_id: r.issued for r in await client.find(MODEL)}
        # republished before expiry, across epochs: visible all along for 1.5 TTLs
        deadline = time.monotonic() + 1.5 * ttl
        while time.monotonic() < deadline:
            assert ranges(await client.find(MODEL)) == both
            await asyncio.sleep(0.1)
        assert all(r.issued > first[r.peer_id] for r in await client.find(MODEL))

        await closing.close()  # a clean exit: offline at once
        found = await client.find(MODEL)
        assert ranges(found) == {nodes[2].peer_id: (4, 8)}
        offline = [r for r in await client.find(MODEL, include_offline=True) if r.peer_id == nodes[1].peer_id]
        assert [r.state for r in offline] == ["offline"]

        await nodes[2].close()  # vanishes without a word: gone once its record expires
        t0 = time.monotonic()
        found = await poll(lambda: client.find(MODEL, include_offline=True),
                           lambda recs: nodes[2].peer_id not in ranges(recs), within=ttl + 5)
        assert nodes[2].peer_id not in ranges(found)
        print(f"vanished peer dropped after {time.monotonic() - t0:.1f} s (ttl {ttl} s)")
    run_swarm(body, ttl=ttl)


def test_a_refresh_asks_each_node_once_or_not_at_all(monkeypatch):
    """A serving peer's refresh (a find, then its announce) in a swarm smaller than k: one lookup stands for
    every key, each record comes from its own peer, and nodes that a find saw listing us as a provider are not
    asked again (an idle swarm paid n^2 requests a find: scripts/idle_peers.py)."""
    async def body(nodes, dhts):
        for i in range(4):
            await dhts[i].announce(PeerRecord(model=MODEL, start=i, end=i + 1))
        peer = dhts[0]
        await poll(lambda: peer.find(MODEL), lambda recs: len(recs) == 4)
        calls: dict[str, list] = {"lookup": [], "get_value": [], "get_providers": [], "add_provider": []}

        async def count():
            for obj, name, kind in ((peer.dht.peer_routing, "find_closest_peers_network", "lookup"),
                                    (peer.dht.value_store, "_get_from_peer", "get_value"),
                                    (peer.dht.provider_store, "_get_providers_from_peer_with_closers", "get_providers"),
                                    (peer.dht.provider_store, "_send_add_provider", "add_provider")):
                def wrap(fn, kind):
                    async def counted(*a, **kw):
                        calls[kind].append(a[0])
                        return await fn(*a, **kw)
                    return counted
                monkeypatch.setattr(obj, name, wrap(getattr(obj, name), kind))
        await nodes[0].run_trio(count)
        monkeypatch.setattr(dht_module, "LOOKUP_REUSE_S", 60.0)  # however slow the machine
        assert ranges(await peer.find(MODEL)) == {nodes[i].peer_id: (i, i + 1) for i in range(4)}
        await peer.announce(PeerRecord(model=MODEL, start=0, end=1))
        others = {n.host.get_id() for n in nodes[1:]}
        assert len(calls["lookup"]) <= 1  # (none when the initial poll's lookup is still fresh)
        assert sorted(map(str, calls["get_value"])) == sorted(str(n.host.get_id()) for n in nodes[1:4])
        assert set(calls["get_providers"]) == others and len(calls["get_providers"]) == 4  # the find's, no more
        assert calls["add_provider"] == []
        await nodes[3].close()  # now a peer that does not answer: its record comes from the nodes that store it
        calls["get_value"].clear()
        assert nodes[3].peer_id in ranges(await peer.find(MODEL))
        assert len(calls["get_value"]) > 1
    run_swarm(body)


def test_a_full_provider_list_makes_room_for_the_newest():
    """py-libp2p's provider list ignores new providers once it holds 20 (for 48 h): a churning swarm's dead
    filled it and later peers went unseen. Ours drops the entry that announced itself longest ago."""
    from libp2p.peer.peerinfo import PeerInfo

    async def body(nodes, dhts):
        async def fill() -> tuple[list[str], list[str]]:
            store, key = dhts[0].dht.provider_store, b"k" * 32
            ids = [ID.from_pubkey(create_new_key_pair().public_key) for _ in range(22)]
            for pid in ids[:20]:
                store.add_provider(key, PeerInfo(pid, []))
                await trio.sleep(0.001)
            store.add_provider(key, PeerInfo(ids[5], []))  # one already listed announces again: nobody goes
            store.add_provider(key, PeerInfo(ids[20], []))  # full: the longest ago (ids[0]) goes
            store.add_provider(key, PeerInfo(ids[21], []))  # then ids[1] (ids[5] is newer now)
            return [str(p.peer_id) for p in store.get_providers(key)], [str(p) for p in ids]
        listed, ids = await nodes[0].run_trio(fill)
        assert len(listed) == 20 and set(listed) == set(ids[2:])
    run_swarm(body, n=2)


def test_clients_find_records_but_stay_out_of_routing_tables():
    """A client-mode DHT (a chat, a `swarm generate`, a `swarm status`) finds records, yet no server puts
    it in its routing table, so it leaves nothing behind for later lookups to trip over; servers do
    enter each other's tables (they join through node 0)."""
    async def body(nodes, dhts):
        await dhts[1].announce(PeerRecord(model=MODEL, start=0, end=4))
        client_node = await P2PNode.start()
        client = await SwarmDHT.start(client_node, [nodes[0].addrs[0]], server=False)
        try:
            found = await poll(lambda: client.find(MODEL), lambda recs: len(recs) == 1)
            assert ranges(found) == {nodes[1].peer_id: (0, 4)}
            with pytest.raises(RuntimeError, match="client-mode"):
                await client.announce(PeerRecord(model=MODEL, start=0, end=4))
            for _ in range(3):  # more requests, to every server, over the same connections
                assert ranges(await client.find(MODEL)) == {nodes[1].peer_id: (0, 4)}
        finally:
            await client.close()
            await client_node.close()

        async def table(d: SwarmDHT) -> set[str]:
            return {str(p) for p in d.dht.routing_table.get_peer_ids()}
        tables = [await node.run_trio(table, d) for node, d in zip(nodes, dhts)]
        assert all(client_node.peer_id not in t for t in tables), tables
        assert tables[0] == {n.peer_id for n in nodes[1:]}
        assert all(nodes[0].peer_id in t for t in tables[1:])
    run_swarm(body, n=3)
