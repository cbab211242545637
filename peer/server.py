"""Serving inference sessions on a block range: the peer's request handler.

A `BlockServer` owns one `BlockRange` and the sessions opened on it. It reads frames from any
stream it is handed (a client's session stream, or the push stream of the previous peer), checks
each step, queues it for the engine (`peer.batching`: steps of sessions that wait together run as
one batch; a stream's reader waits while its queued steps hold `max_step_tokens` positions), and
sends each result, in its session's order, either to the next peer (push mode, over `peer.push`'s
kept-open links) or back to the session's owner; a last hop whose owner asked it to verify rounds
(it holds the head: `peer.verify`) sends the round's verdict instead of the hidden states. Every
error becomes an `Error` reply to whoever should hear it (a step's, to its session's owner alone);
the loop keeps serving.

Every frame takes one path in, `_receive`, which opens it with the codec its kind calls for
(`protocol.sealing`: plaintext; the handshake of a sealed OPEN; the session's own codec for a sealed
client frame; the push link's for a frame from the previous peer, whose onion layer holds this
hop's instructions), and one path out, `Channel.send` with the codec of whoever it is for.
Sessions are sealed end to end by default (docs/security.md). A frame that fails authentication,
or replays an old counter, gets a plaintext error to whoever sent it and changes nothing; once a
frame has proved which session it is about, its errors go to that session's owner (sealed, if the
session is). Limits (sessions in total and per client, cache tokens, rate, connections, frame size
and frame timeout) protect the peer from everyone else.

Knows the model engine, the protocol, channels and the verifier (`peer.verify`); nothing about libp2p
or sockets (streams are anything with `send(bytes)`, `recv() -> bytes`, `close()`); clients' tokens
only as a verifying last hop is told them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from peer.batching import Backlog, Batcher, BatchSettings
from peer.channel import Channel, Stream
from peer.limits import Limits, RateLimit, ServeStats
from peer import verify
from peer.model import BlockRange, CacheError, KVCache, ModelHead, StepLayout
from peer.model.quant import announced_dtype
from peer.model.sampling import SamplingParams
from peer.push import PushLinks
from protocol import crypto, sealing
from protocol import messages as m
from protocol.crypto import SealError, StaticKey, Type
from protocol.framing import FrameTooLarge
from protocol.messages import ErrorCode, ProtocolError
from protocol.sealing import Codec, PeerHop, Sealed

log = logging.getLogger("specswarm.peer")
SEEN_HANDSHAKES = 1 << 17  # ephemeral keys remembered against replayed opens (32 bytes each, ~8 MiB)


@dataclass
class Session:
    id: str
    blocks: BlockRange  # the span this session asked for (all or part of the peer's)
    cache: KVCache
    owner: Channel
    codec: Codec  # the owner's frames are opened and replies to it sealed with this (Plain, or a PeerHop)
    wire_dtype: str
    next: m.NextHop | None
    link_in: Sealed | None = None  # sealed push mode: opens frames from the previous peer
    link_out: Codec | None = None  # push mode: seals frames to the next peer
    last_used: float = field(default_factory=time.monotonic)
    last_reply: asyncio.Task | None = None  # its latest step's reply task: each waits for the one before (order)
    verify: SamplingParams | None = None  # the last hop verifies rounds here and answers with verdicts (peer.verify)

    @property
    def sealed(self) -> bool:
        return self.codec.sealed


Received = tuple[m.Message, memoryview, Codec, Session | None]  # what `BlockServer._receive` lets through


class _Refusal:
    """Who hears that a frame failed: its sender in plaintext, until the frame proves which session
    it is about (then that session's owner) or completes a handshake (then the opener, sealed)."""

    def __init__(self, channel: Channel, codec: Codec):
        self.channel, self.codec = channel, codec
        self.session: Session | None = None
        self.session_id, self.step_id = None, None  # (str | None, int | None)


class BlockServer:
    def __init__(self, blocks: BlockRange, model_id: str, limits: Limits = Limits(),
                 open_stream: Callable[[str], Awaitable[Stream]] | None = None, name: str = "peer",
                 key_pair=None, batching: BatchSettings = BatchSettings(), head: ModelHead | None = None):
        self.blocks, self.model_id, self.limits, self.name = blocks, model_id, limits, name
        self.head = head  # final norm and LM head, held with the model's last block: verification here
        self.open_stream = open_stream  # dials the next peer for push mode
        self.data_addr: str | None = None  # set when a direct TCP listener is up
        self.sessions: dict[str, Session] = {}
        self.links = PushLinks(open_stream, self._next_failed)  # kept-open push streams to next peers
        self.max_elements = limits.max_step_tokens * blocks.cfg.hidden_size
        self.plain = sealing.Plain(self.max_elements)
        self.connections = 0
        self.stats = ServeStats(log)  # sessions and tokens served, requests refused (and their log lines)
        self._seen_ephemeral: OrderedDict[bytes, None] = OrderedDict()  # handshakes this process accepted
        self.static = StaticKey()  # this process's X25519 key; the libp2p identity signs it
        self.identity = crypto.sign_static_key(key_pair, self.static.public) if key_pair is not None else (None, None)
        self.batcher = Batcher(batching, self.stats, lambda s: self.sessions.get(s.id) is s, lambda: len(self.sessions))
        self._replies: set[asyncio.Task] = set()  # steps queued or computing, each waiting to send its result

    @property
    def free_tokens(self) -> int:
        return max(0, self.limits.cache_tokens - sum(s.cache.max_length for s in self.sessions.values()))

    # --- the stream loop --------------------------------------------------------------------------
    async def handle(self, stream: Stream, name: str = "stream", client: str | None = None) -> None:
        """Serve one incoming stream until it closes. Never raises."""
        channel = Channel(stream, name, client or getattr(stream, "remote_peer_id", None) or
                          getattr(stream, "remote_host", None))
        if self.connections >= self.limits.max_connections:
            await self._refuse(_Refusal(channel, self.plain), ErrorCode.TOO_MANY_SESSIONS,
                               f"this peer already serves {self.connections} connections")
            await channel.close()
            return
        self.connections += 1
        rate = RateLimit(self.limits.rate, self.limits.burst)
        backlog = Backlog(self.limits.max_step_tokens)
        try:
            while True:
                try:
                    data = await stream.recv()
                except (EOFError, ConnectionError, asyncio.IncompleteReadError, TimeoutError, asyncio.TimeoutError):
                    break
                except FrameTooLarge as e:  # the stream's framing is lost: say why, then hang up
                    await self._refuse(_Refusal(channel, self.plain), ErrorCode.BAD_REQUEST, str(e))
                    break
                wait = rate.delay()
                if wait > 0:  # over its rate: stop reading this connection for a while (backpressure)
                    await asyncio.sleep(wait)
                refusal = _Refusal(channel, self.plain)
                await self._guard(refusal, self._serve(channel, data, refusal, backlog))
                await backlog.room()  # its queued steps are at their bound: read on once some are done
        except Exception:  # noqa: BLE001 - a bug must not take the peer down
            log.exception("stream %s failed", name)
        finally:
            self.connections -= 1
            await channel.close()
            for sid in [s.id for s in self.sessions.values() if s.owner is channel]:
                self._drop(sid, "its client disconnected")

    async def _serve(self, channel: Channel, data: bytes, refusal: _Refusal, backlog: Backlog) -> None:
        msg, onion, codec, session = self._receive(channel, data, refusal)
        if isinstance(msg, m.Info):
            public_key, sig = self.identity
            await self._send(channel, codec, m.InfoReply(
                self.model_id, (self.blocks.start, self.blocks.end), self.blocks.cfg.num_hidden_layers,
                self.free_tokens, announced_dtype(self.blocks.dtype, self.blocks.quant), self.data_addr,
                self.static.public.hex() if sig else None, sig, public_key,
                verify.offers(self.head, self.blocks.end), verify.offers(self.head, self.blocks.end)))
        elif isinstance(msg, m.Open):
            await self._open(channel, msg, codec)
            self.stats.sessions_served += 1  # (_open raises if it refuses)
        elif isinstance(msg, m.Close):
            self._drop(msg.session, "closed by its client")
        else:  # a Step (_receive lets nothing else through)
            self._step(session, msg, onion, refusal, backlog)

    async def _guard(self, refusal: _Refusal, work: Awaitable) -> None:
        """Await `work`; whatever it raises becomes an Error for whoever `refusal` says should hear it."""
        try:
            await work
        except (ProtocolError, CacheError) as e:
            await self._refuse(refusal, getattr(e, "code", ErrorCode.BAD_STEP), str(e))
        except Exception as e:  # noqa: BLE001
            log.exception("internal error while serving %s", refusal.channel.name)
            await self._refuse(refusal, ErrorCode.INTERNAL, f"internal error: {e}")

    def _receive(self, channel: Channel, data: bytes, refusal: _Refusal) -> Received:
        """Open a frame with the codec its kind calls for and check that it may be served: (message,
        onion for the next hop, the codec it came under, its session). `refusal` follows who should hear
        of a failure."""
        if not crypto.is_envelope(data):
            return self._receive_plain(channel, data, refusal)
        env = crypto.parse_envelope(data)
        refusal.session_id = env.session
        if env.type == Type.OPEN:
            if env.session in self.sessions:
                raise SealError("session id already in use", ErrorCode.BAD_REQUEST)
            if env.ephemeral in self._seen_ephemeral:  # a replayed open: it would re-create old keys
                raise SealError("this handshake was already used", ErrorCode.REPLAYED)
            hop, payload = PeerHop.accept(self.static, env, self.max_elements)
            self._seen_ephemeral[env.ephemeral] = None
            if len(self._seen_ephemeral) > SEEN_HANDSHAKES:
                self._seen_ephemeral.popitem(last=False)
            refusal.codec = hop  # authenticated: the opener hears the rest sealed
            msg, rest = hop.read(payload, 0)
            if not isinstance(msg, m.Open) or msg.session != env.session or len(rest):
                raise ProtocolError(ErrorCode.BAD_REQUEST, "a sealed open frame must hold an Open for its session")
            return msg, rest, hop, None
        session = self.sessions.get(env.session)
        if session is None:
            raise SealError(f"no open session {env.session[:8]}… on this peer", ErrorCode.UNKNOWN_SESSION)
        if env.type == Type.C2P:
            if not session.sealed:
                raise SealError("this session is not sealed", ErrorCode.BAD_REQUEST)
            msg, onion = session.codec.open(env)
            refusal.session = session  # authenticated: from here on errors go sealed to the owner
            refusal.step_id = getattr(msg, "step", None)
            if not isinstance(msg, (m.Step, m.Close)) or msg.session != env.session:
                raise ProtocolError(ErrorCode.BAD_REQUEST,
                                    "a sealed client frame holds a Step or Close for its session")
            return msg, onion, session.codec, session
        if env.type == Type.LINK:
            if session.link_in is None:
                raise SealError("this session takes no pushed steps", ErrorCode.BAD_REQUEST)
            pushed, onion = session.link_in.open(env)
            refusal.session = session
            if not isinstance(pushed, m.Result) or pushed.session != env.session:
                raise ProtocolError(ErrorCode.BAD_REQUEST, "a push link frame holds a Result for its session")
            refusal.step_id = pushed.step
            ctrl, onion = session.codec.onion.open(onion)
            if not isinstance(ctrl, m.Control) or ctrl.session != env.session or ctrl.step != pushed.step:
                raise ProtocolError(ErrorCode.BAD_REQUEST, "the onion layer does not hold this step's instructions")
            step = m.Step(env.session, ctrl.step, ctrl.start, pushed.hidden, ctrl.parents, ctrl.compact,
                          check=ctrl.check)
            return step, onion, session.link_in, session
        raise SealError("peers do not accept sealed replies", ErrorCode.BAD_REQUEST)

    def _receive_plain(self, channel: Channel, data: bytes, refusal: _Refusal) -> Received:
        """A plaintext frame: refused for sealed sessions, and for any session on a peer that requires sealing."""
        msg, onion = self.plain.open(data)
        refusal.session_id, refusal.step_id = getattr(msg, "session", None), getattr(msg, "step", None)
        session = self.sessions.get(refusal.session_id) if refusal.session_id else None
        if session is not None and not session.sealed:  # its owner hears of anything wrong with it
            refusal.session = session
        if isinstance(msg, m.Info):
            return msg, onion, self.plain, None
        if not isinstance(msg, (m.Open, m.Step, m.Close)):
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"peers do not accept {type(msg).__name__} messages")
        if session is not None and session.sealed:  # never the owner's: say so to the sender
            refusal.session_id = None
            raise ProtocolError(ErrorCode.BAD_SEAL, "this session is sealed: plaintext requests for it are refused")
        if self.limits.require_encryption and not isinstance(msg, m.Close):
            raise ProtocolError(ErrorCode.ENCRYPTION_REQUIRED, "this peer serves sealed sessions only")
        if isinstance(msg, m.Step) and session is None:
            raise ProtocolError(ErrorCode.UNKNOWN_SESSION, f"no open session {msg.session[:8]}… on this peer")
        if isinstance(msg, m.Close) and session is not None and session.owner is not channel:
            refusal.session = refusal.session_id = None
            raise ProtocolError(ErrorCode.BAD_REQUEST, "only the stream that opened a session may close it")
        return msg, onion, self.plain, session

    async def _refuse(self, refusal: _Refusal, code: str, message: str) -> None:
        """Errors about a session (from a frame that proved it is about it) go to its owner; anything
        else to the sender. Each is counted and logged (`ServeStats.refuse`: a few lines per reason a minute)."""
        self.stats.refuse(code, refusal.channel.name, message)
        msg = m.Error(code, message, refusal.session_id, refusal.step_id, peer=self.name)
        session = refusal.session
        if session is not None and self.sessions.get(session.id) is session:
            await self._send(session.owner, session.codec, msg)
            return
        await self._send(refusal.channel, refusal.codec, msg)

    async def _send(self, channel: Channel, codec: Codec, msg) -> None:
        try:
            await channel.send(codec, msg)
        except Exception:  # noqa: BLE001 - the receiver is gone; nothing more to tell it
            log.debug("could not reply on %s", channel.name)

    # --- requests ---------------------------------------------------------------------------------
    async def _open(self, channel: Channel, msg: m.Open, codec: Codec) -> None:
        if not self.blocks.start <= msg.blocks[0] < msg.blocks[1] <= self.blocks.end:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"this peer serves blocks [{self.blocks.start}, "
                                f"{self.blocks.end}), which do not include {list(msg.blocks)}")
        if msg.session in self.sessions:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "session id already in use")
        context = self.blocks.cfg.max_position_embeddings  # no session runs past it (ContextTooLong)
        if msg.max_length > context:
            raise ProtocolError(ErrorCode.TOO_LONG, f"a session of {msg.max_length} tokens is past this model's "
                                f"context ({msg.max_length} > {context})")
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
        checks = verify.accept_open(self.head, msg)  # the sampling parameters it verifies with, or None
        if msg.next is not None and self.open_stream is None:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "this peer cannot push to a next peer")
        link_in, link_out = None, self.plain if msg.next is not None else None
        if codec.sealed:
            if msg.next is not None:
                if msg.next.link is None:
                    raise ProtocolError(ErrorCode.BAD_REQUEST, "a sealed push session needs its link secret")
                link_out = sealing.link(msg.next.link, msg.next.session)[0]
            if msg.prev_link is not None:
                link_in = sealing.link(msg.prev_link, msg.session, self.max_elements)[1]
        blocks = self.blocks.view(*msg.blocks)
        session = Session(msg.session, blocks, blocks.new_cache(msg.max_length), channel, codec, msg.wire_dtype,
                          msg.next, link_in, link_out, verify=checks)
        self.sessions[msg.session] = session
        log.info("opened session %s… (%d tokens, %s, %s); %d sessions, %d cache tokens free", msg.session[:8],
                 msg.max_length, "push" if msg.next else "reply", "sealed" if codec.sealed else "PLAINTEXT",
                 len(self.sessions), self.free_tokens)
        await self._send(channel, codec, m.Opened(msg.session, msg.max_length))

    def _step(self, session: Session, msg: m.Step, onion: memoryview, refusal: _Refusal, backlog: Backlog) -> None:
        """Check a step against its session and the limits, then queue it; a task sends its result."""
        session.last_used = time.monotonic()
        hidden = msg.hidden
        width = self.blocks.cfg.hidden_size
        if hidden.dim() != 2 or hidden.shape[1] != width or not 1 <= hidden.shape[0] <= self.limits.max_step_tokens:
            raise ProtocolError(ErrorCode.BAD_STEP, f"hidden states must be [n, {width}] with 1 <= n <= "
                                f"{self.limits.max_step_tokens}, got {list(hidden.shape)}")
        if (session.sealed and session.next is not None) != bool(len(onion)):
            raise ProtocolError(ErrorCode.BAD_REQUEST, "an onion layer for the next hop is needed in sealed push "
                                "mode, and only there")
        end = msg.start + hidden.shape[0]
        if end > session.cache.max_length:  # a client bug, not this peer's failure: no failover will help
            raise ProtocolError(ErrorCode.TOO_LONG, f"a step needing {end} positions is past this "
                                f"session's length ({end} > {session.cache.max_length})")
        check = verify.round_check(session.verify, msg, hidden.shape[0], self.blocks.cfg.vocab_size)
        compact = (msg.compact[0], tuple(msg.compact[1])) if msg.compact is not None else None
        layout = StepLayout(msg.start, hidden.shape[0], tuple(msg.parents) if msg.parents is not None else None,
                            compact)
        done = self.batcher.submit(session, hidden, layout)
        backlog.take(layout.n)
        work = self._result(session, msg, onion, done, session.last_reply, check)
        task = session.last_reply = asyncio.get_running_loop().create_task(self._guard(refusal, work))
        self._replies.add(task)
        task.add_done_callback(lambda t: (backlog.give(layout.n), self._replies.discard(t)))

    async def _result(self, session: Session, msg: m.Step, onion: memoryview, done: asyncio.Future,
                      previous: asyncio.Task | None, check=None) -> None:
        """Wait for a queued step's output and, once the session's previous step has been answered (sealed
        counters and onion layers must leave in order), send it on: to the next peer (push mode) or to the owner."""
        await asyncio.wait([done] if previous is None else [done, previous])
        if done.cancelled() or self.sessions.get(session.id) is not session:  # closed or expired: nobody to answer
            return
        out = done.result()  # (or the error its step failed with)
        self.stats.tokens_served += msg.hidden.shape[0]
        nxt = session.next
        if nxt is None:  # the last hop answers the owner: the verdict (verified here), else the hidden states
            reply = m.Result(session.id, msg.step, out, session.wire_dtype) if session.verify is None else \
                await verify.verdict(self.head, session.id, msg, out, session.verify, check)
            await self._send(session.owner, session.codec, reply)
            return
        if session.sealed:  # its layout travels in the onion, sealed for the next hop alone
            pushed = m.Result(nxt.session, msg.step, out, session.wire_dtype)
        else:
            pushed = m.Step(nxt.session, msg.step, msg.start, out, msg.parents, msg.compact, session.wire_dtype,
                            msg.check)
        try:
            link = await self.links.get(nxt.addr)
            await link.send(session.link_out, pushed, onion)
        except Exception as e:  # noqa: BLE001
            self.links.drop(nxt.addr)
            raise ProtocolError(ErrorCode.NEXT_HOP, f"could not push to the next peer {nxt.addr}: {e}") from None

    async def _next_failed(self, reply: m.Error) -> None:
        """A next peer's error about a session we pushed to: to the owner of the session that pushed."""
        for s in list(self.sessions.values()):
            if s.next is not None and s.next.session == reply.session:
                await self._send(s.owner, s.codec, reply)

    def _drop(self, session_id: str, why: str) -> None:
        if self.sessions.pop(session_id, None) is not None:
            log.info("session %s… %s; %d sessions open", session_id[:8], why, len(self.sessions))

    async def end_sessions(self, why: str) -> None:
        """Drop every session and hang up on its owner, whose client fails over at once (a peer that moves)."""
        for s in list(self.sessions.values()):
            self._drop(s.id, why)
            await s.owner.close()

    async def expire_idle(self, every: float = 5.0) -> None:
        while True:
            await asyncio.sleep(every)
            now = time.monotonic()
            for s in list(self.sessions.values()):
                if now - s.last_used > self.limits.session_timeout:
                    self._drop(s.id, f"expired after {self.limits.session_timeout:.0f} s idle")

    def summary(self, final: bool = False) -> str:
        """One line for the operator: sessions, tokens served and their rate, free cache, batches, refusals."""
        return self.stats.summary(len(self.sessions), self.free_tokens, self.limits.cache_tokens, final)

    async def close(self) -> None:
        await self.batcher.close()
        for task in list(self._replies):  # (one may wait on a client that reads no more)
            task.cancel()
        await asyncio.gather(*self._replies, return_exceptions=True)
        await self.links.close()
        self.sessions.clear()
