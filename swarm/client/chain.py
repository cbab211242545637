"""The client's side of a chain of peers: open sessions along a route, run steps through it.

`ChainSession` opens one session per hop. In push mode (the default) the client sends a step to the
first peer only; each peer pushes its output to the next, and the last one answers the client:
n + 1 one-way hops. In client-mediated mode (`push=False`, as Petals does) the client carries the
hidden states from peer to peer itself: 2n hops. `swarm.client.swarm_model` wraps sessions as the synchronous
`RunBlocks` that `swarm.decode.generate` drives, with failover.

Sessions are sealed end to end by default (protocol/crypto.py, docs/security.md). On each hop's
stream the client first asks for the peer's X25519 key and checks that the peer id it dialled
signed it; then it opens the session with a sealed OPEN frame (a fresh ephemeral key per hop).
In push mode the client gives each pair of neighbours a fresh link secret inside their sealed
Opens, and each step to the first hop carries nested onion layers: hop j's own instructions sealed
for hop j alone, around the layers for the hops after it. Results and errors come back sealed.

Knows the protocol and streams; knows nothing about libp2p (it gets a `dial(addr) -> stream`).
"""

from __future__ import annotations

import asyncio
import secrets
from typing import Awaitable, Callable

import torch

from peer.model import StepLayout
from peer.server import Channel, Stream, new_session_id
from protocol import crypto
from protocol import messages as m
from swarm.client.route import Hop

SEALED_BY_DEFAULT = True  # `swarm generate --insecure` turns it off (benchmarks only)


class RemoteError(RuntimeError):
    """A peer refused or failed a request; `code` says why, `peer` says who."""

    def __init__(self, code: str, message: str, peer: str | None = None):
        super().__init__(f"{peer or 'peer'}: {message} [{code}]")
        self.code, self.peer = code, peer


