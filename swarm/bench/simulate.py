"""The analytic model of a chain: predicted ms/token from link delays, compute, draft cost and acceptance.

A step of n tokens through a route of peers 1..m costs

    step(n) = wire(n) + sum_j compute_j(n) + head(n),    wire(n) = trip + n * serial

    trip (push)             = d(client, 1) + d(1, 2) + ... + d(m-1, m) + d(m, client)   (m + 1 one-way hops)
    trip (client-mediated)  = sum_j rtt(client, j)                                       (2m one-way hops)

where compute_j(n) is peer j's time for a step of n tokens (its blocks plus (de)serialisation, measured
as the step's round trip minus the link's) and head(n) the client's embedding, LM head and sampling.
Where the whole chain was timed (`chain_compute`: a step through the route minus the trip), that
replaces sum_j compute_j(n): it also holds the pushes, the client's relaying and thread hand-offs.

Links. From probes (`swarm measure`, `scripts/wan_bench.py`) d is half a measured round trip over the
very links the runs cross (an emulated WAN's delay proxies: the same per-link delay, jitter and
bandwidth), and the bandwidth's serialisation is inside the measured chain compute (serial = 0).
From a link matrix alone (`ChainTimings.from_links`, `swarm simulate --matrix/--emulate`) d is the
delay proxy's mean one-way delay under jitter, E[max(0, N(delay, jitter))], and serial the time to put
one token's hidden state (`bytes_per_token`) on every capped hop of the trip: bytes * 8 / bandwidth.

Plain decoding of N tokens after a prompt of P:  T = wire(P) + compute(P) + head(1) + (N - 1) step(1)
(the prompt's step computes the LM head of its last position only).

Speculative decoding, replayed round by round (`speculative_timeline_ms`, from the run's own rounds,
`RoundShape`, which `swarm.bench.measure` records): one clock for the client's work, on which the
drafting, the verification (head) and the waiting happen one after another, and the chain's work
overlapped with it. A round that was not sent ahead drafts (draft(k) = per_round + k per_token, k the
draft model's steps, a dropped last draft included, drafts from the n-gram index none (their lookup is
not counted); the first round's catch-up is the prompt's prefill into the draft, draft_prefill(P)), leaves, and is back after wire(n) + compute(n), or after
compute(n) more than the step before it where the chain is still busy with that one. A round sent
ahead (pipelining) is drafted during the current round, after it left, and leaves at once: when it
is used (a hit) the client waits only for what is left of its flight; when it is thrown away (a
wasted round) it cost its drafting, and the chain's compute that the next step queues behind.

Cold start. Every generation starts cold: a fresh session, the prompt's prefill through the chain and
into the draft, and (on a mode's first prompt) a round policy that knows nothing yet: it drafts
k_start tokens, explores step sizes, and pipelines its first rounds to measure what pipelining saves,
so a short run has many rounds unlike its steady state (k = 1 pipelined rounds, mostly hits; then
long rounds whose pipelined twins are thrown away). The model does not assume a warm policy: it
replays the rounds the run actually made, in order, from its first, with the costs the probes
measured warm; the one-time costs are their own terms (the prefills), and the session's opening is
outside both the measurement and the model. A sum of mean rounds (`speculative_ms_per_token`, kept for
what-if predictions from an acceptance rate) cannot do this: it counts every hit as free of the trip,
when with one round ahead back-to-back hits still pay a trip every other round (the cold policy's k = 1
rounds: 40 % too fast on a mode's first prompt, tiny pair, continental), and a thrown-away round as the
peers' full compute, which over a WAN overlapped the wire (later prompts: up to 35 % too slow): errors of
opposite sign that cancel over long runs and not over short ones.
ms/token = T / N. Tokens per round is N / R; with a per-token acceptance a and k drafts it is
E(k) = (1 - a^(k+1)) / (1 - a) (`expected_tokens_per_round`).

Compute tables are piecewise linear in n, extrapolated along their last segment. Knows these formulas
and `swarm measure`'s timings file; must not know the network, the client, the model or decoding:
it takes numbers (a link is anything with delay_ms, jitter_ms and mbit_s) and returns numbers.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field

from swarm.argtypes import non_negative, number, positive


@dataclass
class CostTable:
    """ms as a piecewise-linear function of tokens per step, from measured points {n: ms}."""

    points: dict[int, float]

    def __post_init__(self):
        if not self.points:
            raise ValueError("a cost table needs at least one measured point")
        self.points = {int(n): float(ms) for n, ms in sorted(self.points.items(), key=lambda kv: int(kv[0]))}

    def __call__(self, n: float) -> float:
        xs, ys = list(self.points), list(self.points.values())
        if len(xs) == 1:
            return ys[0]
        if n <= xs[0]:
            i = 0
        elif n >= xs[-1]:
            i = len(xs) - 2
        else:
            i = next(i for i in range(len(xs) - 1) if xs[i] <= n <= xs[i + 1])
        slope = (ys[i + 1] - ys[i]) / (xs[i + 1] - xs[i])
        return max(0.0, ys[i] + slope * (n - xs[i]))


@dataclass
class ChainTimings:
    """What the model needs to know about a swarm and its client (all in ms)."""

    push_hops_ms: list[float]  # one-way delays along the push path: client->1, 1->2, ..., m->client
    client_rtt_ms: list[float]  # client <-> peer j round trips
    compute: list[CostTable]  # per peer on the route: ms for a step of n tokens
    head: CostTable = field(default_factory=lambda: CostTable({1: 0.0}))  # client: embed + LM head + sampling
    draft_ms_per_token: float = 0.0  # one draft-model step (one token)
    draft_ms_per_round: float = 0.0  # catching the draft's cache up with the committed tokens, per round
    draft_prefill: CostTable = field(default_factory=lambda: CostTable({1: 0.0}))  # the prompt into the draft
    # the whole chain's compute as the client sees it (a step's time minus the trip), by mode; when
    # measured it replaces the sum of per-peer tables: it includes pushing, relaying and thread hand-offs
    chain_compute: dict[str, CostTable] = field(default_factory=dict)  # "push" / "client-mediated"
    # ms per token of a step's hidden states on the trip's capped hops, by mode; 0 where it is measured
    # inside the chain compute (probes through the emulated links)
    serial_ms_per_token: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_links(cls, links, compute: list[CostTable], bytes_per_token: float = 0.0, **costs) -> "ChainTimings":
        """Timings from a link matrix alone (node 0 the client, then the peers in chain order; a link is
        anything with delay_ms, jitter_ms, mbit_s): the delay proxy's mean one-way delays, and the
        serialisation of `bytes_per_token` on every capped hop. `costs`: head, draft_* fields."""
        m = len(links) - 1
        push_path = [(0, 1)] + [(j, j + 1) for j in range(1, m)] + [(m, 0)]
        mediated = [pair for j in range(1, m + 1) for pair in ((0, j), (j, 0))]

        def serial(path) -> float:
            return sum(1000 * bytes_per_token * 8 / (links[a][b].mbit_s * 1e6) for a, b in path if links[a][b].mbit_s)

        hop = [[expected_delay_ms(link.delay_ms, link.jitter_ms) for link in row] for row in links]
        return cls([hop[a][b] for a, b in push_path], [hop[0][j] + hop[j][0] for j in range(1, m + 1)], compute,
                   serial_ms_per_token={"push": serial(push_path), "client-mediated": serial(mediated)}, **costs)

    def draft_ms(self, k: float) -> float:
        return self.draft_ms_per_round + k * self.draft_ms_per_token

    def trip(self, push: bool) -> float:
        return sum(self.push_hops_ms) if push else sum(self.client_rtt_ms)

    def wire(self, n: float, push: bool = True) -> float:
        """The trip of a step of n tokens: the hops' delays plus the serialisation not measured elsewhere."""
        return self.trip(push) + n * self.serial_ms_per_token.get("push" if push else "client-mediated", 0.0)

    def compute_ms(self, n: float, push: bool = True) -> float:
        chain = self.chain_compute.get("push" if push else "client-mediated")
        return chain(n) if chain is not None else sum(c(n) for c in self.compute)

    def step(self, n: float, push: bool = True) -> float:
        return self.wire(n, push) + self.compute_ms(n, push) + self.head(n)

    def to_json(self) -> dict:
        return dict(push_hops_ms=self.push_hops_ms, client_rtt_ms=self.client_rtt_ms,
                    compute=[c.points for c in self.compute], head=self.head.points,
                    draft_ms_per_token=self.draft_ms_per_token, draft_ms_per_round=self.draft_ms_per_round,
                    draft_prefill=self.draft_prefill.points,
                    chain_compute={mode: c.points for mode, c in self.chain_compute.items()},
                    serial_ms_per_token=self.serial_ms_per_token)

    @classmethod
    def from_json(cls, d: dict) -> "ChainTimings":
        return cls(d["push_hops_ms"], d["client_rtt_ms"], [CostTable(c) for c in d["compute"]],
                   CostTable(d.get("head") or {1: 0.0}), d.get("draft_ms_per_token", 0.0),
                   d.get("draft_ms_per_round", 0.0), CostTable(d.get("draft_prefill") or {1: 0.0}),
                   {mode: CostTable(c) for mode, c in (d.get("chain_compute") or {}).items()},
                   dict(d.get("serial_ms_per_token") or {}))


