"""The delay proxies of an emulated WAN: user-space links with delay, jitter and a bandwidth cap.

This kernel has no `tc netem`, so latency is added in user space. A `DelayProxy` listens on a port of
its own and forwards every connection to a target; each direction of each connection is a `Pipe`
that reads chunks as they arrive and writes each one out at

    delivery = max(arrival + transmission (bandwidth cap) + one-way delay + jitter, previous delivery)

so bytes are never reordered and a slow chunk holds back the ones behind it (as TCP does). Jitter is
normal around the delay (never below zero), drawn per chunk. The bandwidth cap is a serialisation
delay: a chunk of B bytes occupies the link for B / bandwidth, after the chunk before it has left.
The cap belongs to the link, not to a connection: every connection through one proxy queues its
chunks, per direction, behind the same `Wire` (a second connection does not get a second link).

The proxies run in a child process (`python -m swarm.bench.wan.proxy proxy`, started by
`ProxyProcess`), so the client's compute, which holds the GIL, never delays a forwarded byte.

Knows bytes, sockets and clocks. Must not know the protocol inside the bytes, peers, the client, or
anything beyond the standard library (the child process imports this module alone, never torch).
Profiles and latency matrices are `swarm.bench.wan.links`'; which proxy sits on which link is
`swarm.bench.wan.layout`'s; starting peers behind them is `swarm.bench.wan.swarm`'s.
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
from dataclasses import dataclass

CHUNK = 64 * 1024


@dataclass(frozen=True)
class Link:
    """One direction of a link: one-way delay and jitter (ms), bandwidth (Mbit/s, None = unlimited)."""

    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    mbit_s: float | None = None


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


class Wire:
    """One direction of one emulated link, shared by every connection through it: when it has
    finished sending everything queued on it so far (the bandwidth cap's clock)."""

    def __init__(self):
        self.free_at = 0.0

    def send(self, now: float, size: int, mbit_s: float | None) -> float:
        """When a chunk of `size` bytes arriving at `now` has left: after the chunks before it."""
        if not mbit_s:
            return now
        self.free_at = max(now, self.free_at) + size * 8 / (mbit_s * 1e6)
        return self.free_at


class Pipe:
    """One direction of one proxied connection: delays chunks, keeps their order."""

    def __init__(self, link: Link, rng: random.Random, wire: Wire | None = None):
        self.link, self.rng = link, rng
        self.wire = wire or Wire()  # the link's bandwidth clock (shared by the link's connections)
        self.queue: asyncio.Queue = asyncio.Queue()
        self.last_delivery = 0.0

    def schedule(self, now: float, size: int) -> float:
        """When a chunk of `size` bytes read at `now` is delivered (loop-clock seconds)."""
        sent = self.wire.send(now, size, self.link.mbit_s)
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
        self.wires = (Wire(), Wire())  # up, down: one bandwidth clock per direction of this link
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
            await asyncio.gather(Pipe(self.up, self.rng, self.wires[0]).run(c_reader, t_writer),
                                 Pipe(self.down, self.rng, self.wires[1]).run(t_reader, c_writer))
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m swarm.bench.wan.proxy", description="delay proxies of an emulated WAN")
    ap.add_argument("what", choices=["proxy"], help="proxy: read a JSON list of proxies on stdin, serve them")
    ap.parse_args(argv)
    spec = json.loads(sys.stdin.readline())
    asyncio.run(_serve_proxies(spec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