class ChainSession:
    """Sessions on every hop of a route. Steps may overlap: each reply resolves the future of its
    (hop, step id); an error or a lost connection fails every pending step (the caller fails over)."""

    def __init__(self, dial: Callable[[str], Awaitable[Stream]], route: list[Hop], push: bool = True,
                 wire_dtype: str = "float32", timeout: float = 60.0, sealed: bool | None = None):
        self.dial, self.route, self.push = dial, route, push
        self.wire_dtype, self.timeout = wire_dtype, timeout
        self.sealed = SEALED_BY_DEFAULT if sealed is None else sealed
        self.ids = [new_session_id() for _ in route]
        self.keys: list[crypto.SessionKeys | None] = [None] * len(route)
        self.channels: list[Channel] = []
        self._readers: list[asyncio.Task] = []
        self._waiters: dict[tuple[int, object], asyncio.Future] = {}  # (hop, step id or "open") -> reply
        self._failed: RemoteError | None = None
        self._step = 0

    async def open(self, max_length: int) -> None:
        streams = await asyncio.gather(*(self.dial(hop.addr) for hop in self.route))
        self.channels = [Channel(s, str(hop)) for s, hop in zip(streams, self.route)]
        statics = await asyncio.gather(*(self._peer_key(i) for i in range(len(self.route)))) if self.sealed else None
        self._readers = [asyncio.create_task(self._read(i, c)) for i, c in enumerate(self.channels)]
        opened = [self._expect(i, "open") for i in range(len(self.route))]
        links = [secrets.token_bytes(crypto.KEY_LEN) if self.sealed else None for _ in self.route[1:]]
        for i, (hop, channel) in enumerate(zip(self.route, self.channels)):
            nxt = prev = None
            if self.push and i + 1 < len(self.route):
                nxt = m.NextHop(self.route[i + 1].addr, self.ids[i + 1], links[i].hex() if self.sealed else None)
            if self.push and self.sealed and i > 0:
                prev = links[i - 1].hex()
            msg = m.Open(self.ids[i], max_length, hop.blocks, self.wire_dtype, nxt, prev)
            if self.sealed:
                self.keys[i], frame = crypto.client_handshake(statics[i], bytes.fromhex(self.ids[i]),
                                                              crypto.pack(m.encode(msg)))
                await channel.send_raw(frame)
            else:
                await channel.send(msg)
        for fut in opened:
            await self._wait(fut)

    async def _peer_key(self, i: int) -> bytes:
        """The hop's X25519 key, asked on the session's own stream and checked against the peer id we dialled."""
        hop, channel = self.route[i], self.channels[i]
        try:
            await channel.send(m.Info())
            reply = m.decode(await asyncio.wait_for(channel.stream.recv(), self.timeout))
        except asyncio.TimeoutError:
            raise RemoteError("timeout", f"no answer to Info within {self.timeout:.0f} s", str(hop)) from None
        except m.ProtocolError as e:
            raise RemoteError(e.code, f"bad answer to Info: {e}", str(hop)) from None
        if isinstance(reply, m.Error):
            raise RemoteError(reply.code, reply.message, reply.peer or str(hop))
        if not isinstance(reply, m.InfoReply):
            raise RemoteError("bad_request", f"answered Info with {type(reply).__name__}", str(hop))
        try:
            return crypto.verify_static_key(hop.peer_id, reply.public_key, reply.x25519, reply.x25519_sig)
        except crypto.SealError as e:
            raise RemoteError(e.code, str(e), str(hop)) from None

    def _expect(self, hop: int, key) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        if self._failed is not None:
            fut.set_exception(self._failed)
        else:
            self._waiters[(hop, key)] = fut
        return fut

    def _fail(self, error: RemoteError) -> None:
        self._failed = self._failed or error
        for fut in self._waiters.values():
            if not fut.done():
                fut.set_exception(error)
        self._waiters.clear()

    def _open_reply(self, i: int, data: bytes):
        """A reply from hop i: sealed for us by its p2c key (sealed sessions), else plaintext.

        On a sealed session only an Error may come in plaintext (a refusal of a frame that did not
        authenticate); it fails the session like any error, and says it was unauthenticated."""
        if crypto.is_envelope(data):
            keys = self.keys[i]
            env = crypto.parse_envelope(data)
            if keys is None or env.type != crypto.Type.P2C or env.channel != bytes.fromhex(self.ids[i]):
                raise crypto.SealError("a sealed reply that is not for this session")
            inner, _ = crypto.unpack(keys.p2c.open(env))
            return m.decode(inner)
        msg = m.decode(data)
        if self.sealed and not isinstance(msg, m.Error):
            raise crypto.SealError(f"a plaintext {type(msg).__name__} on a sealed session")
        if self.sealed:
            msg.message = f"(unauthenticated) {msg.message}"
        return msg

    async def _read(self, i: int, channel: Channel) -> None:
        try:
            while True:
                try:
                    msg = self._open_reply(i, await channel.stream.recv())
                except crypto.SealError as e:  # forged, tampered, replayed: refuse the frame, fail the session
                    self._fail(RemoteError(e.code, f"rejected a reply: {e}", str(self.route[i])))
                    continue
                if isinstance(msg, m.Error):
                    self._fail(RemoteError(msg.code, msg.message, msg.peer or str(self.route[i])))
                    continue
                key = "open" if isinstance(msg, m.Opened) else msg.step if isinstance(msg, m.Result) else None
                fut = self._waiters.pop((i, key), None)
                if fut is not None and not fut.done():  # no waiter: a reply to an abandoned step
                    fut.set_result(getattr(msg, "hidden", None))
        except Exception as e:  # noqa: BLE001 - EOF, reset, garbage: the hop is gone
            self._fail(RemoteError("disconnected", f"connection lost: {e or type(e).__name__}", str(self.route[i])))

    async def _wait(self, fut: asyncio.Future):
        try:
            return await asyncio.wait_for(fut, self.timeout)
        except asyncio.TimeoutError:
            error = RemoteError("timeout", f"no answer within {self.timeout:.0f} s")
            self._fail(error)
            raise error from None

    def _message(self, hop: int, step: int, hidden, layout: StepLayout, compact) -> m.Step:
        parents = list(layout.parents) if layout.parents is not None else None
        return m.Step(self.ids[hop], step, layout.start, hidden, parents, compact, self.wire_dtype)

    def _onion(self, first: int, step: int, layout: StepLayout, compact) -> bytes:
        """Hops first.. end's instructions, each sealed for its hop around the layers of the hops after it."""
        parents = list(layout.parents) if layout.parents is not None else None
        layer = b""
        for j in range(len(self.route) - 1, first - 1, -1):
            ctrl = m.encode(m.Control(self.ids[j], step, layout.start, parents, compact))
            layer = self.keys[j].onion.seal_onion(crypto.pack(ctrl, layer))
        return layer

    async def _send_step(self, hop: int, step: int, hidden, layout: StepLayout, compact) -> None:
        msg = self._message(hop, step, hidden, layout, compact)
        if not self.sealed:
            await self.channels[hop].send(msg)
            return
        body = m.encode(msg)
        if self.push and hop == 0 and len(self.route) > 1:  # onion counters must rise in sending order
            build = lambda: crypto.pack(body, self._onion(1, step, layout, compact))  # noqa: E731
        else:
            build = crypto.pack(body)
        await self.channels[hop].send_sealed(self.keys[hop].c2p, build)

    async def step(self, hidden: torch.Tensor, layout: StepLayout, compact=None) -> torch.Tensor:
        return await self.replay([(hidden, layout, compact)])

    async def replay(self, steps: list) -> torch.Tensor:
        """Run steps [(hidden, layout, compact)] in order, sent back to back; returns the last one's output.

        With one step this is a normal step. With many it rebuilds a fresh route's caches after a
        failover: the same steps with the same shapes give the same keys and values, bit for bit.
        """
        first = self._step + 1
        self._step += len(steps)
        if self.push:
            last = self._expect(len(self.route) - 1, self._step)
            for n, (hidden, layout, compact) in enumerate(steps):
                await self._send_step(0, first + n, hidden, layout, compact)
            return await self._wait(last)
        inputs = [hidden for hidden, _, _ in steps]
        for i, channel in enumerate(self.channels):
            futures = [self._expect(i, first + n) for n in range(len(steps))]
            for n, (_, layout, compact) in enumerate(steps):
                await self._send_step(i, first + n, inputs[n], layout, compact)
            inputs = [await self._wait(f) for f in futures]
        return inputs[-1]

    async def close(self) -> None:
        for sid, channel, keys in zip(self.ids, self.channels, self.keys):
            try:
                if keys is not None:
                    await channel.send_sealed(keys.c2p, crypto.pack(m.encode(m.Close(sid))))
                elif not self.sealed:
                    await channel.send(m.Close(sid))
            except Exception:  # noqa: BLE001
                pass
            await channel.close()
        for task in self._readers:
            task.cancel()
