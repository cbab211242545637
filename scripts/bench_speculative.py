"""Speculative vs plain decoding through a local swarm, side by side, on HumanEval prompts.

Starts N peer processes on 127.0.0.1 serving the target (--model, SmolLM2-135M-Instruct by default,
speculating with its own draft unless --draft names one; --wan PROFILE puts
swarm.bench.wan's delay proxies on every link), then for every prompt runs, interleaved in an order that
rotates per prompt so background load hits all alike: plain greedy through the chain, speculative with
every fixed k (1, 2, 3, 4, 6, 8), k=4 pipelined, a greedy tree, and the cost model (`AdaptiveK`) without
pipelining, with pipelining forced, as by default (it decides), and allowed trees; and --local plain
as the reference. Reports tokens/s, tokens per round (committed tokens per verification round used),
drafts per round, acceptance, pipelined rounds thrown away, the speedup over plain push, and whether
every output matched --local token for token. Each mode's round policy (the cost model) carries over
from prompt to prompt, as it does between a chat's turns. Prompts go in raw (completions) by default,
with --chat as a chat turn through the model's chat template (`swarm.bench.prompts.chat_turn`); the
token budget is the same fixed count either way.

    python scripts/bench_speculative.py                      # 3 peers, 10 prompts, 64 tokens
    python scripts/bench_speculative.py --model tiny --prompts 3   # the small bundled pair
    python scripts/bench_speculative.py --chat               # prompts as chat turns through the chat template
    python scripts/bench_speculative.py --peers 2 --prompts 20 --json
    python scripts/bench_speculative.py --wan continental --prompts 3   # through swarm.bench.wan's delay proxies
    python scripts/bench_speculative.py --modes "spec k=4" "adaptive (default)"
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
from swarm.bench.prompts import humaneval_prompts  # noqa: E402
from swarm.bench.workload import WorkloadError, open_workload  # noqa: E402
from swarm.client.swarm_model import SwarmModel  # noqa: E402
from swarm.decode.generate import generate  # noqa: E402
from swarm.decode.speculative import SpecConfig  # noqa: E402
from swarm.decode.target import LocalModel  # noqa: E402
from swarm.flags import add_draft_flag, add_model_flag  # noqa: E402
from swarm.launch import even_spans, start_peers  # noqa: E402

MODES = {
    **{f"spec k={k}": SpecConfig(k=k, pipeline=False) for k in (1, 2, 3, 4, 6, 8)},
    "spec k=4 pipelined": SpecConfig(k=4, pipeline=True),
    "spec tree(2) k=4": SpecConfig(k=4, tree_width=2, pipeline=False),
    "adaptive no-pipeline": SpecConfig(pipeline=False),
    "adaptive pipelined": SpecConfig(pipeline=True),
    "adaptive (default)": SpecConfig(),  # k, tree or chain and pipelining all chosen by the cost model
    "adaptive tree<=2": SpecConfig(tree_width=2),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flag(ap)
    add_draft_flag(ap)
    ap.add_argument("--chat", action="store_true",
                    help="feed each prompt as a chat turn through the model's chat template (default: raw completion)")
    ap.add_argument("--peers", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=10, help="first N HumanEval prompts")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--wan", default=None, metavar="PROFILE",
                    help="emulate a WAN between client and peers (a swarm.bench.wan.links profile: lan, metro, continental, ...)")
    ap.add_argument("--modes", nargs="+", default=None, choices=list(MODES), help="speculative modes to run [all]")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    modes = {name: MODES[name] for name in (args.modes or MODES)}
    torch.set_num_threads(1)
    try:
        work = open_workload(args.model, args.draft, args.chat)
    except WorkloadError as e:
        raise SystemExit(f"error: {e}") from None
    args.model_spec, args.model, args.draft = work.model_spec, str(work.model_dir), str(work.draft_dir)
    local, draft = LocalModel.load(args.model), LocalModel.load(args.draft)
    cfg = local.head.cfg
    context = cfg.max_position_embeddings - args.new_tokens - 40
    totals = {name: dict(tokens=0, seconds=0.0, rounds=0, drafted=0, accepted=0, mismatches=0, wasted_rounds=0)
              for name in ["local plain", "plain push", *modes]}
    with tempfile.TemporaryDirectory() as logs:
        wan, peers, model = None, [], None
        if args.wan:
            from swarm.bench.wan.swarm import WanSwarm

            wan = WanSwarm(args.model, args.peers, args.wan, log_dir=logs)
        else:
            peers = start_peers(args.model, even_spans(cfg.num_hidden_layers, args.peers), log_dir=logs)
        try:
            model = wan.model() if wan else SwarmModel(args.model, [p.addr for p in peers])
            policies = {}  # each mode's round policy, as its last generation left it
            for i, text in enumerate(tqdm(humaneval_prompts(args.prompts), desc=f"{args.peers} peers", file=sys.stderr)):
                prompt = work.encode(text)[-context:]
                ref = generate(local, prompt, args.new_tokens, stop_at_eos=False)
                runs = {"local plain": ref, "plain push": generate(model, prompt, args.new_tokens, stop_at_eos=False)}
                order = list(modes)
                shift = i % len(order)  # rotate the order per prompt: no mode always runs right after plain
                for name in order[shift:] + order[:shift]:
                    runs[name] = generate(model, prompt, args.new_tokens, draft=draft, spec=modes[name], stop_at_eos=False,
                                          policy=policies.get(name))
                    policies[name] = runs[name].policy
                for name, res in runs.items():
                    t = totals[name]
                    t["tokens"] += len(res.tokens)
                    t["seconds"] += res.seconds
                    t["mismatches"] += res.tokens != ref.tokens
                    for key in ("rounds", "drafted", "accepted", "wasted_rounds"):
                        t[key] += getattr(res, key, 0)
        finally:
            if model is not None:
                model.close()
            for p in peers:
                p.stop()
            if wan is not None:
                wan.close()
    plain = totals["plain push"]["tokens"] / totals["plain push"]["seconds"]
    report = {name: dict(tokens_per_s=t["tokens"] / t["seconds"], speedup_vs_plain_push=t["tokens"] / t["seconds"] / plain,
                         tokens_per_round=t["tokens"] / t["rounds"] if t["rounds"] else None,
                         acceptance_rate=t["accepted"] / t["drafted"] if t["drafted"] else None,
                         drafts_per_round=t["drafted"] / t["rounds"] if t["rounds"] else None,
                         wasted_rounds=t["wasted_rounds"],
                         outputs_differing_from_local=t["mismatches"]) for name, t in totals.items()}
    if args.json:
        print(json.dumps(dict(model=args.model, draft=args.draft, model_spec=work.model_spec, draft_spec=work.draft_spec,
                              prompt_mode=work.prompt_mode, peers=args.peers, prompts=args.prompts, wan=args.wan,
                              new_tokens=args.new_tokens, modes=report)))
        return
    where = f"emulated WAN '{args.wan}'" if args.wan else "127.0.0.1"
    print(f"{args.model_spec} ({args.model}), draft {args.draft}; prompts {work.prompt_mode}")
    print(f"{args.peers} peers on {where}, {args.prompts} HumanEval prompts, {args.new_tokens} greedy tokens:")
    print(f"{'mode':>24} | tokens/s | x plain push | tokens/round | drafts/round | acceptance | wasted | != local")
    for name, r in report.items():
        tpr = f"{r['tokens_per_round']:.2f}" if r["tokens_per_round"] else "-"
        acc = f"{r['acceptance_rate']:.2f}" if r["acceptance_rate"] is not None else "-"
        dpr = f"{r['drafts_per_round']:.2f}" if r["drafts_per_round"] is not None else "-"
        print(f"{name:>24} | {r['tokens_per_s']:8.1f} | {r['speedup_vs_plain_push']:12.2f} | {tpr:>12} | {dpr:>12} | "
              f"{acc:>10} | {r['wasted_rounds']:6d} | {r['outputs_differing_from_local']}")


if __name__ == "__main__":
    main()
