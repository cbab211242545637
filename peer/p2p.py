"""A libp2p node (py-libp2p, TCP + Noise + yamux) usable from asyncio.

py-libp2p runs on trio; this module runs one trio event loop in a dedicated thread per
`P2PNode` and makes one coarse crossing per operation (a whole frame per `send`/`recv`,
not one per read). Work goes to trio with `TrioToken.run_sync_soon` and comes back with
`loop.call_soon_threadsafe`, so there is no executor thread in the path.

What it knows: peer identities (Ed25519 key files), dialling and reusing connections,
opening/accepting streams by protocol name, and length-prefixed frames
(`protocol.framing`). What it does not know: models, sessions, routing, what is inside a
frame. Connections are kept open and reused: a fresh dial costs a TCP + Noise + yamux
handshake (a few ms on loopback), while a frame on an open stream costs ~0.2 ms more
than on plain TCP.

Stream errors: `recv` raises EOFError when the remote closed the stream or the
connection went away, ConnectionResetError when the remote reset it, and
`framing.FrameTooLarge` (before reading the body) for an oversize announcement.
A cancelled `send`/`recv` does not break framing: the send completes in the background,
and the frame a cancelled `recv` was reading is returned by the next `recv`.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import threading
from pathlib import Path
from typing import Any, Awaitable, Callable

import multiaddr
import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair, KeyType
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.identity_utils import load_identity, save_identity
from libp2p.network.config import ConnectionConfig
from libp2p.network.stream.exceptions import StreamEOF, StreamReset
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_ID, Transport as Noise
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_ID, Yamux

from protocol import framing

log = logging.getLogger("specswarm.p2p")
DEFAULT_LISTEN = ["/ip4/127.0.0.1/tcp/0"]
PEERSTORE_TTL = 24 * 3600  # seconds a dialled address stays known (libp2p's default is 120)


def load_or_create_identity(path: str | Path | None) -> KeyPair:
    """Ed25519 key pair: loaded from `path` if it exists, else created (and saved there, 0600)."""
    if path is None:
        return create_new_key_pair()
    path = Path(path)
    if not path.exists():
        key_pair = create_new_key_pair()
        save_identity(key_pair, path)  # creates parent dirs, writes with mode 0600
        log.info("created a new peer identity in %s", path)
        return key_pair
    try:
        key_pair = load_identity(path)
    except Exception as exc:
        raise ValueError(f"identity file {path} is not a valid libp2p private key ({exc}); "
                         "move it away to create a new identity (this changes the peer ID)") from exc
    if key_pair.private_key.get_type() != KeyType.Ed25519:
        raise ValueError(f"identity file {path} holds a {key_pair.private_key.get_type().name} key, "
                         "expected Ed25519")
    return key_pair


def _listen_error(maddr: str) -> str:
    """Best guess at why libp2p (which only logs it at debug level) could not listen on `maddr`."""
    try:
        m = multiaddr.Multiaddr(maddr)
        ip6 = "ip6" in {p.name for p in m.protocols()}
        host, port = m.value_for_protocol("ip6" if ip6 else "ip4"), int(m.value_for_protocol("tcp"))
        with socket.socket(socket.AF_INET6 if ip6 else socket.AF_INET) as s:
            s.bind((host, port))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return f"could not listen on {maddr}: address in use (another peer running? pick another port)"
        return f"could not listen on {maddr}: {exc.strerror or exc}"
    except Exception as exc:
        return f"could not listen on {maddr}: {exc} (expected e.g. /ip4/0.0.0.0/tcp/31337)"
    return f"could not listen on {maddr} (libp2p gave no reason; run with DEBUG logging for libp2p)"


def _unwrap(exc: BaseException) -> BaseException:
    """trio nurseries wrap errors in exception groups; callers want the one real error."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


