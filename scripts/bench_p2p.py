"""Round-trip time of one frame over a libp2p stream (peer/p2p.py) vs plain asyncio TCP, same framing.

Three columns: `p2p` is P2PStream from asyncio (what callers get), `trio` is the same libp2p
connection driven from inside the node's trio thread (libp2p alone, no asyncio<->trio crossing),
`tcp` is asyncio streams on a plain socket. The echo servers run in a child process (as a real
peer would); all three are measured in alternating rounds so background load hits them alike.

    python scripts/bench_p2p.py                 # 1 KB, 64 KB, 1 MB
    python scripts/bench_p2p.py --rounds 5 --sizes 1024 1048576
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from peer.p2p import P2PNode  # noqa: E402
from protocol import framing  # noqa: E402

ECHO = "/specswarm/bench-echo/1"
RAW_ECHO = "/specswarm/bench-echo-trio/1"


async def raw_read(s, n: int) -> bytes:  # trio side, straight on the libp2p stream
    chunks, got = [], 0
    while got < n:
        chunks.append(await s.read(n - got))
        got += len(chunks[-1])
    return b"".join(chunks)


async def raw_recv(s) -> bytes:
    return await raw_read(s, framing.parse_header(await raw_read(s, framing.HEADER_SIZE)))


async def raw_echo(s) -> None:  # a libp2p (trio) stream handler
    try:
        while True:
            await s.write(framing.frame(await raw_recv(s)))
    except Exception:
        await s.close()


async def raw_rtts(node: P2PNode, peer: str, payload: bytes, reps: int) -> list[float]:  # runs in trio
    from libp2p.peer.id import ID
    s = await node.host.new_stream(ID.from_base58(peer), [RAW_ECHO])
    times = []
    for _ in range(reps + 1):
        t = time.perf_counter()
        await s.write(framing.frame(payload))
        assert len(await raw_recv(s)) == len(payload)
        times.append(time.perf_counter() - t)
    await s.close()
    return times[1:]


async def tcp_recv(reader: asyncio.StreamReader) -> bytes:
    n = framing.parse_header(await reader.readexactly(framing.HEADER_SIZE))
    return await reader.readexactly(n)


async def serve() -> None:
    async def p2p_echo(stream):
        while True:
            await stream.send(await stream.recv())  # EOFError ends the handler

    async def tcp_echo(reader, writer):
        try:
            while True:
                writer.write(framing.frame(await tcp_recv(reader)))
                await writer.drain()
        except asyncio.IncompleteReadError:
            writer.close()

    node = await P2PNode.start()
    node.set_stream_handler(ECHO, p2p_echo)
    node.host.set_stream_handler(RAW_ECHO, raw_echo)
    server = await asyncio.start_server(tcp_echo, "127.0.0.1", 0)
    print(node.addrs[0], server.sockets[0].getsockname()[1], flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the parent closes stdin
    server.close()
    await node.close()


def _label(size: int) -> str:
    return f"{size >> 20} MB" if size >= 1 << 20 else f"{size >> 10} KB" if size >= 1024 else f"{size} B"


async def bench(sizes: list[int], rounds: int, as_json: bool = False) -> None:
    child = subprocess.Popen([sys.executable, __file__, "--serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
    maddr, port = child.stdout.readline().split()
    node = await P2PNode.start()
    try:
        t = time.perf_counter()
        await node.connect(maddr)
        t_connect = time.perf_counter() - t
        t = time.perf_counter()
        peer = maddr.split("/p2p/")[1]
        stream = await node.open_stream(peer, ECHO)
        t_open = time.perf_counter() - t
        reader, writer = await asyncio.open_connection("127.0.0.1", int(port))

        async def p2p_rtt(payload: bytes) -> float:
            t = time.perf_counter()
            await stream.send(payload)
            assert len(await stream.recv()) == len(payload)
            return time.perf_counter() - t

        async def tcp_rtt(payload: bytes) -> float:
            t = time.perf_counter()
            writer.write(framing.frame(payload))
            await writer.drain()
            assert len(await tcp_recv(reader)) == len(payload)
            return time.perf_counter() - t

        times: dict[tuple[str, int], list[float]] = {}
        for _ in range(rounds):
            for size in sizes:
                payload = bytes(size)
                reps = max(10, min(200, (32 << 20) // max(size, 1) // 8))
                for name, rtt in (("p2p", p2p_rtt), ("tcp", tcp_rtt)):
                    await rtt(payload)  # warm up
                    times.setdefault((name, size), []).extend([await rtt(payload) for _ in range(reps)])
                times.setdefault(("trio", size), []).extend(await node.run_trio(raw_rtts, node, peer, payload, reps))
        rows = [dict(label=_label(size), bytes=size, **{f"{n}_ms": statistics.median(times[(n, size)]) * 1e3
                                                        for n in ("p2p", "trio", "tcp")}) for size in sizes]
        await stream.close()
        writer.close()
        if as_json:
            print(json.dumps(dict(connect_ms=t_connect * 1e3, first_open_stream_ms=t_open * 1e3, rows=rows)))
            return
        print(f"connect {t_connect * 1e3:.1f} ms, first open_stream {t_open * 1e3:.1f} ms")
        print("median round trip, ms (MB/s counts both directions)")
        print(f"{'payload':>9} {'p2p':>8} {'trio':>8} {'tcp':>8} {'p2p/tcp':>8} {'p2p-trio':>9} "
              f"{'p2p MB/s':>9} {'tcp MB/s':>9}")
        for size in sizes:
            p, r, q = (statistics.median(times[(n, size)]) * 1e3 for n in ("p2p", "trio", "tcp"))
            print(f"{size:>9} {p:8.3f} {r:8.3f} {q:8.3f} {p / q:8.1f} {p - r:9.3f} "
                  f"{2 * size / p / 1e3:9.1f} {2 * size / q / 1e3:9.1f}")
    finally:
        await node.close()
        child.stdin.close()
        child.wait(timeout=10)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 64 * 1024, 1024 * 1024])
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds; medians are over all of them")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    asyncio.run(serve() if args.serve else bench(args.sizes, args.rounds, args.json))
