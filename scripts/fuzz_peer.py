"""Throw random and mutated frames at a live peer; check it neither crashes, hangs nor grows.

Frames go over a few direct TCP connections, pipelined (a reader per connection drains the
replies). They are random bytes, valid messages (plaintext and sealed, with real handshakes) and
mutations of both: bit flips, truncations, splices, random JSON fields, forged envelopes, replays.
At the end every connection must still answer an Info, and the peer's RSS must not have grown by
more than --max-rss-growth MiB. With --honest the script also runs a greedy generation through
the peer over libp2p while the fuzzing goes on, and checks it equals the local one.

    python scripts/fuzz_peer.py --frames 100000               # starts a tiny-model peer itself
    python scripts/fuzz_peer.py --addr tcp://127.0.0.1:PORT --pid PID --frames 100000

Exit code 0 and a JSON summary on stdout when the peer survived.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import struct
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402

from peer.transport import data_addrs, parse_tcp_addr  # noqa: E402
from protocol import crypto, framing, sealing  # noqa: E402
from protocol import messages as m  # noqa: E402


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class FrameMaker:
    """Cheap hostile frames. `static` is the peer's X25519 key (for real handshakes to mutate)."""

    def __init__(self, rng: random.Random, hidden_size: int, num_blocks: int, static: bytes | None):
        self.rng, self.d, self.n, self.static = rng, hidden_size, num_blocks, static
        self.sessions: list[str] = [os.urandom(16).hex() for _ in range(4)]
        self.valid: list[bytes] = []  # real frames seen or made, to mutate and replay
        self.keys: list[tuple[str, crypto.SessionKeys]] = []

    def sid(self) -> str:
        return self.rng.choice(self.sessions) if self.rng.random() < 0.7 else os.urandom(16).hex()

    def tensor(self) -> torch.Tensor:
        r = self.rng.random()
        rows = self.rng.randint(1, 3)
        width = self.d if r < 0.8 else self.rng.randint(0, 2 * self.d)
        return torch.randn(rows, width)

    def message(self) -> bytes:
        r, rng = self.rng.random(), self.rng
        if r < 0.15:
            return m.encode(m.Info())
        if r < 0.35:
            a = rng.randint(0, self.n)
            b = rng.randint(0, self.n + 2)
            try:
                return m.encode(m.Open(self.sid(), rng.choice([1, 8, 64, 10**6]), (a, b)))
            except Exception:  # noqa: BLE001
                return b""
        if r < 0.75:
            parents = None if rng.random() < 0.7 else [rng.randint(-2, 4) for _ in range(rng.randint(0, 4))]
            compact = None if rng.random() < 0.9 else (rng.randint(0, 8), [rng.randint(0, 3)])
            return m.encode(m.Step(self.sid(), rng.randint(0, 99), rng.randint(0, 70), self.tensor(), parents, compact))
        if r < 0.85:
            return m.encode(m.Close(self.sid()))
        header = {k: rng.choice([None, -1, 0, 2**40, "x" * rng.randint(0, 40), [], {}, [1, 2], 1.5, True])
                  for k in rng.sample(["session", "step", "start", "blocks", "max_length", "parents", "compact",
                                       "tensor", "next", "wire_dtype", "prev_link"], rng.randint(0, 6))}
        body = json.dumps(header).encode()
        return m.PREFIX.pack(m.MAGIC, m.VERSION, rng.randint(0, 12), len(body)) + body + os.urandom(rng.randint(0, 16))

    def sealed(self) -> bytes:
        rng = self.rng
        r = rng.random()
        if self.static is not None and (r < 0.3 or not self.keys):
            sid = os.urandom(16).hex()
            a = rng.randint(0, self.n - 1)
            msg = m.Open(sid, rng.choice([8, 16, 10**6]), (a, rng.randint(a + 1, self.n)))
            keys, frame = crypto.client_handshake(self.static, bytes.fromhex(sid), sealing.pack(m.encode(msg)))
            if len(self.keys) < 64:
                self.keys.append((sid, keys))
            self.sessions.append(sid)
            if len(self.sessions) > 64:
                self.sessions.pop(0)
            return frame
        if r < 0.7 and self.keys:
            sid, keys = rng.choice(self.keys)
            step = m.Step(sid, rng.randint(0, 99), rng.randint(0, 8), self.tensor())
            onion = os.urandom(rng.randint(0, 40)) if rng.random() < 0.2 else b""
            return keys.c2p.seal(sealing.pack(m.encode(step), onion))
        kind = rng.choice([crypto.Type.OPEN, crypto.Type.C2P, crypto.Type.P2C, crypto.Type.LINK, 0, 9])
        head = crypto.ENVELOPE.pack(crypto.MAGIC, rng.choice([1, 1, 1, 2]), kind, bytes.fromhex(self.sid()),
                                    rng.randint(0, 2**64 - 1))
        return head + os.urandom(rng.randint(0, 80))

    def mutate(self, data: bytes) -> bytes:
        rng, b = self.rng, bytearray(data)
        for _ in range(rng.randint(1, 4)):
            op = rng.random()
            if not b:
                b += os.urandom(rng.randint(1, 8))
            elif op < 0.5:
                i = rng.randrange(len(b))
                b[i] ^= 1 << rng.randrange(8)
            elif op < 0.7:
                del b[rng.randrange(len(b)):]
            elif op < 0.85:
                i = rng.randrange(len(b))
                b[i:i] = os.urandom(rng.randint(1, 8))
            else:
                i = rng.randrange(len(b))
                b[i:i + 4] = struct.pack(">I", rng.choice([0, 1, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF]))
        return bytes(b)

    def frame(self) -> bytes:
        r = self.rng.random()
        if r < 0.1:
            return os.urandom(self.rng.randint(0, 64))
        if r < 0.35:
            data = self.message()
        elif r < 0.65:
            data = self.sealed()
        elif self.valid:
            data = self.rng.choice(self.valid)  # a replay, or a mutation of one
            return data if self.rng.random() < 0.3 else self.mutate(data)
        else:
            data = self.message()
        if len(self.valid) < 256:
            self.valid.append(data)
        else:
            self.valid[self.rng.randrange(256)] = data
        return data if self.rng.random() < 0.5 else self.mutate(data)


