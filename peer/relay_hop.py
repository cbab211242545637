"""The relay side of Circuit Relay v2: upstream's protocol (py-libp2p 0.8.1, pinned) with our fixes.

`RelayProtocol` takes the STOP side on every node (accepts circuits) and, with `RelayLimits`, the HOP side
(reservations and circuits for others, within the limits). What it fixes and why: peer/relay.py's module
docstring (bugs 2 and 5 of docs/nat-research.md, limits that upstream does not enforce) and the comments on
each override below.

Knows libp2p streams, connections and the circuit v2 messages; nothing of models, sessions or records.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from typing import Any

import trio
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage
from libp2p.relay.circuit_v2.protocol import STREAM_READ_TIMEOUT, CircuitV2Protocol
from libp2p.relay.circuit_v2.protocol_buffer import StatusCode
from libp2p.relay.circuit_v2.utils import maybe_consume_signed_record, read_delimited_msg
from libp2p.stream_muxer.exceptions import MuxedStreamEOF
from libp2p.tools.constants import MAX_READ_LEN

from peer.relay import RELAYED_TAG, RelayLimits, close_quietly, is_relayed, protect, reset_quietly

log = logging.getLogger("specswarm.relay")


class _ByCircuit(dict):
    """Upstream's `_active_relays` keyed by circuit instead of by peer id (bug 2). Upstream's `_handle_connect`
    stores `[source peer] = (hop stream, None)`, then `[destination peer] = (hop stream, stop stream)`: here
    both land on one entry keyed by the circuit's hop stream, so a second circuit to the same destination no
    longer overwrites the first one's, and the first one's end cannot close the second's streams."""

    def __setitem__(self, _peer: Any, streams: tuple) -> None:
        super().__setitem__(streams[0], streams)


