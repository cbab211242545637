"""One libp2p stream as our `Stream` (send/recv/close of length-prefixed frames), usable from asyncio.

Every operation crosses into the node's trio thread once, coarsely: a whole frame per `send`/`recv`,
never one read at a time. Errors: `recv` raises EOFError when the remote closed the stream or the
connection died, ConnectionResetError when the stream was reset, `framing.FrameTooLarge` from the header
alone (the stream is then reset), TimeoutError when a started frame stalls (`node.frame_timeout`). A
cancelled `send` or `recv` does not break the framing (see peer/p2p.py).

Knows py-libp2p's stream API, trio and the framing; nothing of what frames hold. The node (peer/p2p.py)
makes these; only its `_call`/`_submit` (run in the trio thread), `frame_timeout` and `max_frame` are used.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import TYPE_CHECKING, Any

import trio
from libp2p.network.stream.exceptions import StreamEOF, StreamReset

from protocol import framing

if TYPE_CHECKING:
    from peer.p2p import P2PNode

log = logging.getLogger("specswarm.p2p")


class P2PStream:
    """One libp2p stream carrying length-prefixed frames. One reader at a time; sends are serialised."""

    def __init__(self, node: P2PNode, net_stream: Any, done: trio.Event | None = None):
        self._node, self._s, self._done = node, net_stream, done  # done: set when an inbound stream ends
        self.remote_peer_id: str = str(net_stream.muxed_conn.peer_id)
        self.protocol: str = str(net_stream.get_protocol())
        self._write_lock = trio.Lock()  # used in the trio thread only
        self._recv_lock = asyncio.Lock()
        self._pending_recv: asyncio.Future | None = None
        self._closed = False

    async def send(self, payload: bytes) -> None:
        await self._node._call(self._send_trio, payload, cancel=False)

    async def recv(self) -> bytes:
        async with self._recv_lock:
            if self._pending_recv is None:
                self._pending_recv = self._node._submit(self._recv_trio, cancel=False)
                # if our caller is cancelled and nobody calls recv() again, the outcome (often EOF
                # once the stream closes) must still count as retrieved, or asyncio logs it
                self._pending_recv.add_done_callback(lambda f: f.cancelled() or f.exception())
            fut = self._pending_recv
            try:
                return await asyncio.shield(fut)
            finally:
                if fut.done():  # else we were cancelled, and the next recv() returns this frame
                    self._pending_recv = None

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                await self._node._call(self._close_trio, cancel=False)
            except ConnectionError:
                pass  # the node is closed, and the stream with it

    # trio thread

    async def _send_trio(self, payload: bytes) -> None:
        async with self._write_lock:
            try:
                await self._s.write(b"".join((framing.header(len(payload)), payload)))  # one copy
            except Exception as exc:
                # libp2p marks a failed write locally but tells the remote nothing, which would leave
                # it waiting for the rest of the frame forever: reset so that its recv() fails too.
                with trio.CancelScope(shield=True):
                    await self._s.reset()
                if isinstance(exc, StreamReset):  # also what yamux's 5 s flow-control timeout gives
                    raise ConnectionResetError(f"stream to {self.remote_peer_id} was reset (by the remote, "
                                               "or because it read nothing for 5 s)") from exc
                raise EOFError(f"stream to {self.remote_peer_id} is closed ({exc!r})") from exc

    async def _recv_trio(self) -> bytes:
        first = await self._read_exactly(1, True)  # waiting for a frame to start has no limit...
        timeout = self._node.frame_timeout
        with trio.move_on_after(timeout if timeout is not None else math.inf) as scope:  # ...its rest has
            head = first + await self._read_exactly(framing.HEADER_SIZE - 1, False)
            try:
                length = framing.parse_header(head, self._node.max_frame)
            except framing.FrameTooLarge:
                await self._s.reset()  # the framing is lost: stop the sender rather than drain its body
                raise
            return await self._read_exactly(length, False)
        if scope.cancelled_caught:
            with trio.CancelScope(shield=True):
                await self._s.reset()
            raise TimeoutError(f"a frame from {self.remote_peer_id} took over {timeout:.0f} s to arrive")

    async def _read_exactly(self, n: int, frame_start: bool) -> bytes:
        chunks, got = [], 0
        while got < n:  # libp2p's read(n) returns at most n bytes, often fewer
            try:
                chunk = await self._s.read(n - got)
            except StreamReset as exc:
                raise ConnectionResetError(f"stream from {self.remote_peer_id} was reset") from exc
            except StreamEOF:
                chunk = b""
            if not chunk:
                where = "" if frame_start and got == 0 else f" inside a frame ({got} of {n} bytes)"
                raise EOFError(f"stream from {self.remote_peer_id} closed{where}")
            chunks.append(chunk)
            got += len(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def _close_trio(self) -> None:
        try:
            async with self._write_lock:  # after a send still under way (one whose caller was cancelled)
                await self._s.close()
        except Exception as exc:
            log.debug("closing a stream to %s: %r", self.remote_peer_id, exc)
        finally:
            if self._done is not None:
                self._done.set()
