"""py-libp2p 0.8.1 NAT experiments: one role per process, run inside a nat_lab namespace.

Hosts are built the way specswarm builds them (peer/p2p.py: Ed25519, Noise, Yamux,
ConnectionConfig(max_connections_per_peer=1, ...)). Every result line starts with 'RESULT '.
"""
import json
import logging
import os
import sys
import time

import multiaddr
import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.host.autonat import AutoNATService
from libp2p.network.config import ConnectionConfig
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol
from libp2p.relay.circuit_v2.discovery import RelayDiscovery
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_ID, CircuitV2Protocol
from libp2p.relay.circuit_v2.resources import RelayLimits
from libp2p.relay.circuit_v2.transport import CircuitV2Transport
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_ID, Transport as Noise
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_ID, Yamux
from libp2p.tools.anyio_service import background_trio_service

ECHO = TProtocol("/natexp/echo/1")
logging.basicConfig(level=os.environ.get("LOGLEVEL", "WARNING"), stream=sys.stderr,
                    format="%(relativeCreated)6.0f %(name)s %(levelname)s %(message)s")
T0 = time.monotonic()


def out(what, **kw):
    print("RESULT " + json.dumps({"t": round(time.monotonic() - T0, 2), "what": what, **kw}), flush=True)


def _like_specswarm(candidates):
    """specswarm's addrs_factory: the bound addresses, wildcards expanded, observed ones dropped."""
    from libp2p.utils.address_validation import expand_wildcard_address
    out = []
    for a in candidates:
        if str(a).startswith("/ip4/0.0.0.0/"):
            out += [x for x in expand_wildcard_address(a) if "/127." not in str(x)]
    return out or list(candidates)


def make_host(per_peer=1):
    kp = create_new_key_pair()
    return new_host(key_pair=kp, muxer_opt={YAMUX_ID: Yamux}, addrs_factory=_like_specswarm,
                    sec_opt={NOISE_ID: Noise(kp, noise_privkey=create_x25519_key_pair().private_key)},
                    connection_config=ConnectionConfig(max_connections_per_peer=per_peer, min_connections=0,
                                                       low_watermark=0))


async def echo(stream):
    try:
        while data := await stream.read(65536):
            await stream.write(data)
    except Exception:
        pass
    finally:
        try:
            await stream.close()
        except Exception:
            pass


def conn_kinds(host, peer_id):
    conns = host.get_network().connections.get(peer_id, [])
    conns = conns if isinstance(conns, list) else [conns]
    return [[str(a) for a in c.get_transport_addresses()] for c in conns]


async def roundtrip(host, peer_id, payload=b"hello through the NAT"):
    with trio.fail_after(15):
        s = await host.new_stream(peer_id, [ECHO])
        await s.write(payload)
        got = await s.read(65536)
        addrs = [str(a) for a in s.muxed_conn.get_transport_addresses()] if hasattr(
            s.muxed_conn, "get_transport_addresses") else "?"
        await s.close()
    return got == payload, addrs


async def relay(port):
    host = make_host()
    limits = RelayLimits(duration=3600, data=100 << 20, max_circuit_conns=16, max_reservations=16)
    proto = CircuitV2Protocol(host, limits=limits, allow_hop=True)
    AutoNATService(host)  # serve dial-back requests
    la = [multiaddr.Multiaddr(f"/ip4/0.0.0.0/tcp/{port}")]
    async with host.run(listen_addrs=la), background_trio_service(proto):
        host.set_stream_handler(ECHO, echo)
        out("relay_up", peer_id=str(host.get_id()), addrs=[str(a) for a in host.get_addrs()])
        await trio.sleep_forever()