def expected_delay_ms(delay_ms: float, jitter_ms: float) -> float:
    """Mean one-way delay of the delay proxy: delay + normal jitter, never below zero, E[max(0, X)]."""
    if jitter_ms <= 0:
        return delay_ms
    z = delay_ms / jitter_ms
    cdf, pdf = 0.5 * (1 + math.erf(z / math.sqrt(2))), math.exp(-z * z / 2) / math.sqrt(2 * math.pi)
    return delay_ms * cdf + jitter_ms * pdf


@dataclass(frozen=True)
class RoundShape:
    """One verification round as a run made it, in order (`swarm.bench.measure` records them)."""

    sent: int  # tokens its step carried: the last committed token and the drafts (a tree: its nodes)
    drafted: int  # draft steps it cost, the k of draft(k): a chain's drafts plus a dropped last one; 0: none
    hit: bool = False  # it had been sent ahead during the round before, and was used
    ahead: "RoundShape | None" = None  # a round sent ahead during this one (the next one if that is a hit)


def plain_ms_per_token(t: ChainTimings, new_tokens: int, prompt_tokens: int, push: bool = True) -> float:
    """Plain decoding: one step for the prompt (the LM head of its last position only), then one step
    per token (the last token needs none)."""
    prefill = t.wire(prompt_tokens, push) + t.compute_ms(prompt_tokens, push) + t.head(1)
    return (prefill + (new_tokens - 1) * t.step(1, push)) / new_tokens