class RelayProtocol(CircuitV2Protocol):
    """Upstream's circuit v2 protocol (pinned 0.8.1) with the fixes of the module docstring. With `limits`
    it takes the HOP side too (is a relay), else only the STOP side (upstream's allow_hop=False)."""

    def __init__(self, host: Any, limits: RelayLimits | None = None):
        super().__init__(host, limits.upstream() if limits else None, allow_hop=limits is not None)
        self.relay_limits = limits
        self._active_relays = _ByCircuit()
        self.circuits = 0  # circuits being set up or relayed now
        self._circuits_to: Counter[ID] = Counter()  # the same, by destination

    async def _handle_hop_stream(self, stream: Any) -> None:
        # Overrides upstream, which loops reading messages on a hop stream: peers send one RESERVE or one
        # CONNECT per stream (the spec's exchange; our client and upstream's open a stream for each), so
        # after each reservation and each circuit upstream logged three ERROR lines ("Error reading from hop
        # stream", "Cannot write to stream; closed for writing", ...). One message, then done.
        peer = stream.muxed_conn.peer_id
        circuit = False
        try:
            if is_relayed(stream.muxed_conn):  # spec: no reservation or circuit over a relayed connection
                await self._send_status(stream, StatusCode.PERMISSION_DENIED, "no relaying over a relayed connection")
                return
            with trio.fail_after(STREAM_READ_TIMEOUT):
                msg = await read_delimited_msg(stream, HopMessage)
            if msg.HasField("senderRecord") and not maybe_consume_signed_record(msg, self.host, peer):
                return
            if msg.type == HopMessage.RESERVE:
                await self._handle_reserve(stream, msg)
            elif msg.type == HopMessage.CONNECT:
                circuit = True  # the stream is the circuit now: its end is _relay_data's business
                await self._handle_connect(stream, msg)
            else:
                await self._send_status(stream, StatusCode.UNEXPECTED_MESSAGE, "expected RESERVE or CONNECT")
        except Exception as exc:  # noqa: BLE001 - a peer that hung up or sent garbage: nothing to answer
            log.debug("hop stream from %s ended: %r", peer, exc)
        finally:
            if not circuit:
                await close_quietly(stream)

    async def _handle_reserve(self, stream: Any, msg: HopMessage) -> None:
        # Wraps upstream. (1) A slot is for the peer on the other end of the stream: upstream takes the peer
        # id from the message if there is one, so anybody could reserve in another peer's name (the spec's
        # RESERVE carries no peer). (2) A slot lapses when its holder disconnects (spec; upstream's
        # get_reservation agrees) but upstream counts it against max_reservations until its TTL ends: a relay
        # would turn newcomers away for an hour after others left. Free those first.
        msg.ClearField("peer")
        manager = self.resource_manager
        for peer in [p for p in manager._reservations if not manager._is_peer_connected(p)]:
            del manager._reservations[peer]
        await super()._handle_reserve(stream, msg)

    async def _handle_connect(self, stream: Any, msg: HopMessage) -> None:
        # Wraps upstream: (1) caps circuits in total (upstream: only per slot holder) and per slot holder
        # exactly (upstream counts a circuit only once the destination accepted it, so concurrent requests
        # all pass, and it answers a full holder with NO_RESERVATION); (2) drops the circuit's entry in
        # _active_relays however it ends (upstream leaves the source's behind when the destination fails).
        limits = self.relay_limits
        assert limits is not None  # the HOP handler is registered for relays only
        dest = ID(msg.peer.id)
        status = StatusCode.RESOURCE_LIMIT_EXCEEDED
        if self.resource_manager.get_reservation(dest) is None:  # (upstream then idles 0.5 s, counted as a circuit)
            status, why = StatusCode.NO_RESERVATION, f"{dest} holds no slot on this relay"
        elif self.circuits >= limits.max_circuits:
            why = f"this relay carries {limits.max_circuits} circuits already"
        elif self._circuits_to[dest] >= limits.max_circuits_per_peer:
            why = f"{dest} has {limits.max_circuits_per_peer} circuits through this relay already"
        else:
            why = ""
        if why:
            await self._send_status(stream, status, why)
            await close_quietly(stream)  # a close, not a reset: the status must arrive first
            return
        self.circuits += 1
        self._circuits_to[dest] += 1
        try:
            await super()._handle_connect(stream, msg)
        finally:
            self.circuits -= 1
            self._circuits_to[dest] -= 1
            if not self._circuits_to[dest]:
                del self._circuits_to[dest]
            self._active_relays.pop(stream, None)

    async def _relay_data(self, src: Any, dst: Any, peer_id: ID, deadline: float | None = None,
                          circuit_data_limit: list[int] | None = None) -> None:
        # Replaces upstream's pump (upstream's _handle_connect runs one per direction, with a shared deadline
        # and a shared one-element byte budget, None when data=0). Upstream's: treats a yamux EOF as an
        # unexpected error (bug 5), retried with sleeps; checks the deadline only when data arrives, so an
        # idle circuit outlives `duration`; with data=0 ("no limit") falls back to a per-reservation budget
        # of 0 bytes that resets every circuit at its first byte; writes a HOP status message into the
        # circuit's data when a limit is hit (garbage to the end-to-end Noise session); and on its way out
        # closes whatever _active_relays holds under the peer id, maybe another circuit's streams (bug 2).
        # Here: an EOF is passed on (a half-close) and this direction ends; a limit, a reset or a stall
        # resets both streams of this circuit, and only those.
        direction = f"{src.muxed_conn.peer_id} -> {dst.muxed_conn.peer_id}"
        # upstream's deadline is on time.monotonic(); trio's clock has an offset of its own
        end = math.inf if deadline is None else trio.current_time() + deadline - time.monotonic()
        with trio.move_on_at(end) as timer:
            try:
                while True:
                    try:
                        data = await src.read(MAX_READ_LEN)
                    except (StreamEOF, MuxedStreamEOF):
                        data = b""
                    if not data:
                        with trio.fail_after(self.close_timeout):
                            await dst.close_write()
                        return
                    if circuit_data_limit is not None:
                        circuit_data_limit[0] -= len(data)
                        if circuit_data_limit[0] < 0:
                            log.info("a circuit %s reached this relay's data limit (%d bytes): reset",
                                     direction, self.limits.data)
                            break
                    with trio.fail_after(self.write_timeout):  # the other end stopped reading
                        await dst.write(data)
            except Exception as exc:  # noqa: BLE001 - a reset, a dead connection, a stalled reader
                log.debug("circuit %s ended: %r", direction, exc)
        if timer.cancelled_caught and src in self._active_relays:  # (said once: by the direction from the hop stream)
            log.info("a circuit %s reached this relay's duration limit (%d s): reset", direction, self.limits.duration)
        await reset_quietly(src)
        await reset_quietly(dst)

    async def handle_incoming_connection(self, stream: Any, remote_peer_id: bytes) -> None:
        # Wraps upstream (the STOP side, once it accepted a circuit): protect the peer before the relayed
        # connection joins the swarm, which could otherwise close a direct one to make room (see protect).
        protect(self.host, ID(remote_peer_id), RELAYED_TAG)
        await super().handle_incoming_connection(stream, remote_peer_id)
