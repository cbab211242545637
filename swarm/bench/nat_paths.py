"""The roles of the NAT-paths benchmark (issue 15), one process per lab namespace (scripts/bench_nat_paths.py).

    python -m swarm.bench.nat_paths relay  --ip PUBLIC_IP [--port 31330]
    python -m swarm.bench.nat_paths server --relay RELAY_MADDR --stun stun:IP:PORT [--direct-port 31331]
    python -m swarm.bench.nat_paths client --circuit CIRCUIT --direct tcp://WAN_IP:PORT --stun URL \
        [--turn turn:IP:PORT --turn-user U --turn-password P] [--reps N] [--paths tcp,relay,webrtc,turn]

relay   (public): a libp2p node that relays circuits (`RelayLimits`) on TCP `--port`, and a STUN server
        (`peer.stun`) on UDP `--port`, like a public swarm peer. Prints {"role": "relay", "addr", "stun"}.
server  (behind NAT A): holds a slot on the relay and echoes every frame it gets, on four ways in: a
        libp2p stream of `BENCH_PROTOCOL` (through the circuit), a plain TCP listener on `--direct-port`
        (router A forwards that port: the direct baseline crosses the same two NATs and links), and
        WebRTC data channels whose offers come over `SIGNAL_PROTOCOL` (its own ICE: the relay's STUN,
        no TURN, so a TURN link is one TURN hop, relay/srflx). Prints {"role": "server", "circuit", ...}.
client  (behind NAT B): sets up one stream per path (timing each set-up), then measures the round trip
        of echoed frames: a sealed 1-token decode Step (`step_frame`), 64 KiB and 1 MiB; warm-up rounds
        first, then `reps` rounds, each round visiting every path once in a rotating order so background
        load hits all paths alike. Prints progress lines {"progress": str} and last {"role": "client", ...}.

Paths: "tcp" (direct TCP through router A's port forward), "relay" (libp2p Circuit Relay v2 through the
relay), "webrtc" (ICE with the relay's STUN: host/srflx candidates, a hole punched through both NATs),
"turn" (ICE with relay candidates only, `IceConfig(turn_only=True)`: every byte through coturn). Each
result says which path and ICE pair it really took; a path that cannot be set up (e.g. hole punching
behind a hard NAT) is reported with its error and the others still run.

Knows the transports' public APIs (P2PNode, peer.webrtc, peer.tcp/transport, peer.stun) and how to build
a decode Step frame (protocol.messages, protocol.sealing); must not know the lab (namespaces, routers,
coturn's process), the command line of the whole benchmark, its table or its plot.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import secrets
import signal
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

BENCH_PROTOCOL = "/specswarm/bench-echo/1.0.0"
RELAY_PORT = 31330  # TCP (libp2p) and UDP (STUN) on the public host; coturn has 3478
DIRECT_PORT = 31331  # the server's plain TCP echo port, forwarded on router A
HIDDEN_SIZE = 576  # SmolLM2-135M (the default model): one token's hidden state, float32 on the wire
PATHS = ("tcp", "relay", "webrtc", "turn")
LABELS = {"tcp": "direct TCP", "relay": "libp2p relay", "webrtc": "WebRTC hole-punched", "turn": "WebRTC via TURN"}
SIZES = ("step", "64k", "1m")
SIZE_LABELS = {"step": "decode step", "64k": "64 KB", "1m": "1 MB"}
DEFAULT_REPS = {"step": 50, "64k": 20, "1m": 5}
ECHO_TIMEOUT = 30.0  # s for one echo, then the path is given up
log = logging.getLogger("specswarm.bench.nat_paths")


def emit(obj: dict) -> None:
    """One JSON line on stdout: how the roles talk to the benchmark script."""
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def progress(text: str) -> None:
    emit({"progress": text})


async def until_stopped() -> None:
    """Until SIGTERM, SIGINT or SIGHUP (the lab stops its processes with SIGTERM)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def echo(stream: Any, *_: Any) -> None:
    """Send every frame back until the stream ends (any transport's stream: send/recv/close)."""
    try:
        while True:
            await stream.send(await stream.recv())
    except (EOFError, ConnectionError, OSError, TimeoutError):
        pass
    finally:
        await stream.close()


# --- relay -----------------------------------------------------------------------------------------------

async def run_relay(args: argparse.Namespace) -> None:
    from peer.p2p import P2PNode
    from peer.relay import RelayLimits
    from peer.stun import StunServer

    node = await P2PNode.start(listen=[f"/ip4/0.0.0.0/tcp/{args.port}"], public_ip=args.ip, relay=RelayLimits())
    stun = await StunServer.start("0.0.0.0", args.port)
    try:
        emit({"role": "relay", "addr": node.addrs[0], "peer_id": node.peer_id,
              "stun": f"stun:{args.ip}:{stun.addr[1]}"})
        await until_stopped()
    finally:
        stun.close()
        await node.close()