def speculative_ms_per_token(t: ChainTimings, new_tokens: int, prompt_tokens: int, rounds: int, sent_tokens: int,
                             drafted: float, pipelined_hits: int = 0, push: bool = True, wasted_rounds: int = 0) -> float:
    """Speculative decoding as a sum of mean rounds (for what-if predictions from an acceptance rate;
    a measured run is replayed by `speculative_timeline_ms`): `rounds` verification steps of
    `sent_tokens` tokens in all (mean n = sent / rounds; cost is linear within a segment of the tables),
    `drafted` draft-model steps.

    Pipelining sends a round ahead before the verdict on the current one. Here a round that was
    already on the wire when its turn came (a hit) pays neither the trip nor its drafting again; every
    round sent ahead costs its drafting, and one thrown away (wasted) also costs the peers' compute.
    CPU work is counted one after another (as on one shared machine); only the wire overlaps."""
    n = sent_tokens / max(rounds, 1)
    k = drafted / max(rounds, 1)
    compute, head, draft = t.compute_ms(n, push), t.head(n), t.draft_ms(k)
    total = _spec_prefill(t, prompt_tokens, push) + t.draft_prefill(prompt_tokens)
    waited = rounds - pipelined_hits
    total += waited * (t.wire(n, push) + draft) + rounds * (compute + head)
    total += (pipelined_hits + wasted_rounds) * draft + wasted_rounds * compute
    return total / new_tokens