class P2PStream:
    """One libp2p stream carrying length-prefixed frames. One reader at a time; sends are serialised."""

    def __init__(self, node: P2PNode, net_stream: Any, done: trio.Event | None = None):
        self._node, self._s, self._done = node, net_stream, done
        self.remote_peer_id: str = str(net_stream.muxed_conn.peer_id)
        self.protocol: str = str(net_stream.get_protocol())
        self._write_lock = trio.Lock()  # only touched in the trio thread
        self._recv_lock = asyncio.Lock()
        self._pending_recv: asyncio.Future | None = None
        self._closed = False

    async def send(self, payload: bytes) -> None:
        await self._node._call(self._send_trio, payload, cancel=False)

    async def recv(self) -> bytes:
        async with self._recv_lock:
            if self._pending_recv is None:
                self._pending_recv = self._node._submit(self._recv_trio, cancel=False)
            fut = self._pending_recv
            try:
                return await asyncio.shield(fut)
            finally:
                if fut.done():  # otherwise we were cancelled: the next recv() gets this frame
                    self._pending_recv = None

    async def request(self, payload: bytes) -> bytes:
        """send() then recv() in one crossing instead of two (saves ~0.1-0.3 ms per round trip)."""
        async with self._recv_lock:
            if self._pending_recv is not None:
                raise RuntimeError("request() while a cancelled recv() still has a frame to deliver")
            return await self._node._call(self._request_trio, payload, cancel=False)

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                await self._node._call(self._close_trio, cancel=False)
            except ConnectionError:
                pass  # node already closed

    async def _send_trio(self, payload: bytes) -> None:
        async with self._write_lock:
            try:
                await self._s.write(framing.header(len(payload)) + bytes(payload))
            except Exception as exc:
                # libp2p marks a failed write locally but tells the remote nothing, which would leave
                # it waiting forever for the rest of the frame: reset so its recv() fails too.
                with trio.CancelScope(shield=True):
                    await self._s.reset()
                if isinstance(exc, StreamReset):  # also raised when yamux's 5 s flow-control wait expires
                    raise ConnectionResetError(f"stream to {self.remote_peer_id} was reset (the remote "
                                               "did not read for 5 s, or reset the stream)") from exc
                raise EOFError(f"stream to {self.remote_peer_id} is closed ({exc!r})") from exc

    async def _request_trio(self, payload: bytes) -> bytes:
        await self._send_trio(payload)
        return await self._recv_trio()

    async def _recv_trio(self) -> bytes:
        length = framing.parse_header(await self._read_exactly(framing.HEADER_SIZE, True), self._node.max_frame)
        return await self._read_exactly(length, False)

    async def _read_exactly(self, n: int, frame_start: bool) -> bytes:
        chunks, got = [], 0
        while got < n:
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
            async with self._write_lock:  # let a background send finish first
                await self._s.close()
        except Exception as exc:
            log.debug("closing stream to %s: %r", self.remote_peer_id, exc)
        finally:
            if self._done is not None:
                self._done.set()