# --- server ----------------------------------------------------------------------------------------------

async def run_server(args: argparse.Namespace) -> None:
    from peer.p2p import P2PNode
    from peer.paths import SIGNAL_PROTOCOL
    from peer.transport import listen_tcp
    from peer.webrtc import IceConfig, RtcAcceptor

    node = await P2PNode.start()
    tcp = acceptor = None
    try:
        node.set_stream_handler(BENCH_PROTOCOL, echo)
        tcp, direct = await listen_tcp(echo, "0.0.0.0", args.direct_port)
        acceptor = RtcAcceptor(IceConfig.parse(args.stun, args.turn, args.turn_user, args.turn_password), echo)

        async def on_signal(stream: Any) -> None:
            await acceptor.handle(stream, stream.remote_peer_id)

        node.set_stream_handler(SIGNAL_PROTOCOL, on_signal)
        t0 = time.perf_counter()
        circuit = await node.reserve(args.relay)
        emit({"role": "server", "circuit": circuit, "peer_id": node.peer_id, "direct": direct,
              "reserve_ms": round(1e3 * (time.perf_counter() - t0), 1), "ice_servers": [args.stun, args.turn]})
        await until_stopped()
    finally:
        if acceptor is not None:
            await acceptor.close()
        if tcp is not None:
            tcp.close()
        await node.close()


# --- client ----------------------------------------------------------------------------------------------

