"""Reachability (issue 15, part 1): which addresses a peer may announce (peer/addrs.py), the dial-back
protocol and its hostile-input rules (peer/dialback.py), verdicts and plans (peer/reachability.py), a
private peer's DHT mode and record, and two `swarm peer` processes on loopback (a loopback swarm: a
successful dial-back from 127.0.0.1 makes a peer `public`, with its loopback addresses)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time

import pytest
from libp2p.crypto.ed25519 import create_new_key_pair

from peer import dialback
from peer.addrs import scope, usable
from peer.dht import SwarmDHT
from peer.dialback import DialbackError, RateLimit, parse_request
from peer.p2p import NO_ADDRESS, P2PNode
from peer.reachability import Reachability, Verdict
from peer.record import PeerRecord, RecordError, _seal
from peer.transport import listen_tcp, parse_tcp_addr
from swarm.launch import PeerProcess
from test_dht import poll  # find() until ok(result), bounded
from test_volunteer import swarm, wait_for  # the same peer-process helpers

pytestmark = pytest.mark.timeout(60)
NONCE = bytes(range(16))


@pytest.fixture(autouse=True)
def cache_dir(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SPECSWARM_CACHE", str(tmp_path_factory.getbasetemp() / "reachability-cache"))


# --- addresses -----------------------------------------------------------------------------------

def test_scopes():
    assert [scope(h) for h in ("0.0.0.0", "::", "127.0.0.1", "::1", "10.1.2.3", "172.20.0.1", "192.168.1.10",
                               "100.64.3.4", "169.254.1.1", "fd00::1", "fe80::1", "224.0.0.1", "8.8.8.8",
                               "203.0.113.10", "::ffff:192.168.1.10", "peer.example")] == [
        "unspecified", "unspecified", "loopback", "loopback", "private", "private", "private", "private", "private",
        "private", "private", "multicast", "global", "global", "private", "global"]  # TEST-NET-3 is "global" here


def test_usable_addresses():
    lan, lo, wild, pub = ("/ip4/192.168.1.10/tcp/31330", "/ip4/127.0.0.1/tcp/31330", "/ip4/0.0.0.0/tcp/31330",
                          "/ip4/203.0.113.2/tcp/31330")
    name = "/dns4/peer.example/tcp/4001"
    everything = [wild, lan, lo, pub, name]
    # the first peer of a swarm (no bootstrap peer): no wildcard, no loopback unless it has nothing else
    assert usable(everything) == [lan, pub, name]
    assert usable([lo]) == [lo] and usable([lo, wild]) == [lo]
    # a loopback swarm keeps loopback; a public one does not
    assert usable(everything, ["/ip4/127.0.0.1/tcp/1/p2p/x"], "public") == [lan, lo, pub, name]
    assert usable(everything, ["/ip4/203.0.113.10/tcp/1/p2p/x"], "public") == [lan, pub, name]
    # private: nothing others could not dial, unless a bootstrap peer is on that same private network
    assert usable(everything, ["/ip4/203.0.113.10/tcp/1/p2p/x"], "private") == []
    assert usable(everything, ["/ip4/127.0.0.1/tcp/1/p2p/x"], "private") == []
    assert usable(everything, ["/ip4/192.168.1.20/tcp/1/p2p/x"], "private") == [lan]
    assert usable(everything, ["/ip4/192.168.2.20/tcp/1/p2p/x"], "private") == []  # another home's LAN


# --- the protocol's messages and limits ----------------------------------------------------------------

@pytest.mark.parametrize("body, says", [
    (b"\xff\xfe", "JSON"), (b"[1, 2]", "JSON"), (b"[" * 100_000, "JSON"), (b'{"v": 2}', "version"),
    (b'{"v": 1, "nonce": "abcd", "ports": {"libp2p": 1}}', "nonce"),
    (b'{"v": 1, "nonce": "' + b"zz" * 16 + b'", "ports": {"libp2p": 1}}', "JSON"),
    (json.dumps({"v": 1, "nonce": NONCE.hex(), "ports": {"libp2p": 0}}).encode(), "ports"),
    (json.dumps({"v": 1, "nonce": NONCE.hex(), "ports": {"libp2p": 70000}}).encode(), "ports"),
    (json.dumps({"v": 1, "nonce": NONCE.hex(), "ports": {"libp2p": True}}).encode(), "ports"),
    (json.dumps({"v": 1, "nonce": NONCE.hex(), "ports": {"ssh": 22}}).encode(), "ports"),
    (json.dumps({"v": 1, "nonce": NONCE.hex(), "ports": {}}).encode(), "ports"),
    (json.dumps({"v": 1, "nonce": NONCE.hex(), "ports": [31330]}).encode(), "ports"),
])
def test_malformed_requests_are_refused(body, says):
    with pytest.raises(DialbackError, match=says) as err:
        parse_request(body)
    assert err.value.code == "bad_request"


def test_request_round_trip_and_probe_frames():
    assert parse_request(dialback.encode_request(NONCE, {"libp2p": 4001, "data": 4002})) == \
        (NONCE, {"libp2p": 4001, "data": 4002})
    assert dialback.probe_nonce(dialback.PROBE + NONCE) == NONCE
    assert dialback.probe_nonce(dialback.PROBE + NONCE + b"x") is None
    assert dialback.probe_nonce(b"SWRM" + NONCE) is None
    with pytest.raises(DialbackError) as err:
        dialback.parse_reply(b'{"v": 1, "error": "rate_limited", "message": "slow down"}', NONCE)
    assert err.value.code == "rate_limited"
    with pytest.raises(DialbackError, match="does not match"):  # an answer to another request
        dialback.parse_reply(json.dumps({"nonce": "00" * 16, "observed": "1.2.3.4", "results": {}}).encode(), NONCE)


def test_rate_limit():
    now = [0.0]
    limit = RateLimit(burst=2, every=30.0, parallel=3, exempt_loopback=True, clock=lambda: now[0])
    for _ in range(2):
        limit.admit("198.51.100.7")
        limit.done()
    with pytest.raises(DialbackError, match="too often") as err:
        limit.admit("198.51.100.7")
    assert err.value.code == "rate_limited"
    limit.admit("198.51.100.8")  # another IP has its own bucket
    limit.done()
    now[0] += 30.0  # one more token
    limit.admit("198.51.100.7")
    limit.done()
    for _ in range(10):  # loopback (every peer of a local swarm) is exempt...
        limit.admit("127.0.0.1")
        limit.done()
    for _ in range(3):  # ...but not from the cap on dial-backs under way
        limit.admit("127.0.0.1")
    with pytest.raises(DialbackError) as err:
        limit.admit("127.0.0.1")
    assert err.value.code == "busy"
    big = RateLimit()
    for i in range(dialback.MAX_IPS + 10):  # the table of IPs stays bounded
        big.admit(f"10.0.{i >> 8}.{i & 255}")
        big.done()
    assert len(big._buckets) == dialback.MAX_IPS


# --- the protocol between nodes -------------------------------------------------------------------------

async def raw_request(node: P2PNode, helper: P2PNode, payload: bytes) -> dict:
    stream = await node.open_stream(helper.peer_id, dialback.PROTOCOL)
    try:
        await stream.send(payload)
        return json.loads(await asyncio.wait_for(stream.recv(), 15))
    finally:
        await stream.close()


def test_hostile_requests_get_errors_and_the_helper_keeps_serving(monkeypatch):
    """Oversized, malformed, slow and flooding requests each get a one-line error; a good one after them is
    answered; the helper dials only the requester's observed IP, and proves whom it reached."""
    monkeypatch.setattr(dialback, "READ_TIMEOUT", 0.5)

    async def main():
        helper, asker, other = [await P2PNode.start() for _ in range(3)]
        now = [0.0]
        server = dialback.DialbackServer(helper.host, RateLimit(burst=2, exempt_loopback=False, clock=lambda: now[0]))
        helper.host.set_stream_handler(dialback.PROTOCOL, server.handle)
        try:
            await asker.connect(helper.addrs[0])
            big = await raw_request(asker, helper, b"{" + b" " * 600 + b"}")
            assert big["error"] == "too_large" and "exceeds" in big["message"]
            bad = await raw_request(asker, helper, b"not json")
            assert bad["error"] == "bad_request"
            stream = await asker.open_stream(helper.peer_id, dialback.PROTOCOL)  # says nothing: slowloris
            assert json.loads(await asyncio.wait_for(stream.recv(), 10))["error"] == "timeout"
            await stream.close()
            my_port = int(asker.addrs[0].split("/")[4])
            other_port = int(other.addrs[0].split("/")[4])
            ok = await raw_request(asker, helper, dialback.encode_request(NONCE, {"libp2p": my_port, "data": 1}))
            assert ok["observed"] == "127.0.0.1" and ok["nonce"] == NONCE.hex()
            assert ok["results"] == {"libp2p": "ok", "data": "refused"}
            flood = [await raw_request(asker, helper, dialback.encode_request(NONCE, {"libp2p": my_port}))
                     for _ in range(3)]  # the burst of 2 is spent (a malformed request counts too)
            assert all(f["error"] == "rate_limited" for f in flood), flood
            now[0] += 3 * dialback.PER_IP_EVERY  # time passes: served again
            # a port where another peer listens: the handshake shows it is not the requester
            wrong = await raw_request(asker, helper, dialback.encode_request(NONCE, {"libp2p": other_port}))
            assert wrong["results"] == {"libp2p": "not_you"}
            answer = await asker.run_trio(dialback.ask, asker.host, helper.host.get_id(), NONCE, {"libp2p": my_port})
            assert answer == {"observed": "127.0.0.1", "results": {"libp2p": "ok"}}
            assert server.stats["too_large"] == 1 and server.stats["bad_request"] == 1 and server.stats["timeout"] == 1
            assert server.stats["rate_limited"] == 3 and server.stats["answered"] == 3
        finally:
            for n in (asker, other, helper):
                await n.close()
    asyncio.run(main())


