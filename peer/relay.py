"""Circuit Relay v2 for `P2PNode` (py-libp2p 0.8.1, `libp2p.relay.circuit_v2`): relaying for others within
limits, holding slots on relays, and dialling peers through them.

A peer nobody can dial (behind a NAT) reserves a slot on a relay it can reach and keeps that connection
open; others dial it at `<relay multiaddr>/p2p-circuit/p2p/<its id>`: the relay opens a STOP stream to it
over that connection and copies bytes between the two streams. Noise and yamux run end to end inside, so a
relay sees ciphertext only. Every node takes the STOP side (accepts circuits, dials them); a node started
with `RelayLimits` also takes the HOP side (is a relay).

What upstream gets wrong and what this module does instead (bug numbers: docs/nat-research.md, section 1):
* bug 1, Swarm.dial_peer skips /p2p-circuit addresses: `dial_circuit` sends the HOP CONNECT itself. Not
  with CircuitV2Transport.dial: that first retries every circuit address of the destination found in the
  peerstore (where it also writes them, with a 68-year TTL), has no timeout on that path, and in its
  default CLIENT role makes a reservation before every dial (bug 4).
* bug 2 (a relay keys circuits by peer id, so closing one circuit kills a newer one to the same peer),
  bug 5 (a yamux EOF is an "unexpected error" with retries), idle circuits outliving `duration`, `data=0`
  (documented "unlimited") resetting every circuit, slots of departed peers counted until their TTL,
  reservations made in another peer's name, no cap on circuits in total and a racy one per peer, three
  ERROR lines after every reservation and circuit: `RelayProtocol`, a subclass that replaces two methods
  and wraps three.
* bug 3 (RelayDiscovery), and a refresher that never re-dials a relay that went away: `RelaySlots` reserves
  explicitly, renews at half-time and re-dials with backoff.

Knows libp2p hosts, connections, streams and the circuit v2 messages; nothing of models, sessions, the DHT
or records: what to announce is the node owner's business (`RelaySlots.live`, and its change callback).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import multiaddr
import trio
from libp2p.abc import INotifee
from libp2p.connection_types import ConnectionType
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.protocol_muxer.exceptions import MultiselectClientError
from libp2p.relay.circuit_v2 import resources
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage, PeerId as CircuitPeerId
from libp2p.relay.circuit_v2.protocol import (PROTOCOL_ID as HOP, STOP_PROTOCOL_ID as STOP)
from libp2p.relay.circuit_v2.protocol_buffer import StatusCode
from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg
from multiaddr.protocols import P_P2P_CIRCUIT

log = logging.getLogger("specswarm.relay")
__all__ = ["HOP", "STOP", "RelayLimits", "RelaySlots", "dial_circuit", "reserve", "is_circuit", "is_relayed",
           "relay_of"]  # the relay protocol itself (HOP and STOP handlers): peer/relay_hop.py

EXCHANGE_TIMEOUT = 15.0  # s for a relay to answer a RESERVE or CONNECT
ATTEMPT_TIMEOUT = 30.0  # s for one whole attempt: dial the relay, reserve
RENEW_EVERY = 300.0  # s between renewals at most (a slot is renewed at half its remaining time, or sooner)
RENEW_SOONEST = 0.5  # s between renewals at least
RENEW_SKEWED = 60.0  # s between renewals when the relay's expiry is already past by our clock (clock skew)
RETRY_FIRST, RETRY_MAX = 1.0, 60.0  # s: backoff after a lost slot, doubling
SLOT_TAG = "specswarm-relay-slot"  # protects the connection to a relay we hold a slot on from the pruner
RELAYED_TAG = "specswarm-relayed"  # protects a peer's connections while one of them is relayed (see protect)
WHY = {
    StatusCode.NO_RESERVATION: "the peer holds no slot there (it left, or its slot lapsed)",
    StatusCode.RESOURCE_LIMIT_EXCEEDED: "the relay is at its limits",
    StatusCode.PERMISSION_DENIED: "the relay does not allow it",
    StatusCode.CONNECTION_FAILED: "the relay could not reach the peer",
    StatusCode.RESERVATION_REFUSED: "the relay refuses slots",
}


@dataclass
class RelayLimits:
    """What a relay grants; None in `P2PNode.start(relay=...)`: not a relay."""

    max_reservations: int = 128  # peers holding a slot at once (a slot lapses when its holder disconnects)
    max_circuits: int = 512  # circuits relayed at once, all peers together
    max_circuits_per_peer: int = 32  # circuits at once to one slot holder (its clients)
    duration: int = 2 * 3600  # s a circuit may last, then it is reset (0: no limit); inference sessions are long
    data: int = 4 << 30  # bytes a circuit may carry, both directions together, then it is reset (0: no limit)
    reservation_ttl: int = 3600  # s a slot lasts unless renewed (holders here renew at half-time)

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            floor = 0 if name in ("duration", "data") else 1
            if type(value) is not int or value < floor:
                raise ValueError(f"relay limit {name} must be an integer >= {floor}, got {value!r}")

    def upstream(self) -> resources.RelayLimits:
        return resources.RelayLimits(duration=self.duration, data=self.data, reservation_ttl=self.reservation_ttl,
                                     max_circuit_conns=self.max_circuits_per_peer,
                                     max_reservations=self.max_reservations)


def is_circuit(maddr: Any) -> bool:
    """Whether a multiaddr (str or Multiaddr) goes through a relay (`/p2p-circuit`)."""
    return "/p2p-circuit" in str(maddr)


def is_relayed(conn: Any) -> bool:
    """Whether a swarm connection (or a muxed connection) runs through a relay."""
    try:
        if conn.get_connection_type() == ConnectionType.RELAYED:
            return True
        return any(is_circuit(a) for a in conn.get_transport_addresses() or [])
    except Exception:  # noqa: BLE001 - a connection type that cannot tell: direct
        return False


def relay_of(circuit: Any) -> PeerInfo:
    """The relay of a circuit address (`<relay addr>/p2p/<relay>/p2p-circuit[/p2p/<dest>]`): its id and the
    address to dial it at (none if the circuit names only the relay's id). ValueError if there is no relay."""
    maddr = circuit if isinstance(circuit, multiaddr.Multiaddr) else multiaddr.Multiaddr(circuit)
    if not is_circuit(maddr):
        raise ValueError(f"not a circuit address: {maddr}")
    try:
        return info_from_p2p_addr(maddr.decapsulate_code(P_P2P_CIRCUIT))
    except Exception as exc:
        raise ValueError(f"circuit address {maddr} names no relay (want <relay addr>/p2p/<relay id>/p2p-circuit)") \
            from exc


def protect(host: Any, peer: ID, tag: str) -> None:
    """Keep libp2p from closing `peer`'s connections to stay under its limits.

    RELAYED_TAG: our nodes allow one connection per peer (more costs every direct dial 250 ms in
    Swarm.dial_peer), but a relayed and a direct connection may coexist for a while (both peers dialled at
    once, or a direct dial while a circuit is open): the swarm would then close the older one, streams and
    all. Unprotected again when the peer's last relayed connection closes (RelaySlots.disconnected)."""
    host.get_network().protect(peer, tag)


async def close_quietly(stream: Any) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(1):
        try:
            await stream.close()
        except Exception:  # noqa: BLE001 - already reset or gone
            pass


async def reset_quietly(stream: Any) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(1):
        try:
            await stream.reset()
        except Exception:  # noqa: BLE001
            pass


async def _hop_stream(host: Any, relay: ID) -> Any:
    """A new HOP stream to `relay` (connected); ConnectionError saying so if it is not a relay."""
    not_relay = ConnectionError(f"peer {relay} is not a relay (it does not speak {HOP}; a specswarm peer relays "
                                "only when started with relay limits)")
    # Ask identify first (it runs right after connecting; BasicHost internals, 0.8.1): asking the peer
    # itself, libp2p logs a 7-line ERROR when it says no.
    inflight = getattr(host, "_identify_inflight", set())
    with trio.move_on_after(2):
        while relay in inflight:
            await trio.sleep(0.01)
    try:
        known = host.get_peerstore().get_protocols(relay)
    except Exception:  # noqa: BLE001 - not in the peerstore: we'll ask
        known = []
    if known and HOP not in known:
        raise not_relay
    try:
        return await host.new_stream(relay, [HOP])
    except Exception as exc:  # libp2p raises a different class for each way of failing
        if isinstance(exc.__cause__, MultiselectClientError) and "not supported" in str(exc.__cause__):
            raise not_relay from exc
        raise ConnectionError(f"could not open a relay stream to {relay}: {exc}") from exc


def _status(resp: HopMessage) -> StatusCode:
    try:
        return StatusCode(resp.status) if resp.HasField("status") else StatusCode.UNUSED
    except ValueError:
        return StatusCode.UNUSED


def _refusal(resp: HopMessage) -> str:
    status = _status(resp)
    return f"{status.name}: {WHY[status]}" if status in WHY else status.name


async def _exchange(host: Any, relay: ID, request: HopMessage, what: str) -> tuple[Any, HopMessage]:
    """Send one HOP message on a new stream to `relay`; (the stream, the answer). ConnectionError if none."""
    stream = await _hop_stream(host, relay)
    try:
        with trio.fail_after(EXCHANGE_TIMEOUT):
            await write_delimited_msg(stream, request)
            return stream, await read_delimited_msg(stream, HopMessage)
    except BaseException as exc:
        await reset_quietly(stream)
        if isinstance(exc, trio.TooSlowError):
            raise ConnectionError(f"relay {relay} did not answer a {what} within {EXCHANGE_TIMEOUT:.0f} s") from None
        if isinstance(exc, Exception):
            raise ConnectionError(f"relay {relay} hung up during a {what}: {exc!r}") from exc
        raise


async def reserve(host: Any, relay: ID) -> float:
    """One RESERVE exchange with `relay` (connected): the slot's expiry, a Unix time by the relay's clock."""
    stream, resp = await _exchange(host, relay, HopMessage(type=HopMessage.RESERVE), "reservation")
    await close_quietly(stream)
    if _status(resp) != StatusCode.OK:
        raise ConnectionError(f"relay {relay} refused us a slot ({_refusal(resp)})")
    if not resp.HasField("reservation"):
        raise ConnectionError(f"relay {relay} accepted a reservation but sent none")
    return float(resp.reservation.expire)


async def dial_circuit(host: Any, circuit: multiaddr.Multiaddr, dest: ID) -> Any:
    """Connect to `dest` through the relay of `circuit` (already connected: dial it directly first); the new
    swarm connection, which new streams to `dest` then use. ConnectionError saying why not."""
    relay = relay_of(circuit).peer_id
    request = HopMessage(type=HopMessage.CONNECT, peer=CircuitPeerId(id=dest.to_bytes()))
    stream, resp = await _exchange(host, relay, request, "circuit request")
    if _status(resp) != StatusCode.OK:
        await close_quietly(stream)
        raise ConnectionError(f"relay {relay} did not connect us to {dest} ({_refusal(resp)})")
    full = circuit if circuit.get_peer_id() == str(dest) else circuit.encapsulate(multiaddr.Multiaddr(f"/p2p/{dest}"))
    raw = RawConnection(stream, initiator=True, connection_type=ConnectionType.RELAYED, addresses=[full])
    protect(host, dest, RELAYED_TAG)
    try:
        with trio.fail_after(ATTEMPT_TIMEOUT):
            return await host.upgrade_outbound_connection(raw, dest)  # Noise (proves dest) + yamux, then the swarm
    except BaseException as exc:
        await reset_quietly(stream)
        if not any(is_relayed(c) for c in host.get_network().get_connections(dest) if not c.is_closed):
            host.get_network().unprotect(dest, RELAYED_TAG)
        if isinstance(exc, Exception):
            raise ConnectionError(f"the circuit to {dest} through relay {relay} failed its handshake: {exc}") from exc
        raise


@dataclass(eq=False)
class _Slot:
    relay: PeerInfo  # the relay's id, and where to dial it
    addr: str  # the relay's multiaddr as given (…/p2p/<relay id>)
    circuit: str  # ours through it: addr/p2p-circuit/p2p/<our id>
    expires: float = 0.0  # Unix time, the relay's word
    live: bool = False
    wake: trio.Event = field(default_factory=trio.Event)  # set when the connection to the relay closes
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)


