"""An emulated WAN on one machine: user-space delay proxies between the client and the peers.

This kernel has no `tc netem`, so latency is added in user space. A `DelayProxy` listens on a port of
its own and forwards every connection to a target; each direction of each connection is a `Pipe`
that reads chunks as they arrive and writes each one out at

    delivery = max(arrival + transmission (bandwidth cap) + one-way delay + jitter, previous delivery)

so bytes are never reordered and a slow chunk holds back the ones behind it (as TCP does). The
bandwidth cap is a serialisation delay: a chunk of B bytes occupies the link for B / bandwidth, after
the chunk before it has left.

One proxy per directed link (source, destination), nodes being the client (index 0 of a latency
matrix) and peers 1..n. A route names peer j by its link from peer j-1, which is what the client
puts in peer j-1's NextHop; the client itself dials peer j through its own link (`swarm.bench.wan.client`
maps one address to the other). So in push mode a step crosses client->p1, p1->p2, ..., pn->client,
each with its own delay, and client-mediated mode crosses client<->pj for every j. The libp2p
control plane (Info, DHT) is not delayed: it is off the per-token path.

The proxies run in a child process (`python -m swarm.bench.wan.proxy proxy`), so the client's compute, which
holds the GIL, never delays a forwarded byte.

The proxies move bytes and know nothing of the protocol inside; `WanSwarm` asks each peer (Info) for
its direct data port and puts a proxy in front of it for every link a chain uses.
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import itertools
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

CHUNK = 64 * 1024


# --- links and profiles ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Link:
    """One direction of a link: one-way delay and jitter (ms), bandwidth (Mbit/s, None = unlimited)."""

    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    mbit_s: float | None = None


@dataclass(frozen=True)
class Profile:
    """Where nodes sit: one-way delay between two nodes, by region. Node 0 is the client."""

    name: str
    delay_ms: float  # between nodes of different regions (or all nodes, with one region)
    jitter_ms: float = 0.0
    mbit_s: float | None = None
    regions: tuple[int, ...] = ()  # region of node i (cycled); () = every node apart from every other
    near_ms: float = 0.5  # between nodes of the same region

    def link(self, src: int, dst: int) -> Link:
        if self.regions and self.regions[src % len(self.regions)] == self.regions[dst % len(self.regions)]:
            return Link(self.near_ms, self.jitter_ms * self.near_ms / self.delay_ms, self.mbit_s)
        return Link(self.delay_ms, self.jitter_ms, self.mbit_s)

    def matrix(self, n_peers: int) -> list[list[Link]]:
        return [[self.link(s, d) for d in range(n_peers + 1)] for s in range(n_peers + 1)]


PROFILES = {
    "loopback": Profile("loopback", 0.0),
    "lan": Profile("lan", 0.5, 0.05, 1000.0),
    "metro": Profile("metro", 5.0, 0.5, 500.0),
    "continental": Profile("continental", 25.0, 2.0, 100.0),
    "intercontinental": Profile("intercontinental", 80.0, 5.0, 50.0),
    # client in Europe; peers alternate US, Europe, US, ...: 40 ms across the Atlantic, 5 ms within a continent
    "heterogeneous": Profile("heterogeneous", 40.0, 3.0, 100.0, regions=(0, 1), near_ms=5.0),
}


def load_matrix(path: str | Path, jitter_ms: float = 0.0, mbit_s: float | None = None) -> list[list[Link]]:
    """A JSON latency matrix: one-way ms, [[client->client, client->p1, ...], [p1->client, ...], ...]."""
    rows = json.loads(Path(path).read_text())
    if not rows or any(len(r) != len(rows) for r in rows):
        raise ValueError(f"{path}: a latency matrix must be square (client first, then each peer)")
    return [[Link(float(ms), jitter_ms, mbit_s) for ms in row] for row in rows]


# --- the proxy ------------------------------------------------------------------------------------
class _Timer:
    """Wakes asyncio futures at precise times: a thread that sleeps on a condition (~0.1 ms late), where
    asyncio's own timers wait in whole milliseconds rounded up (a 0.5 ms sleep takes 1.1 ms)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.heap, self.order = loop, [], itertools.count()
        self.cv = threading.Condition()
        threading.Thread(target=self._run, name="wan-timer", daemon=True).start()

    def wake_at(self, when: float, fut: asyncio.Future) -> None:
        with self.cv:
            heapq.heappush(self.heap, (when, next(self.order), fut))
            self.cv.notify()

    def _run(self) -> None:
        while True:
            with self.cv:
                while not self.heap:
                    self.cv.wait()
                when, _, fut = self.heap[0]
                wait = when - time.monotonic()  # the clock of asyncio's loop.time()
                if wait > 0:
                    self.cv.wait(wait)
                    continue
                heapq.heappop(self.heap)
            self.loop.call_soon_threadsafe(lambda f=fut: f.done() or f.set_result(None))


