"""WebRTC links and their streams (issue 15): one `RtcLink` is one RTCPeerConnection (ICE + DTLS + SCTP)
to one remote peer; every `RtcStream` on it is one reliable, ordered RTCDataChannel carrying
length-prefixed frames (`protocol.framing`), with the interface of `peer.tcp.TcpStream`: send(bytes),
recv() -> bytes, close(). Links are made by `peer.webrtc` (`connect`, `RtcAcceptor`), which signals them.

A stream is a byte stream cut into binary messages of at most CHUNK bytes (aiortc's SCTP limits a
message to the remote's max-message-size, 64 KiB by default), with flow control of its own: aiortc's
SCTP has none that works (its receive window never closes: every message is handed over at once) and
its congestion window grows until UDP datagrams are dropped at the receiver's socket, and a loss at
the end of a burst costs a 1 s retransmission timeout. So a sender has at most `window` bytes the
receiver has not yet taken in flight, and never more than `window` beyond what the receiver's reader
consumed plus the frame it is reading: the receiver grants credit, text messages holding the total
bytes the sender may have sent, each time the limit moved by a quarter window. A sender that ignores
its credit gets the stream reset. Memory per stream is thus at most one frame plus a window. WINDOW is
part of the protocol (both ends assume it) and a trade-off: measured between two processes, 256 KiB in
flight still overflowed a default UDP socket buffer (aioice asks for 256 KiB) now and then, 128 KiB never
did; a stream's throughput is at most WINDOW / round trip (2.6 MB/s at 50 ms), and the windows of
concurrent bulk streams on one link add up.

Other aiortc facts: a new channel is usable once the remote acknowledged it (one round trip); a peer
that vanishes without closing is noticed by ICE consent checks, after ~30 s.

Knows aiortc's peer connection and data channels, and the framing; nothing of signalling, libp2p,
models, sessions or routing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable

from aiortc import RTCPeerConnection
from aiortc.exceptions import InvalidStateError

from peer.tcp import DEFAULT_FRAME_TIMEOUT
from protocol.framing import DEFAULT_MAX_FRAME, HEADER_SIZE, FrameTooLarge, header, parse_header

log = logging.getLogger("specswarm.webrtc")

CHUNK = 16 * 1024  # bytes per SCTP message (aiortc cuts each into ~1.2 KB DATA chunks anyway)
WINDOW = 128 * 1024  # bytes in flight per stream (see the module docstring for why not more)
OPEN_TIMEOUT = 10.0  # seconds for a new data channel to open
Handler = Callable[["RtcStream"], Awaitable[None]]


# --- streams -------------------------------------------------------------------------------------------------

class RtcStream:
    """Frames over one reliable ordered RTCDataChannel. One reader at a time; sends are serialised.

    recv: EOFError once the channel or its link closed (after the frames that arrived before);
    TimeoutError when a frame's last byte comes over `frame_timeout` s after its first;
    FrameTooLarge from the header alone (the stream is then reset); ConnectionResetError after the
    remote broke the flow control. send: waits for credit (a reader that does not read stops its
    sender); BrokenPipeError on a closed stream. A cancelled send still completes and a cancelled
    recv consumes nothing, so cancelling never breaks the framing.
    """

    def __init__(self, channel: Any, link: "RtcLink | None" = None, max_frame: int = DEFAULT_MAX_FRAME,
                 frame_timeout: float | None = DEFAULT_FRAME_TIMEOUT, window: int = WINDOW):
        self.channel, self.link, self.max_frame, self.frame_timeout = channel, link, max_frame, frame_timeout
        self.window = window  # both ends must use the same value
        self.remote_peer_id: str | None = link.remote_peer_id if link else None
        self._buf = bytearray()
        self._first_byte_at = 0.0  # when the first byte of the frame at the head of _buf arrived
        self._error: BaseException | None = None  # raised by recv once _buf has no whole frame left
        self._eof = False
        self._data = asyncio.Event()  # bytes arrived, or EOF
        # byte counts since the stream opened: receiving, then sending
        self._received = self._consumed = 0
        self._granted = window  # the sender may send up to this; told in credit messages
        self._sent, self._credit = 0, window
        self._credited = asyncio.Event()  # credit came, or the channel closed
        self._opened = asyncio.Event()
        self._send_lock = asyncio.Lock()
        self._sending = 0  # sends queued for or holding _send_lock
        self._closed = False
        channel.on("message", self._on_message)
        channel.on("close", self._on_close)
        if channel.readyState == "open":
            self._opened.set()
        else:
            channel.on("open", self._opened.set)

    @property
    def path(self) -> str:
        return self.link.path if self.link else "webrtc"

    # aiortc callbacks: they must not raise (pyee would turn it into an 'error' event inside SCTP)

    def _on_message(self, data: bytes | str) -> None:
        if isinstance(data, str):  # credit: the total bytes we may have sent
            if data.isdigit() and int(data) > self._credit:
                self._credit = int(data)
                self._credited.set()
            return
        if self._eof:
            return
        self._received += len(data)
        if self._received > self._granted:
            log.warning("WebRTC stream from %s: the remote sent %d bytes beyond its credit; resetting the stream",
                        self.remote_peer_id, self._received - self._granted)
            self._fail(ConnectionResetError(f"the remote sent {self._received - self._granted} bytes beyond "
                                            "its credit"))
            return
        if not self._buf:
            self._first_byte_at = time.monotonic()
        self._buf += data
        self._data.set()
        self._grant()

    def _grant(self) -> None:
        """Tell the sender how far it may go, once that moved by a quarter window: `window` beyond what
        arrived, and beyond what was consumed plus the frame at the head of the buffer."""
        head = 0
        if len(self._buf) >= HEADER_SIZE:
            length = int.from_bytes(self._buf[:HEADER_SIZE], "big")
            head = HEADER_SIZE + length if length <= self.max_frame else 0
        limit = min(self._received, self._consumed + head) + self.window
        if limit - self._granted >= self.window // 4:
            self._granted = limit
            try:
                self.channel.send(str(limit))
            except (InvalidStateError, ConnectionError):
                pass  # closing: no more credit needed

    def _on_close(self) -> None:
        self._set_eof()
        if self.link:
            self.link._streams.discard(self)

    def _set_eof(self) -> None:
        self._eof = True
        self._opened.set()
        self._data.set()
        self._credited.set()

    def _fail(self, error: BaseException) -> None:
        """Reset: drop what is buffered, close the channel; recv raises `error` from now on."""
        self._error, self._buf = error, bytearray()
        self._set_eof()
        try:
            self.channel.close()
        except Exception:  # noqa: BLE001 - the transport may already be gone
            pass

    async def _wait_open(self, timeout: float) -> None:
        try:
            async with asyncio.timeout(timeout):
                await self._opened.wait()
        except TimeoutError:
            raise ConnectionError(f"WebRTC data channel to {self.remote_peer_id} did not open within "
                                  f"{timeout:.0f} s") from None
        if self.channel.readyState != "open":
            raise ConnectionError(f"WebRTC data channel to {self.remote_peer_id} closed before it opened")

    # Stream interface

    async def send(self, payload: bytes | bytearray | memoryview) -> None:
        data = header(len(payload)) + payload
        if len(data) <= CHUNK and not self._sending and self._sent + len(data) <= self._credit:
            self._send_message(data)  # fast path: one message, nothing queued before it, credit enough
            return
        self._sending += 1
        task = asyncio.ensure_future(self._send_chunks(data))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved even if we are cancelled
        await asyncio.shield(task)

    async def _send_chunks(self, data: bytes) -> None:
        try:
            async with self._send_lock:
                view, pos = memoryview(data), 0
                while pos < len(data):
                    room = self._credit - self._sent
                    if room <= 0:
                        if self._closed or self.channel.readyState != "open":
                            raise BrokenPipeError(f"WebRTC stream to {self.remote_peer_id} is closed")
                        self._credited.clear()
                        await self._credited.wait()
                        continue
                    n = min(CHUNK, room, len(data) - pos)
                    self._send_message(bytes(view[pos:pos + n]))
                    pos += n
        finally:
            self._sending -= 1

    def _send_message(self, data: bytes) -> None:
        if self._closed or self.channel.readyState != "open":
            raise BrokenPipeError(f"WebRTC stream to {self.remote_peer_id} is closed")
        try:
            self.channel.send(data)
        except InvalidStateError:
            raise BrokenPipeError(f"WebRTC stream to {self.remote_peer_id} is closed") from None
        self._sent += len(data)

    async def recv(self) -> bytes:
        """The next frame. Nothing is consumed until a whole frame is here."""
        while True:
            buffered = len(self._buf)
            if buffered >= HEADER_SIZE:
                try:
                    length = parse_header(self._buf[:HEADER_SIZE], self.max_frame)
                except FrameTooLarge as exc:
                    self._fail(ConnectionResetError(f"stream reset after an oversized frame: {exc}"))
                    raise
                end = HEADER_SIZE + length
                if buffered >= end:
                    with memoryview(self._buf) as view:
                        frame = bytes(view[HEADER_SIZE:end])
                    del self._buf[:end]
                    self._consumed += end
                    if self._buf:
                        self._first_byte_at = time.monotonic()
                    if not self._eof:
                        self._grant()
                    return frame
            if self._error is not None:
                raise type(self._error)(*self._error.args)
            if self._eof:
                raise EOFError("WebRTC stream closed" + (f" {buffered} bytes into a frame" if buffered else ""))
            self._data.clear()
            if buffered and self.frame_timeout is not None:
                left = self._first_byte_at + self.frame_timeout - time.monotonic()
                try:
                    if left <= 0:
                        raise TimeoutError
                    async with asyncio.timeout(left):
                        await self._data.wait()
                except TimeoutError:
                    raise TimeoutError(f"a frame took over {self.frame_timeout:g} s to arrive") from None
            else:
                await self._data.wait()

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._set_eof()
            if self.link is not None and self.link.closed:
                return  # the connection's close ends every channel (a reset now would race with it)
            try:
                self.channel.close()  # frames already sent are delivered before the reset
            except Exception:  # noqa: BLE001 - the link may already be gone
                pass


# --- links ---------------------------------------------------------------------------------------------------

def selected_pair(pc: RTCPeerConnection) -> tuple[str, str, tuple[str, int], tuple[str, int]] | None:
    """(local type, remote type, local (host, port), remote (host, port)) of the nominated ICE pair, from
    aiortc/aioice internals; None when not connected or when those internals changed."""
    try:
        pair = pc.sctp.transport.transport._connection._nominated.get(1)
        if pair is None:
            return None
        local, remote = pair.local_candidate, pair.remote_candidate
        return (str(local.type), str(remote.type), (str(local.host), int(local.port)),
                (str(remote.host), int(remote.port)))
    except Exception:  # noqa: BLE001 - private attributes: tolerate any change
        return None


def path_of(pair: tuple[str, str, Any, Any] | None) -> str:
    """"webrtc-turn" when either side of the pair is a TURN relay candidate, else "webrtc"."""
    return "webrtc-turn" if pair and "relay" in pair[:2] else "webrtc"


class RtcLink:
    """One RTCPeerConnection to one remote peer, carrying many streams. Made by `connect` or
    `RtcAcceptor.handle`. Incoming streams (channels the remote opens) go to `on_stream`, each in its
    own task (the stream is closed when it returns); without `on_stream` they are refused. When the
    connection fails or closes, every stream's recv raises EOFError."""

    def __init__(self, pc: RTCPeerConnection, remote_peer_id: str | None = None, on_stream: Handler | None = None,
                 max_frame: int = DEFAULT_MAX_FRAME, frame_timeout: float | None = DEFAULT_FRAME_TIMEOUT):
        self.pc, self.remote_peer_id, self.on_stream = pc, remote_peer_id, on_stream
        self.max_frame, self.frame_timeout = max_frame, frame_timeout
        self.path = "webrtc"
        self.pair: tuple[str, str, tuple[str, int], tuple[str, int]] | None = None
        self._streams: set[RtcStream] = set()
        self._tasks: set[asyncio.Task] = set()
        self._connected: asyncio.Future = asyncio.get_running_loop().create_future()
        self._connected.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._closing = False
        self._closed = asyncio.Event()
        self._close_task: asyncio.Future | None = None
        self._close_callbacks: list[Callable[[RtcLink], None]] = []
        pc.on("connectionstatechange", self._on_state)
        pc.on("datachannel", self._on_datachannel)

    @property
    def closed(self) -> bool:
        return self._closing

    def on_close(self, callback: Callable[["RtcLink"], None]) -> None:
        """Call `callback(link)` once the link is closed (at once if it already is)."""
        if self._closed.is_set():
            callback(self)
        else:
            self._close_callbacks.append(callback)

    async def wait_closed(self) -> None:
        await self._closed.wait()

    def _on_state(self) -> None:
        state = self.pc.connectionState
        if state == "connected" and not self._connected.done():
            self.pair = selected_pair(self.pc)
            self.path = path_of(self.pair)
            self._connected.set_result(None)
        elif state in ("failed", "closed"):
            if not self._connected.done():
                self._connected.set_exception(ConnectionError(f"connection {state}"))
            elif not self._closing:
                log.info("WebRTC link to %s %s", self.remote_peer_id, "failed (ICE consent or DTLS lost)"
                         if state == "failed" else "closed by the remote")
            if not self._closing:
                self._close_task = asyncio.ensure_future(self.close())  # referenced: not collected mid-way

    def _on_datachannel(self, channel: Any) -> None:
        if self.on_stream is None or self._closing:
            channel.close()
            return
        stream = self._adopt(channel)
        task = asyncio.ensure_future(self._serve(stream))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, stream: RtcStream) -> None:
        try:
            await self.on_stream(stream)
        except Exception:  # noqa: BLE001 - a handler's failure never takes the link down
            log.exception("WebRTC stream handler for %s failed", self.remote_peer_id)
        finally:
            await stream.close()

    def _adopt(self, channel: Any) -> RtcStream:
        stream = RtcStream(channel, self, self.max_frame, self.frame_timeout)
        self._streams.add(stream)
        return stream

    async def open_stream(self, timeout: float = OPEN_TIMEOUT) -> RtcStream:
        """A new stream (data channel); returns once the remote has acknowledged it (one round trip)."""
        if self._closing:
            raise ConnectionError(f"WebRTC link to {self.remote_peer_id} is closed")
        stream = self._adopt(self.pc.createDataChannel("specswarm", ordered=True))
        try:
            await stream._wait_open(timeout)
        except BaseException:
            await stream.close()
            raise
        return stream

    async def wait_connected(self) -> None:
        """Until ICE and DTLS are up; ConnectionError if the connection failed or closed first."""
        await asyncio.shield(self._connected)

    async def close(self) -> None:
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        for stream in list(self._streams):
            stream._set_eof()
        for task in list(self._tasks):
            task.cancel()
        try:
            await self.pc.close()
        except Exception as exc:  # noqa: BLE001 - closing must not fail
            log.debug("closing the WebRTC connection to %s: %r", self.remote_peer_id, exc)
        self._closed.set()
        for callback in self._close_callbacks:
            try:
                callback(self)
            except Exception:  # noqa: BLE001
                log.exception("WebRTC link close callback failed")
        self._close_callbacks.clear()