class RelaySlots(INotifee):
    """Our slots on relays, each kept alive by a task (trio side). `dial(relay_id)` connects to a relay
    directly (never through another relay); `on_change(live)` hears every change of `live`."""

    def __init__(self, host: Any, dial: Callable[[ID], Awaitable[None]], on_change: Callable[[tuple[str, ...]], None]):
        self.host, self._dial, self._on_change = host, dial, on_change
        self._slots: dict[ID, _Slot] = {}
        self.live: tuple[str, ...] = ()  # replaced, never mutated: other threads may read it
        host.get_network().register_notifee(self)

    async def reserve(self, relay_addr: str, nursery: trio.Nursery) -> str:
        """Reserve a slot on the relay at `relay_addr` (…/p2p/<relay id>, a direct address) and keep it from
        now on; our circuit address through it. ConnectionError if the relay cannot be reached or refuses.
        Reserving on a relay we already hold (or are retrying) a slot on returns at once."""
        if is_circuit(relay_addr):
            raise ValueError(f"a relay is dialled directly, not through another relay: {relay_addr}")
        try:
            relay = info_from_p2p_addr(multiaddr.Multiaddr(relay_addr))
        except Exception as exc:
            raise ValueError(f"not a relay address: {relay_addr!r} (want /ip4/<ip>/tcp/<port>/p2p/<relay id>)") \
                from exc
        if relay.peer_id in self._slots:
            return self._slots[relay.peer_id].circuit
        addr = str(multiaddr.Multiaddr(relay_addr))
        slot = _Slot(relay, addr, f"{addr}/p2p-circuit/p2p/{self.host.get_id()}")
        await self._renew(slot)
        if relay.peer_id in self._slots:  # a concurrent reserve() on the same relay got there first
            return self._slots[relay.peer_id].circuit
        self._slots[relay.peer_id] = slot
        protect(self.host, relay.peer_id, SLOT_TAG)
        slot.live = True
        log.info("reserved a relay slot on %s (%s): reachable at %s", relay.peer_id, addr, slot.circuit)
        self._changed()
        nursery.start_soon(self._keep, slot)
        return slot.circuit

    def release(self, relay: str) -> bool:
        """Stop keeping the slot on `relay` (its multiaddr, its id, or our circuit address through it); it lapses
        on the relay at its expiry. Whether we held one."""
        text = relay.split("/p2p-circuit")[0]
        peer = text.rsplit("/p2p/", 1)[-1]
        slot = next((s for p, s in self._slots.items() if str(p) == peer), None)
        if slot is None:
            return False
        slot.scope.cancel()
        del self._slots[slot.relay.peer_id]
        self.host.get_network().unprotect(slot.relay.peer_id, SLOT_TAG)
        log.info("gave up the relay slot on %s (%s)", slot.relay.peer_id, slot.addr)
        if slot.live:
            self._changed()
        return True

    async def _renew(self, slot: _Slot) -> None:
        """Connect to the relay if need be, then RESERVE (a new slot, or the same one extended)."""
        try:
            with trio.fail_after(ATTEMPT_TIMEOUT):
                self.host.get_peerstore().add_addrs(slot.relay.peer_id, slot.relay.addrs, 24 * 3600)
                await self._dial(slot.relay.peer_id)
                slot.expires = await reserve(self.host, slot.relay.peer_id)
        except trio.TooSlowError:
            raise ConnectionError(f"no answer from relay {slot.relay.peer_id} within {ATTEMPT_TIMEOUT:.0f} s") from None

    async def _keep(self, slot: _Slot) -> None:
        """Renew the slot at half-time, at once when the relay connection closes; after a failure retry with
        backoff until it works again (a relay that restarts: same id and address)."""
        backoff = RETRY_FIRST
        with slot.scope:
            while True:
                if slot.live:
                    left = slot.expires - time.time()
                    wait = min(max(left / 2, RENEW_SOONEST), RENEW_EVERY) if left > 0 else RENEW_SKEWED
                    with trio.move_on_after(wait):
                        await slot.wake.wait()
                    slot.wake = trio.Event()
                try:
                    await self._renew(slot)
                except ConnectionError as exc:
                    if slot.live:
                        slot.live = False
                        self._changed()
                        log.warning("lost the relay slot on %s (%s): %s; retrying in %.0f s", slot.relay.peer_id,
                                    slot.addr, exc, backoff)
                    else:
                        log.info("still no relay slot on %s (%s): %s; retrying in %.0f s", slot.relay.peer_id,
                                 slot.addr, exc, backoff)
                    await trio.sleep(backoff)
                    backoff = min(2 * backoff, RETRY_MAX)
                    continue
                backoff = RETRY_FIRST
                if not slot.live:
                    slot.live = True
                    log.info("reserved a relay slot on %s (%s) again: reachable at %s", slot.relay.peer_id,
                             slot.addr, slot.circuit)
                    self._changed()
                else:
                    log.debug("renewed the relay slot on %s (for %.0f s)", slot.relay.peer_id,
                              slot.expires - time.time())

    def _changed(self) -> None:
        self.live = tuple(s.circuit for s in self._slots.values() if s.live)
        self._on_change(self.live)

    # INotifee: the swarm tells us about every connection that closes

    async def disconnected(self, network: Any, conn: Any) -> None:
        peer = conn.muxed_conn.peer_id
        left = [c for c in network.get_connections(peer) if not c.is_closed]
        if not left and peer in self._slots:
            self._slots[peer].wake.set()  # renew now: re-dials, or reports the slot lost
        if not any(is_relayed(c) for c in left):
            network.unprotect(peer, RELAYED_TAG)

    async def connected(self, network: Any, conn: Any) -> None:
        pass

    async def opened_stream(self, network: Any, stream: Any) -> None:
        pass

    async def closed_stream(self, network: Any, stream: Any) -> None:
        pass

    async def listen(self, network: Any, maddr: multiaddr.Multiaddr) -> None:
        pass

    async def listen_close(self, network: Any, maddr: multiaddr.Multiaddr) -> None:
        pass
