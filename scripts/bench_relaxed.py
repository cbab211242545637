"""What `--relaxed TAU` (LOSSY acceptance) buys and what it costs, on HumanEval prompts, in one process.

For every TAU (0 = lossless greedy) and every prompt, speculative greedy decoding with the bundled
pair (or --model / --draft) at a fixed draft length k. Speed is tokens per round: each round is one trip
through the chain, so across a WAN time per token falls as 1 / (tokens per round). Quality, against
lossless greedy (which is the target's own output):

  - exact match: the share of prompts whose whole output is identical;
  - agreement: the share of tokens that equal lossless greedy's until the first difference;
  - log-likelihood: the target's own mean log-probability per generated token of the produced text
    (one teacher-forced pass of the target over prompt + output), beside lossless greedy's.

    python scripts/bench_relaxed.py                          # 20 prompts, 64 tokens, k=4
    python scripts/bench_relaxed.py --prompts 164 --new-tokens 128 --taus 0.1 0.3 --json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from peer.model import StepLayout  # noqa: E402
from swarm.bench.prompts import humaneval_prompts  # noqa: E402
from swarm.bundled import TINY_DRAFT, TINY_MODEL  # noqa: E402
from swarm.decode.generate import generate  # noqa: E402
from swarm.decode.speculative import SpecConfig  # noqa: E402
from swarm.decode.target import LocalModel  # noqa: E402
from swarm.text import load_tokenizer  # noqa: E402


def log_likelihood(model: LocalModel, prompt: list[int], output: list[int]) -> float:
    """Sum of the target's log p(token | everything before it) over the output tokens."""
    ids = prompt + output
    session = model.session(len(ids))
    hidden = session.submit(model.head.embed(torch.tensor(ids)), StepLayout(0, len(ids))).result()
    logp = torch.log_softmax(model.head.logits(hidden[len(prompt) - 1:-1]).float(), -1)
    return float(logp.gather(-1, torch.tensor(output)[:, None]).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(TINY_MODEL))
    ap.add_argument("--draft", default=str(TINY_DRAFT))
    ap.add_argument("--prompts", type=int, default=20, help="first N HumanEval prompts")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--k", type=int, default=4, help="fixed draft length (the same for every TAU)")
    ap.add_argument("--taus", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.3, 0.5, 0.8])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    target, draft = LocalModel.load(args.model), LocalModel.load(args.draft)
    tokenizer = load_tokenizer(args.model)
    context = target.head.cfg.max_position_embeddings - args.new_tokens - 2 * args.k - 8
    taus = [0.0] + [t for t in args.taus if t > 0]
    stats = {tau: dict(tokens=0, rounds=0, seconds=0.0, exact=0, agree=0, loglik=0.0) for tau in taus}
    policies = {}  # per TAU: the round policy, carried from prompt to prompt
    prompts = humaneval_prompts(args.prompts)
    for text in tqdm(prompts, desc="prompts", file=sys.stderr):
        prompt = tokenizer.encode(text).ids[-context:]
        reference = None
        for tau in taus:
            cfg = SpecConfig(k=args.k, pipeline=False, relaxed=tau or None)
            t0 = time.perf_counter()
            res = generate(target, prompt, args.new_tokens, draft=draft, spec=cfg, stop_at_eos=False,
                           policy=policies.get(tau))
            policies[tau] = res.policy
            s = stats[tau]
            s["seconds"] += time.perf_counter() - t0
            s["tokens"] += len(res.tokens)
            s["rounds"] += res.rounds
            if reference is None:
                reference = res.tokens
            same = 0
            while same < min(len(reference), len(res.tokens)) and reference[same] == res.tokens[same]:
                same += 1
            s["exact"] += res.tokens == reference
            s["agree"] += same
            s["loglik"] += log_likelihood(target, prompt, res.tokens)
    base = stats[0.0]
    rows = []
    for tau, s in stats.items():
        tpr = s["tokens"] / s["rounds"]
        rows.append(dict(tau=tau, lossless=tau == 0.0, tokens_per_round=tpr,
                         rounds_speedup=tpr / (base["tokens"] / base["rounds"]),
                         local_tokens_per_s=s["tokens"] / s["seconds"],
                         exact_match=s["exact"] / len(prompts), agreement=s["agree"] / s["tokens"],
                         loglik_per_token=s["loglik"] / s["tokens"],
                         loglik_vs_lossless=s["loglik"] / s["tokens"] - base["loglik"] / base["tokens"]))
    if args.json:
        print(json.dumps(dict(model=args.model, draft=args.draft, prompts=len(prompts), new_tokens=args.new_tokens,
                              k=args.k, rows=rows)))
        return
    print(f"{len(prompts)} HumanEval prompts, {args.new_tokens} greedy tokens, k={args.k}, local target:")
    print("   TAU | tokens/round | x rounds | local tok/s | exact match | agreement | target log-lik/token (vs lossless)")
    for r in rows:
        name = "0 (lossless)" if r["lossless"] else f"{r['tau']:g}"
        print(f"{name:>6} | {r['tokens_per_round']:12.2f} | {r['rounds_speedup']:8.2f} | {r['local_tokens_per_s']:11.1f} | "
              f"{100 * r['exact_match']:10.0f}% | {100 * r['agreement']:8.1f}% | "
              f"{r['loglik_per_token']:8.3f} ({r['loglik_vs_lossless']:+.3f})")


if __name__ == "__main__":
    main()
