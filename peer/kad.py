"""py-libp2p's Kademlia DHT (0.8.1) made fit for a swarm: what honest nodes store, who enters routing tables.

`RecordValidator`: honest nodes store only valid records (peer/record.py) under their own key, and keep the
newest. `ServerKadDHT`: a server-mode KadDHT whose routing table holds servers only (`offers_kad`: identify
lists the KAD protocol), whose provider lists keep the newest k providers of a key (py-libp2p's keep the
first k). `not_eof_warning`: drops the DHT's warning on every normally closed stream.

Knows py-libp2p's KadDHT, peer store and identify, and the record rules; nothing of announcing or finding
records (peer/dht.py does both).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import trio
from libp2p.kad_dht import KadDHT
from libp2p.kad_dht.common import BUCKET_SIZE, PROTOCOL_ID
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
    runs on every new connection) lists the KAD protocol among its own. Its provider lists keep the newest
    providers (`_newest_providers`)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.provider_store.add_provider = _newest_providers(self.provider_store)

    async def add_peer(self, peer_id: ID, *, skip_server_mode_check: bool = False) -> bool:
        if skip_server_mode_check and not await offers_kad(self.host, peer_id):
            return False
        return await super().add_peer(peer_id, skip_server_mode_check=skip_server_mode_check)


def _newest_providers(store: Any):
    """py-libp2p lists at most k (20) providers of a key and then ignores new ones for 48 h: in a swarm whose
    peers come and go, the dead filled the list and peers that joined later went unseen through this node.
    Here a new provider takes the place of the one that announced itself longest ago; a live peer whose entry
    went re-adds itself at its next refresh (peer/dht.py checks), so the dead go first."""
    add = store.add_provider

    def add_provider(key: bytes, provider: Any) -> None:
        entries = store.providers.get(key)
        if provider and provider.peer_id and entries and len(entries) >= BUCKET_SIZE and \
                str(provider.peer_id) not in entries:
            del entries[min(entries, key=lambda p: entries[p].timestamp)]
        add(key, provider)
    return add_provider


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
