"""Probing a route: what each part of a chain costs, measured between the runs of `swarm measure`.

One probe of a client's current route gives raw numbers (a dict; `merge_probes` takes medians over
several, `timings_from` turns them into the simulator's `ChainTimings`):
  - round trips on the data plane: the client to every peer of its route (an Info request on an
    open stream, over the path the client's streams take: direct, webrtc, webrtc-turn or relay, so a
    relayed hop's two legs are in it), and between consecutive peers: pinged through the emulated link where the caller
    names the links (`EmulatedLinks`, e.g. a `WanLayout`), else what the peer published, else
    estimated from the client's own round trips;
  - each peer's compute per step by tokens per step (a one-hop session: the step's round trip minus
    the link's);
  - the client's own costs: embedding + LM head + token probabilities, and the draft model's
    (per drafted token, per round, prefill of a prompt);
  - the whole chain's compute as generation sees it (steps through a session of the route, push
    and client-mediated, minus the trip).

Knows the client's surface (`route`, `peers`, `node`, `paths`, `bg`, `dial`, `config`, `with_config`,
`session`), `ChainSession`, the protocol's Info message and the head / draft models. Must not know
decoding loops or policies, the run loop over modes, reporting, or how an emulated WAN is built.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import replace
from typing import Protocol

import torch

from peer.model import StepLayout
from peer.transport import dial as raw_dial
from protocol import messages as m

from swarm.bench.simulate import ChainTimings, CostTable
from swarm.client.chain import ChainSession
from swarm.decode.generate import LocalModel
from swarm.decode.sampling import SamplingParams, token_probs
from swarm.decode.speculative import Drafter, SpecConfig

# A step's cost is not linear in its tokens at small n on a CPU: one token is a matrix-vector product,
# two or three run about as that many of them, four or more a blocked matrix product (SmolLM2's LM head:
# 11, 23, 34, 18, 20 ms at n = 1..5), so the tables keep every measured size, 4 included.
STEP_SIZES = (1, 2, 3, 4, 5, 9, 17, 33)
PREFILL_TOKENS = 128


class EmulatedLinks(Protocol):
    """Where an emulated WAN's link from route position i to j can be pinged (0 = the client)."""

    def link_addr(self, i: int, j: int) -> str: ...


class NoProgress:
    def update(self, n: int = 1) -> None:
        pass


def probe_units(n_hops: int) -> int:
    """Progress units one probe of a route of n hops reports (for sizing a progress bar)."""
    return 3 * n_hops + 3


# --- the network ----------------------------------------------------------------------------------
async def _ping(stream, reps: int) -> float:
    """Median round trip (ms) of an Info request on an open data-plane stream."""
    loop = asyncio.get_running_loop()
    times = []
    for _ in range(reps + 1):
        t0 = loop.time()
        await stream.send(m.encode(m.Info()))
        reply = m.decode(await stream.recv())
        times.append(1000 * (loop.time() - t0))
        if not isinstance(reply, m.InfoReply):
            raise ConnectionError(f"the peer answered Info with {type(reply).__name__}")
    return statistics.median(times[1:])  # the first pays for warming up


async def _ping_addr(dial, addr: str, reps: int) -> float:
    stream = await dial(addr)
    try:
        return await _ping(stream, reps)
    finally:
        await stream.close()