async def listener(relay_addr, port, mode):
    """The NATed volunteer: AutoNAT, then reserve a slot, then serve echo; DCUtR on."""
    host = make_host(per_peer=int(os.environ.get("PER_PEER", "1")))
    proto = CircuitV2Protocol(host, allow_hop=False)
    transport = CircuitV2Transport(host, proto, RelayConfig(roles=RelayRole.STOP | RelayRole.CLIENT))
    autonat = AutoNATService(host, serve=False, confirmations=1)
    dcutr = DCUtRProtocol(host)
    info = info_from_p2p_addr(multiaddr.Multiaddr(relay_addr))
    la = [multiaddr.Multiaddr(f"/ip4/0.0.0.0/tcp/{port}")]
    async with host.run(listen_addrs=la), background_trio_service(proto), background_trio_service(dcutr), \
            trio.open_nursery() as nursery:
        host.set_stream_handler(ECHO, echo)
        if mode == "discovery":  # as examples/nat/listener.py: discovery started before connecting
            discovery = RelayDiscovery(host, auto_reserve=True)
            transport.discovery = discovery
            nursery.start_soon(lambda: _run_service(discovery))
            await trio.sleep(0.5)
        await host.connect(info)
        out("listener_connected", peer_id=str(host.get_id()), own_addrs=[str(a) for a in host.get_addrs()])
        # (1) reachability
        await trio.sleep(1.0)  # identify: learn the observed address
        mgr = getattr(host, "_observed_addr_manager", None)
        observed = [str(a) for a in mgr.addrs(min_observers=1)] if mgr else []
        out("observed_addrs", observed=observed, nat_type=str(host.get_nat_type()) if hasattr(host, "get_nat_type") else None)
        st = await autonat.check_reachability([info.peer_id])
        out("autonat_own_addrs", status=st, name={0: "UNKNOWN", 1: "PUBLIC", 2: "PRIVATE"}[st],
            verdicts={str(k): v for k, v in autonat.dial_results.items()})
        if observed:
            lp = port
            guess = [multiaddr.Multiaddr(f"/ip4/{multiaddr.Multiaddr(o).value_for_protocol('ip4')}/tcp/{lp}").to_bytes()
                     for o in observed]
            status, addr = await autonat.query_server(info.peer_id, addrs=guess)
            out("autonat_with_observed_ip", status=status, ok=status == 0, dialed=str(multiaddr.Multiaddr(addr)) if addr else None,
                note="0=OK: the server says it dialed us back")
        # (2) reservation
        if mode == "discovery":
            for _ in range(20):
                ri = discovery.get_relay_info(info.peer_id)
                if ri and ri.has_reservation:
                    break
                await trio.sleep(0.5)
            ri = discovery.get_relay_info(info.peer_id)
            out("discovery_reservation", relays=[str(r) for r in discovery.get_relays()],
                has_reservation=bool(ri and ri.has_reservation))
            if not (ri and ri.has_reservation):
                await discovery.discover_relays()  # a manual round after the connection exists
                ri = discovery.get_relay_info(info.peer_id)
                out("discovery_reservation_after_manual_round", relays=[str(r) for r in discovery.get_relays()],
                    has_reservation=bool(ri and ri.has_reservation))
        else:
            s = await host.new_stream(info.peer_id, [HOP_ID])
            ok = await transport.reserve(s, info.peer_id, nursery)
            try:
                await s.close()
            except Exception:
                pass
            out("reserved", ok=ok, expires_in=transport._reservations.get(info.peer_id, 0) - int(time.time()))
        out("listener_ready", circuit=f"{relay_addr}/p2p-circuit/p2p/{host.get_id()}")
        while True:
            await trio.sleep(2)
            peers = [p for p in host.get_connected_peers() if p != info.peer_id]
            out("listener_conns", conns={str(p)[-6:]: conn_kinds(host, p) for p in peers})


async def _run_service(svc):
    async with background_trio_service(svc):
        await trio.sleep_forever()