async def ask_info(host: str, port: int) -> m.InfoReply:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(framing.frame(m.encode(m.Info())))
        n = framing.parse_header(await reader.readexactly(4))
        reply = m.decode(await reader.readexactly(n))
        assert isinstance(reply, m.InfoReply), reply
        return reply
    finally:
        writer.close()


async def fuzz(addr: str, frames: int, connections: int = 8, seed: int = 0, hidden_size: int | None = None,
               check_every: int = 5000) -> dict:
    """Send `frames` hostile frames to the peer's direct port; returns counts. Raises if the peer hangs."""
    host, port = parse_tcp_addr(addr)
    info = await ask_info(host, port)
    static = bytes.fromhex(info.x25519) if info.x25519 else None
    stats = {"frames": 0, "replies": 0, "reconnects": 0, "oversize": 0}
    per_conn = [frames // connections + (1 if i < frames % connections else 0) for i in range(connections)]

    async def one(i: int, count: int) -> None:
        rng = random.Random(seed * 1000 + i)
        maker = FrameMaker(rng, hidden_size or 64, info.num_blocks, static)
        reader = writer = drain = None

        async def read_all(r: asyncio.StreamReader) -> None:
            try:
                while True:
                    n = framing.parse_header(await r.readexactly(4), 1 << 30)
                    await r.readexactly(n)
                    stats["replies"] += 1
            except (asyncio.IncompleteReadError, ConnectionError):
                pass

        async def connect():
            nonlocal reader, writer, drain
            if writer is not None:
                writer.close()
                drain.cancel()
            reader, writer = await asyncio.open_connection(host, port)
            drain = asyncio.create_task(read_all(reader))

        await connect()
        sent = 0
        while sent < count:
            if rng.random() < 0.0005:  # a header over the limit: the peer must refuse and hang up
                writer.write(framing.header(framing.DEFAULT_MAX_FRAME + rng.randint(1, 1000)))
                stats["oversize"] += 1
                await asyncio.wait_for(drain, 30)
                stats["reconnects"] += 1
                await connect()
            else:
                writer.write(framing.frame(maker.frame()))
            sent += 1
            stats["frames"] += 1
            if sent % 64 == 0:
                try:
                    await asyncio.wait_for(writer.drain(), 60)
                except (ConnectionError, asyncio.TimeoutError) as e:
                    raise RuntimeError(f"the peer stopped reading connection {i}: {e!r}") from None
            if sent % check_every == 0:  # the peer still answers, promptly
                await asyncio.wait_for(ask_info(host, port), 30)
        # a half-sent frame to finish: the peer must just drop it when we hang up
        writer.write(framing.header(100) + b"half")
        await writer.drain()
        writer.close()
        drain.cancel()

    await asyncio.gather(*(one(i, c) for i, c in enumerate(per_conn)))
    final = await asyncio.wait_for(ask_info(host, port), 30)
    stats["free_cache_tokens_after"] = final.free_cache_tokens
    return stats


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=100_000)
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--addr", help="the peer's direct tcp://HOST:PORT [default: start a tiny-model peer]")
    ap.add_argument("--pid", type=int, help="the peer's process id (for its RSS), with --addr")
    ap.add_argument("--model", help="checkpoint for the peer we start [default: a tiny random one]")
    ap.add_argument("--honest", action=argparse.BooleanOptionalAction, default=True,
                    help="run a greedy generation through the peer meanwhile and check it equals local")
    ap.add_argument("--max-rss-growth", type=float, default=200.0, help="MiB")
    args = ap.parse_args()

    peer = None
    model = args.model
    tmp = tempfile.TemporaryDirectory()
    if args.addr is None:
        from swarm.launch import PeerProcess

        if model is None:
            sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
            from conftest import make_checkpoint

            model = Path(tmp.name) / "tiny"
            make_checkpoint(model, "llama2")
        peer = PeerProcess(model, (0, 8), "--max-sessions", "16", "--max-sessions-per-client", "8",
                           "--cache-tokens", "4096", "--max-session-tokens", "256")
        args.addr, args.pid = data_addrs([peer.addr])[0], peer.proc.pid
    try:
        honest: dict = {}
        thread = None
        if args.honest and peer is not None:
            import threading

            from swarm.client.config import ClientConfig
            from swarm.client.swarm_model import SwarmModel
            from swarm.decode.generate import LocalModel, generate

            reference = generate(LocalModel.load(model), [5, 6, 7, 8], 40, stop_at_eos=False).tokens

            def run_honest():
                sm = SwarmModel(model, [peer.addr], ClientConfig(transport="libp2p", discovery=False))
                try:
                    honest["tokens"] = generate(sm, [5, 6, 7, 8], 40, stop_at_eos=False).tokens
                finally:
                    sm.close()
                honest["ok"] = honest["tokens"] == reference
            thread = threading.Thread(target=run_honest)
        rss0 = rss_mib(args.pid) if args.pid else float("nan")
        t0 = time.perf_counter()
        if thread is not None:
            thread.start()
        stats = asyncio.run(fuzz(args.addr, args.frames, args.connections, args.seed))
        if thread is not None:
            thread.join(300)
        seconds = time.perf_counter() - t0
        rss1 = rss_mib(args.pid) if args.pid else float("nan")
        alive = peer is None or peer.proc.poll() is None
        summary = {**stats, "seconds": round(seconds, 1), "frames_per_s": round(stats["frames"] / seconds),
                   "rss_before_mib": round(rss0, 1), "rss_after_mib": round(rss1, 1), "peer_alive": alive,
                   "honest_generation_equal_to_local": honest.get("ok")}
        print(json.dumps(summary))
        ok = alive and not rss1 - rss0 > args.max_rss_growth and (thread is None or honest.get("ok") is True)
        return 0 if ok else 1
    finally:
        if peer is not None:
            peer.stop()
        tmp.cleanup()


if __name__ == "__main__":
    sys.exit(main())
