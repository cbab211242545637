"""py-libp2p's Kademlia DHT (0.8.1) made fit for a swarm: what honest nodes store, who enters routing tables.

`RecordValidator`: honest nodes store only valid records (peer/record.py) under their own key, and keep the
newest. `ServerKadDHT`: a server-mode KadDHT whose routing table holds servers only (`offers_kad`: identify
lists the KAD protocol). `not_eof_warning`: drops the DHT's warning on every normally closed stream.

Knows py-libp2p's KadDHT, peer store and identify, and the record rules; nothing of announcing or finding
records (peer/dht.py does both).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import trio
from libp2p.kad_dht import KadDHT
from libp2p.kad_dht.common import PROTOCOL_ID
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.peer.id import ID
from libp2p.peer.peerstore import PeerStoreError
from libp2p.records.validator import Validator

from peer.record import PeerRecord, RecordError, record_key

IDENTIFY_WAIT = 3.0  # how long a server waits for identify to say whether a new requester is a server too


class RecordValidator(Validator):
    """What honest DHT nodes store: valid records under their own key; the newest one wins."""

    def validate(self, key: str, value: bytes) -> None:
        rec = PeerRecord.verify(value)
        if key != record_key(rec.model, rec.peer_id):
            raise RecordError("record does not match its key")

    def select(self, key: str, values: list[bytes]) -> int:
        def rank(value: bytes) -> tuple[float, float]:
            try:
                rec = PeerRecord.verify(value)
                return rec.issued, rec.expires
            except RecordError:
                return -math.inf, -math.inf
        return max(range(len(values)), key=lambda i: rank(values[i]))  # ties: the first (stored) one


def not_eof_warning(record: logging.LogRecord) -> bool:
    return not (str(record.msg).startswith("Failed to read DHT message") and isinstance(record.args, tuple)
                and record.args and isinstance(record.args[0], StreamEOF))


class ServerKadDHT(KadDHT):
    """A server-mode KadDHT whose routing table holds servers only. py-libp2p 0.8.1 adds every peer
    that opens a KAD stream to it (`add_peer(..., skip_server_mode_check=True)`), assuming that whoever
    asks is a server too: a client-mode node would stay in the table, and be handed to others as a
    closer peer, long after it has gone. Here such a peer is added only if identify (which the host
    runs on every new connection) lists the KAD protocol among its own."""

    async def add_peer(self, peer_id: ID, *, skip_server_mode_check: bool = False) -> bool:
        if skip_server_mode_check and not await offers_kad(self.host, peer_id):
            return False
        return await super().add_peer(peer_id, skip_server_mode_check=skip_server_mode_check)


async def offers_kad(host: Any, peer_id: ID, wait: float = IDENTIFY_WAIT) -> bool:
    """Whether identify says `peer_id` serves the KAD protocol; waits up to `wait` s for identify to
    answer (it starts when the connection opens); no answer by then counts as no."""
    with trio.move_on_after(wait):
        while True:
            try:
                protocols = host.get_peerstore().get_protocols(peer_id)
            except PeerStoreError:
                protocols = None
            if protocols:
                return str(PROTOCOL_ID) in protocols
            await trio.sleep(0.02)
    return False