async def dialer(relay_addr, circuit, punch):
    """Behind NAT B: dial the NATed listener through the relay, echo, optionally hole-punch."""
    info = info_from_p2p_addr(multiaddr.Multiaddr(relay_addr))
    target = ID.from_base58(circuit.rsplit("/p2p/", 1)[1])
    hosts = [make_host(per_peer=int(os.environ.get("PER_PEER", "1"))) for _ in range(2)]
    stacks = []
    for h in hosts:
        p = CircuitV2Protocol(h, allow_hop=False)
        stacks.append((h, p, CircuitV2Transport(h, p, RelayConfig(roles=RelayRole.STOP)), DCUtRProtocol(h)))
    la = [multiaddr.Multiaddr("/ip4/0.0.0.0/tcp/0")]
    (a, pa, ta, da), (b, pb, tb, db) = stacks
    async with a.run(listen_addrs=la), b.run(listen_addrs=[multiaddr.Multiaddr("/ip4/0.0.0.0/tcp/0")]), \
            background_trio_service(pa), background_trio_service(pb), background_trio_service(da):
        await a.connect(info)
        # what specswarm's P2PNode does today: put the circuit address in the peerstore, dial_peer
        try:
            a.get_peerstore().add_addrs(target, [multiaddr.Multiaddr(circuit)], 3600)
            await a.get_network().dial_peer(target)
            out("swarm_dial_peer_circuit", ok=True)
        except Exception as e:
            out("swarm_dial_peer_circuit", ok=False, error=f"{type(e).__name__}: {e}"[:300])
        try:
            await a.connect(__import__("libp2p.peer.peerinfo", fromlist=["PeerInfo"]).PeerInfo(target, [multiaddr.Multiaddr(circuit)]))
            out("host_connect_circuit", ok=True)
        except Exception as e:
            out("host_connect_circuit", ok=False, error=f"{type(e).__name__}: {e}"[:300])
        t = time.monotonic()
        try:
            await ta.dial(multiaddr.Multiaddr(circuit))
            out("transport_dial_circuit", ok=True, secs=round(time.monotonic() - t, 2), conns=conn_kinds(a, target))
        except Exception as e:
            out("transport_dial_circuit", ok=False, error=f"{type(e).__name__}: {e}"[:300])
            return
        ok, via = await roundtrip(a, target)
        out("echo_over_circuit", ok=ok, via=via)
        # a 1 MiB echo: throughput through the relay
        t = time.monotonic()
        big = os.urandom(1 << 20)
        with trio.fail_after(60):
            s = await a.new_stream(target, [ECHO])
            async with trio.open_nursery() as n:
                n.start_soon(s.write, big)
                got = b""
                while len(got) < len(big):
                    got += await s.read(65536)
            await s.close()
        out("echo_1MiB_over_circuit", ok=got == big, secs=round(time.monotonic() - t, 2))
        # second client through the same relay to the same listener; close the FIRST circuit
        await b.connect(info)
        await tb.dial(multiaddr.Multiaddr(circuit))
        ok_b, _ = await roundtrip(b, target)
        out("second_client_echo", ok=ok_b)
        if punch == "punch":
            t = time.monotonic()
            await da.event_started.wait()
            res = await da.initiate_hole_punch(target)
            out("dcutr_initiate_hole_punch", ok=res, secs=round(time.monotonic() - t, 2), conns=conn_kinds(a, target))
            await trio.sleep(1)
            ok, via = await roundtrip(a, target)
            out("echo_after_punch", ok=ok, via=via, conns=conn_kinds(a, target))
        first_closed = os.environ.get("CLOSE", "first") == "first"
        closer, keeper = (a, b) if first_closed else (b, a)
        for c in list(closer.get_network().connections.get(target, [])):
            await c.close()
        await trio.sleep(1.0)
        label = "other_client_echo_after_" + ("first" if first_closed else "second") + "_circuit_closed"
        try:
            with trio.fail_after(20):
                ok_k, via = await roundtrip(keeper, target)
            out(label, ok=ok_k, via=via)
        except BaseException as e:
            out(label, ok=False, error=f"{type(e).__name__}: {e}"[:300])


async def public_autonat(relay_addr, port):
    """A host on the public segment asking the relay's AutoNAT: the control."""
    host = make_host()
    autonat = AutoNATService(host, serve=False, confirmations=1)
    info = info_from_p2p_addr(multiaddr.Multiaddr(relay_addr))
    async with host.run(listen_addrs=[multiaddr.Multiaddr(f"/ip4/0.0.0.0/tcp/{port}")]):
        await host.connect(info)
        st = await autonat.check_reachability([info.peer_id])
        out("public_autonat", status=st, own_addrs=[str(a) for a in host.get_addrs()])


if __name__ == "__main__":
    role, *args = sys.argv[1:]
    fn = {"relay": relay, "listener": listener, "dialer": dialer, "public_autonat": public_autonat}[role]
    conv = [int(a) if a.isdigit() else a for a in args]
    try:
        trio.run(fn, *conv)
    except BaseException as e:  # noqa
        out("crashed", error=f"{type(e).__name__}: {e}"[:500])
        raise