def _spec_prefill(t: ChainTimings, prompt_tokens: int, push: bool) -> float:
    """The prompt but its last token through the chain (no LM head: the last token travels with round 1)."""
    if prompt_tokens <= 1:
        return 0.0
    return t.wire(prompt_tokens - 1, push) + t.compute_ms(prompt_tokens - 1, push)


def speculative_timeline_ms(t: ChainTimings, rounds: list[RoundShape], prompt_tokens: int, push: bool = True) -> float:
    """Total ms of a speculative generation, replaying its rounds in order (see the module's docstring):
    the client's drafting, waiting and verifying on one clock; each step back after wire + compute, or
    compute after the step before it where the chain is still busy with that one (a thrown-away round
    included); a round sent ahead leaves once drafted, during the round before."""
    clock = _spec_prefill(t, prompt_tokens, push)
    chain_done = clock  # when the chain has answered every step sent so far
    ahead_back = None  # when the round sent ahead during the last round is back

    def draft(k: int, first: bool) -> float:
        if k <= 0:
            return 0.0
        if first:  # the catch-up step of the first round is the prompt's prefill into the draft
            return t.draft_prefill(prompt_tokens) + (k - 1) * t.draft_ms_per_token
        return t.draft_ms(k)

    def launch(at: float, n: int) -> float:
        nonlocal chain_done
        compute = t.compute_ms(n, push)
        chain_done = max(at + t.wire(n, push) + compute, chain_done + compute)
        return chain_done

    for i, r in enumerate(rounds):
        if r.hit and ahead_back is not None:
            back = ahead_back
        else:
            clock += draft(r.drafted, i == 0)
            back = launch(clock, r.sent)
        ahead_back = None
        if r.ahead is not None:
            clock += draft(r.ahead.drafted, False)
            ahead_back = launch(clock, r.ahead.sent)
        clock = max(clock, back) + t.head(r.sent)
    return clock


def expected_tokens_per_round(acceptance: float, k: int) -> float:
    """Tokens one round commits when each draft is accepted with probability `acceptance` (k drafts + 1)."""
    a = min(max(acceptance, 0.0), 0.999999)
    return (1 - a ** (k + 1)) / (1 - a)


def relative_error(predicted: float, measured: float) -> float:
    return (predicted - measured) / measured if measured else float("nan")


