"""The client's side of a chain of peers: open sessions along a route, run steps through it.

`ChainSession` opens one session per hop. In push mode (the default) the client sends a step to the
first peer only; each peer pushes its output to the next, and the last one answers the client:
n + 1 one-way hops. In client-mediated mode (`push=False`, as Petals does) the client carries the
hidden states from peer to peer itself: 2n hops. `swarm.client.swarm_model` wraps sessions as the
`RunBlocks` that `swarm.decode` drives, with failover.

Every hop has a codec (`protocol.sealing`), and every frame goes out and comes in through it:
sealed end to end by default (docs/security.md), plaintext with `ClientConfig(sealed=False)`. For
a sealed hop the client first asks for the peer's X25519 key on the session's own stream and checks
that the peer id it dialled signed it; the hop's Open is then the handshake (a fresh ephemeral key
per hop). In push mode the client gives each pair of neighbours a fresh link secret inside their
sealed Opens, and each step to the first hop carries nested onion layers: hop j's own instructions
sealed for hop j alone, around the layers for the hops after it. Results and errors come back sealed.

A peer's error fails the session as a `RemoteError` (the caller fails over), except `too_long`: a
session or step past the model's context is the request's fault, not the peer's, and becomes
`ContextTooLong` (a ValueError, "session too long for this model (N > M)"): no failover, no ban.

With `verify` (verification at the last peer) the last hop's Open asks it to verify rounds and it
answers each step with a `Verdict`, never the final hidden states; a sampled round's `Check` (drafts,
their sparse distributions, a seed) reaches the last hop alone: in its own Step (client-mediated),
sealed in its onion layer (sealed push), or riding along the pushed Steps (plaintext push).

Knows the protocol, channels and the client's config; nothing about libp2p (it gets a
`dial(addr) -> stream`), sampling or tokens.
"""

from __future__ import annotations

import asyncio
import re
from typing import Awaitable, Callable

import torch

from peer.channel import Channel, Stream, new_session_id
from peer.model import ContextTooLong, StepLayout
from protocol import crypto, sealing
from protocol import messages as m
from protocol.messages import ErrorCode
from protocol.sealing import Codec
from swarm.client.config import ClientConfig
from swarm.client.route import Hop


class RemoteError(RuntimeError):
    """A peer refused or failed a request; `code` says why, `peer` says who."""

    def __init__(self, code: str, message: str, peer: str | None = None):
        super().__init__(f"{peer or 'peer'}: {message} [{code}]")
        self.code, self.peer = code, peer


