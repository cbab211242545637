"""What spot-checks cost: ms per token through real peers, with and without checks, on the same prompts.

Starts 3 peers (a third of the model's blocks each) and a replica of the middle span on this machine, then
generates (greedy, plain decoding) each prompt at every `--verify-rate` in turn on one client (views of it:
the same peers, route and probation state; the order rotates per prompt so background load hits all alike).
Reports per rate: ms/token (median over prompts, wall time including the session's open), its overhead over
rate 0, the ms per token spent inside checks (opening shadows, catching up, comparing: the direct measure,
less noisy than the difference of two medians on a loaded machine), checks per generation, and the steps the
shadow routes replayed per generated token (extra work for the swarm: 1.0 = every step computed twice). Also:
the first generation of a fresh client (probation: every new peer that has a replica is checked on its first
step), and with `--liar`, the generation that catches a lying peer of the middle span routed through, beside
one honest peer of that span (probation check, the client's own third opinion from blocks it loads, re-route).

    python scripts/bench_integrity.py                        # the bundled model, rates 0,0.01,0.05,0.2,1
    python scripts/bench_integrity.py --tokens 64 --rounds 3 --rates 0,0.05 --liar --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from liar_peer import LIAR_ENTRY  # noqa: E402
from peer.model import Checkpoint  # noqa: E402
from swarm.bundled import TINY_MODEL  # noqa: E402
from swarm.client.config import ClientConfig  # noqa: E402
from swarm.client.integrity import with_rollback  # noqa: E402
from swarm.client.swarm_model import SwarmModel  # noqa: E402
from swarm.decode.generate import generate  # noqa: E402
from swarm.launch import PeerProcess, even_spans, start_peers, stop_peers  # noqa: E402
from swarm.text import load_tokenizer  # noqa: E402

PROMPTS = ["def fibonacci(n):", "import numpy as np\n\ndef softmax(x):", "class Stack:\n    def __init__(self):",
           "def is_prime(n):", "def quicksort(xs):", "def read_json(path):"]


def timed(model, prompt: list[int], tokens: int) -> tuple[float, list[int]]:
    t0 = time.perf_counter()
    res = with_rollback(model, lambda cb: generate(model, prompt, tokens, stop_at_eos=False, on_tokens=cb))
    return time.perf_counter() - t0, res.tokens


def measure_rates(model: SwarmModel, prompts: list[list[int]], rates: list[float], tokens: int) -> dict:
    views = {r: model.with_config(verify_rate=r) for r in rates}
    timed(views[1.0 if 1.0 in views else rates[-1]], prompts[0], 4)  # warm-up; every peer passes probation
    stats = model.audit.stats
    rows = {r: {"ms": [], "checks": 0, "replayed": 0, "tokens": 0, "same": True, "in_checks": 0.0} for r in rates}
    reference: dict[int, list[int]] = {}
    for i, prompt in enumerate(prompts):
        order = rates[i % len(rates):] + rates[:i % len(rates)]
        for r in order:
            checks, replayed, in_checks = stats["checks"], stats["steps_replayed"], stats["seconds"]
            seconds, out = timed(views[r], prompt, tokens)
            row = rows[r]
            row["ms"].append(1000 * seconds / len(out))
            row["checks"] += stats["checks"] - checks
            row["replayed"] += stats["steps_replayed"] - replayed
            row["in_checks"] += stats["seconds"] - in_checks
            row["tokens"] += len(out)
            row["same"] &= reference.setdefault(i, out) == out
    base = statistics.median(rows[rates[0]]["ms"])
    return {str(r): {"ms_per_token": round(statistics.median(row["ms"]), 2),
                     "overhead_pct": round(100 * (statistics.median(row["ms"]) / base - 1), 1),
                     "in_checks_ms_per_token": round(1000 * row["in_checks"] / row["tokens"], 2),
                     "checks_per_generation": round(row["checks"] / len(prompts), 2),
                     "shadow_steps_per_token": round(row["replayed"] / row["tokens"], 3),
                     "identical_outputs": row["same"]} for r, row in rows.items()}


def first_generation(addrs: list[str], model_dir: str, prompt: list[int], tokens: int, rate: float) -> float:
    """ms/token of a fresh client's first generation (its session's open included)."""
    model = SwarmModel(model_dir, addrs, ClientConfig(discovery=False, verify_rate=rate))
    try:
        seconds, out = timed(model, prompt, tokens)
        return round(1000 * seconds / len(out), 2)
    finally:
        model.close()


def catch_liar(addrs: list[str], liar: str, model_dir: str, prompts: list[list[int]], tokens: int, rate: float) -> dict:
    """A fresh client routed through the liar: the generation that catches it, then a clean one."""
    model = SwarmModel(model_dir, addrs, ClientConfig(discovery=False, verify_rate=rate))
    try:
        span = model.peers[liar].blocks
        rivals = [q for q, p in model.peers.items() if p.blocks == span and q != liar]
        model.banned.update({q: time.monotonic() + 600 for q in rivals})
        model.replan()
        for q in rivals:
            del model.banned[q]
        caught, _ = timed(model, prompts[0], tokens)
        clean, _ = timed(model, prompts[1], tokens)
        return {"caught": liar in model.banned, "catching_generation_ms": round(1000 * caught, 1),
                "next_generation_ms": round(1000 * clean, 1), "accusation": model.audit.accusations[:1]}
    finally:
        model.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(TINY_MODEL))
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2, help="times over the prompts (medians over all)")
    ap.add_argument("--rates", default="0,0.01,0.05,0.2,1", help="comma-separated; the first is the baseline")
    ap.add_argument("--default-rate", type=float, default=ClientConfig().verify_rate)
    ap.add_argument("--liar", action="store_true", help="also time catching a lying replica of the middle span")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rates = [float(r) for r in args.rates.split(",")]
    tokenizer = load_tokenizer(args.model)
    prompts = [tokenizer.encode(p).ids for p in PROMPTS] * args.rounds
    spans = even_spans(Checkpoint(args.model).config.num_hidden_layers, 3)
    results: dict = {"setup": {"model": args.model, "spans": spans, "replica": spans[1], "tokens": args.tokens,
                               "prompts": len(prompts)}}
    with tempfile.TemporaryDirectory() as logs:
        peers = start_peers(args.model, spans + [spans[1]], log_dir=logs)
        try:
            addrs = [p.addr for p in peers]
            model = SwarmModel(args.model, addrs, ClientConfig(discovery=False, verify_rate=0.0))
            try:
                results["setup"]["push"] = model.config.push
                results["rates"] = measure_rates(model, prompts, rates, args.tokens)
            finally:
                model.close()
            results["first_generation_ms_per_token"] = {
                str(r): first_generation(addrs, args.model, prompts[2], args.tokens, r) for r in (0.0, args.default_rate)}
            if args.liar:
                liar = PeerProcess(args.model, spans[1], "--initial-peers", peers[0].addr, "--lie-scale", "0.5",
                                   entry=LIAR_ENTRY, log_file=Path(logs) / "liar.log")
                peers.append(liar)
                # the honest replica left out: the liar's rival is the route's own peer; the client is the third opinion
                results["liar"] = catch_liar(addrs[:3] + [liar.addr], liar.peer_id, args.model, prompts, args.tokens,
                                             args.default_rate)
        finally:
            stop_peers(peers)
    if args.json:
        print(json.dumps(results))
        return 0
    print(f"3 peers {spans} + a replica of {spans[1]}; {len(prompts)} prompts x {args.tokens} tokens, greedy; "
          f"push={results['setup']['push']}")
    print(f"  {'rate':>6} {'ms/token':>9} {'overhead':>9} {'in checks':>10} {'checks/gen':>11} "
          f"{'shadow steps/token':>19}  same output")
    for r, row in results["rates"].items():
        print(f"  {r:>6} {row['ms_per_token']:>9.2f} {row['overhead_pct']:>8.1f}% {row['in_checks_ms_per_token']:>10.2f} "
              f"{row['checks_per_generation']:>11.2f} {row['shadow_steps_per_token']:>19.3f}  {row['identical_outputs']}")
    first = results["first_generation_ms_per_token"]
    print("  a fresh client's first generation (probation): " + ", ".join(f"rate {r}: {v} ms/token"
                                                                          for r, v in first.items()))
    if "liar" in results:
        liar = results["liar"]
        print(f"  catching a liar on the route: caught={liar['caught']}, that generation {liar['catching_generation_ms']} "
              f"ms, the next {liar['next_generation_ms']} ms ({liar['accusation'][0]['reason'] if liar['caught'] else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
