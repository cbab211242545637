"""Which path carries inference streams to a peer, chosen by measurement, and the streams on it.

In order of preference (issue 15):
  direct       the peer's `tcp://` data port, or a libp2p connection that is not relayed
  webrtc       a WebRTC data channel whose ICE pair is host/server-reflexive: a hole punched through
               the NATs on both sides, with the SDP offer/answer carried over the libp2p connection
               (through the relay: `SIGNAL_PROTOCOL`)
  webrtc-turn  the same channel through a TURN server (`--turn`), for NATs that defeat hole punching
  relay        a libp2p stream through the Circuit Relay v2 relay itself: always there, the slowest
A relayed libp2p connection is upgraded once per peer: the WebRTC link is negotiated (bounded by
`UPGRADE_TIMEOUT`), then one Info round trip on it and one on the relay decide (the faster wins; ICE
already preferred host over srflx over relay pairs). A dial waits up to `UPGRADE_WAIT` s for it (ICE
takes well under a second where it works), then goes through the relay while the upgrade goes on in the
background. A failed upgrade is not retried for `RETRY_AFTER` seconds; the relay serves meanwhile. Every later stream to that peer is a new data channel on the
same link (no new ICE). Sealing is end to end above all this: a relay or TURN server sees ciphertext.

The serving side (`serve`) answers offers with a `webrtc.RtcAcceptor` and hands each data channel to
the same handler as any inference stream. STUN: `--stun URL`, else a public peer's own STUN server
(`peer/stun.py`; learnt from its record: `learn_stun`), else none (host candidates only).

Knows P2PNode (connect, connection_path, streams by protocol), peer/webrtc.py and the Info message;
nothing of sessions, routes, records or models.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

from peer.tcp import TcpStream
from protocol import messages as m
from protocol.framing import DEFAULT_MAX_FRAME

log = logging.getLogger("specswarm.paths")
SIGNAL_PROTOCOL = "/specswarm/webrtc-signal/1.0.0"
INFERENCE_PROTOCOL = "/specswarm/inference/1.0.0"  # (peer/transport.py's; repeated to avoid an import cycle)
PATHS = ("direct", "webrtc", "webrtc-turn", "relay")
UPGRADE_TIMEOUT = 12.0  # seconds for the offer/answer and ICE (aiortc gathers every candidate first)
UPGRADE_WAIT = 4.0  # seconds a dial waits for an upgrade under way; later dials use the link once it is up
RETRY_AFTER = 300.0  # seconds before a failed upgrade to a peer is tried again


@dataclass(frozen=True)
class PathSettings:
    """What a process may use to reach peers behind NATs (flags --no-webrtc, --stun, --turn ...)."""

    webrtc: bool = True  # upgrade relayed connections to WebRTC data channels
    stun: str | None = None  # "stun:HOST:PORT"; None: a public peer's, learnt from records
    turn: str | None = None  # "turn:HOST:PORT"
    turn_user: str | None = None
    turn_password: str | None = None

    def __post_init__(self):
        if self.stun or self.turn:
            self.ice()  # ValueError, one line, for a bad URL

    def ice(self, swarm_stun: str | None = None):
        from peer.webrtc import IceConfig  # aiortc is heavy: loaded when a link is made

        return IceConfig.parse(self.stun or swarm_stun, self.turn, self.turn_user, self.turn_password)


def peer_id_at(addr: str) -> str:
    """The peer id a libp2p multiaddr ends in (ValueError if none)."""
    head, sep, pid = addr.rpartition("/p2p/")
    if not sep or not pid or "/" in pid:
        raise ValueError(f"not a peer address: {addr!r} (expected a multiaddr ending in /p2p/<peer id>)")
    return pid


class Paths:
    """One per process: dials inference streams over the best path to each peer (`dial`), remembers
    which (`path_of`), and, on a serving peer, answers WebRTC offers (`serve`)."""

    def __init__(self, node, settings: PathSettings = PathSettings(), max_frame: int = DEFAULT_MAX_FRAME):
        self.node, self.settings, self.max_frame = node, settings, max_frame
        self.swarm_stun: str | None = None
        self.links: dict[str, object] = {}  # peer id -> RtcLink
        self.paths: dict[str, str] = {}  # peer id -> the path its last stream took
        self._retry_at: dict[str, float] = {}
        self._upgrading: dict[str, asyncio.Future] = {}
        self._acceptor = None

    def learn_stun(self, url: str | None, addrs: list[str] | None = None) -> None:
        """A public peer's STUN server (from its record), used unless --stun names one. With `addrs` (the
        peer's own), only on the host of one of its direct addresses: a record must not send our STUN
        requests to some third party's machine."""
        if not url or self.swarm_stun:
            return
        host = url.removeprefix("stun:").rpartition(":")[0].strip("[]")
        if addrs is not None and not any(a.split("/")[2:3] == [host] for a in addrs if "/p2p-circuit" not in a):
            return
        self.swarm_stun = url
        log.info("using the swarm's STUN server %s for WebRTC", url)

    def path_of(self, peer_id: str) -> str | None:
        return self.paths.get(peer_id)

    async def dial(self, addr: str):
        """An inference stream to `addr` (`tcp://` or a multiaddr ending in /p2p/<id>), on the best path."""
        if addr.startswith("tcp://"):
            from peer.transport import parse_tcp_addr

            return await TcpStream.connect(*parse_tcp_addr(addr), max_frame=self.max_frame)
        pid = peer_id_at(addr)
        stream = await self._on_link(pid)
        if stream is not None:
            return stream
        await self.node.connect(addr)
        path = await self.node.connection_path(pid) or "direct"
        if path == "relay" and self.settings.webrtc and time.monotonic() >= self._retry_at.get(pid, 0.0):
            if pid not in self._upgrading:  # one upgrade per peer at a time; it goes on past our wait
                task = self._upgrading[pid] = asyncio.ensure_future(self._upgrade(pid))
                task.add_done_callback(lambda _: self._upgrading.pop(pid, None))
                try:  # (only the dial that started it waits: while it lasts, others take the relay)
                    await asyncio.wait_for(asyncio.shield(task), UPGRADE_WAIT)
                except asyncio.TimeoutError:
                    log.info("WebRTC to %s not up within %.0f s: streams go through the relay meanwhile",
                             pid[-8:], UPGRADE_WAIT)
            stream = await self._on_link(pid)
            if stream is not None:
                return stream
        self.paths[pid] = path
        return await self.node.open_stream(pid, INFERENCE_PROTOCOL)

    async def _on_link(self, pid: str):
        link = self.links.get(pid)
        if link is None:
            return None
        if not link.closed:
            try:
                stream = await link.open_stream()
                self.paths[pid] = link.path
                return stream
            except (ConnectionError, EOFError, OSError, asyncio.TimeoutError) as exc:
                log.info("WebRTC link to %s failed (%s); falling back to the relay", pid[-8:], exc)
        self.links.pop(pid, None)
        return None

    async def _upgrade(self, pid: str) -> None:
        """Try a WebRTC link to a peer we reach through a relay; keep it (in `links`) if it wins."""
        from peer import webrtc

        t0 = time.perf_counter()
        signal = link = None
        try:
            signal = await self.node.open_stream(pid, SIGNAL_PROTOCOL)
            link = await asyncio.wait_for(
                webrtc.connect(signal, self.settings.ice(self.swarm_stun), timeout=UPGRADE_TIMEOUT,
                               max_frame=self.max_frame, remote_peer_id=pid), UPGRADE_TIMEOUT + 2)
            rtc_ms, relay_ms = await self._ping_link(link), await self._ping_relay(pid)
        except Exception as exc:  # noqa: BLE001 - whatever failed, the relay still serves
            self._retry_at[pid] = time.monotonic() + RETRY_AFTER
            log.warning("no WebRTC path to %s (%s) after %.1f s: using the relay (slower); retrying in %.0f s",
                        pid[-8:], exc, time.perf_counter() - t0, RETRY_AFTER)
            if link is not None:
                await link.close()
            return
        finally:
            if signal is not None:
                await signal.close()
        if rtc_ms is None or (relay_ms is not None and relay_ms < rtc_ms):
            log.warning("WebRTC to %s is not faster than its relay (%s vs %s ms): using the relay",
                        pid[-8:], _ms(rtc_ms), _ms(relay_ms))
            await link.close()
            self._retry_at[pid] = time.monotonic() + RETRY_AFTER
            return
        self.links[pid] = link
        log.info("peer %s: %s path (round trip %s ms; %s ms through the relay), set up in %.1f s",
                 pid[-8:], link.path, _ms(rtc_ms), _ms(relay_ms), time.perf_counter() - t0)

    async def _ping_link(self, link) -> float | None:
        stream = await link.open_stream()
        try:
            return await self._ping(stream)
        finally:
            await stream.close()

    async def _ping_relay(self, pid: str) -> float | None:
        try:
            stream = await self.node.open_stream(pid, INFERENCE_PROTOCOL)
        except (ConnectionError, OSError):
            return None
        try:
            return await self._ping(stream)
        finally:
            await stream.close()

    async def _ping(self, stream, timeout: float = 5.0) -> float | None:
        """One Info round trip on `stream` (ms), or None if it failed."""
        try:
            t0 = time.perf_counter()
            await stream.send(m.encode(m.Info()))
            reply = m.decode(await asyncio.wait_for(stream.recv(), timeout))
            return 1000 * (time.perf_counter() - t0) if isinstance(reply, m.InfoReply) else None
        except (ConnectionError, EOFError, OSError, ValueError, asyncio.TimeoutError):
            return None

    def serve(self, handler: Callable[[object, str], Awaitable[None]]) -> None:
        """Answer WebRTC offers (over SIGNAL_PROTOCOL); each data channel is `await handler(stream, name)`."""
        if not self.settings.webrtc:
            return
        from peer import webrtc

        async def on_stream(stream) -> None:
            pid = getattr(stream, "remote_peer_id", None) or "?"
            await handler(stream, f"rtc:{pid[-8:]}")

        self._acceptor = webrtc.RtcAcceptor(self.settings.ice(self.swarm_stun), on_stream, max_frame=self.max_frame)

        async def on_signal(stream) -> None:
            self._acceptor.ice = self.settings.ice(self.swarm_stun)  # the swarm's STUN may be known by now
            await self._acceptor.handle(stream, stream.remote_peer_id)

        self.node.set_stream_handler(SIGNAL_PROTOCOL, on_signal)

    async def close(self) -> None:
        for task in list(self._upgrading.values()):
            task.cancel()
        for link in list(self.links.values()):
            await link.close()
        self.links.clear()
        if self._acceptor is not None:
            await self._acceptor.close()


def _ms(v: float | None) -> str:
    return "?" if v is None else f"{v:.1f}"