async def direct_listener(reach: Reachability):
    """A direct port whose only job is to answer dial-back probes (what `swarm peer` does before serving)."""
    async def handler(stream, name):
        try:
            await reach.sniff(stream).recv()
        except EOFError:
            pass
        finally:
            await stream.close()
    server, bound = await listen_tcp(handler, "127.0.0.1", 0)
    return server, parse_tcp_addr(bound)[1]


def test_verdicts_and_plans():
    async def main():
        helper, me, old = [await P2PNode.start() for _ in range(3)]
        await Reachability(helper).start()
        reach = Reachability(me, bootstrap=[helper.addrs[0]])
        await reach.start()
        tcp, reach.data_port = await direct_listener(reach)
        my_port = int(me.addrs[0].split("/")[4])
        try:
            v = await reach.check()
            assert (v.state, v.observed, v.reached, v.data, v.answered) == \
                ("public", "127.0.0.1", [f"/ip4/127.0.0.1/tcp/{my_port}"], True, 1)
            plan = reach.plan(v)
            assert plan.addrs == [f"/ip4/127.0.0.1/tcp/{my_port}"] and plan.kad_server
            assert plan.data_addr == f"tcp://127.0.0.1:{reach.data_port}"
            line = reach.describe(v, plan)
            assert line.startswith(f"reachability: PUBLIC — peers reach you at 127.0.0.1:{my_port} ") and \
                "loopback swarm" in line
            reach.data_port = 1  # nothing listens there: no direct address is announced
            v = await reach.check()
            assert v.state == "public" and v.data is False and reach.plan(v).data_addr is None
            assert "direct port 1 is NOT reachable" in reach.describe(v, reach.plan(v))
            # --announce of a port nobody can dial (a broken port forward): private, nothing announced
            reach.data_port = None
            broken = Reachability(me, bootstrap=[helper.addrs[0]], configured=True)
            broken.initial = ["/ip4/127.0.0.1/tcp/1"]
            v = await broken.check()
            assert (v.state, v.answered, v.reached) == ("private", 1, [])
            plan = broken.plan(v)
            assert plan.addrs == [] and plan.data_addr is None and not plan.kad_server
            line = broken.describe(v, plan)
            assert line.startswith("reachability: PRIVATE — you are behind a NAT or firewall") and \
                "127.0.0.1:1" in line and "through a relay" in line and "forward TCP port(s) 1" in line and "\n" not in line
            # no helper that speaks the protocol (an older peer), or none at all: unknown, flags as given
            v = await Reachability(me, bootstrap=[old.addrs[0]]).check()
            assert (v.state, v.asked, v.answered) == ("unknown", 1, 0)
            first = Reachability(me)
            v = await first.check()
            assert v.state == "unknown" and first.plan(v).addrs == [me.addrs[0].split("/p2p/")[0]]
            assert "first peer of a new swarm" in first.describe(v, first.plan(v))
            # explicit: no dial-back at all
            for mode in ("public", "private"):
                told = Reachability(me, mode=mode, bootstrap=[helper.addrs[0]])
                v = await told.check()
                assert (v.state, v.checked, v.asked) == (mode, False, 0)
                assert told.plan(v).addrs == ([] if mode == "private" else [me.addrs[0].split("/p2p/")[0]])
                assert f"--reachability {mode}: not checked" in told.describe(v, told.plan(v))
        finally:
            tcp.close()
            for n in (me, old, helper):
                await n.close()
    asyncio.run(main())


