"""Discovery records over the libp2p Kademlia DHT (py-libp2p 0.8.1), usable from asyncio.

A serving peer announces one signed, expiring `PeerRecord` (peer/record.py: what it says and the
rules that make it trustworthy). A client that knows only the model id finds every peer of the
model, hence all peers of every block. This module is the DHT plumbing: it publishes records, finds
them, and has every honest node check them; it knows nothing of tensors, sessions or routing, and
not what makes a record valid beyond asking `PeerRecord.verify`. `SwarmDHT` republishes the
announced record every ttl/2 (the DHT has no TTL: records carry their own expiry) and, on close(),
publishes it "offline".

Keys. A Kademlia value is one value per key (last writer wins), so no key has two writers:
  * value /specswarm/<sha256(model)[:32]>/<peer id>: that peer's record. Strict validation is on,
    and honest nodes store only what `RecordValidator` (peer/kad.py) accepts: signed by the key that
    hashes to the peer id, matching its key, well-formed, <= 16 KiB, unexpired; `select` keeps the newest.
  * provider key sha256("specswarm/providers/<model>/<epoch>"): who has a record for the model.
    py-libp2p keeps provider entries 48 h and at most 20 per key, so the key changes every EPOCH s;
    a peer provides the epochs of now and now + ttl, which covers its record's life. Provider entries
    are unsigned hints: only verified values are believed.
  A provider key per block was rejected: py-libp2p silently drops the 11th ADD_PROVIDER one peer
  sends another within 10 s, so a server of many blocks would lose most of its announcements.

Modes. A serving peer runs the DHT as a server (`SwarmDHT.start(..., server=True)`, the default): it
answers Kademlia requests and sits in other nodes' routing tables. A client (`server=False`: a chat,
a `swarm generate`, a `swarm status`) only looks records up: it runs py-libp2p's client mode (no KAD
protocol handler, so identify does not list it) and no maintenance service (no routing-table
refresh, no republishing), and servers keep it out of their routing tables, so it leaves nothing
behind when it exits (a departed node in routing tables costs every later lookup failed dials).
py-libp2p 0.8.1 alone does not do that last part: a server adds whoever opens a KAD stream to it,
client-mode nodes included; our servers (`ServerKadDHT`) add such a peer only once identify says
that it offers the KAD protocol itself. The KAD handler is registered before the first dial, so
that identify, which runs on every new connection, already lists it for a server (connections opened
earlier, e.g. for a reachability check, get an identify push). A serving peer that others cannot dial
(`reachable=False`, peer/reachability.py) publishes like a server but runs Kademlia as a client, and
`set_reachable` switches the mode when its reachability changes.

py-libp2p quirks handled (with a few private calls into its stores; pinned by libp2p<0.9):
  * get_value/find_providers answer from the local store whenever it has anything (a stale record,
    an old provider list) without asking the network: we ask the closest peers, and add our store.
  * FIND_NODE refuses keys over 50 bytes: value keys are looked up by their sha256 (and are kept out
    of py-libp2p's own republisher, which would look them up raw).
  * ADD_PROVIDER is fire-and-forget and may be dropped: we ask each closest peer whether it lists us,
    send ADD_PROVIDER if not, and ask again; the next republish retries what is still missing.
  * stored values are served without re-validation, and a bad peer serves anything: `find` verifies
    every value. The DHT's warning on every normally closed stream (StreamEOF) is filtered out.
A serving peer's find (every refresh) asks each provider for its own record (it holds its newest) and the
peers that store a record (the closest to its key) only when its peer does not answer within OWN_RECORD_WAIT:
a dead peer's record lingers there until it expires. A client's find (at its start, on a failover) asks all
of them at once, so that a dead peer costs it no wait. (Asking every storer of every record cost a swarm of
n peers n^2 requests a find, and idle peers most of their CPU: scripts/idle_peers.py.) For the same reason a
lookup that found every node reads for any key for LOOKUP_REUSE_S (a refresh looks up once, not four times),
and a node that listed us as a provider of a key (a find's answer shows it) is not asked again for a TTL.
Limits: at most 20 peers per model and epoch are visible at one node (shard the provider key to go beyond;
peer/kad.py keeps the newest 20, so peers that died give way), and Sybil peers can crowd those slots; clocks
must agree to within a fraction of the TTL; in a swarm of over 20 DHT nodes a find costs one lookup per peer
found that does not answer (below that, one lookup finds them all).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import trio
from libp2p.kad_dht import DHTMode, KadDHT
from libp2p.kad_dht.common import BUCKET_SIZE, PROTOCOL_ID
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.tools.anyio_service import background_trio_service

from peer.kad import RecordValidator, ServerKadDHT, not_eof_warning, offers_kad
from peer.p2p import P2PNode
from peer.record import MAX_TTL, NAMESPACE, STATES, PeerRecord, RecordError, provider_key, record_key

log = logging.getLogger("specswarm.dht")
EPOCH = 600.0  # provider keys change every EPOCH s: the same in the whole swarm, and >= any ttl
RPC_TIMEOUT = 5.0  # per DHT request to one peer
OWN_RECORD_WAIT = 1.5  # for a peer's record from the peer itself, before asking the peers that store it
LOOKUP_REUSE_S = 5.0  # a lookup that found every node (fewer than k) stands for any key this long


class SwarmDHT:
    """Our records on a KadDHT in `node`'s trio thread: a server (publishes, answers others) or a
    client (looks up only). `await SwarmDHT.start(...)`."""

    def __init__(self, node: P2PNode, ttl: float, server: bool = True, reachable: bool = True):
        if not 0 < ttl <= MAX_TTL:
            raise ValueError(f"ttl must be in (0, {MAX_TTL}] seconds, not {ttl}")
        self.node, self.ttl, self.server, self.reachable = node, ttl, server, reachable
        self.dht: KadDHT | None = None  # trio thread only
        self._record: PeerRecord | None = None  # the latest announced, republished every ttl/2
        self._due = math.inf
        self._closed = False
        self._runner: asyncio.Future | None = None
        self._everyone: tuple[float, list[ID]] | None = None  # (when, every node but us): the last lookup found all
        self._listed: dict[tuple[bytes, ID], float] = {}  # (provider key, node) -> when that node last listed us

    @classmethod
    async def start(cls, node: P2PNode, bootstrap: Sequence[str] = (), ttl: float = 120.0, *,
                    server: bool = True, reachable: bool = True) -> SwarmDHT:
        """Run a KadDHT (strict validation) in `node`, joined through `bootstrap` multiaddrs. `server`:
        a serving peer's DHT (announces, answers requests, in others' routing tables); False: a
        client's (finds records; py-libp2p's client mode, and no background maintenance). A serving
        peer that others cannot dial (`reachable=False`) announces and republishes, but runs Kademlia
        as a client, so that nobody hands it out as a contact."""
        self = cls(node, ttl, server, reachable)
        logging.getLogger("libp2p.kad_dht.kad_dht").addFilter(not_eof_warning)
        await node.run_trio(self._create_trio)  # before dialling: identify must already list our KAD protocol
        if server and reachable:  # peers we are connected to already (dial-back helpers) must hear of it
            await node.push_identify()
        peers = []
        for addr in bootstrap:
            try:
                peers.append(await node.connect(addr))
            except ConnectionError as exc:
                log.warning("bootstrap peer unreachable: %s", exc)
        if bootstrap and not peers:
            raise ConnectionError(f"could not reach any bootstrap peer of {list(bootstrap)}")
        await node.run_trio(self._join_trio, peers)
        if server:
            self._runner = asyncio.ensure_future(node.run_trio(self._serve_trio))
        kind = ("server" if reachable else "publisher in client mode (unreachable)") if server else "client"
        log.info("DHT %s on %s started (%d bootstrap peers, ttl %.0f s)", kind, node.peer_id, len(peers), ttl)
        return self

    async def announce(self, record: PeerRecord) -> None:
        """Publish `record` now (peer id, keys and expiry are filled in here), then republish it
        every ttl/2 until the next announce() or close(). One model at a time: announcing another
        model publishes the previous model's record as "offline"."""
        if self._closed:
            raise RuntimeError("SwarmDHT is closed")
        if not self.server:
            raise RuntimeError("a client-mode SwarmDHT announces nothing (start it with server=True)")
        if record.peer_id not in ("", self.node.peer_id):
            raise ValueError(f"cannot announce a record of {record.peer_id} from {self.node.peer_id}")
        now = time.time()
        record = dataclasses.replace(record, peer_id=self.node.peer_id, addrs=list(record.addrs or self.node.addrs),
                                     issued=now, expires=now + self.ttl)
        record.sign(self.node.key_pair)  # RecordError now, rather than in the republisher
        if self._record is not None and self._record.model != record.model:  # we leave that model
            self._record = dataclasses.replace(self._record, state="offline")
            await self.node.run_trio(self._publish_trio)
        self._record = record
        await self.node.run_trio(self._publish_trio)

    async def set_reachable(self, reachable: bool) -> None:
        """A serving peer's Kademlia mode after its reachability changed: server if others can dial it,
        client if not (its routing table is kept); connected peers are told at once (identify push)."""
        if not self.server or self._closed or reachable == self.reachable:
            return
        self.reachable = reachable
        await self.node.run_trio(self._switch_trio, reachable)
        await self.node.push_identify()
        log.info("DHT on %s now runs as a %s", self.node.peer_id, "server" if reachable else "client (unreachable)")

    async def find(self, model: str, blocks: range | None = None, *, include_offline: bool = False) -> list[PeerRecord]:
        """Each peer's newest valid, unexpired record of `model` (of those overlapping `blocks`, if
        given), sorted by block range. State "offline" only with include_offline."""
        records = await self.node.run_trio(self._find_trio, model)
        if blocks is not None:
            records = [r for r in records if r.start < blocks.stop and blocks.start < r.end]
        if not include_offline:
            records = [r for r in records if r.state != "offline"]
        return sorted(records, key=lambda r: (r.start, r.end, r.peer_id))

    async def close(self, final_state: str = "offline") -> None:
        """Publish our record in `final_state` (clients stop routing to us at once), then stop the DHT."""
        if final_state not in STATES:
            raise ValueError(f"final_state must be one of {STATES}")
        if self._closed:
            return
        self._closed = True
        try:
            if self._record is not None:
                self._record = dataclasses.replace(self._record, state=final_state)
                await asyncio.wait_for(self.node.run_trio(self._publish_trio), 2 * RPC_TIMEOUT)
        except (ConnectionError, asyncio.TimeoutError) as exc:  # our node is closed, or the swarm is gone
            log.warning("DHT on %s could not publish its final state: %r", self.node.peer_id, exc)
        try:
            if self.server:
                await self.node.run_trio(self._stop_trio)
        except ConnectionError:
            pass  # the node is closed, and _serve_trio with it
        if self._runner is not None:  # a DHT service that will not stop must not hang the shutdown
            done, _ = await asyncio.wait([self._runner], timeout=2 * RPC_TIMEOUT)
            outcome = self._runner.exception() if done and not self._runner.cancelled() else None
            if not done:
                log.warning("DHT service on %s did not stop within %.0f s; closing regardless",
                            self.node.peer_id, 2 * RPC_TIMEOUT)
            elif isinstance(outcome, Exception) and not isinstance(outcome, ConnectionError):
                log.warning("DHT service on %s had failed: %r", self.node.peer_id, outcome)
        log.info("DHT on %s closed", self.node.peer_id)

    # trio thread

    async def _create_trio(self) -> None:
        if self.server:  # in server mode, registers the KAD protocol's handler: what identify tells others
            mode = DHTMode.SERVER if self.reachable else DHTMode.CLIENT
            self.dht = ServerKadDHT(self.node.host, mode, strict_validation=True)
        else:
            self.dht = KadDHT(self.node.host, DHTMode.CLIENT, strict_validation=True)
        self.dht.register_validator(NAMESPACE, RecordValidator())
        self._lock, self._stop = trio.Lock(), trio.Event()

    async def _switch_trio(self, reachable: bool) -> None:
        table = self.dht.routing_table
        peers = table.get_peer_ids()
        await self.dht.switch_mode(DHTMode.SERVER if reachable else DHTMode.CLIENT)  # (empties the table)
        for peer in peers:
            if not table.peer_in_table(peer):
                await table.add_peer(peer, skip_server_mode_check=True)

    async def _join_trio(self, bootstrap_ids: list[str]) -> None:
        table = self.dht.routing_table
        for peer_id in bootstrap_ids:
            pid = ID.from_base58(peer_id)
            if not await offers_kad(self.node.host, pid):  # a peer that runs no DHT server (a private one)
                log.warning("bootstrap peer %s does not serve the DHT (a peer behind a NAT, or not a specswarm "
                            "peer): records cannot be found through it; give a public peer in --initial-peers",
                            peer_id)
                continue
            await table.add_peer(pid, skip_server_mode_check=True)
        if self.server:  # look ourselves up: fills our routing table, puts us in others'
            me = self.node.host.get_id()
            for peer in await self.dht.peer_routing.find_closest_peers_network(me.to_bytes()):
                await self.dht.add_peer(peer)

    async def _serve_trio(self) -> None:
        async with background_trio_service(self.dht), trio.open_nursery() as nursery:
            nursery.start_soon(self._republish_trio)
            await self._stop.wait()
            nursery.cancel_scope.cancel()

    async def _stop_trio(self) -> None:
        self.node.host.remove_stream_handler(PROTOCOL_ID)
        self._stop.set()

    async def _republish_trio(self) -> None:
        while True:
            await trio.sleep(min(1.0, self.ttl / 10))
            if self._record is not None and time.time() >= self._due:
                try:
                    await self._publish_trio()
                except Exception as exc:
                    log.warning("republishing our record failed: %r", exc)
                    self._due = time.time() + min(self.ttl / 4, 5.0)

    async def _publish_trio(self) -> None:
        async with self._lock:
            t0, now = time.perf_counter(), time.time()
            rec = dataclasses.replace(self._record, issued=now, expires=now + self.ttl)
            stored, asked = await self._put_trio(record_key(rec.model, rec.peer_id), rec.sign(self.node.key_pair))
            t1, provided = time.perf_counter(), []
            if rec.state != "offline":
                for epoch in sorted({int(now // EPOCH), int((now + self.ttl) // EPOCH)}):
                    provided.append(await self._provide_trio(provider_key(rec.model, epoch)))
            self._due = now + self.ttl / 2 if rec.state != "offline" else math.inf
            log.debug("published %s blocks %d:%d (%s): stored at %d/%d peers in %.0f ms, listed at %s in %.0f ms",
                      rec.model, rec.start, rec.end, rec.state, stored, asked, (t1 - t0) * 1000, provided,
                      (time.perf_counter() - t1) * 1000)

    async def _put_trio(self, key: str, value: bytes) -> tuple[int, int]:
        """Store `value` locally and at the closest peers; (how many accepted it, how many asked)."""
        store, key_bytes = self.dht.value_store, key.encode()
        self.dht.validator.validate(key, value)  # what honest peers would refuse, we do not send
        store.put(key_bytes, value)
        store.local_keys.discard(key_bytes)  # we republish it; py-libp2p would FIND_NODE the raw key
        peers = await self._closest_trio(hashlib.sha256(key_bytes).digest())
        oks = await self._each_trio(peers, lambda peer: store._store_at_peer(peer, key_bytes, value))
        return sum(map(bool, oks)), len(peers)

    async def _provide_trio(self, key: bytes) -> int:
        """Be listed as a provider of `key` at the closest peers (checked); at how many we are."""
        store, host, now = self.dht.provider_store, self.node.host, time.monotonic()
        store.add_provider(key, PeerInfo(host.get_id(), host.get_addrs()))
        self._listed = {k: t for k, t in self._listed.items() if now - t < self.ttl}  # (old epochs' keys go)

        async def provide(peer: ID) -> bool:
            if time.monotonic() - self._listed.get((key, peer), -math.inf) < self.ttl:
                return True  # it listed us lately (a find or an earlier check saw it): entries last 48 h
            for attempt in range(3):
                providers, _ = await store._get_providers_from_peer_with_closers(peer, key)
                if self._lists_us(key, peer, providers):
                    return True
                if attempt < 2:
                    await store._send_add_provider(peer, key)
                    await trio.sleep(0.05 * (attempt + 1))  # the peer handles it after we hang up
            return False
        return sum(map(bool, await self._each_trio(await self._closest_trio(key), provide)))

    async def _find_trio(self, model: str) -> list[PeerRecord]:
        store, key = self.dht.provider_store, provider_key(model, int(time.time() // EPOCH))
        closest = await self._closest_trio(key)
        answers = await self._each_trio(closest, lambda peer: store._get_providers_from_peer_with_closers(peer, key))
        providers = {p.peer_id for p in store.get_providers(key)}
        providers.update(p.peer_id for answer in answers if answer for p in answer[0])
        for peer, answer in zip(closest, answers):
            if answer:
                self._lists_us(key, peer, answer[0])
        # A lookup that found fewer than k peers found them all: they are the closest to any key.
        everyone = closest if len(closest) < BUCKET_SIZE - 1 else None
        records = await self._each_trio(list(providers), lambda pid: self._get_record_trio(model, pid, everyone),
                                        timeout=3 * RPC_TIMEOUT)
        return [r for r in records if r is not None]

    async def _get_record_trio(self, model: str, peer_id: ID, peers: list[ID] | None = None) -> PeerRecord | None:
        """The newest valid record of `peer_id` for `model`, from our store and the closest peers of its key
        (`peers`, or looked up); a serving peer asks the peer itself first (it holds its newest) and the others
        only when it does not answer within OWN_RECORD_WAIT (dead, unreachable, slow, lying)."""
        store, key_bytes = self.dht.value_store, record_key(model, str(peer_id)).encode()
        answers, asked = [store.get(key_bytes)], None
        if peer_id == self.node.host.get_id():
            return self._newest(model, peer_id, answers)  # ours: our store has the newest
        if self.server:  # (a client asks all at once: a dead peer costs it no wait)
            own, asked = None, peer_id
            with trio.move_on_after(OWN_RECORD_WAIT):
                try:
                    own = await store._get_from_peer(peer_id, key_bytes, return_record=True)
                except Exception as exc:
                    log.debug("DHT request to %s failed: %r", peer_id, exc)
            if (rec := self._newest(model, peer_id, [own])) is not None:
                return rec  # its own, valid: the newest there is
        if peers is None:
            peers = await self._closest_trio(hashlib.sha256(key_bytes).digest())
        answers += await self._each_trio([p for p in peers if p != asked],
                                         lambda peer: store._get_from_peer(peer, key_bytes, return_record=True))
        return self._newest(model, peer_id, answers)

    @staticmethod
    def _newest(model: str, peer_id: ID, answers: list[Any]) -> PeerRecord | None:
        best = None
        for answer in answers:
            if answer is None:
                continue
            try:
                rec = PeerRecord.verify(answer.value)
            except RecordError as exc:
                log.debug("dropped a record for %s of %s: %s", model, peer_id, exc)
                continue
            if rec.model == model and rec.peer_id == str(peer_id):
                if best is None or (rec.issued, rec.expires) > (best.issued, best.expires):
                    best = rec
        return best

    def _lists_us(self, key: bytes, peer: ID, providers: list[PeerInfo]) -> bool:
        """Whether `peer`'s answer lists us as a provider of `key`, remembered for `_provide_trio` (a node that
        dropped us is forgotten: our next announce adds us there again)."""
        if any(p.peer_id == self.node.host.get_id() for p in providers):
            self._listed[(key, peer)] = time.monotonic()
            return True
        self._listed.pop((key, peer), None)
        return False

    async def _closest_trio(self, key: bytes) -> list[ID]:
        """The closest peers to `key` but us; `key` must be <= 50 bytes (longer ones fail FIND_NODE). A lookup
        that found fewer than k nodes found them all, the closest to any key: reused for LOOKUP_REUSE_S."""
        me, now = self.node.host.get_id(), time.monotonic()
        if self._everyone is not None and now - self._everyone[0] < LOOKUP_REUSE_S:
            return list(self._everyone[1])
        peers = [p for p in await self.dht.peer_routing.find_closest_peers_network(key) if p != me]
        self._everyone = (now, peers) if len(peers) < BUCKET_SIZE - 1 else None
        return peers

    async def _each_trio(self, items: list[Any], fn: Callable[[Any], Awaitable[Any]],
                         timeout: float = RPC_TIMEOUT) -> list[Any]:
        """`await fn(item)` for all items at once, each within `timeout`; results (None: failed)."""
        results: list[Any] = [None] * len(items)

        async def one(i: int, item: Any) -> None:
            with trio.move_on_after(timeout):
                try:
                    results[i] = await fn(item)
                except Exception as exc:
                    log.debug("DHT request to %s failed: %r", item, exc)
        async with trio.open_nursery() as nursery:
            for i, item in enumerate(items):
                nursery.start_soon(one, i, item)
        return results
