"""Serving inference sessions on a block range: the peer's request handler.

A `BlockServer` owns one `BlockRange` and the sessions opened on it. It reads messages from any
stream it is handed (a client's session stream, or the push stream of the previous peer), runs
steps, and sends each result either to the next peer (push mode) or back to the session's owner.
Every error becomes an `Error` reply to whoever should hear it; the loop keeps serving.

Knows the model engine and the protocol; knows nothing about libp2p (streams are anything with
`send(bytes)`, `recv() -> bytes`, `close()`), and nothing about clients' tokens.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Protocol

import torch

from peer.model import BlockRange, CacheError, KVCache, StepLayout
from protocol import messages as m
from protocol.framing import FrameTooLarge
from protocol.messages import ErrorCode, ProtocolError

from peer.transport import INFERENCE_PROTOCOL  # noqa: F401 - re-exported for callers

log = logging.getLogger("specswarm.peer")


class Stream(Protocol):
    async def send(self, payload: bytes) -> None: ...
    async def recv(self) -> bytes: ...
    async def close(self) -> None: ...


@dataclass
class Limits:
    cache_tokens: int = 32768  # sum of max_length over open sessions
    max_sessions: int = 64
    max_step_tokens: int = 4096  # new positions per step
    session_timeout: float = 600.0  # seconds idle before a session is dropped


class Channel:
    """A stream with a send lock: several tasks may reply on the same stream."""

    def __init__(self, stream: Stream, name: str):
        self.stream, self.name = stream, name
        self._lock = asyncio.Lock()
        self.closed = False

    async def send(self, msg) -> None:
        data = m.encode(msg)
        async with self._lock:
            await self.stream.send(data)

    async def close(self) -> None:
        if not self.closed:
            self.closed = True
            try:
                await self.stream.close()
            except Exception:  # noqa: BLE001 - the other side may already be gone
                pass


@dataclass
class Session:
    id: str
    blocks: BlockRange  # the span this session asked for (all or part of the peer's)
    cache: KVCache
    owner: Channel
    wire_dtype: str
    next: m.NextHop | None
    last_used: float = field(default_factory=time.monotonic)


class BlockServer:
    def __init__(self, blocks: BlockRange, model_id: str, limits: Limits = Limits(),
                 open_stream: Callable[[str], Awaitable[Stream]] | None = None, name: str = "peer"):
        self.blocks, self.model_id, self.limits, self.name = blocks, model_id, limits, name
        self.open_stream = open_stream  # dials the next peer for push mode
        self.data_addr: str | None = None  # set when a direct TCP listener is up
        self.sessions: dict[str, Session] = {}
        self.links: dict[str, Channel] = {}  # next-peer address -> kept-open push stream
        self._link_locks: dict[str, asyncio.Lock] = {}
        self.max_elements = limits.max_step_tokens * blocks.cfg.hidden_size

    @property
    def used_tokens(self) -> int:
        return sum(s.cache.max_length for s in self.sessions.values())

    # --- the stream loop --------------------------------------------------------------------------
    async def handle(self, stream: Stream, name: str = "stream") -> None:
        """Serve one incoming stream until it closes. Never raises."""
        channel = Channel(stream, name)
        try:
            while True:
                try:
                    data = await stream.recv()
                except (EOFError, ConnectionError, asyncio.IncompleteReadError):
                    break
                except FrameTooLarge as e:  # the stream's framing is lost: say why, then hang up
                    await self._reply(channel, m.Error(ErrorCode.BAD_REQUEST, str(e), peer=self.name))
                    break
                await self._dispatch(channel, data)
        except Exception:  # noqa: BLE001 - a bug must not take the peer down
            log.exception("stream %s failed", name)
        finally:
            await channel.close()
            for sid in [s.id for s in self.sessions.values() if s.owner is channel]:
                self._drop(sid, "its client disconnected")

    async def _dispatch(self, channel: Channel, data: bytes) -> None:
        session_id = step_id = None
        try:
            msg = m.decode(data, self.max_elements)
            session_id, step_id = getattr(msg, "session", None), getattr(msg, "step", None)
            if isinstance(msg, m.Info):
                await channel.send(m.InfoReply(self.model_id, (self.blocks.start, self.blocks.end),
                                               self.blocks.cfg.num_hidden_layers, self.free_tokens,
                                               str(self.blocks.dtype).removeprefix("torch."), self.data_addr))
            elif isinstance(msg, m.Open):
                await self._open(channel, msg)
            elif isinstance(msg, m.Step):
                await self._step(msg)
            elif isinstance(msg, m.Close):
                self._drop(msg.session, "closed by its client")
            else:
                raise ProtocolError(ErrorCode.BAD_REQUEST, f"peers do not accept {type(msg).__name__} messages")
        except (ProtocolError, CacheError) as e:
            code = getattr(e, "code", ErrorCode.BAD_STEP)
            await self._error(channel, session_id, step_id, code, str(e))
        except Exception as e:  # noqa: BLE001
            log.exception("internal error while serving %s", channel.name)
            await self._error(channel, session_id, step_id, ErrorCode.INTERNAL, f"internal error: {e}")

    async def _error(self, channel, session_id, step_id, code, message) -> None:
        """Errors about a known session go to its owner; anything else to the sender."""
        session = self.sessions.get(session_id) if session_id else None
        target = session.owner if session else channel
        await self._reply(target, m.Error(code, message, session_id, step_id, peer=self.name))

    async def _reply(self, channel: Channel, msg) -> None:
        try:
            await channel.send(msg)
        except Exception:  # noqa: BLE001 - the receiver is gone; nothing more to tell it
            log.debug("could not reply on %s", channel.name)

    # --- requests ---------------------------------------------------------------------------------
    @property
    def free_tokens(self) -> int:
        return max(0, self.limits.cache_tokens - self.used_tokens)

    async def _open(self, channel: Channel, msg: m.Open) -> None:
        if not self.blocks.start <= msg.blocks[0] < msg.blocks[1] <= self.blocks.end:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"this peer serves blocks [{self.blocks.start}, "
                                f"{self.blocks.end}), which do not include {list(msg.blocks)}")
        if msg.session in self.sessions:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "session id already in use")
        if len(self.sessions) >= self.limits.max_sessions:
            raise ProtocolError(ErrorCode.TOO_MANY_SESSIONS, f"this peer already serves {len(self.sessions)} sessions")
        if msg.max_length > self.free_tokens:
            raise ProtocolError(ErrorCode.CACHE_FULL, f"session of {msg.max_length} tokens does not fit: "
                                f"{self.free_tokens} of {self.limits.cache_tokens} cache tokens are free")
        if msg.next is not None and self.open_stream is None:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "this peer cannot push to a next peer")
        blocks = self.blocks.view(*msg.blocks)
        self.sessions[msg.session] = Session(msg.session, blocks, blocks.new_cache(msg.max_length), channel,
                                             msg.wire_dtype, msg.next)
        log.info("opened session %s… (%d tokens, %s); %d sessions, %d cache tokens free", msg.session[:8],
                 msg.max_length, "push" if msg.next else "reply", len(self.sessions), self.free_tokens)
        await channel.send(m.Opened(msg.session, msg.max_length))

    async def _step(self, msg: m.Step) -> None:
        session = self.sessions.get(msg.session)
        if session is None:
            raise ProtocolError(ErrorCode.UNKNOWN_SESSION, f"no open session {msg.session[:8]}… on this peer")
        session.last_used = time.monotonic()
        hidden = msg.hidden
        width = self.blocks.cfg.hidden_size
        if hidden.dim() != 2 or hidden.shape[1] != width or not 1 <= hidden.shape[0] <= self.limits.max_step_tokens:
            raise ProtocolError(ErrorCode.BAD_STEP, f"hidden states must be [n, {width}] with 1 <= n <= "
                                f"{self.limits.max_step_tokens}, got {list(hidden.shape)}")
        layout = StepLayout(msg.start, hidden.shape[0], tuple(msg.parents) if msg.parents is not None else None)
        if msg.compact is not None:
            session.cache.compact(*msg.compact)
        with torch.inference_mode():
            out = session.blocks(hidden.to(self.blocks.device), session.cache, layout)
        if session.next is None:
            await session.owner.send(m.Result(session.id, msg.step, out, session.wire_dtype))
            return
        forward = m.Step(session.next.session, msg.step, msg.start, out, msg.parents, msg.compact, session.wire_dtype)
        try:
            link = await self._link(session.next.addr)
            await link.send(forward)
        except Exception as e:  # noqa: BLE001
            self.links.pop(session.next.addr, None)
            raise ProtocolError(ErrorCode.NEXT_HOP, f"could not push to the next peer {session.next.addr}: {e}") from None

    async def _link(self, addr: str) -> Channel:
        lock = self._link_locks.setdefault(addr, asyncio.Lock())
        async with lock:
            link = self.links.get(addr)
            if link is None or link.closed:
                stream = await self.open_stream(addr)
                link = self.links[addr] = Channel(stream, f"push->{addr[-12:]}")
                asyncio.get_running_loop().create_task(self._drain_link(addr, link))
            return link

    async def _drain_link(self, addr: str, link: Channel) -> None:
        """The next peer answers on a push stream only with errors: pass each to the owner of the session."""
        try:
            while True:
                reply = m.decode(await link.stream.recv(), 0)
                if isinstance(reply, m.Error) and reply.session:
                    for s in list(self.sessions.values()):
                        if s.next is not None and s.next.session == reply.session:
                            await self._reply(s.owner, reply)
        except Exception:  # noqa: BLE001 - EOF or garbage: this link is done
            pass
        finally:
            link.closed = True
            if self.links.get(addr) is link:
                del self.links[addr]

    def _drop(self, session_id: str, why: str) -> None:
        if self.sessions.pop(session_id, None) is not None:
            log.info("session %s… %s; %d sessions open", session_id[:8], why, len(self.sessions))

    async def expire_idle(self, every: float = 5.0) -> None:
        while True:
            await asyncio.sleep(every)
            now = time.monotonic()
            for s in list(self.sessions.values()):
                if now - s.last_used > self.limits.session_timeout:
                    self._drop(s.id, f"expired after {self.limits.session_timeout:.0f} s idle")

    async def close(self) -> None:
        for link in list(self.links.values()):
            await link.close()
        self.sessions.clear()


def new_session_id() -> str:
    return secrets.token_hex(16)