def test_watch_applies_a_changed_verdict(caplog):
    """The periodic re-check asks the connected peers that speak the protocol; a new verdict is applied and
    logged, the same one is not; explicit modes are never re-checked."""
    async def main():
        helper, me = [await P2PNode.start() for _ in range(2)]
        await Reachability(helper).start()
        reach = Reachability(me, bootstrap=[helper.addrs[0]])
        await me.connect(helper.addrs[0])
        applied: list[Verdict] = []

        async def apply(v: Verdict) -> None:
            applied.append(v)
        task = asyncio.ensure_future(reach.watch(Verdict("private"), apply, every=0.3, observe_every=0.1))
        try:
            await poll(lambda: asyncio.sleep(0, applied), lambda got: len(got) >= 1)
            await asyncio.sleep(1.0)  # more checks, same verdict: nothing more applied
        finally:
            task.cancel()
        assert [v.state for v in applied] == ["public"] and applied[0].observed == "127.0.0.1"
        told = Reachability(me, mode="public")
        await asyncio.wait_for(told.watch(Verdict("public", checked=False), apply, every=0.1), 1)  # returns at once
        for n in (me, helper):
            await n.close()
    with caplog.at_level("INFO", logger="specswarm.reachability"):
        asyncio.run(main())
    assert [r.getMessage() for r in caplog.records if "reachability: PUBLIC" in r.getMessage()], caplog.text


