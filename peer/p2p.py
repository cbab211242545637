"""A libp2p node (py-libp2p: TCP + Noise + yamux) usable from asyncio.

py-libp2p runs on trio. Each `P2PNode` runs its own trio loop in a dedicated thread
(`peer.trio_thread`), and every operation crosses over once, coarsely: a whole frame per
`send`/`recv`, never one read at a time.

It knows peer identities (Ed25519 key files), the addresses it listens on and announces (never a
wildcard), dialling and reusing connections (one per peer), streams by protocol name, and
length-prefixed frames (`protocol.framing`). It knows nothing about models, sessions, routing, or
what is inside a frame. Keep connections and streams open: a dial costs ~10-30 ms and a new stream
~3 ms (protocol negotiation), a frame on an open stream ~1-2 ms.

Relays (Circuit Relay v2, `peer.relay`): every node accepts and dials circuits, so a peer behind a NAT
is reachable at `<relay addr>/p2p/<relay>/p2p-circuit/p2p/<peer>` once it holds a slot on that relay
(`reserve`, kept alive in the background); a node started with `RelayLimits` relays for others.
`connect`/`open_stream` dial a circuit address through its relay, and a peer id whose only known
addresses are circuits through one of them; a direct connection is preferred when there is one
(`connection_path` says which a peer's streams take). A relayed and a direct connection to one peer
may coexist. On loopback a circuit dial costs ~25-30 ms once the relay is connected, a frame's round
trip ~4 ms instead of ~1 (each byte crosses the relay's Python twice).

Errors: streams' are peer/p2p_stream.py's; node-level failures raise ConnectionError. A cancelled
`send` or `recv` (e.g. `asyncio.wait_for`) does not break the framing: the send still completes, and
the frame a cancelled `recv` was reading is returned by the next `recv`.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from pathlib import Path
from typing import Any, Awaitable, Callable, Sequence

import multiaddr
import trio
from libp2p import new_host
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.network.config import ConnectionConfig
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_ID, Transport as Noise
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_ID, Yamux
from libp2p.tools.anyio_service import background_trio_service

from peer.addrs import check_announce, concrete as _concrete
from peer.relay import HOP, RelayLimits, RelaySlots, dial_circuit, is_circuit, is_relayed, relay_of
from peer.relay_hop import RelayProtocol
from peer.identity import load_or_create_identity
from peer.p2p_stream import P2PStream
from peer.trio_thread import TrioThread, unwrap
from protocol import framing

log = logging.getLogger("specswarm.p2p")
DEFAULT_LISTEN = ["/ip4/127.0.0.1/tcp/0"]
# Told (identify, DHT provider entries) when no address of ours is dialable: py-libp2p's DHT drops a provider
# entry without an address, and nobody dials a circuit address without a relay in front (not even us).
NO_ADDRESS = multiaddr.Multiaddr("/p2p-circuit")
PEERSTORE_TTL = 24 * 3600  # seconds a dialled address is remembered (libp2p's connect() uses 120)
Handler = Callable[["P2PStream"], Awaitable[None]]


class ListenError(OSError):
    """This node cannot listen where it was asked (the port is taken, or the address is not this machine's)."""


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
        self.relay_limits: RelayLimits | None = None  # set by start(relay=...): this node relays for others
        # called on start()'s loop with our live circuit addresses whenever that set changes (a slot won, lost,
        # won back, given up); may be a coroutine function. E.g. re-announce: set_addrs(direct + live ones).
        self.on_reservations: Callable[[list[str]], Any] | None = None
        self.paths: Any = None  # set by the owner (peer/paths.py): how inference streams reach peers (transport.dial)
        self._circuit_dials: dict[ID, trio.Event] = {}  # circuit dials under way (trio thread)

    def _name(self) -> str:
        return f"p2p node {self.peer_id}"

    @classmethod
    async def start(cls, identity: str | Path | None = None, listen: list[str] | None = None,
                    max_frame: int = framing.DEFAULT_MAX_FRAME, announce: Sequence[str] = (),
                    public_ip: str | None = None, relay: RelayLimits | None = None) -> P2PNode:
        """Listen on `listen`; tell others `announce` and the bound ports on `public_ip` (else where it listens).
        `relay`: relay circuits for others within these limits (only worth it on a peer others can dial)."""
        listen = list(listen or DEFAULT_LISTEN)
        for problem in filter(None, map(_bind_problem, listen)):
            raise ListenError(problem)
        node = cls(load_or_create_identity(identity), max_frame, announce, public_ip)
        node.relay_limits = relay
        try:
            await node._start_thread(f"p2p-trio-{node.peer_id[-6:]}", listen)
        except BaseException:
            await node.close()
            raise
        announced = "" if node.addrs == node.bound else f", announcing {' '.join(node.addrs)}"
        relaying = "" if relay is None else (f", relaying up to {relay.max_circuits} circuits for up to "
                                             f"{relay.max_reservations} peers")
        log.info("peer %s listening on %s%s%s", node.peer_id, " ".join(node.bound), announced, relaying)
        return node

    async def connect(self, maddr: str) -> str:
        """Dial `maddr` (…/p2p/<peer id>, or a circuit …/p2p/<relay>/p2p-circuit/p2p/<peer id>) unless already
        connected to that peer; returns the peer id."""
        try:
            info = info_from_p2p_addr(multiaddr.Multiaddr(maddr))
        except Exception as exc:
            raise ValueError(f"not a peer address: {maddr!r} (expected /ip4/<ip>/tcp/<port>/p2p/<peer id>)") from exc
        await self._call(self._connect_trio, info.peer_id, info.addrs, maddr)
        return str(info.peer_id)

    async def open_stream(self, peer: str, protocol: str) -> P2PStream:
        """A new stream to `peer`: a peer id (connected, or with addresses known: direct ones are tried first,
        then circuits) or a full multiaddr."""
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
        """Tell others `addrs` (multiaddrs, our /p2p/<id> at the end optional; circuit addresses from
        `reservations` too; may be none) from now on: in `addrs`, in identify (pushed to the connected peers
        at once) and so in the DHT."""
        own = f"/p2p/{self.peer_id}"
        bare = [a.removesuffix(own) for a in addrs]  # (a circuit address holds the relay's /p2p/ too)
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

    async def reserve(self, relay_addr: str) -> str:
        """Reserve a slot on the relay at `relay_addr` (a direct multiaddr ending in /p2p/<relay id>) and keep
        it alive from now on (renewed before it expires; re-dialled with backoff when the relay goes away):
        returns our circuit address through it, `<relay_addr>/p2p-circuit/p2p/<our id>`. ConnectionError if
        the relay cannot be reached, is not a relay, or refuses (e.g. it is full); ValueError for a bad address."""
        return await self._call(self._slots.reserve, relay_addr, self._nursery)

    async def unreserve(self, relay: str) -> bool:
        """Stop keeping the slot on `relay` (its multiaddr, id, or our circuit address through it): whether
        there was one. (No message to the relay: the slot lapses there at its expiry.)"""
        return await self._call(_as_async(lambda: self._slots.release(relay)))

    @property
    def reservations(self) -> list[str]:
        """Our circuit addresses through the relays we hold a live slot on now (see also on_reservations)."""
        return list(self._slots.live)

    async def connection_path(self, peer_id: str) -> str | None:
        """"direct" or "relay": the path new streams to `peer_id` take (a direct connection wins when there
        are both); None when not connected."""
        def path() -> str | None:
            conns = [c for c in self._host.get_network().get_connections(ID.from_base58(peer_id)) if not c.is_closed]
            if not conns:
                return None
            return "relay" if all(is_relayed(c) for c in conns) else "direct"
        return await self._call(_as_async(path))

    async def is_relay(self, peer_id: str) -> bool:
        """Whether `peer_id` offers slots (speaks the relay HOP protocol), from what identify told us: known
        ~10 ms after connecting to it; False for a peer not identified yet."""
        def hop() -> bool:
            try:
                return HOP in (self._host.get_peerstore().get_protocols(ID.from_base58(peer_id)) or [])
            except Exception:  # noqa: BLE001 - not in the peerstore
                return False
        return await self._call(_as_async(hop))

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
            # One connection per peer; this also ends dial_peer's 250 ms happy-eyeballs wait on success (with 2
            # every direct dial takes 250 ms more). A relayed and a direct connection to one peer may coexist all
            # the same: the peer is protected from the per-peer trim meanwhile (peer.relay.protect).
            # No auto-connector: it redials every peer ever seen (departed clients too) to keep 50 open.
            connection_config=ConnectionConfig(max_connections_per_peer=1, min_connections=0, low_watermark=0),
            addrs_factory=lambda found: list(found if self._advertised is None else self._advertised or [NO_ADDRESS]))
        self._relay = RelayProtocol(host, self.relay_limits)  # the STOP side always; HOP with limits
        self._slots = RelaySlots(host, self._dial_direct, self._slots_changed)
        async with host.run(listen_addrs=maddrs), background_trio_service(self._relay), \
                trio.open_nursery() as nursery:
            self._nursery = nursery
            await self._relay.event_started.wait()  # its stream handlers are set
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

    def _connected(self, peer_id: ID) -> bool:
        return any(not c.is_closed for c in self._host.get_network().get_connections(peer_id))

    async def _connect_trio(self, peer_id: ID, addrs: list[Any], what: str) -> None:
        """Connect unless connected: to circuit `addrs` through their relays; else (by peer id, or to direct
        addresses) directly, and if that fails through the circuit addresses the peerstore knows."""
        if addrs:
            self._host.get_peerstore().add_addrs(peer_id, addrs, PEERSTORE_TTL)
        if self._connected(peer_id):
            return
        if addrs and all(map(is_circuit, addrs)):
            return await self._dial_circuits(peer_id, addrs, what, [])
        try:
            known = self._host.get_peerstore().addrs(peer_id)
        except Exception:  # noqa: BLE001 - py-libp2p's PeerStoreError: never heard of it
            raise ConnectionError(f"could not connect to {what}: no address known for it") from None
        circuits = [a for a in known if is_circuit(a)]
        if circuits and all(map(is_circuit, known)):  # (e.g. a private peer, learnt from the DHT)
            return await self._dial_circuits(peer_id, circuits, what, [])
        try:
            await self._dial_direct(peer_id, what)
        except ConnectionError as exc:
            if not circuits:
                raise
            await self._dial_circuits(peer_id, circuits, what, [str(exc)])

    async def _dial_direct(self, peer_id: ID, what: str | None = None) -> None:
        """Connect to `peer_id` at its direct addresses in the peerstore (Swarm.dial_peer skips circuits)."""
        net = self._host.get_network()
        cache = getattr(net, "_negative_peer_cache", None)  # else a failed dial blocks redials for 60 s
        if cache is not None:
            cache.evict(str(peer_id))
        try:
            await net.dial_peer(peer_id)  # (identify then runs in the background, as for host.connect)
        except Exception as exc:
            raise ConnectionError(f"could not connect to {what or peer_id}: {unwrap(exc)} "
                                  "(is the peer running, and its port reachable from here?)") from exc

    async def _dial_circuits(self, peer_id: ID, circuits: list[Any], what: str, errors: list[str]) -> None:
        """Connect to `peer_id` through the first of `circuits` that works (each relay dialled directly)."""
        while peer_id in self._circuit_dials:  # one circuit per peer: wait for a dial under way
            await self._circuit_dials[peer_id].wait()
            if self._connected(peer_id):
                return
        self._circuit_dials[peer_id] = done = trio.Event()
        try:
            for circuit in circuits:
                try:
                    relay = relay_of(circuit)
                except ValueError:  # e.g. the bare /p2p-circuit a peer without any address announces
                    continue
                try:
                    if relay.peer_id == self._host.get_id():
                        raise ConnectionError("it is reserved on this very node: only others can reach it through us")
                    if relay.addrs:
                        self._host.get_peerstore().add_addrs(relay.peer_id, relay.addrs, PEERSTORE_TTL)
                    if not self._connected(relay.peer_id):
                        await self._dial_direct(relay.peer_id, f"relay {relay.peer_id}")
                    await dial_circuit(self._host, circuit, peer_id)
                    return
                except ConnectionError as exc:
                    errors.append(f"through {relay.peer_id}: {exc}")
            raise ConnectionError(f"could not connect to {what}: " + ("; ".join(errors) or "no usable address"))
        finally:
            del self._circuit_dials[peer_id]
            done.set()

    def _slots_changed(self, live: tuple[str, ...]) -> None:  # trio thread
        def tell() -> None:
            if self.on_reservations is not None:
                try:
                    result = self.on_reservations(list(live))
                except Exception:
                    log.exception("on_reservations failed")
                    return
                if asyncio.iscoroutine(result):
                    task = self._loop.create_task(result)
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
        try:
            self._loop.call_soon_threadsafe(tell)
        except RuntimeError:  # the asyncio loop is gone
            pass

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