def main(argv: list[str] | None = None) -> int:
    """`swarm simulate`: predictions from a timings file (`swarm measure --json` writes one) or from flags."""
    ap = argparse.ArgumentParser(prog="swarm simulate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    return run(ap.parse_args(argv))


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--timings", help="JSON from `swarm measure --json` or scripts/wan_bench.py (their 'timings')")
    ap.add_argument("--peers", type=positive(), default=2, help="without --timings: peers on the chain")
    ap.add_argument("--one-way-ms", type=non_negative(), default=25.0, help="without --timings: delay of every link")
    ap.add_argument("--matrix", help="without --timings: the links (delay, jitter, bandwidth) of a latency matrix "
                    "file, as `swarm measure --matrix` / scripts/wan_bench.py --matrix read it (sets --peers)")
    ap.add_argument("--emulate", help="without --timings: the links of an emulated-WAN profile "
                    "(lan, metro, continental, intercontinental, heterogeneous)")
    ap.add_argument("--bytes-per-token", type=non_negative(), default=2304.0,
                    help="with --matrix/--emulate: bytes of one token's hidden state on the wire, for the "
                    "bandwidth caps [default: 2304, SmolLM2-135M's 576 floats]")
    ap.add_argument("--compute-ms", type=non_negative(), nargs=2, default=[1.0, 0.1], metavar=("BASE", "PER_TOKEN"),
                    help="without --timings: each peer's step time = BASE + PER_TOKEN x n")
    ap.add_argument("--draft-ms", type=non_negative(), default=0.5, help="without --timings: ms per drafted token")
    ap.add_argument("--acceptance", type=number(float, 0, 1), default=0.7, help="per-token draft acceptance, 0..1")
    ap.add_argument("--k", type=positive(), nargs="+", default=[1, 2, 4, 8], help="draft lengths to predict")
    ap.add_argument("--prompt-tokens", type=positive(), default=128, help="prompt length [default: 128]")
    ap.add_argument("--new-tokens", type=positive(), default=128, help="tokens generated [default: 128]")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def run(args) -> int:
    if args.timings:
        data = json.loads(open(args.timings).read())
        data = data["results"][0] if "results" in data else data  # scripts/wan_bench.py: its first configuration
        t = ChainTimings.from_json(data.get("timings", data))
    else:
        t = _timings_from_flags(args)
    n, p = args.new_tokens, args.prompt_tokens
    rows = [dict(mode="plain client-mediated", ms_per_token=plain_ms_per_token(t, n, p, push=False)),
            dict(mode="plain push", ms_per_token=plain_ms_per_token(t, n, p))]
    for k in args.k:
        per_round = expected_tokens_per_round(args.acceptance, k)
        rounds = max(1, round(n / per_round))
        rows.append(dict(mode=f"speculative k={k}", tokens_per_round=per_round,
                         ms_per_token=speculative_ms_per_token(t, n, p, rounds, rounds * (k + 1), rounds * k)))
    plain = rows[1]["ms_per_token"]
    for r in rows:
        r["speedup_vs_plain_push"] = plain / r["ms_per_token"]
    if args.json:
        print(json.dumps(dict(timings=t.to_json(), acceptance=args.acceptance, predictions=rows)))
    else:
        print(f"trip: push {t.trip(True):.1f} ms, client-mediated {t.trip(False):.1f} ms; "
              f"compute {t.compute_ms(1):.2f} ms (1 token) .. {t.compute_ms(9):.2f} ms (9 tokens)")
        print(f"{'mode':>24} | ms/token | tokens/round | x plain push")
        for r in rows:
            tpr = f"{r['tokens_per_round']:.2f}" if "tokens_per_round" in r else "1"
            print(f"{r['mode']:>24} | {r['ms_per_token']:8.2f} | {tpr:>12} | {r['speedup_vs_plain_push']:.2f}")
    return 0


def _timings_from_flags(args) -> ChainTimings:
    """Without --timings: every link --one-way-ms, or a matrix's / a profile's links, and linear compute."""
    base, per = args.compute_ms
    if not (args.matrix or args.emulate):
        return ChainTimings([args.one_way_ms] * (args.peers + 1), [2 * args.one_way_ms] * args.peers,
                            [CostTable({1: base + per, 64: base + 64 * per})] * args.peers,
                            draft_ms_per_token=args.draft_ms)
    from swarm.bench.wan.links import PROFILES, load_matrix

    if args.matrix:
        try:
            links = load_matrix(args.matrix)
        except (OSError, ValueError) as e:
            raise SystemExit(f"swarm simulate: --matrix: {e}") from None
    elif args.emulate in PROFILES:
        links = PROFILES[args.emulate].matrix(args.peers)
    else:
        raise SystemExit(f"swarm simulate: --emulate must be one of {', '.join(sorted(PROFILES))}")
    compute = [CostTable({1: base + per, 64: base + 64 * per})] * (len(links) - 1)
    return ChainTimings.from_links(links, compute, args.bytes_per_token, draft_ms_per_token=args.draft_ms)