_timers: dict[asyncio.AbstractEventLoop, _Timer] = {}


async def precise_sleep_until(when: float) -> None:
    """Sleep until loop.time() == when, to a tenth of a millisecond."""
    loop = asyncio.get_running_loop()
    timer = _timers.get(loop) or _timers.setdefault(loop, _Timer(loop))
    fut = loop.create_future()
    timer.wake_at(when, fut)
    await fut


class Pipe:
    """One direction of one proxied connection: delays chunks, keeps their order."""

    def __init__(self, link: Link, rng: random.Random):
        self.link, self.rng = link, rng
        self.queue: asyncio.Queue = asyncio.Queue()
        self.free_at = 0.0  # when the emulated link has sent everything before (bandwidth cap)
        self.last_delivery = 0.0

    def schedule(self, now: float, size: int) -> float:
        sent = now
        if self.link.mbit_s:
            self.free_at = sent = max(now, self.free_at) + size * 8 / (self.link.mbit_s * 1e6)
        delay = self.link.delay_ms
        if self.link.jitter_ms:  # normal around the delay, never below zero (and never before the chunk ahead)
            delay = max(0.0, self.rng.gauss(delay, self.link.jitter_ms))
        self.last_delivery = max(sent + delay / 1000, self.last_delivery)
        return self.last_delivery

    async def run(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()

        async def deliver():
            while True:
                at, data = await self.queue.get()
                if data is None:
                    break
                if at > loop.time():
                    await precise_sleep_until(at)
                writer.write(data)
                await writer.drain()

        sender = loop.create_task(deliver())
        try:
            while data := await reader.read(CHUNK):
                self.queue.put_nowait((self.schedule(loop.time(), len(data)), data))
        except (ConnectionError, OSError):
            pass
        self.queue.put_nowait((0.0, None))
        try:
            await sender
            writer.write_eof()
        except (ConnectionError, OSError, RuntimeError):
            pass


class DelayProxy:
    """Listens on 127.0.0.1:<port>, forwards every connection to `target` through two `Pipe`s."""

    def __init__(self, target: tuple[str, int], up: Link, down: Link | None = None, seed: int = 0):
        self.target, self.up, self.down = target, up, down or up
        self.rng = random.Random(seed)
        self.server: asyncio.base_events.Server | None = None
        self.port = 0
        self.connections: set[asyncio.Task] = set()

    async def start(self, port: int = 0) -> "DelayProxy":
        self.server = await asyncio.start_server(self._connect, "127.0.0.1", port)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    @property
    def addr(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    async def _connect(self, c_reader, c_writer) -> None:
        task = asyncio.current_task()
        self.connections.add(task)  # asyncio drops its own reference when the client's side closes
        task.add_done_callback(self.connections.discard)
        try:
            t_reader, t_writer = await asyncio.open_connection(*self.target)
        except OSError:
            c_writer.close()
            return
        for w in (c_writer, t_writer):
            sock = w.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            await asyncio.gather(Pipe(self.up, self.rng).run(c_reader, t_writer),
                                 Pipe(self.down, self.rng).run(t_reader, c_writer))
        except asyncio.CancelledError:  # the proxy is shutting down: drop the connection quietly
            pass
        finally:
            for w in (c_writer, t_writer):
                w.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()


def parse_tcp(addr: str) -> tuple[str, int]:
    host, port = addr.removeprefix("tcp://").rsplit(":", 1)
    return host, int(port)


async def _serve_proxies(spec: list[dict]) -> None:
    """Child process: one DelayProxy per spec item; prints their ports as one JSON line; runs until stdin closes."""
    proxies = []
    for i, item in enumerate(spec):
        p = DelayProxy(parse_tcp(item["target"]), Link(**item["up"]), Link(**item["down"]), seed=i)
        proxies.append(await p.start())
    print(json.dumps([p.port for p in proxies]), flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)  # the parent closes our stdin (or dies): stop


class ProxyProcess:
    """The delay proxies of one emulated WAN, in a child process."""

    def __init__(self, spec: list[dict]):
        self.proc = subprocess.Popen([sys.executable, "-m", "swarm.bench.wan.proxy", "proxy"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
        self.proc.stdin.write(json.dumps(spec) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            self.stop()
            raise RuntimeError("the delay proxy process did not start")
        self.ports: list[int] = json.loads(line)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(5)
            except (subprocess.TimeoutExpired, OSError):
                self.proc.kill()
                self.proc.wait()


# --- an emulated swarm ----------------------------------------------------------------------------
@dataclass
class WanLayout:
    """Proxy addresses of an emulated WAN: `to_peer[(src, j)]` reaches peer j (1-based) from node src."""

    links: list[list[Link]]
    to_peer: dict[tuple[int, int], str] = field(default_factory=dict)
    direct: list[str] = field(default_factory=list)  # peers' own data addresses, in order

    def route_addr(self, j: int) -> str:
        """How the route names peer j: through its link from the node before it on the chain."""
        return self.to_peer[(j - 1, j)]

    def client_addr(self, addr: str) -> str:
        """The client's own link to the peer that `addr` (a route address) reaches."""
        for (src, j), a in self.to_peer.items():
            if a == addr:
                return self.to_peer[(0, j)]
        return addr

    def one_way_ms(self, src: int, dst: int) -> float:
        return self.links[src][dst].delay_ms


class WanSwarm:
    """N `swarm peer` processes on 127.0.0.1, one span each, behind delay proxies for every link a
    chain uses (client<->each peer, peer j-1 -> peer j). `model()` gives a client whose traffic
    crosses them. Use as a context manager."""

    def __init__(self, model_dir: str | Path, n_peers: int, links: list[list[Link]] | Profile | str,
                 log_dir: str | Path | None = None, threads: int = 1):
        from peer.model import Checkpoint

        from swarm.launch import even_spans, start_peers

        if isinstance(links, str):
            links = PROFILES[links]
        if isinstance(links, Profile):
            links = links.matrix(n_peers)
        if len(links) != n_peers + 1:
            raise ValueError(f"the latency matrix has {len(links)} nodes; {n_peers} peers need {n_peers + 1}")
        self.model_dir, self.links = str(model_dir), links
        self.spans = even_spans(Checkpoint(model_dir).config.num_hidden_layers, n_peers)
        self.peers = start_peers(model_dir, self.spans, threads=threads, log_dir=log_dir)
        self.proxies = None
        try:
            self.layout = WanLayout(links, direct=self._data_addrs(self.initial_peers))
            pairs = [(0, j) for j in range(1, n_peers + 1)] + [(j - 1, j) for j in range(2, n_peers + 1)]
            spec = [dict(target=self.layout.direct[j - 1], up=asdict(links[s][j]), down=asdict(links[j][s]))
                    for s, j in pairs]
            self.proxies = ProxyProcess(spec)
            self.layout.to_peer = {pair: f"tcp://127.0.0.1:{port}" for pair, port in zip(pairs, self.proxies.ports)}
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _data_addrs(maddrs: list[str]) -> list[str]:
        from peer.transport import data_addrs

        addrs = data_addrs(maddrs)
        if not all(addrs):
            raise RuntimeError("every emulated peer needs its direct data port (do not pass --no-direct)")
        return addrs

    @property
    def initial_peers(self) -> list[str]:
        return [p.addr for p in self.peers]

    def model(self, **kwargs):
        """A client (`swarm.bench.wan.client.WanSwarmModel`) whose data plane crosses this WAN's links."""
        from swarm.bench.wan.client import WanSwarmModel

        return WanSwarmModel(self.layout, self.model_dir, self.initial_peers, discovery=False, **kwargs)

    def close(self) -> None:
        if self.proxies is not None:
            self.proxies.stop()
        for p in self.peers:
            p.stop()

    def __enter__(self) -> "WanSwarm":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m swarm.bench.wan.proxy", description="delay proxies of an emulated WAN")
    ap.add_argument("what", choices=["proxy"], help="proxy: read a JSON list of proxies on stdin, serve them")
    ap.parse_args(argv)
    spec = json.loads(sys.stdin.readline())
    asyncio.run(_serve_proxies(spec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
