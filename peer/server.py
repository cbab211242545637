"""Serving inference sessions on a block range: the peer's request handler.

A `BlockServer` owns one `BlockRange` and the sessions opened on it. It reads messages from any
stream it is handed (a client's session stream, or the push stream of the previous peer), runs
steps, and sends each result either to the next peer (push mode) or back to the session's owner.
Every error becomes an `Error` reply to whoever should hear it; the loop keeps serving.

Sessions are sealed end to end by default (protocol/crypto.py, docs/security.md): a sealed OPEN
frame sets up the session's keys; its steps arrive sealed from the client (c2p) or, in push mode,
from the previous peer (a link key the client gave both ends) with this hop's own instructions in
an onion layer only it can open; results and errors go back sealed for the client (p2c). A frame
that fails authentication, or replays an old counter, gets a plaintext error to whoever sent it
and changes nothing. Limits (sessions in total and per client, cache tokens, rate, connections,
frame size and frame timeout) protect the peer from everyone else.

Knows the model engine and the protocol; knows nothing about libp2p (streams are anything with
`send(bytes)`, `recv() -> bytes`, `close()`), and nothing about clients' tokens.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Protocol

import torch

from peer.model import BlockRange, CacheError, KVCache, StepLayout
from protocol import crypto
from protocol import messages as m
from protocol.crypto import OpenKey, SealError, SealKey, SessionKeys, StaticKey, Type
from protocol.framing import DEFAULT_MAX_FRAME, FrameTooLarge
from protocol.messages import ErrorCode, ProtocolError

from peer.transport import INFERENCE_PROTOCOL  # noqa: F401 - re-exported for callers

log = logging.getLogger("specswarm.peer")
SEEN_HANDSHAKES = 1 << 17  # ephemeral keys remembered against replayed opens (32 bytes each, ~8 MiB)


class Stream(Protocol):
    async def send(self, payload: bytes) -> None: ...
    async def recv(self) -> bytes: ...
    async def close(self) -> None: ...


@dataclass
class Limits:
    """What one peer grants; every field is a `swarm peer` flag (docs/security.md lists the defaults)."""

    cache_tokens: int = 32768  # sum of max_length over open sessions
    max_sessions: int = 64
    max_step_tokens: int = 4096  # new positions per step
    session_timeout: float = 600.0  # seconds idle before a session is dropped
    max_sessions_per_client: int = 16  # per libp2p peer id, or per IP address on the direct port
    max_session_tokens: int = 8192  # max_length of one session
    max_frame: int = DEFAULT_MAX_FRAME  # bytes; checked from the header, before allocating
    frame_timeout: float = 30.0  # seconds a started frame may take to arrive in full (slowloris)
    rate: float = 1000.0  # frames per second per connection, sustained (0: unlimited)
    burst: int = 2000  # frames a connection may send at once above the rate
    max_connections: int = 512  # open streams in total
    require_encryption: bool = False  # refuse plaintext sessions


class RateLimit:
    """A token bucket: `delay()` says how long to wait before serving one more frame."""

    def __init__(self, rate: float, burst: int):
        self.rate, self.burst = rate, max(1, burst)
        self.tokens, self.at = float(self.burst), time.monotonic()

    def delay(self) -> float:
        if self.rate <= 0:
            return 0.0
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        self.tokens -= 1.0
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


class Channel:
    """A stream with a send lock: several tasks may reply on the same stream."""

    def __init__(self, stream: Stream, name: str, client: str | None = None):
        self.stream, self.name, self.client = stream, name, client or name
        self._lock = asyncio.Lock()
        self.closed = False

    async def send(self, msg) -> None:
        data = m.encode(msg)
        async with self._lock:
            await self.stream.send(data)

    async def send_raw(self, data: bytes) -> None:
        async with self._lock:
            await self.stream.send(data)

    async def send_sealed(self, key: SealKey, build) -> None:
        """Seal `build()` (bytes, or a callable making them) with `key` and send it; sealing under the
        send lock keeps counters in the order frames leave."""
        async with self._lock:
            await self.stream.send(key.seal(build() if callable(build) else build))

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
    keys: SessionKeys | None = None  # sealed sessions: c2p/onion to open, p2c to seal
    link_in: OpenKey | None = None  # push mode, sealed: frames from the previous peer
    link_out: SealKey | None = None  # push mode, sealed: frames to the next peer


class BlockServer:
    def __init__(self, blocks: BlockRange, model_id: str, limits: Limits = Limits(),
                 open_stream: Callable[[str], Awaitable[Stream]] | None = None, name: str = "peer",
                 key_pair=None):
        self.blocks, self.model_id, self.limits, self.name = blocks, model_id, limits, name
        self.open_stream = open_stream  # dials the next peer for push mode
        self.data_addr: str | None = None  # set when a direct TCP listener is up
        self.sessions: dict[str, Session] = {}
        self.links: dict[str, Channel] = {}  # next-peer address -> kept-open push stream
        self._link_locks: dict[str, asyncio.Lock] = {}
        self.max_elements = limits.max_step_tokens * blocks.cfg.hidden_size
        self.connections = 0
        self._seen_ephemeral: OrderedDict[bytes, None] = OrderedDict()  # handshakes this process accepted
        self.static = StaticKey()  # this process's X25519 key; the libp2p identity signs it
        self.identity = crypto.sign_static_key(key_pair, self.static.public) if key_pair is not None else (None, None)

    @property
    def used_tokens(self) -> int:
        return sum(s.cache.max_length for s in self.sessions.values())

    # --- the stream loop --------------------------------------------------------------------------
    async def handle(self, stream: Stream, name: str = "stream", client: str | None = None) -> None:
        """Serve one incoming stream until it closes. Never raises."""
        channel = Channel(stream, name, client or getattr(stream, "remote_peer_id", None) or
                          getattr(stream, "remote_host", None))
        if self.connections >= self.limits.max_connections:
            await self._reply(channel, m.Error(ErrorCode.TOO_MANY_SESSIONS, f"this peer already serves "
                                               f"{self.connections} connections", peer=self.name))
            await channel.close()
            return
        self.connections += 1
        rate = RateLimit(self.limits.rate, self.limits.burst)
        try:
            while True:
                try:
                    data = await stream.recv()
                except (EOFError, ConnectionError, asyncio.IncompleteReadError, TimeoutError, asyncio.TimeoutError):
                    break
                except FrameTooLarge as e:  # the stream's framing is lost: say why, then hang up
                    await self._reply(channel, m.Error(ErrorCode.BAD_REQUEST, str(e), peer=self.name))
                    break
                wait = rate.delay()
                if wait > 0:  # over its rate: stop reading this connection for a while (backpressure)
                    await asyncio.sleep(wait)
                await self._dispatch(channel, data)
        except Exception:  # noqa: BLE001 - a bug must not take the peer down
            log.exception("stream %s failed", name)
        finally:
            self.connections -= 1
            await channel.close()
            for sid in [s.id for s in self.sessions.values() if s.owner is channel]:
                self._drop(sid, "its client disconnected")

    async def _dispatch(self, channel: Channel, data: bytes) -> None:
        if crypto.is_envelope(data):
            return await self._dispatch_sealed(channel, data)
        session_id = step_id = None
        try:
            msg = m.decode(data, self.max_elements)
            session_id, step_id = getattr(msg, "session", None), getattr(msg, "step", None)
            if isinstance(msg, m.Info):
                public_key, sig = self.identity
                await channel.send(m.InfoReply(self.model_id, (self.blocks.start, self.blocks.end),
                                               self.blocks.cfg.num_hidden_layers, self.free_tokens,
                                               str(self.blocks.dtype).removeprefix("torch."), self.data_addr,
                                               self.static.public.hex() if sig else None, sig, public_key))
                return
            if isinstance(msg, (m.Open, m.Step, m.Close)):
                session = self.sessions.get(session_id)
                if session is not None and session.keys is not None:  # never the owner's: say so to the sender
                    session_id = None
                    raise ProtocolError(ErrorCode.BAD_SEAL, "this session is sealed: plaintext requests for it "
                                        "are refused")
                if self.limits.require_encryption and isinstance(msg, (m.Open, m.Step)):
                    raise ProtocolError(ErrorCode.ENCRYPTION_REQUIRED, "this peer serves sealed sessions only")
            if isinstance(msg, m.Open):
                await self._open(channel, msg)
            elif isinstance(msg, m.Step):
                session = self.sessions.get(msg.session)
                if session is None:
                    raise ProtocolError(ErrorCode.UNKNOWN_SESSION, f"no open session {msg.session[:8]}… on this peer")
                await self._step(session, msg)
            elif isinstance(msg, m.Close):
                session = self.sessions.get(msg.session)
                if session is not None and session.owner is not channel:
                    session_id = None
                    raise ProtocolError(ErrorCode.BAD_REQUEST, "only the stream that opened a session may close it")
                self._drop(msg.session, "closed by its client")
            else:
                raise ProtocolError(ErrorCode.BAD_REQUEST, f"peers do not accept {type(msg).__name__} messages")
        except (ProtocolError, CacheError) as e:
            code = getattr(e, "code", ErrorCode.BAD_STEP)
            session = self.sessions.get(session_id) if session_id else None
            await self._error(channel, session if session and session.keys is None else None, session_id, step_id,
                              code, str(e))
        except Exception as e:  # noqa: BLE001
            log.exception("internal error while serving %s", channel.name)
            await self._error(channel, None, session_id, step_id, ErrorCode.INTERNAL, f"internal error: {e}")

    async def _dispatch_sealed(self, channel: Channel, data: bytes) -> None:
        """A sealed frame. Until it authenticates, errors go in plaintext to the sender and nothing
        changes; after, they go sealed to the session's owner."""
        session = keys = None
        session_id = step_id = None
        try:
            env = crypto.parse_envelope(data)
            session_id = env.session
            if env.type == Type.OPEN:
                if session_id in self.sessions:
                    raise SealError("session id already in use", ErrorCode.BAD_REQUEST)
                if env.ephemeral in self._seen_ephemeral:  # a replayed open: it would re-create old keys
                    raise SealError("this handshake was already used", ErrorCode.REPLAYED)
                keys, plain = self.static.accept(env)
                self._seen_ephemeral[env.ephemeral] = None
                if len(self._seen_ephemeral) > SEEN_HANDSHAKES:
                    self._seen_ephemeral.popitem(last=False)
                inner, rest = crypto.unpack(plain)
                msg = m.decode(inner, 0)
                if not isinstance(msg, m.Open) or msg.session != session_id or len(rest):
                    raise ProtocolError(ErrorCode.BAD_REQUEST, "a sealed open frame must hold an Open for its session")
                if msg.session in self.sessions:
                    raise ProtocolError(ErrorCode.BAD_REQUEST, "session id already in use")
                await self._open(channel, msg, keys)
                return
            session = self.sessions.get(session_id)
            if session is None:
                raise SealError(f"no open session {session_id[:8]}… on this peer", ErrorCode.UNKNOWN_SESSION)
            if env.type == Type.C2P:
                if session.keys is None:
                    raise SealError("this session is not sealed", ErrorCode.BAD_REQUEST)
                inner, onion = crypto.unpack(session.keys.c2p.open(env))
                keys = session.keys  # authenticated: from here on errors go sealed to the owner
                msg = m.decode(inner, self.max_elements)
                step_id = getattr(msg, "step", None)
                if not isinstance(msg, (m.Step, m.Close)) or msg.session != session_id:
                    raise ProtocolError(ErrorCode.BAD_REQUEST, "a sealed client frame holds a Step or Close for its session")
                if isinstance(msg, m.Close):
                    self._drop(session_id, "closed by its client")
                    return
                await self._step(session, msg, onion)
            elif env.type == Type.LINK:
                if session.link_in is None:
                    raise SealError("this session takes no pushed steps", ErrorCode.BAD_REQUEST)
                inner, onion = crypto.unpack(session.link_in.open(env))
                keys = session.keys
                pushed = m.decode(inner, self.max_elements)
                if not isinstance(pushed, m.Result) or pushed.session != session_id:
                    raise ProtocolError(ErrorCode.BAD_REQUEST, "a push link frame holds a Result for its session")
                step_id = pushed.step
                ctrl_bytes, onion = crypto.unpack(session.keys.onion.open_onion(onion))
                ctrl = m.decode(ctrl_bytes, 0)
                if not isinstance(ctrl, m.Control) or ctrl.session != session_id or ctrl.step != pushed.step:
                    raise ProtocolError(ErrorCode.BAD_REQUEST, "the onion layer does not hold this step's instructions")
                step = m.Step(session_id, ctrl.step, ctrl.start, pushed.hidden, ctrl.parents, ctrl.compact)
                await self._step(session, step, onion)
            else:
                raise SealError("peers do not accept sealed replies", ErrorCode.BAD_REQUEST)
        except (ProtocolError, CacheError) as e:
            code = getattr(e, "code", ErrorCode.BAD_STEP)
            if keys is None:  # not authenticated: tell the sender, touch nothing
                log.info("refused a sealed frame from %s: %s", channel.name, e)
                await self._reply(channel, m.Error(code, str(e), session_id, step_id, peer=self.name))
            elif session is None:  # a sealed open that failed: the opener hears it sealed
                await self._sealed_reply(channel, keys.p2c, m.Error(code, str(e), session_id, step_id, peer=self.name))
            else:
                await self._error(channel, session, session_id, step_id, code, str(e))
        except Exception as e:  # noqa: BLE001
            log.exception("internal error while serving %s", channel.name)
            await self._error(channel, session if keys is not None else None, session_id, step_id,
                              ErrorCode.INTERNAL, f"internal error: {e}")

    async def _error(self, channel, session: Session | None, session_id, step_id, code, message) -> None:
        """Errors about a session (from an authenticated request) go to its owner; anything else to the sender."""
        msg = m.Error(code, message, session_id, step_id, peer=self.name)
        if session is not None and self.sessions.get(session.id) is session:
            await self._to_owner(session, msg)
        else:
            await self._reply(channel, msg)

    async def _to_owner(self, session: Session, msg) -> None:
        if session.keys is not None:
            await self._sealed_reply(session.owner, session.keys.p2c, msg)
        else:
            await self._reply(session.owner, msg)

    async def _sealed_reply(self, channel: Channel, key: SealKey, msg) -> None:
        try:
            await channel.send_sealed(key, lambda: crypto.pack(m.encode(msg)))
        except Exception:  # noqa: BLE001
            log.debug("could not reply on %s", channel.name)

    async def _reply(self, channel: Channel, msg) -> None:
        try:
            await channel.send(msg)
        except Exception:  # noqa: BLE001 - the receiver is gone; nothing more to tell it
            log.debug("could not reply on %s", channel.name)

    # --- requests ---------------------------------------------------------------------------------
    @property
    def free_tokens(self) -> int:
        return max(0, self.limits.cache_tokens - self.used_tokens)

    async def _open(self, channel: Channel, msg: m.Open, keys: SessionKeys | None = None) -> None:
        if not self.blocks.start <= msg.blocks[0] < msg.blocks[1] <= self.blocks.end:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"this peer serves blocks [{self.blocks.start}, "
                                f"{self.blocks.end}), which do not include {list(msg.blocks)}")
        if msg.session in self.sessions:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "session id already in use")
        if len(self.sessions) >= self.limits.max_sessions:
            raise ProtocolError(ErrorCode.TOO_MANY_SESSIONS, f"this peer already serves {len(self.sessions)} sessions")
        mine = sum(1 for s in self.sessions.values() if s.owner.client == channel.client)
        if mine >= self.limits.max_sessions_per_client:
            raise ProtocolError(ErrorCode.TOO_MANY_SESSIONS, f"this peer already serves {mine} sessions for you "
                                f"(at most {self.limits.max_sessions_per_client} per client)")
        if msg.max_length > self.limits.max_session_tokens:
            raise ProtocolError(ErrorCode.CACHE_FULL, f"session of {msg.max_length} tokens exceeds this peer's limit "
                                f"of {self.limits.max_session_tokens} per session")
        if msg.max_length > self.free_tokens:
            raise ProtocolError(ErrorCode.CACHE_FULL, f"session of {msg.max_length} tokens does not fit: "
                                f"{self.free_tokens} of {self.limits.cache_tokens} cache tokens are free")
        if msg.next is not None and self.open_stream is None:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "this peer cannot push to a next peer")
        link_in = link_out = None
        if keys is not None:
            if msg.next is not None:
                if msg.next.link is None:
                    raise ProtocolError(ErrorCode.BAD_REQUEST, "a sealed push session needs its link secret")
                link_out = crypto.link_keys(bytes.fromhex(msg.next.link), bytes.fromhex(msg.next.session))[0]
            if msg.prev_link is not None:
                link_in = crypto.link_keys(bytes.fromhex(msg.prev_link), bytes.fromhex(msg.session))[1]
        blocks = self.blocks.view(*msg.blocks)
        session = Session(msg.session, blocks, blocks.new_cache(msg.max_length), channel, msg.wire_dtype, msg.next,
                          keys=keys, link_in=link_in, link_out=link_out)
        self.sessions[msg.session] = session
        log.info("opened session %s… (%d tokens, %s, %s); %d sessions, %d cache tokens free", msg.session[:8],
                 msg.max_length, "push" if msg.next else "reply", "sealed" if keys else "PLAINTEXT",
                 len(self.sessions), self.free_tokens)
        await self._to_owner(session, m.Opened(msg.session, msg.max_length))

    async def _step(self, session: Session, msg: m.Step, onion: bytes | memoryview = b"") -> None:
        session.last_used = time.monotonic()
        hidden = msg.hidden
        width = self.blocks.cfg.hidden_size
        if hidden.dim() != 2 or hidden.shape[1] != width or not 1 <= hidden.shape[0] <= self.limits.max_step_tokens:
            raise ProtocolError(ErrorCode.BAD_STEP, f"hidden states must be [n, {width}] with 1 <= n <= "
                                f"{self.limits.max_step_tokens}, got {list(hidden.shape)}")
        sealed_push = session.keys is not None and session.next is not None
        if sealed_push != bool(len(onion)):
            raise ProtocolError(ErrorCode.BAD_REQUEST, "an onion layer for the next hop is needed in sealed push "
                                "mode, and only there")
        layout = StepLayout(msg.start, hidden.shape[0], tuple(msg.parents) if msg.parents is not None else None)
        if msg.compact is not None:
            session.cache.compact(*msg.compact)
        with torch.inference_mode():
            out = session.blocks(hidden.to(self.blocks.device), session.cache, layout)
        if session.next is None:
            await self._to_owner(session, m.Result(session.id, msg.step, out, session.wire_dtype))
            return
        try:
            link = await self._link(session.next.addr)
            if session.keys is not None:
                pushed = m.Result(session.next.session, msg.step, out, session.wire_dtype)
                payload = crypto.pack(m.encode(pushed), bytes(onion))
                await link.send_sealed(session.link_out, payload)
            else:
                await link.send(m.Step(session.next.session, msg.step, msg.start, out, msg.parents, msg.compact,
                                       session.wire_dtype))
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
                            await self._to_owner(s, reply)
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
