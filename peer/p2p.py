"""A libp2p node (py-libp2p: TCP + Noise + yamux) usable from asyncio.

py-libp2p runs on trio. Each `P2PNode` runs its own trio loop in a dedicated thread
(`peer.trio_thread`), and every operation crosses over once, coarsely: a whole frame per
`send`/`recv`, never one read at a time.

It knows peer identities (Ed25519 key files), the addresses it listens on and announces (never a
wildcard), dialling and reusing connections (one per peer), streams by protocol name, and
length-prefixed frames (`protocol.framing`). It knows nothing about models, sessions, routing, or
what is inside a frame. Keep connections and streams open: a dial costs ~10-30 ms and a new stream
~3 ms (protocol negotiation), a frame on an open stream ~1-2 ms.

Errors: `recv` raises EOFError when the remote closed the stream or the connection died,
ConnectionResetError when the stream was reset, `framing.FrameTooLarge` from the header alone
(the stream is then reset). Node-level failures raise ConnectionError. A cancelled `send` or
`recv` (e.g. `asyncio.wait_for`) does not break the framing: the send still completes, and the
frame a cancelled `recv` was reading is returned by the next `recv`.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import math
import socket
from pathlib import Path
from typing import Any, Awaitable, Callable, Sequence

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

from peer.addrs import check_announce, concrete as _concrete
from peer.trio_thread import TrioThread, unwrap
from protocol import framing

log = logging.getLogger("specswarm.p2p")
DEFAULT_LISTEN = ["/ip4/127.0.0.1/tcp/0"]
# Told (identify, DHT provider entries) when no address of ours is dialable: py-libp2p's DHT drops a provider
# entry without an address, and no py-libp2p node dials a circuit address (none without a relay in front).
NO_ADDRESS = multiaddr.Multiaddr("/p2p-circuit")
PEERSTORE_TTL = 24 * 3600  # seconds a dialled address is remembered (libp2p's connect() uses 120)
Handler = Callable[["P2PStream"], Awaitable[None]]


class ListenError(OSError):
    """This node cannot listen where it was asked (the port is taken, or the address is not this machine's)."""


def load_or_create_identity(path: str | Path | None) -> KeyPair:
    """Ed25519 key pair from `path`; created there (mode 0600, parent dirs too) if missing. None: ephemeral."""
    if path is None:
        return create_new_key_pair()
    path = Path(path)
    if not path.exists():
        key_pair = create_new_key_pair()
        save_identity(key_pair, path)
        log.info("created a new peer identity in %s", path)
        return key_pair
    try:
        key_pair = load_identity(path)
    except Exception as exc:
        raise ValueError(f"identity file {path} is not a libp2p private key ({exc}); move it away to "
                         "create a new identity (the peer ID will change)") from exc
    if key_pair.private_key.get_type() != KeyType.Ed25519:
        raise ValueError(f"identity file {path} holds a {key_pair.private_key.get_type().name} key, not Ed25519")
    return key_pair


def _bind_problem(maddr: str) -> str | None:
    """Why we cannot listen on TCP `maddr`, found by binding it ourselves; None if we can (or it is not TCP).

    Needed before starting too: libp2p sets SO_REUSEPORT on its listeners, so a second peer on the
    same port would "succeed" and the kernel would split incoming connections between the two.
    """
    try:
        m = multiaddr.Multiaddr(maddr)
        ip = "ip6" if "ip6" in {p.name for p in m.protocols()} else "ip4"
        host, port = m.value_for_protocol(ip), int(m.value_for_protocol("tcp"))
    except Exception:
        return None  # not ip/tcp: libp2p's own error will do
    try:
        with socket.socket(socket.AF_INET6 if ip == "ip6" else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # like libp2p: ignore TIME_WAIT leftovers
            s.bind((host, port))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return f"could not listen on {maddr}: address in use (is another peer running? choose another port)"
        return f"could not listen on {maddr}: {exc.strerror or exc}"
    return None


def _as_async(fn: Callable[[], Any]) -> Callable[[], Awaitable[Any]]:
    async def run() -> Any:
        return fn()
    return run


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


class P2PNode(TrioThread):
    """A libp2p host in its own trio thread. Create with `await P2PNode.start(...)`, end with `close()`."""

    def __init__(self, key_pair: KeyPair, max_frame: int, announce: Sequence[str] = (), public_ip: str | None = None):
        self.key_pair, self.max_frame = key_pair, max_frame
        self.frame_timeout: float | None = 30.0  # seconds from a frame's first byte to its last (slowloris)
        self.peer_id: str = str(ID.from_pubkey(key_pair.public_key))
        self._announce, self._public_ip = check_announce(announce, public_ip, self.peer_id), public_ip
        self._advertised: list[multiaddr.Multiaddr] | None = None  # what libp2p tells others (identify, DHT)
        self.addrs: list[str] = []  # what others should dial: announced, else bound (full, with /p2p/<id>)
        self.bound: list[str] = []  # where it listens, wildcards made concrete (full multiaddrs)
        self._handlers: dict[str, Handler] = {}
        self._tasks: set[asyncio.Task] = set()

    def _name(self) -> str:
        return f"p2p node {self.peer_id}"

    @classmethod
    async def start(cls, identity: str | Path | None = None, listen: list[str] | None = None,
                    max_frame: int = framing.DEFAULT_MAX_FRAME, announce: Sequence[str] = (),
                    public_ip: str | None = None) -> P2PNode:
        """Listen on `listen`; tell others `announce` and the bound ports on `public_ip` (else where it listens)."""
        listen = list(listen or DEFAULT_LISTEN)
        for problem in filter(None, map(_bind_problem, listen)):
            raise ListenError(problem)
        node = cls(load_or_create_identity(identity), max_frame, announce, public_ip)
        try:
            await node._start_thread(f"p2p-trio-{node.peer_id[-6:]}", listen)
        except BaseException:
            await node.close()
            raise
        announced = "" if node.addrs == node.bound else f", announcing {' '.join(node.addrs)}"
        log.info("peer %s listening on %s%s", node.peer_id, " ".join(node.bound), announced)
        return node

    async def connect(self, maddr: str) -> str:
        """Dial `maddr` (…/p2p/<peer id>) unless already connected to that peer; returns the peer id."""
        try:
            info = info_from_p2p_addr(multiaddr.Multiaddr(maddr))
        except Exception as exc:
            raise ValueError(f"not a peer address: {maddr!r} (expected /ip4/<ip>/tcp/<port>/p2p/<peer id>)") from exc
        await self._call(self._connect_trio, info.peer_id, info.addrs, maddr)
        return str(info.peer_id)

    async def open_stream(self, peer: str, protocol: str) -> P2PStream:
        """A new stream to `peer`: a peer id (connected, or with addresses known) or a full multiaddr."""
        if peer.startswith("/"):
            peer = await self.connect(peer)
        return await self._call(self._open_stream_trio, ID.from_base58(peer), protocol)

    def set_stream_handler(self, protocol: str, handler: Handler) -> None:
        """Run `await handler(stream)` on start()'s loop for each inbound stream; the stream is closed after."""
        self._handlers[protocol] = handler
        self._host.set_stream_handler(protocol, self._on_stream_trio)  # a dict assignment: thread-safe

    async def run_trio(self, async_fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        """`await async_fn(*args)` in the trio thread, where it may use `self.host`; returns its result."""
        return await self._call(async_fn, *args)

    async def set_addrs(self, addrs: Sequence[str]) -> None:
        """Tell others `addrs` (multiaddrs, /p2p/ part optional; may be none) from now on: in `addrs`, in
        identify (pushed to the connected peers at once) and so in the DHT."""
        bare = [a.split("/p2p/")[0] for a in addrs]
        self._advertised = [multiaddr.Multiaddr(a) for a in bare]
        self.addrs = [f"{a}/p2p/{self.peer_id}" for a in bare]
        await self.push_identify()

    async def push_identify(self) -> None:
        """Send our identify (addresses, protocols) to every connected peer now (after a change)."""
        await self._call(self._host._push_identify_to_all_peers)

    async def observed_ips(self) -> set[str]:
        """The IPs connected peers say they see us at (identify's observed addresses)."""
        def ips() -> set[str]:
            manager = getattr(self._host, "_observed_addr_manager", None)
            return {str(a).split("/")[2] for a in (manager.addrs(min_observers=1) if manager else [])}
        return await self._call(_as_async(ips))

    @property
    def host(self) -> Any:
        """The py-libp2p host: use it only from trio code (run_trio)."""
        return self._host

    async def close(self) -> None:
        if self._closed:
            return
        await self._stop_thread()
        for task in list(self._tasks):
            task.cancel()
        log.info("peer %s stopped", self.peer_id)

    # the trio thread

    async def _trio_main(self, listen: list[str], on_started: Callable[[], None]) -> None:
        try:
            maddrs = [multiaddr.Multiaddr(a) for a in listen]
        except Exception as exc:
            raise ValueError(f"bad listen address in {listen}: {exc}") from exc
        self._host = host = new_host(
            key_pair=self.key_pair, listen_addrs=maddrs, muxer_opt={YAMUX_ID: Yamux},
            sec_opt={NOISE_ID: Noise(self.key_pair, noise_privkey=create_x25519_key_pair().private_key)},
            # One connection per peer; this also ends dial_peer's 250 ms happy-eyeballs wait on success.
            # No auto-connector: it redials every peer ever seen (departed clients too) to keep 50 open.
            connection_config=ConnectionConfig(max_connections_per_peer=1, min_connections=0, low_watermark=0),
            addrs_factory=lambda found: list(found if self._advertised is None else self._advertised or [NO_ADDRESS]))
        async with host.run(listen_addrs=maddrs), trio.open_nursery() as nursery:
            self._nursery = nursery
            missing = [a for a in listen if str(multiaddr.Multiaddr(a)) not in host.get_network().listeners]
            why = [_bind_problem(a) or f"could not listen on {a} (see the 'libp2p' logger)" for a in missing]
            for line in why:
                log.error(line)
            if len(missing) == len(listen):
                self._start_error = ListenError(why[0])
                return  # raised here, it would come out wrapped in exception groups
            bound, advertised = _concrete(host.get_transport_addrs(), self._announce, self._public_ip)
            self._advertised = [multiaddr.Multiaddr(a) for a in advertised]
            self.bound, self.addrs = ([f"{a}/p2p/{self.peer_id}" for a in addrs] for addrs in (bound, advertised))
            on_started()
            if not self._closed:  # close() ran while we were starting
                await self._stop_event.wait()
            nursery.cancel_scope.cancel()  # pending calls fail with "node is closed"
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                await host.close()  # host.run() alone would leave the connections' sockets open

    async def _connect_trio(self, peer_id: ID, addrs: list[Any], what: str) -> None:
        net = self._host.get_network()
        if addrs:
            self._host.get_peerstore().add_addrs(peer_id, addrs, PEERSTORE_TTL)
        if any(not c.is_closed for c in net.get_connections(peer_id)):
            return
        cache = getattr(net, "_negative_peer_cache", None)  # else a failed dial blocks redials for 60 s
        if cache is not None:
            cache.evict(str(peer_id))
        try:
            await net.dial_peer(peer_id)  # (identify then runs in the background, as for host.connect)
        except Exception as exc:
            raise ConnectionError(f"could not connect to {what}: {unwrap(exc)} "
                                  "(is the peer running, and its port reachable from here?)") from exc

    async def _open_stream_trio(self, peer_id: ID, protocol: str) -> P2PStream:
        await self._connect_trio(peer_id, [], str(peer_id))  # redials if the connection died
        try:
            net_stream = await self._host.new_stream(peer_id, [protocol])
        except Exception as exc:
            raise ConnectionError(f"could not open a {protocol} stream to {peer_id}: {unwrap(exc)}") from exc
        return P2PStream(self, net_stream)

    async def _on_stream_trio(self, net_stream: Any) -> None:
        done = trio.Event()
        stream = P2PStream(self, net_stream, done)
        handler = self._handlers.get(stream.protocol)
        try:
            if handler is None:
                raise RuntimeError
            self._loop.call_soon_threadsafe(self._spawn_handler, handler, stream)
        except RuntimeError:  # no handler, or the asyncio loop is gone
            await net_stream.reset()
            return
        await done.wait()  # libp2p's handler lives until the asyncio side closes the stream

    def _spawn_handler(self, handler: Handler, stream: P2PStream) -> None:
        async def run() -> None:
            where = f"on {stream.protocol} from {stream.remote_peer_id}"
            try:
                await handler(stream)
            except (EOFError, ConnectionError) as exc:
                log.debug("stream %s ended: %s", where, exc)
            except framing.FrameTooLarge as exc:
                log.warning("refused a frame %s: %s", where, exc)
            except Exception:
                log.exception("stream handler failed %s", where)
            finally:
                await stream.close()
        task = self._loop.create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
