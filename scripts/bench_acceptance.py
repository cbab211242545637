"""How well the draft model predicts the target: per-token agreement and tokens committed per round.

On the HumanEval prompts, greedy, 128 new tokens, locally (no network): the target's plain greedy
continuation is the reference; the draft's teacher-forced agreement with it is measured in one pass;
then greedy speculative decoding runs for each k and must reproduce the reference token for token.

    python scripts/bench_acceptance.py            # all 164 prompts, k = 2, 4, 8, bundled pair
    python scripts/bench_acceptance.py --limit 20 --ks 1,2,4,8,16 --json
"""

from __future__ import annotations

import argparse
import json
import sys
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


def draft_agreement(draft: LocalModel, prompt: list[int], reference: list[int]) -> int:
    """How many reference tokens the draft's argmax predicts, teacher-forced on the reference itself."""
    seq = torch.tensor(prompt + reference[:-1])
    session = draft.session(len(seq))
    logits = draft.head.logits(session.submit(draft.head.embed(seq), StepLayout(0, len(seq))).result())
    guesses = logits[len(prompt) - 1:].argmax(-1)
    return int((guesses == torch.tensor(reference)).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(TINY_MODEL), help="target model directory")
    ap.add_argument("--draft", default=str(TINY_DRAFT), help="draft model directory")
    ap.add_argument("--limit", type=int, default=None, help="first N HumanEval prompts (default: all 164)")
    ap.add_argument("--ks", default="2,4,8")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: fastest for small models, and immune to busy cores)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    target, draft = LocalModel.load(args.model), LocalModel.load(args.draft)
    tokenizer = load_tokenizer(args.model)
    if target.head.cfg.vocab_size != draft.head.cfg.vocab_size:
        raise SystemExit("target and draft must share a tokenizer (vocab sizes differ)")
    ks = [int(k) for k in args.ks.split(",")]
    n_new = args.max_new_tokens
    context = target.head.cfg.max_position_embeddings - n_new - max(ks) - 1
    prompts = humaneval_prompts(args.limit)
    totals = {"tokens": 0, "agree": 0, "plain_s": 0.0, "truncated": 0}
    per_k = {k: dict(rounds=0, tokens=0, drafted=0, accepted=0, seconds=0.0, mismatches=0) for k in ks}
    for text in tqdm(prompts, desc="HumanEval prompts", file=sys.stderr):
        prompt = tokenizer.encode(text).ids
        if len(prompt) > context:
            prompt, totals["truncated"] = prompt[-context:], totals["truncated"] + 1
        plain = generate(target, prompt, n_new, stop_at_eos=False)
        totals["tokens"] += len(plain.tokens)
        totals["plain_s"] += plain.seconds
        totals["agree"] += draft_agreement(draft, prompt, plain.tokens)
        for k in ks:
            res = generate(target, prompt, n_new, draft=draft, spec=SpecConfig(k=k, pipeline=False), stop_at_eos=False)
            stats = per_k[k]
            stats["mismatches"] += res.tokens != plain.tokens
            for key in ("rounds", "drafted", "accepted", "seconds"):
                stats[key] += getattr(res, key)
            stats["tokens"] += len(res.tokens)
    report = dict(
        target=args.model, draft=args.draft, prompts=len(prompts), new_tokens_per_prompt=n_new,
        truncated_prompts=totals["truncated"], draft_agreement=totals["agree"] / totals["tokens"],
        plain_tokens_per_s=totals["tokens"] / totals["plain_s"],
        k={k: dict(tokens_per_round=s["tokens"] / s["rounds"], acceptance_rate=s["accepted"] / max(s["drafted"], 1),
                   local_speedup=totals["plain_s"] / s["seconds"], mismatches=s["mismatches"]) for k, s in per_k.items()},
    )
    if args.json:
        print(json.dumps(report))
        return
    print(f"{len(prompts)} HumanEval prompts, greedy, {n_new} new tokens; draft agreement with target "
          f"(teacher-forced): {report['draft_agreement']:.3f}")
    print(" k | tokens/round | acceptance | local speedup vs plain | outputs != plain greedy")
    for k, s in report["k"].items():
        print(f"{k:>2} | {s['tokens_per_round']:12.2f} | {s['acceptance_rate']:10.3f} | "
              f"{s['local_speedup']:22.2f} | {s['mismatches']}")


if __name__ == "__main__":
    main()