# --- DHT and records -----------------------------------------------------------------------------------



def test_private_peer_publishes_as_a_dht_client_and_public_ones_join_after_a_check():
    """A private serving peer's record (no addresses) is found, yet no server has it in its routing table; a
    public peer that connected for its reachability check before its DHT started still gets into the tables
    (identify push), and so does the private one once it becomes reachable."""
    async def main():
        boot, private, public, client = [await P2PNode.start() for _ in range(4)]
        dhts = []
        try:
            dhts.append(await SwarmDHT.start(boot, [], ttl=30))
            await private.set_addrs([])
            assert private.addrs == [] and await private.run_trio(_addrs_of, private) == [f"{NO_ADDRESS}/p2p/{private.peer_id}"]
            dhts.append(await SwarmDHT.start(private, [boot.addrs[0]], ttl=30, reachable=False))
            await dhts[-1].announce(PeerRecord("m", 2, 4, reachability="private", observed="203.0.113.2"))
            await public.connect(boot.addrs[0])  # as the reachability check does, before the DHT
            dhts.append(await SwarmDHT.start(public, [boot.addrs[0]], ttl=30))
            await dhts[-1].announce(PeerRecord("m", 0, 2, reachability="public", observed="127.0.0.1"))
            finder = await SwarmDHT.start(client, [boot.addrs[0]], server=False)
            dhts.append(finder)
            found = await poll(lambda: finder.find("m"), lambda recs: len(recs) == 2)
            assert [(r.start, r.addrs, r.reachability, r.observed) for r in found] == [
                (0, [public.addrs[0]], "public", "127.0.0.1"), (2, [], "private", "203.0.113.2")]
            table = await poll(lambda: boot.run_trio(_table_of, dhts[0]), lambda t: public.peer_id in t)
            assert public.peer_id in table and private.peer_id not in table, table
            await dhts[1].set_reachable(True)  # a later check found it reachable
            await dhts[1].announce(PeerRecord("m", 2, 4, reachability="public"))
            table = await poll(lambda: boot.run_trio(_table_of, dhts[0]), lambda t: private.peer_id in t)
            assert private.peer_id in table
        finally:
            for d in reversed(dhts):
                await d.close()
            for n in (client, public, private, boot):
                await n.close()
    asyncio.run(main())


async def _addrs_of(node: P2PNode) -> list[str]:
    return [str(a) for a in node.host.get_addrs()]


async def _table_of(dht: SwarmDHT) -> set[str]:
    return {str(p) for p in dht.dht.routing_table.get_peer_ids()}


