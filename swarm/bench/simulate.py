"""The analytic model of a chain: predicted ms/token from link delays, compute, draft cost and acceptance.

A step of n tokens through a route of peers 1..m costs

    step(n) = trip + sum_j compute_j(n) + head(n)

    trip (push)             = d(client, 1) + d(1, 2) + ... + d(m-1, m) + d(m, client)   (m + 1 one-way hops)
    trip (client-mediated)  = sum_j rtt(client, j)                                       (2m one-way hops)

where compute_j(n) is peer j's time for a step of n tokens (its blocks plus (de)serialisation, measured
as the step's round trip minus the link's) and head(n) the client's embedding, LM head and sampling.
Where the whole chain was timed (`chain_compute`: a step through the route minus the trip), that
replaces sum_j compute_j(n): it also holds the pushes, the client's relaying and thread hand-offs.

Plain decoding of N tokens after a prompt of P:  T = step(P) + (N - 1) step(1).
Speculative decoding, R rounds carrying S tokens in all (each round: the last committed token plus
its drafts; a tree round sends width x depth drafts), D drafted tokens of the draft model:

    T = step(P - 1) + draft_prefill(P) + sum_rounds [trip + sum_j compute_j(n_r) + head(n_r) + draft(k_r)]
    draft(k) = per_round + k per_token   (the draft's catch-up step, then k one-token steps)

Pipelined (a round sent ahead, before the verdict on the current one): H hits (rounds already on the
wire when their turn came) pay neither the trip nor drafting at their turn; each of the H + W rounds
sent ahead pays its drafting, and each of the W wasted ones (thrown away after a rejection) also the
peers' compute:  + (H + W) draft(k) + W compute(n) - H (trip + draft(k)). CPU work counts one after
another (one shared machine, as here); only the wire overlaps. ms/token = T / N. Tokens per round is N / R; with a per-token
acceptance a and k drafts it is E(k) = (1 - a^(k+1)) / (1 - a) (`expected_tokens_per_round`).

Compute tables are piecewise linear in n, extrapolated along their last segment. Knows these formulas
and `swarm measure`'s timings file; must not know the network, the client, the model or decoding:
it takes numbers and returns numbers.
"""

from __future__ import annotations

import argparse
import json
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

    @classmethod
    def fitted(cls, points: dict[int, float], linear_upto: int = 33) -> "CostTable":
        """Measured points smoothed: a least-squares line through those with n <= linear_upto (single
        probes of small steps are noisy; their cost is close to linear), the larger ones kept as measured."""
        small = {n: ms for n, ms in points.items() if n <= linear_upto}
        if len(small) < 2:
            return cls(dict(points))
        mx, my = sum(small) / len(small), sum(small.values()) / len(small)
        var = sum((n - mx) ** 2 for n in small)
        slope = max(0.0, sum((n - mx) * (ms - my) for n, ms in small.items()) / var)
        line = {n: max(0.0, my + slope * (n - mx)) for n in small}
        return cls({**line, **{n: ms for n, ms in points.items() if n > linear_upto}})

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

    def draft_ms(self, k: float) -> float:
        return self.draft_ms_per_round + k * self.draft_ms_per_token

    def trip(self, push: bool) -> float:
        return sum(self.push_hops_ms) if push else sum(self.client_rtt_ms)

    def compute_ms(self, n: float, push: bool = True) -> float:
        chain = self.chain_compute.get("push" if push else "client-mediated")
        return chain(n) if chain is not None else sum(c(n) for c in self.compute)

    def step(self, n: float, push: bool = True) -> float:
        return self.trip(push) + self.compute_ms(n, push) + self.head(n)

    def to_json(self) -> dict:
        return dict(push_hops_ms=self.push_hops_ms, client_rtt_ms=self.client_rtt_ms,
                    compute=[c.points for c in self.compute], head=self.head.points,
                    draft_ms_per_token=self.draft_ms_per_token, draft_ms_per_round=self.draft_ms_per_round,
                    draft_prefill=self.draft_prefill.points,
                    chain_compute={mode: c.points for mode, c in self.chain_compute.items()})

    @classmethod
    def from_json(cls, d: dict) -> "ChainTimings":
        return cls(d["push_hops_ms"], d["client_rtt_ms"], [CostTable(c) for c in d["compute"]],
                   CostTable(d.get("head") or {1: 0.0}), d.get("draft_ms_per_token", 0.0),
                   d.get("draft_ms_per_round", 0.0), CostTable(d.get("draft_prefill") or {1: 0.0}),
                   {mode: CostTable(c) for mode, c in (d.get("chain_compute") or {}).items()})


def plain_ms_per_token(t: ChainTimings, new_tokens: int, prompt_tokens: int, push: bool = True) -> float:
    """Plain decoding: one step for the prompt, then one step per token (the last token needs none)."""
    total = t.step(prompt_tokens, push) + (new_tokens - 1) * t.step(1, push)
    return total / new_tokens


def speculative_ms_per_token(t: ChainTimings, new_tokens: int, prompt_tokens: int, rounds: int, sent_tokens: int,
                             drafted: float, pipelined_hits: int = 0, push: bool = True, wasted_rounds: int = 0) -> float:
    """Speculative decoding from what the rounds carried: `rounds` verification steps of `sent_tokens`
    tokens in all (mean n = sent / rounds; cost is linear within a segment of the tables), `drafted`
    draft-model steps.

    Pipelining sends a round ahead before the verdict on the current one. A round that was already on
    the wire when its turn came (a hit) does not pay the trip, nor its drafting again; every round sent
    ahead costs its drafting, and one thrown away (wasted) also costs the peers' compute. CPU work is
    counted one after another (as on one shared machine); only the wire overlaps."""
    n = sent_tokens / max(rounds, 1)
    k = drafted / max(rounds, 1)
    compute, head, draft = t.compute_ms(n, push), t.head(n), t.draft_ms(k)
    total = t.step(prompt_tokens - 1, push) if prompt_tokens > 1 else 0.0
    total += t.draft_prefill(prompt_tokens)
    waited = rounds - pipelined_hits
    total += waited * (t.trip(push) + draft) + rounds * (compute + head)
    total += (pipelined_hits + wasted_rounds) * draft + wasted_rounds * compute
    return total / new_tokens


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
        base, per = args.compute_ms
        t = ChainTimings([args.one_way_ms] * (args.peers + 1), [2 * args.one_way_ms] * args.peers,
                         [CostTable({1: base + per, 64: base + 64 * per})] * args.peers,
                         draft_ms_per_token=args.draft_ms)
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