class P2PNode:
    """A libp2p host in its own trio thread. Create with `await P2PNode.start(...)`."""

    def __init__(self, key_pair: KeyPair, max_frame: int):
        self.key_pair, self.max_frame = key_pair, max_frame
        self.peer_id: str = str(ID.from_pubkey(key_pair.public_key))
        self.addrs: list[str] = []
        self._handlers: dict[str, Callable[[P2PStream], Awaitable[None]]] = {}
        self._tasks: set[asyncio.Task] = set()
        self._closed = False

    @classmethod
    async def start(cls, identity: str | Path | None = None, listen: list[str] | None = None,
                    max_frame: int = framing.DEFAULT_MAX_FRAME) -> P2PNode:
        node = cls(load_or_create_identity(identity), max_frame)
        node._loop = asyncio.get_running_loop()
        started = node._loop.create_future()
        node._stopped = node._loop.create_future()
        node._thread = threading.Thread(target=node._thread_main, args=(list(listen or DEFAULT_LISTEN), started),
                                        name=f"p2p-trio-{node.peer_id[-6:]}", daemon=True)
        node._thread.start()
        try:
            await started
        except BaseException:
            await asyncio.shield(node._stopped)
            node._thread.join()
            raise
        log.info("peer %s listening on %s", node.peer_id, ", ".join(node.addrs))
        return node

    # ---- asyncio-facing API ----

    async def connect(self, maddr: str) -> str:
        """Dial a full multiaddr (…/p2p/<peer id>) unless already connected; returns the peer id."""
        try:
            info = info_from_p2p_addr(multiaddr.Multiaddr(maddr))
        except Exception as exc:
            raise ValueError(f"not a peer address: {maddr!r} (expected /ip4/<ip>/tcp/<port>/p2p/<peer id>)") from exc
        await self._call(self._connect_trio, info, maddr)
        return str(info.peer_id)

    async def open_stream(self, peer: str, protocol: str) -> P2PStream:
        """Open a stream to `peer` (a peer id we know addresses for, or a full multiaddr)."""
        if peer.startswith("/"):
            peer = await self.connect(peer)
        return await self._call(self._open_stream_trio, ID.from_base58(peer), protocol)

    def set_stream_handler(self, protocol: str, handler: Callable[[P2PStream], Awaitable[None]]) -> None:
        """`await handler(stream)` runs on the start() loop for each incoming stream; the stream is closed after."""
        self._handlers[protocol] = handler
        # A plain dict assignment inside libp2p (multiselect.handlers[protocol] = fn): safe from
        # this thread, and effective before set_stream_handler returns.
        self._host.set_stream_handler(protocol, self._on_stream_trio)

    async def run_trio(self, async_fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        """Run `await async_fn(*args)` in the trio thread (it may use self.host); returns its result."""
        return await self._call(async_fn, *args)

    @property
    def host(self) -> Any:
        """The libp2p host. Touch it only from trio code run via run_trio()."""
        return self._host

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._token.run_sync_soon(self._stop_event.set)
        except trio.RunFinishedError:
            pass
        await asyncio.shield(self._stopped)
        self._thread.join()
        for task in list(self._tasks):
            task.cancel()
        log.info("peer %s stopped", self.peer_id)

    # ---- the asyncio <-> trio bridge ----

    def _submit(self, async_fn: Callable[..., Awaitable[Any]], *args: Any, cancel: bool = True) -> asyncio.Future:
        """Start `async_fn(*args)` in the trio thread; the returned future gets its outcome."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        scope = trio.CancelScope()

        def deliver(ok: bool, value: Any) -> None:  # trio thread
            def settle() -> None:
                if not fut.done():
                    fut.set_result(value) if ok else fut.set_exception(value)
            try:
                loop.call_soon_threadsafe(settle)
            except RuntimeError:  # the asyncio loop is gone; nobody is waiting
                pass

        async def runner() -> None:  # trio thread
            try:
                with scope:
                    deliver(True, await async_fn(*args))
                    return
                deliver(False, asyncio.CancelledError())
            except trio.Cancelled:
                deliver(False, ConnectionError(f"p2p node {self.peer_id} is closing"))
                raise
            except BaseException as exc:  # a failure must reach the caller, not kill the node
                deliver(False, _unwrap(exc))

        def spawn() -> None:  # trio thread
            try:
                self._nursery.start_soon(runner)
            except RuntimeError:
                deliver(False, ConnectionError(f"p2p node {self.peer_id} is closed"))

        if self._closed:
            fut.set_exception(ConnectionError(f"p2p node {self.peer_id} is closed"))
            return fut
        try:
            self._token.run_sync_soon(spawn)
        except trio.RunFinishedError:
            fut.set_exception(ConnectionError(f"p2p node {self.peer_id} is closed"))
        if cancel:
            def on_done(f: asyncio.Future) -> None:
                if f.cancelled():
                    try:
                        self._token.run_sync_soon(scope.cancel)
                    except trio.RunFinishedError:
                        pass
            fut.add_done_callback(on_done)
        return fut

    async def _call(self, async_fn: Callable[..., Awaitable[Any]], *args: Any, cancel: bool = True) -> Any:
        fut = self._submit(async_fn, *args, cancel=cancel)
        return await (fut if cancel else asyncio.shield(fut))

    # ---- trio thread ----

    def _thread_main(self, listen: list[str], started: asyncio.Future) -> None:
        def report(fut: asyncio.Future, exc: BaseException | None) -> None:
            def settle() -> None:
                if not fut.done():
                    fut.set_result(None) if exc is None else fut.set_exception(exc)
            try:
                self._loop.call_soon_threadsafe(settle)
            except RuntimeError:  # the asyncio loop is gone
                pass

        self._start_error: BaseException | None = None
        try:
            trio.run(self._trio_main, listen, lambda: report(started, None))
            report(started, self._start_error or ConnectionError("p2p node stopped before it started"))
        except BaseException as exc:
            exc = _unwrap(exc)
            if self.addrs:  # it was running: nobody awaits this, so say it here
                log.error("p2p node %s stopped unexpectedly: %r", self.peer_id, exc, exc_info=exc)
            report(started, exc)
        finally:
            report(self._stopped, None)

    async def _trio_main(self, listen: list[str], on_started: Callable[[], None]) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop_event = trio.Event()
        try:
            maddrs = [multiaddr.Multiaddr(a) for a in listen]
        except Exception as exc:
            raise ValueError(f"bad listen address in {listen}: {exc}") from exc
        self._host = host = new_host(
            key_pair=self.key_pair, listen_addrs=maddrs,
            sec_opt={NOISE_ID: Noise(self.key_pair, noise_privkey=create_x25519_key_pair().private_key)},
            muxer_opt={YAMUX_ID: Yamux},
            # One connection per peer: also makes dial_peer stop its 250 ms happy-eyeballs wait early.
            connection_config=ConnectionConfig(max_connections_per_peer=1))
        async with host.run(listen_addrs=maddrs), trio.open_nursery() as nursery:
            self._nursery = nursery
            bound = {str(m) for m in host.get_network().listeners}
            missing = [a for a in listen if str(multiaddr.Multiaddr(a)) not in bound]
            for a in missing:
                log.error(_listen_error(a))
            if len(missing) == len(listen):
                self._start_error = OSError(_listen_error(missing[0]))
                return  # raising here would come out wrapped in an ExceptionGroup
            self.addrs = [str(a) for a in host.get_addrs()]
            on_started()
            await self._stop_event.wait()
            nursery.cancel_scope.cancel()

    async def _connect_trio(self, info: Any, maddr: str) -> None:
        host = self._host
        host.get_peerstore().add_addrs(info.peer_id, info.addrs, PEERSTORE_TTL)
        if any(not c.is_closed for c in host.get_network().get_connections(info.peer_id)):
            return
        # An explicit connect should try again even if an earlier dial failed recently
        # (libp2p refuses to redial a failed peer for 60 s otherwise).
        cache = getattr(host.get_network(), "_negative_peer_cache", None)
        if cache is not None:
            cache.evict(str(info.peer_id))
        try:
            await host.connect(info)
        except Exception as exc:
            raise ConnectionError(f"could not connect to {maddr}: {exc} "
                                  "(is the peer running and the port reachable?)") from exc
        host.get_peerstore().add_addrs(info.peer_id, info.addrs, PEERSTORE_TTL)  # connect() set 120 s
        log.debug("connected to %s", maddr)

    async def _open_stream_trio(self, peer_id: ID, protocol: str) -> P2PStream:
        try:
            s = await self._host.new_stream(peer_id, [protocol])
        except Exception as exc:
            raise ConnectionError(f"could not open a {protocol} stream to {peer_id}: {exc}") from exc
        return P2PStream(self, s)

    async def _on_stream_trio(self, net_stream: Any) -> None:
        done = trio.Event()
        stream = P2PStream(self, net_stream, done)
        handler = self._handlers.get(stream.protocol)
        if handler is None:
            await net_stream.reset()
            return
        self._loop.call_soon_threadsafe(self._spawn_handler, handler, stream)
        await done.wait()  # keep libp2p's handler alive until the asyncio side closes the stream

    def _spawn_handler(self, handler: Callable[[P2PStream], Awaitable[None]], stream: P2PStream) -> None:
        async def run() -> None:
            try:
                await handler(stream)
            except (EOFError, ConnectionError) as exc:
                log.debug("%s stream from %s ended: %r", stream.protocol, stream.remote_peer_id, exc)
            except Exception:
                log.exception("%s handler failed on a stream from %s", stream.protocol, stream.remote_peer_id)
            finally:
                await stream.close()
        task = self._loop.create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