def test_records_carry_reachability_and_old_ones_still_verify():
    kp = create_new_key_pair()
    now = time.time()
    rec = PeerRecord("m", 0, 4, reachability="private", observed="203.0.113.2", issued=now, expires=now + 60)
    back = PeerRecord.verify(rec.sign(kp))
    assert (back.reachability, back.observed) == ("private", "203.0.113.2")
    old = dataclasses.asdict(dataclasses.replace(back))  # as a peer from before issue 15 signs it
    del old["reachability"], old["observed"]
    back = PeerRecord.verify(_seal(old, kp.private_key))
    assert (back.reachability, back.observed) == ("unknown", None)
    for bad in (dict(reachability="maybe"), dict(observed="not-an-ip"), dict(observed=7)):
        with pytest.raises(RecordError, match="malformed"):
            PeerRecord.verify(_seal({**dataclasses.asdict(rec), "peer_id": back.peer_id,
                                     "public_key": back.public_key, **bad}, kp.private_key))


# --- two peer processes on loopback ---------------------------------------------------------------------

@pytest.mark.slow  # a 2-peer swarm with reachability checks: ~30 s
@pytest.mark.timeout(180)
def test_loopback_swarm(tiny, tmp_path):
    """The first peer cannot be checked (UNKNOWN); the second is dialled back by it on loopback (PUBLIC, its
    loopback address announced); one started --reachability private announces only its relayed address
    (through the first) and is shown so, reached through the relay."""
    path = str(tiny("llama2").path)
    first = PeerProcess(path, (0, 4), log_file=tmp_path / "first.log")
    second = third = None
    try:
        second = PeerProcess(path, (4, 8), "--initial-peers", first.addr, log_file=tmp_path / "second.log")
        third = PeerProcess(path, (4, 8), "--initial-peers", first.addr, "--reachability", "private",
                            log_file=tmp_path / "third.log")
        log1 = wait_for(tmp_path / "first.log", "reachability:", 20)
        assert "reachability: UNKNOWN — no peer could check (no --initial-peers: the first peer" in log1, log1
        port = second.addr.split("/")[4]
        log2 = wait_for(tmp_path / "second.log", "reachability:", 20)
        assert f"INFO specswarm.peer: reachability: PUBLIC — peers reach you at 127.0.0.1:{port} " in log2, log2
        log3 = wait_for(tmp_path / "third.log", "reachability:", 20)
        assert "reachability: PRIVATE (--reachability private: not checked)" in log3, log3
        assert "DHT publisher in client mode (unreachable)" in log3
        out = swarm("status", "--model", path, "--initial-peers", first.addr, "--json")
        peers = {p["peer_id"]: p for p in json.loads(out.stdout)["peers"]}
        assert (peers[first.peer_id]["reachability"], peers[first.peer_id]["observed"]) == ("unknown", None)
        assert (peers[second.peer_id]["reachability"], peers[second.peer_id]["observed"]) == ("public", "127.0.0.1")
        assert peers[second.peer_id]["addrs"] == [second.addr] and peers[second.peer_id]["reachable"]
        assert peers[second.peer_id]["data_addr"].startswith("tcp://127.0.0.1:")
        # the private one holds a slot on the first (a relay, as every peer by default) and is reached through
        # it: over WebRTC where this machine has a non-loopback interface (aioice never uses loopback)
        third_seen = peers[third.peer_id]
        assert (third_seen["reachability"], third_seen["addrs"][0], third_seen["data_addr"]) == \
            ("private", f"{first.addr}/p2p-circuit/p2p/{third.peer_id}", None), third_seen
        assert all("/p2p-circuit/p2p/" in a for a in third_seen["addrs"]) and len(third_seen["addrs"]) <= 2
        assert third_seen["reachable"] and third_seen["path"] in ("webrtc", "relay"), third_seen
        table = swarm("status", "--model", path, "--initial-peers", first.addr).stdout
        row = next(line for line in table.splitlines() if line.startswith("…" + third.peer_id[-12:]))
        assert " private " in row and "/p2p-circuit/p2p/" in row, table
        assert " public   127.0.0.1 " in next(line for line in table.splitlines()
                                             if line.startswith("…" + second.peer_id[-12:])), table
        # a bootstrap peer that runs no DHT server (the private one, reached through its relay) is said so
        through = swarm("status", "--model", path, "--initial-peers", third_seen["addrs"][0], "--json")
        assert f"bootstrap peer {third.peer_id} does not serve the DHT" in through.stderr, through.stderr[-2000:]
    finally:
        for p in (third, second, first):
            if p is not None:
                p.stop()