class ChainSession:
    """Sessions on every hop of a route. Steps may overlap: each reply resolves the future of its
    (hop, step id); an error or a lost connection fails every pending step (the caller fails over).

    Reads `config.push`, `config.wire_dtype`, `config.timeout` and `config.sealed`."""

    def __init__(self, dial: Callable[[str], Awaitable[Stream]], route: list[Hop], config: ClientConfig,
                 context: int | None = None, verify: m.VerifyAt | None = None):
        self.dial, self.route, self.config = dial, route, config
        self.verify = verify  # the last hop verifies rounds itself: its answers are Verdicts, not hidden states
        self.context, self.max_length = context, 0  # the model's context, when the caller knows it
        self.ids = [new_session_id() for _ in route]
        # how each hop's frames are sealed and opened; a sealed hop's once the peer's key is checked
        self.codecs: list[Codec | None] = [None if config.sealed else sealing.Plain() for _ in route]
        self.channels: list[Channel] = []
        self._readers: list[asyncio.Task] = []
        self._waiters: dict[tuple[int, object], asyncio.Future] = {}  # (hop, step id or "open") -> reply
        self._failed: RemoteError | ContextTooLong | None = None
        self._step = 0

    async def open(self, max_length: int) -> None:
        cfg, route = self.config, self.route
        self.max_length = max_length
        streams = await asyncio.gather(*(self.dial(hop.addr) for hop in route))
        self.channels = [Channel(s, str(hop)) for s, hop in zip(streams, route)]
        if cfg.sealed:
            statics = await asyncio.gather(*(self._peer_key(i) for i in range(len(route))))
            self.codecs = [sealing.ClientHop(static, sid) for static, sid in zip(statics, self.ids)]
        self._readers = [asyncio.create_task(self._read(i, c)) for i, c in enumerate(self.channels)]
        opened = [self._expect(i, "open") for i in range(len(route))]
        links = [sealing.link_secret() if cfg.sealed else None for _ in route[1:]]
        for i, (hop, channel) in enumerate(zip(route, self.channels)):
            nxt = m.NextHop(route[i + 1].addr, self.ids[i + 1], links[i]) if cfg.push and i + 1 < len(route) else None
            prev = links[i - 1] if cfg.push and i > 0 else None
            verify = self.verify if i == len(route) - 1 else None
            await channel.send(self.codecs[i], m.Open(self.ids[i], max_length, hop.blocks, cfg.wire_dtype, nxt, prev,
                                                      verify))
        for fut in opened:
            await self._wait(fut)

    async def _peer_key(self, i: int) -> bytes:
        """The hop's X25519 key, asked on the session's own stream and checked against the peer id we dialled."""
        hop, channel, plain, timeout = self.route[i], self.channels[i], sealing.Plain(), self.config.timeout
        try:
            await channel.send(plain, m.Info())
            reply, _ = await asyncio.wait_for(channel.recv(plain), timeout)
        except asyncio.TimeoutError:
            raise RemoteError(ErrorCode.TIMEOUT, f"no answer to Info within {timeout:.0f} s", str(hop)) from None
        except m.ProtocolError as e:
            raise RemoteError(e.code, f"bad answer to Info: {e}", str(hop)) from None
        if isinstance(reply, m.Error):
            raise RemoteError(reply.code, reply.message, reply.peer or str(hop))
        if not isinstance(reply, m.InfoReply):
            raise RemoteError(ErrorCode.BAD_REQUEST, f"answered Info with {type(reply).__name__}", str(hop))
        try:
            return crypto.verify_static_key(hop.peer_id, reply.public_key, reply.x25519, reply.x25519_sig)
        except crypto.SealError as e:
            raise RemoteError(e.code, str(e), str(hop)) from None

    def _expect(self, hop: int, key) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        if self._failed is not None:
            fut.set_exception(self._failed)
            fut.exception()  # (marked retrieved, as in `_fail`: a send that fails first leaves it unawaited)
        else:
            self._waiters[(hop, key)] = fut
        return fut

    def _fail(self, error: RemoteError | ContextTooLong) -> None:
        self._failed = self._failed or error
        for fut in self._waiters.values():
            if not fut.done():
                fut.set_exception(error)
                fut.exception()  # whoever waits on it raises it; one nobody waits on any more (a reply
                # abandoned by Ctrl-C) must not be reported at exit as "never retrieved"
        self._waiters.clear()

    async def _read(self, i: int, channel: Channel) -> None:
        """Hop i's replies, opened with its codec (a sealed hop's plaintext Error, a refusal of a frame
        that did not authenticate, fails the session like any error and says it was unauthenticated)."""
        try:
            while True:
                try:
                    msg, _ = await channel.recv(self.codecs[i])
                except crypto.SealError as e:  # forged, tampered, replayed: refuse the frame, fail the session
                    self._fail(RemoteError(e.code, f"rejected a reply: {e}", str(self.route[i])))
                    continue
                if isinstance(msg, m.Error):
                    self._fail(self._refusal(msg, msg.peer or str(self.route[i])))
                    continue
                key = "open" if isinstance(msg, m.Opened) else msg.step if isinstance(msg, (m.Result, m.Verdict)) \
                    else None
                fut = self._waiters.pop((i, key), None)
                if fut is not None and not fut.done():  # no waiter: a reply to an abandoned step
                    fut.set_result(msg.hidden if isinstance(msg, m.Result) else msg)
        except Exception as e:  # noqa: BLE001 - EOF, reset, garbage: the hop is gone
            self._fail(RemoteError(ErrorCode.DISCONNECTED, f"connection lost: {e or type(e).__name__}",
                                   str(self.route[i])))

    async def _wait(self, fut: asyncio.Future):
        try:
            return await asyncio.wait_for(fut, self.config.timeout)
        except asyncio.TimeoutError:
            error = RemoteError(ErrorCode.TIMEOUT, f"no answer within {self.config.timeout:.0f} s")
            self._fail(error)
            raise error from None

    def _onion(self, first: int, step: int, layout: StepLayout, check: m.Check | None) -> bytes:
        """Hops first.. end's instructions, each sealed for its hop around the layers of the hops after it (the
        last hop's with the round's check, when it verifies: no other hop sees the drafts)."""
        parents, compact = _wire_layout(layout)
        layer, last = b"", len(self.route) - 1
        for j in range(last, first - 1, -1):
            ctrl = m.Control(self.ids[j], step, layout.start, parents, compact, check if j == last else None)
            layer = self.codecs[j].onion.seal(ctrl, layer)
        return layer

    async def _send_step(self, hop: int, step: int, hidden: torch.Tensor, layout: StepLayout,
                         check: m.Check | None = None) -> None:
        parents, compact = _wire_layout(layout)
        sealed_push = self.config.push and self.codecs[hop].sealed and hop == 0 and len(self.route) > 1
        # the check rides to the last hop: in its own Step, in its onion layer (sealed push), or along a plain push
        here = check if hop == len(self.route) - 1 or (self.config.push and not sealed_push) else None
        msg = m.Step(self.ids[hop], step, layout.start, hidden, parents, compact, self.config.wire_dtype, here)
        onion = b""
        if sealed_push:  # the later hops' layers, built under the send lock: onion counters rise in sending order
            onion = lambda: self._onion(1, step, layout, check)  # noqa: E731
        await self.channels[hop].send(self.codecs[hop], msg, onion)

    async def step(self, hidden: torch.Tensor, layout: StepLayout, check: m.Check | None = None):
        """Run one step (`layout.compact` first keeps one path of the previous tree step); its output: hidden
        states, or with a verifying last hop its `Verdict` (`check`: a sampled round's, for it)."""
        return await self.replay([(hidden, layout)], check)

    async def replay(self, steps: list[tuple[torch.Tensor, StepLayout]], check: m.Check | None = None):
        """Run steps [(hidden, layout)] in order, sent back to back; returns the last one's output (`check`: its).

        With one step this is a normal step. With many it rebuilds a fresh route's caches after a
        failover: the same steps with the same shapes give the same keys and values, bit for bit.
        """
        first = self._step + 1
        self._step += len(steps)
        checks = [None] * (len(steps) - 1) + [check]
        if self.config.push:
            last = self._expect(len(self.route) - 1, self._step)
            for n, (hidden, layout) in enumerate(steps):
                await self._send_step(0, first + n, hidden, layout, checks[n])
            return await self._wait(last)
        inputs = [hidden for hidden, _ in steps]
        for i in range(len(self.channels)):
            futures = [self._expect(i, first + n) for n in range(len(steps))]
            for n, (_, layout) in enumerate(steps):
                await self._send_step(i, first + n, inputs[n], layout, checks[n])
            inputs = [await self._wait(f) for f in futures]
        return inputs[-1]

    def _refusal(self, error: m.Error, peer: str) -> RemoteError | ContextTooLong:
        """A peer's Error as the exception the caller gets: `too_long` with its "(N > M)" is ContextTooLong,
        unless the caller knows the model's context and asked for no more than it: then the peer is wrong
        (or lying, to end the session without being banned) and it is a RemoteError like any other."""
        found = re.search(r"\((\d{1,10}) > (\d{1,10})\)$", error.message) if error.code == ErrorCode.TOO_LONG else None
        if found is not None and (self.context is None or self.max_length > self.context):
            return ContextTooLong(int(found[1]), int(found[2]), "session")
        return RemoteError(error.code, error.message, peer)

    async def close(self) -> None:
        for sid, channel, codec in zip(self.ids, self.channels, self.codecs):
            try:  # (a sealed hop whose Open never left refuses to seal a Close: there is nothing to close)
                if codec is not None:
                    await channel.send(codec, m.Close(sid))
            except Exception:  # noqa: BLE001
                pass
            await channel.close()
        for task in self._readers:
            task.cancel()




def _wire_layout(layout: StepLayout) -> tuple[list[int] | None, tuple[int, list[int]] | None]:
    """A layout's tree parents and compaction as messages carry them."""
    parents = list(layout.parents) if layout.parents is not None else None
    compact = (layout.compact[0], list(layout.compact[1])) if layout.compact is not None else None
    return parents, compact