async def _hop_compute(model, hop, rtt_ms: float, reps: int) -> dict[int, float]:
    """ms per step of n tokens on one peer (after a PREFILL_TOKENS prefill): step round trip minus rtt."""
    chain = ChainSession(model.dial, [hop], replace(model.config, push=False))
    width = model.head.cfg.hidden_size
    loop = asyncio.get_running_loop()
    out = {}
    try:
        await chain.open(PREFILL_TOKENS + max(STEP_SIZES) + 8)

        async def timed(n: int, start: int) -> float:
            hidden = torch.randn(n, width) * 0.1
            t0 = loop.time()
            await chain.step(hidden, StepLayout(start, n))
            return 1000 * (loop.time() - t0)

        await timed(PREFILL_TOKENS, 0)  # warm-up
        out[PREFILL_TOKENS] = statistics.median([await timed(PREFILL_TOKENS, 0) for _ in range(max(1, reps // 2))])
        for n in STEP_SIZES:
            out[n] = statistics.median([await timed(n, PREFILL_TOKENS) for _ in range(reps)])
    finally:
        await chain.close()
    return {n: max(0.0, ms - rtt_ms) for n, ms in sorted(out.items())}


async def _link_rtt(model, j: int, client_rtt: list[float], links: EmulatedLinks | None, reps: int):
    """(ms, how it was found) between route positions j and j + 1 (1-based peers)."""
    route = model.route
    if links is not None:  # an emulated WAN: ping through that link's own proxy, not the client's
        return await _ping_addr(lambda a: raw_dial(model.node, a), links.link_addr(j, j + 1), reps), "emulated link"
    published = model.peers.get(route[j - 1].peer_id)
    rtt = published.rtts.get(route[j].peer_id) if published else None
    if rtt is not None:
        return rtt, "published by the peer"
    return (client_rtt[j - 1] + client_rtt[j]) / 2, "estimated from the client's RTTs"


async def _network(model, reps: int, progress, links: EmulatedLinks | None) -> dict:
    client_rtt = []
    for hop in model.route:
        client_rtt.append(await _ping_addr(model.dial, hop.addr, reps))
        progress.update(1)
    between = []  # consecutive peers: (ms, how it was found)
    for j in range(1, len(model.route)):
        between.append(await _link_rtt(model, j, client_rtt, links, reps))
        progress.update(1)
    compute = []
    for hop, rtt in zip(model.route, client_rtt):
        compute.append(await _hop_compute(model, hop, rtt, reps))
        progress.update(1)
    paths = [model.paths.path_of(hop.peer_id) if getattr(model, "paths", None) else None for hop in model.route]
    return dict(client_rtt=client_rtt, links=between, compute=compute, paths=paths)  # paths: peer/paths.py


# --- the client -----------------------------------------------------------------------------------
def _head_costs(head, reps: int, greedy: bool = True) -> dict[int, float]:
    """ms of the client's own work for a step of n tokens as the runs do it: embed, then greedy the LM head's
    argmax (`ModelHead.argmax`: from a bfloat16 copy and a bound where that pays), else the logits and token
    probabilities."""
    out = {}
    for n in STEP_SIZES:
        ids = torch.randint(0, head.cfg.vocab_size, (n,))
        times = []
        for _ in range(reps + 1):
            t0 = time.perf_counter()
            hidden = head.embed(ids)
            if greedy:
                head.argmax(hidden).tolist()
            else:
                token_probs(head.logits(hidden), SamplingParams()).argmax(-1).tolist()
            times.append(1000 * (time.perf_counter() - t0))
        out[n] = statistics.median(times[1:])
    return out


def _draft_prefill(draft: LocalModel, reps: int) -> dict[int, float]:
    """ms to run a prompt of n tokens into a fresh draft cache (what the first round of a generation pays)."""
    out = {}
    for n in (1, 32, 128, 256):
        ids = torch.randint(0, draft.head.cfg.vocab_size, (n,))
        times = []
        for _ in range(reps + 1):
            session = draft.session(n + 1)
            t0 = time.perf_counter()
            draft.head.logits(session.submit(draft.head.embed(ids), StepLayout(0, n)).result()[-1:])
            times.append(1000 * (time.perf_counter() - t0))
            session.close()
        out[n] = statistics.median(times[1:])
    return out


def _draft_costs(draft: LocalModel, prompt: list[int], reps: int) -> tuple[float, float]:
    """(ms per drafted token, ms per round) of the draft model, from rounds of 2 and of 6 drafts."""
    drafter = Drafter(draft, len(prompt) + 16 * (reps + 2), SpecConfig().draft_vocab)  # the default head
    context = list(prompt)
    drafter.propose(context, 2, SamplingParams())  # warm-up: the prompt goes in
    times = {2: [], 6: []}
    for r in range(2 * reps):
        k = 2 if r % 2 else 6
        t0 = time.perf_counter()
        tokens, _ = drafter.propose(context, k, SamplingParams())
        times[k].append(1000 * (time.perf_counter() - t0))
        context += tokens[:2] + [0]  # two accepted, one of the target's own: the next round catches up 3
    t2, t6 = statistics.median(times[2]), statistics.median(times[6])
    per_token = max(0.0, (t6 - t2) / 4)
    return per_token, max(0.0, t2 - 2 * per_token)


def _chain_compute(model, trip_ms: float, reps: int) -> dict[int, float]:
    """ms per step of n tokens through the whole route, as generation sees it (from this thread, through
    the client's session, in the model's own push or client-mediated mode), minus the trip: the chain's
    compute plus every hand-off on the way."""
    session = model.session(PREFILL_TOKENS + max(STEP_SIZES) + 8)
    width = model.head.cfg.hidden_size

    def step(n: int, start: int) -> float:
        hidden = torch.randn(n, width) * 0.1
        t0 = time.perf_counter()
        session.submit(hidden, StepLayout(start, n)).result()
        return 1000 * (time.perf_counter() - t0)

    times: dict[int, list[float]] = {n: [] for n in (*STEP_SIZES, PREFILL_TOKENS)}
    try:
        step(PREFILL_TOKENS, 0)
        for r in range(reps):  # sizes interleaved, so load hits them alike
            for n in STEP_SIZES:
                times[n].append(step(n, PREFILL_TOKENS))
            if r < 2:
                times[PREFILL_TOKENS].append(step(PREFILL_TOKENS, 0))
    finally:
        session.close()
    return {n: max(0.0, statistics.median(ts) - trip_ms) for n, ts in sorted(times.items())}


# --- one probe, many probes -----------------------------------------------------------------------
def _push_hops(net: dict) -> list[float]:
    """One-way delays along the push path: half of each round trip (client->1, 1->2, ..., m->client)."""
    rtts = net["client_rtt"]
    return [rtts[0] / 2] + [ms / 2 for ms, _ in net["links"]] + [rtts[-1] / 2]


def probe(model, draft: LocalModel | None, prompt: list[int], reps: int = 5, progress=None,
          links: EmulatedLinks | None = None, greedy: bool = True) -> dict:
    """One round of every probe of the model's current route: raw numbers (see `timings_from`).
    `links`: where to ping the links between peers of an emulated WAN (else what peers published);
    `greedy`: the runs decode greedily (the client's head cost is then its argmax's, not the logits')."""
    progress = progress or NoProgress()
    net = model.bg.run(_network(model, reps, progress, links))
    net["head"] = _head_costs(model.head, reps, greedy)
    net["draft"] = _draft_costs(draft, prompt, reps) if draft is not None else (0.0, 0.0)
    net["draft_prefill"] = _draft_prefill(draft, reps) if draft is not None else {1: 0.0}
    progress.update(1)
    net["chain"] = {}
    for mode, push in (("push", True), ("client-mediated", False)):
        trip = sum(_push_hops(net)) if push else sum(net["client_rtt"])
        net["chain"][mode] = _chain_compute(model.with_config(push=push), trip, reps)
        progress.update(1)
    return net


def _median_tables(tables: list[dict]) -> dict:
    return {n: statistics.median(t[n] for t in tables if n in t) for n in tables[0]}


def merge_probes(probes: list[dict]) -> dict:
    """Medians over repeated probes (taken between the runs, so they saw the same background load)."""
    first = probes[0]
    return dict(
        client_rtt=[statistics.median(p["client_rtt"][j] for p in probes) for j in range(len(first["client_rtt"]))],
        links=[(statistics.median(p["links"][j][0] for p in probes), first["links"][j][1])
               for j in range(len(first["links"]))],
        compute=[_median_tables([p["compute"][j] for p in probes]) for j in range(len(first["compute"]))],
        head=_median_tables([p["head"] for p in probes]),
        draft=tuple(statistics.median(p["draft"][i] for p in probes) for i in range(2)),
        draft_prefill=_median_tables([p["draft_prefill"] for p in probes]),
        chain={mode: _median_tables([p["chain"][mode] for p in probes]) for mode in first["chain"]},
        paths=first.get("paths"), probes=len(probes))


def timings_from(net: dict) -> ChainTimings:
    """The simulator's view of (merged) probes: cost tables through the measured medians, as measured.
    Not a line through the small steps: that charged a 1-token step (all of plain decoding) the cost of
    the line, 1.4x what it pays (chain 85 ms fitted, 62 probed, 64 in plain decoding's own steps, lan),
    and a 3-token step (k = 2) less than it pays."""
    return ChainTimings(_push_hops(net), net["client_rtt"], [CostTable(c) for c in net["compute"]],
                        CostTable(net["head"]), *net["draft"], CostTable(net["draft_prefill"]),
                        {mode: CostTable(c) for mode, c in net["chain"].items()})
