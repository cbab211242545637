"""Speculative vs plain decoding through a local swarm, side by side, on HumanEval prompts.

Starts N peer processes on 127.0.0.1 serving the bundled target (or --model), then for every prompt
runs, interleaved so background load hits all alike: plain greedy through the chain, speculative with
fixed k, adaptive k, adaptive + pipelining, and a greedy tree; and --local plain as the reference.
Reports tokens/s, tokens per round, acceptance, the speedup over plain push, and whether every output
matched --local token for token.

    python scripts/bench_speculative.py                      # 3 peers, 10 prompts, 64 tokens
    python scripts/bench_speculative.py --peers 2 --prompts 20 --json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from swarm.cli import DEFAULT_DRAFT, DEFAULT_MODEL  # noqa: E402
from swarm.generate import LocalModel, generate  # noqa: E402
from swarm.launch import even_spans, start_peers  # noqa: E402
from swarm.prompts import humaneval_prompts  # noqa: E402
from swarm.remote import SwarmModel  # noqa: E402
from swarm.speculative import SpecConfig, generate_speculative  # noqa: E402

MODES = {
    "spec k=2": SpecConfig(k=2, pipeline=False), "spec k=4": SpecConfig(k=4, pipeline=False),
    "spec k=8": SpecConfig(k=8, pipeline=False), "spec adaptive": SpecConfig(pipeline=False),
    "spec adaptive+pipeline": SpecConfig(pipeline=True), "spec tree(2) k=4": SpecConfig(k=4, tree_width=2, pipeline=False),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--draft", default=str(DEFAULT_DRAFT))
    ap.add_argument("--peers", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=10, help="first N HumanEval prompts")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    local, draft = LocalModel.load(args.model), LocalModel.load(args.draft)
    cfg = local.head.cfg
    context = cfg.max_position_embeddings - args.new_tokens - 40
    totals = {name: dict(tokens=0, seconds=0.0, rounds=0, drafted=0, accepted=0, mismatches=0)
              for name in ["local plain", "plain push", *MODES]}
    with tempfile.TemporaryDirectory() as logs:
        peers = start_peers(args.model, even_spans(cfg.num_hidden_layers, args.peers), log_dir=logs)
        model = None
        try:
            model = SwarmModel(args.model, [p.addr for p in peers])
            for text in tqdm(humaneval_prompts(args.prompts), desc=f"{args.peers} peers", file=sys.stderr):
                prompt = local.tokenizer.encode(text).ids[-context:]
                ref = generate(local, prompt, args.new_tokens, stop_at_eos=False)
                runs = {"local plain": ref, "plain push": generate(model, prompt, args.new_tokens, stop_at_eos=False)}
                for name, spec in MODES.items():
                    runs[name] = generate_speculative(model, draft, prompt, args.new_tokens, spec, stop_at_eos=False)
                for name, res in runs.items():
                    t = totals[name]
                    t["tokens"] += len(res.tokens)
                    t["seconds"] += res.seconds
                    t["mismatches"] += res.tokens != ref.tokens
                    for key in ("rounds", "drafted", "accepted"):
                        t[key] += getattr(res, key, 0)
        finally:
            if model is not None:
                model.close()
            for p in peers:
                p.stop()
    plain = totals["plain push"]["tokens"] / totals["plain push"]["seconds"]
    report = {name: dict(tokens_per_s=t["tokens"] / t["seconds"], speedup_vs_plain_push=t["tokens"] / t["seconds"] / plain,
                         tokens_per_round=t["tokens"] / t["rounds"] if t["rounds"] else None,
                         acceptance_rate=t["accepted"] / t["drafted"] if t["drafted"] else None,
                         outputs_differing_from_local=t["mismatches"]) for name, t in totals.items()}
    if args.json:
        print(json.dumps(dict(model=args.model, draft=args.draft, peers=args.peers, prompts=args.prompts,
                              new_tokens=args.new_tokens, modes=report)))
        return
    print(f"{args.peers} peers on 127.0.0.1, {args.prompts} HumanEval prompts, {args.new_tokens} greedy tokens:")
    print(f"{'mode':>24} | tokens/s | x plain push | tokens/round | acceptance | != local")
    for name, r in report.items():
        tpr = f"{r['tokens_per_round']:.2f}" if r["tokens_per_round"] else "-"
        acc = f"{r['acceptance_rate']:.2f}" if r["acceptance_rate"] is not None else "-"
        print(f"{name:>24} | {r['tokens_per_s']:8.1f} | {r['speedup_vs_plain_push']:12.2f} | {tpr:>12} | {acc:>10} | "
              f"{r['outputs_differing_from_local']}")


if __name__ == "__main__":
    main()