def step_frame(hidden_size: int = HIDDEN_SIZE) -> bytes:
    """A realistic decode-step frame payload: a sealed `Step` carrying one token's hidden state [1, hidden]
    in float32, under a push-link key (the same AEAD envelope a client's hop uses): 2472 bytes for 576."""
    import torch

    from protocol import messages as m
    from protocol import sealing

    session = secrets.token_hex(m.SESSION_ID_LEN // 2)
    out, _ = sealing.link(sealing.link_secret(), session)
    return out.seal(m.Step(session, 1, 100, torch.randn(1, hidden_size, dtype=torch.float32)))


def payloads(hidden_size: int = HIDDEN_SIZE) -> dict[str, bytes]:
    return {"step": step_frame(hidden_size), "64k": os.urandom(64 * 1024), "1m": os.urandom(1024 * 1024)}


def summary(samples: list[float]) -> dict:
    """median, p90 (nearest rank), min, mean of round trips in ms."""
    if not samples:
        return {"n": 0}
    ordered = sorted(samples)
    return {"n": len(ordered), "median": round(statistics.median(ordered), 3),
            "p90": round(ordered[max(0, math.ceil(0.9 * len(ordered)) - 1)], 3), "min": round(ordered[0], 3),
            "mean": round(statistics.fmean(ordered), 3), "samples": [round(x, 3) for x in samples]}


class BenchPath:
    """One way to the server: its stream, what setting it up cost, what it turned out to be."""

    def __init__(self, name: str):
        self.name, self.label = name, LABELS[name]
        self.stream: Any = None
        self.link: Any = None  # WebRTC
        self.setup: dict[str, float] = {}
        self.kind: str | None = None  # the path it really took: direct, relay, webrtc, webrtc-turn
        self.pair: list | None = None  # ICE: [local type, remote type, [host, port], [host, port]]
        self.gathered: str | None = None  # ICE: the candidate types gathered (a separate, timed gathering)
        self.error: str | None = None
        self.samples: dict[str, list[float]] = {s: [] for s in SIZES}

    def result(self, direct: BenchPath | None) -> dict:
        rtt = {s: summary(v) for s, v in self.samples.items()}
        over = {}
        if direct is not None and direct is not self and direct.error is None:
            for s in SIZES:
                if rtt[s].get("n") and self.samples[s] and direct.samples[s]:
                    over[s] = round(rtt[s]["median"] - statistics.median(direct.samples[s]), 3)
        return {"label": self.label, "ok": self.error is None, "error": self.error, "path": self.kind,
                "pair": self.pair, "gathered": self.gathered, "setup_ms": self.setup, "rtt_ms": rtt,
                "overhead_ms": over}


def _ms(t0: float) -> float:
    return round(1e3 * (time.perf_counter() - t0), 1)


async def gather_ms(ice: Any) -> tuple[float, str]:
    """How long ICE candidate gathering alone takes with `ice` (a STUN binding; a TURN allocation), and what
    was gathered: aiortc gathers everything in setLocalDescription, before the offer can go out."""
    from aiortc import RTCPeerConnection

    pc = RTCPeerConnection(ice.configuration())
    try:
        t0 = time.perf_counter()
        await pc.setLocalDescription(await pc.createOffer())
        took = _ms(t0)
        kinds = sorted(line.split(" typ ")[1].split()[0] for line in pc.localDescription.sdp.splitlines()
                       if line.startswith("a=candidate:") and " typ " in line)
        return took, ",".join(kinds)
    finally:
        await pc.close()


async def setup_path(path: BenchPath, args: argparse.Namespace, node: Any) -> None:
    """Open `path`'s stream to the server, recording set-up times (ms) and the path taken."""
    from peer.paths import SIGNAL_PROTOCOL, peer_id_at
    from peer.tcp import TcpStream
    from peer.transport import parse_tcp_addr

    pid = peer_id_at(args.circuit)
    if path.name == "tcp":
        t0 = time.perf_counter()
        path.stream = await TcpStream.connect(*parse_tcp_addr(args.direct))
        path.setup = {"connect": _ms(t0)}
        path.kind = "direct"
        return
    if path.name == "relay":
        t0 = time.perf_counter()
        await node.connect(args.circuit)
        path.setup["dial"] = _ms(t0)  # the relay's connection (if new), HOP CONNECT, Noise + yamux inside
        t1 = time.perf_counter()
        path.stream = await node.open_stream(pid, BENCH_PROTOCOL)
        path.setup["stream"] = _ms(t1)
        path.setup["total"] = _ms(t0)
        path.kind = await node.connection_path(pid)
        return
    from peer import webrtc

    if path.name == "webrtc":
        ice = webrtc.IceConfig.parse(args.stun)
    else:
        ice = webrtc.IceConfig.parse(None, args.turn, args.turn_user, args.turn_password, turn_only=True)
    path.setup["gather"], path.gathered = await gather_ms(ice)
    await node.connect(args.circuit)  # signalling goes through the relay (already connected when "relay" ran)
    t0 = time.perf_counter()
    signal_stream = await node.open_stream(pid, SIGNAL_PROTOCOL)
    path.setup["signal_stream"] = _ms(t0)
    t1 = time.perf_counter()
    try:
        path.link = await webrtc.connect(signal_stream, ice, timeout=args.ice_timeout, remote_peer_id=pid)
    finally:
        await signal_stream.close()
    path.setup["ice"] = _ms(t1)  # gathering, offer/answer over the relay, ICE checks, DTLS
    t2 = time.perf_counter()
    path.stream = await path.link.open_stream()
    path.setup["channel"] = _ms(t2)  # SCTP association + data channel open
    path.setup["total"] = _ms(t0)
    path.kind, pair = path.link.path, path.link.pair
    path.pair = None if pair is None else [pair[0], pair[1], list(pair[2]), list(pair[3])]


async def round_trip(stream: Any, payload: bytes) -> float:
    t0 = time.perf_counter()
    await stream.send(payload)
    back = await asyncio.wait_for(stream.recv(), ECHO_TIMEOUT)
    took = 1e3 * (time.perf_counter() - t0)
    if back != payload:
        raise ConnectionError(f"the echo differs from what was sent ({len(back)} bytes back for {len(payload)})")
    return took


async def measure(paths: list[BenchPath], data: dict[str, bytes], reps: dict[str, int], warmup: int) -> None:
    """Per size: `warmup` + reps[size] rounds, each visiting every live path once, the order rotated by one
    each round; only the rounds after the warm-up are kept. A path whose echo fails is dropped (its error kept)."""
    for size in SIZES:
        for rnd in range(warmup + reps[size]):
            live = [p for p in paths if p.error is None]
            if not live:
                return
            k = rnd % len(live)
            for path in live[k:] + live[:k]:
                try:
                    took = await round_trip(path.stream, data[size])
                except (ConnectionError, EOFError, OSError, TimeoutError) as exc:
                    path.error = f"echo of {SIZE_LABELS[size]} failed: {exc!r}"
                    progress(f"{path.label}: {path.error}")
                    continue
                if rnd >= warmup:
                    path.samples[size].append(took)
        done = ", ".join(f"{p.label} {statistics.median(p.samples[size]):.2f}" for p in paths if p.samples[size])
        progress(f"{SIZE_LABELS[size]} ({len(data[size])} B) x{reps[size]}, median ms: {done}")


async def run_client(args: argparse.Namespace) -> None:
    from peer.p2p import P2PNode

    names = [n.strip() for n in args.paths.split(",") if n.strip()]
    unknown = [n for n in names if n not in PATHS]
    if unknown:
        raise SystemExit(f"unknown path(s) {unknown}; choose from {','.join(PATHS)}")
    if "turn" in names and not args.turn:
        names.remove("turn")
        progress("no --turn given: the TURN path is left out")
    reps = {s: args.reps if args.reps is not None else DEFAULT_REPS[s] for s in SIZES}
    for s, v in (("step", args.reps_step), ("64k", args.reps_64k), ("1m", args.reps_1m)):
        if v is not None:
            reps[s] = v
    data = payloads(args.hidden_size)
    paths = [BenchPath(n) for n in PATHS if n in names]
    node = await P2PNode.start()
    try:
        for path in paths:
            try:
                await asyncio.wait_for(setup_path(path, args, node), args.ice_timeout + 30)
                pair = f", pair {path.pair[0]}/{path.pair[1]}" if path.pair else ""
                progress(f"{path.label}: set up in {path.setup.get('total', path.setup.get('connect'))} ms "
                         f"({', '.join(f'{k} {v}' for k, v in path.setup.items())}), path {path.kind}{pair}")
            except Exception as exc:  # noqa: BLE001 - reported, and the other paths still run
                path.error = f"set-up failed: {exc}"
                progress(f"{path.label}: {path.error}")
        await measure(paths, data, reps, args.warmup)
        direct = next((p for p in paths if p.name == "tcp"), None)
        emit({"role": "client", "sizes": {s: len(data[s]) for s in SIZES}, "reps": reps, "warmup": args.warmup,
              "step_frame": f"a sealed protocol.messages.Step: 1 token x {args.hidden_size} float32 hidden "
                            f"(SmolLM2-135M), {len(data['step'])} B payload",
              "paths": {p.name: p.result(direct) for p in paths}})
    finally:
        for path in paths:
            for thing in (path.stream, path.link):
                if thing is not None:
                    with contextlib.suppress(Exception):  # closing must not hide what happened
                        await thing.close()
        await node.close()


# --- command line ----------------------------------------------------------------------------------------

def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m swarm.bench.nat_paths", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="role", required=True)
    r = sub.add_parser("relay", help="public: libp2p relay + STUN server")
    r.add_argument("--ip", required=True, help="the public IP others reach this host at")
    r.add_argument("--port", type=int, default=RELAY_PORT, help=f"TCP (libp2p) and UDP (STUN) port [{RELAY_PORT}]")
    s = sub.add_parser("server", help="behind NAT A: echo on TCP, libp2p (relayed) and WebRTC")
    s.add_argument("--relay", required=True, help="the relay's multiaddr (…/p2p/<id>)")
    s.add_argument("--direct-port", type=int, default=DIRECT_PORT, help=f"plain TCP echo port [{DIRECT_PORT}]")
    c = sub.add_parser("client", help="behind NAT B: set up every path, measure echo round trips, print JSON")
    c.add_argument("--circuit", required=True, help="the server's circuit address through the relay")
    c.add_argument("--direct", required=True, help="tcp://HOST:PORT of the server's forwarded TCP echo port")
    c.add_argument("--paths", default=",".join(PATHS), help=f"which paths, comma-separated [{','.join(PATHS)}]")
    add_reps_args(c)
    c.add_argument("--warmup", type=int, default=3, help="unmeasured rounds per size first [3]")
    c.add_argument("--hidden-size", type=int, default=HIDDEN_SIZE, help=f"the step's hidden size [{HIDDEN_SIZE}]")
    c.add_argument("--ice-timeout", type=float, default=15.0, help="s for a WebRTC link to connect [15]")
    for q in (s, c):
        q.add_argument("--stun", help="stun:HOST:PORT (the relay's)")
        q.add_argument("--turn", help="turn:HOST:PORT (client: the TURN path's server)")
        q.add_argument("--turn-user")
        q.add_argument("--turn-password")
    return p


def add_reps_args(p) -> None:
    """--reps and its per-size overrides (the client role's and scripts/bench_nat_paths.py's)."""
    p.add_argument("--reps", type=int, help="measured round trips per path for every size (default: "
                   + ", ".join(f"{SIZE_LABELS[k]} {v}" for k, v in DEFAULT_REPS.items()) + ")")
    p.add_argument("--reps-step", type=int, help="... for the decode step only")
    p.add_argument("--reps-64k", type=int, help="... for 64 KB only")
    p.add_argument("--reps-1m", type=int, help="... for 1 MB only")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if os.environ.get("NAT_PATHS_VERBOSE") else logging.WARNING,
                        stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run: Callable[[argparse.Namespace], Awaitable[None]] = {"relay": run_relay, "server": run_server,
                                                            "client": run_client}[args.role]
    try:
        asyncio.run(run(args))
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
