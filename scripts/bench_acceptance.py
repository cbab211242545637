"""How well the draft model predicts the target: per-token agreement and tokens committed per round.

On the HumanEval prompts, greedy, 128 new tokens, locally (no network), for every prompt: the target's
plain greedy continuation is the reference, and the draft's teacher-forced agreement with it is
measured in one pass. Greedy chains being deterministic, that agreement vector fixes what speculative
decoding with chains of k drafts commits per round, for every k (`swarm.bench.acceptance.simulate_chain`:
a round at position i accepts the run of consecutive agreements from i, capped at k, plus one token of
the target's): these "simulated" figures cover every prompt at the cost of one target pass and one
draft pass each. Real greedy speculative decoding runs for each k on the first --check prompts only
(default 8; `--check all`: every prompt): its tokens/round stands beside the simulated figure on the
same prompts, every output must equal plain greedy token for token (outputs != plain greedy: must be
0), and the prompts where real and simulated round counts differ are counted (rare numerical ties
between the draft's cached steps and its teacher-forced pass may cause one).

Beside agreement stands the target's own repetitiveness: the share of the generated tokens' 4-grams
that already occurred earlier in prompt + generated text (`swarm.bench.acceptance.repeated_ngrams`:
over every n-gram ending at a generated token, summed over prompts), so that a target stuck in a loop
or copying its prompt (easy for any draft) cannot flatter the figure; and the same share counting only
4-grams seen before in the output itself (its loops alone, prompt copying left out).

Who drafts (--modes model,ngram,fused,...; `swarm.bench.acceptance.SOURCE_MODES`): real greedy
speculative decoding on the checked prompts in each named mode, the draft model alone (with plain
steps where it does not pay), the n-gram index alone (drafting from the prompt and the output so
far), both fused into one tree per round by the cost model, and fixed chains of 4 with and without
the n-gram proposal grafted on; each mode's round policy carries over from prompt to prompt, as in a
chat, and the modes run one after the other on each prompt, in an order that rotates. For each:
tokens per round, accepted drafts by source (model, n-gram, both: drafted by the model and proposed
by the index too), rounds by who drafted them, wall time per token against plain greedy on the
same prompts (local target, this machine), and outputs != plain greedy (must be 0).

Prompts go in raw (as completions) by default; with --chat as a chat turn ("Complete this Python
function: ..." in `swarm.bench.prompts.chat_turn`) through the model's chat template. Either way the
token budget is the same fixed count and nothing stops at end-of-turn, so modes compare on equal work.

    python scripts/bench_acceptance.py                  # all 164 prompts, k = 2, 4, 8, SmolLM2-135M + its draft
    python scripts/bench_acceptance.py --model tiny     # the small bundled pair
    python scripts/bench_acceptance.py --limit 20 --ks 1,2,4,8,16 --check all --chat --json
    python scripts/bench_acceptance.py --limit 20 --check 20 --ks 4 --modes model,ngram,fused
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from swarm.bench.acceptance import (SOURCE_MODES, ChainRounds, SourceTally, draft_agreement,  # noqa: E402
                                    repeated_ngrams, simulate_chain, source_mode)
from swarm.bench.prompts import humaneval_prompts  # noqa: E402
from swarm.bench.workload import WorkloadError, machine, open_workload  # noqa: E402
from swarm.decode.generate import generate  # noqa: E402
from swarm.decode.speculative import SpecConfig  # noqa: E402
from swarm.decode.target import LocalModel  # noqa: E402
from swarm.flags import add_draft_flag, add_model_flag  # noqa: E402


def check_count(value: str) -> int | None:
    """--check: a number of prompts, or 'all' (None)."""
    if value == "all":
        return None
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"want a number of prompts or 'all', got {value!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"want a number >= 0, got {n}")
    return n


def k_list(value: str) -> list[int]:
    """--ks: draft lengths >= 1, comma-separated, or 'none'."""
    if value == "none":
        return []
    try:
        ks = [int(k) for k in value.split(",")]
    except ValueError:
        ks = []
    if not ks or min(ks) < 1:
        raise argparse.ArgumentTypeError(f"want draft lengths >= 1, comma-separated, got {value!r}")
    return ks


def mode_list(value: str) -> list[str]:
    """--modes: names of `SOURCE_MODES`, comma-separated."""
    modes = [m for m in value.split(",") if m]
    if any(m not in SOURCE_MODES for m in modes):
        raise argparse.ArgumentTypeError(f"want modes among {', '.join(SOURCE_MODES)}, got {value!r}")
    return modes


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flag(ap)
    add_draft_flag(ap)
    ap.add_argument("--limit", type=int, default=None, help="first N HumanEval prompts (default: all 164)")
    ap.add_argument("--ks", type=k_list, default="2,4,8",
                    help="draft lengths, comma-separated, or none [default: %(default)s]")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--check", type=check_count, default=8, metavar="N|all",
                    help="run real speculative decoding on the first N prompts (all: every prompt) [default: 8]")
    ap.add_argument("--modes", type=mode_list, default=[], metavar="M1,M2",
                    help=f"also decode the checked prompts in these modes ({', '.join(SOURCE_MODES)}) [default: none]")
    ap.add_argument("--chat", action="store_true",
                    help="feed each prompt as a chat turn through the model's chat template (default: raw completion)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: fastest for small models, and immune to busy cores)")
    ap.add_argument("--json", action="store_true")
    return ap.parse_args(argv)


def real_k(target, draft, prompt, n_new, k, plain_tokens, sim: ChainRounds, stats: dict) -> None:
    res = generate(target, prompt, n_new, draft=draft, spec=SpecConfig(k=k, pipeline=False), stop_at_eos=False)
    stats["mismatches"] += res.tokens != plain_tokens
    stats["rounds_differ"] += res.rounds != sim.rounds
    for key in ("rounds", "drafted", "accepted", "seconds"):
        stats[key] += getattr(res, key)
    stats["tokens"] += len(res.tokens)
    stats["sim"].add(sim)


def run(args, work, target: LocalModel, draft: LocalModel, ks: list[int], texts: list[str]) -> dict:
    n_new, check = args.max_new_tokens, len(texts) if args.check is None else min(args.check, len(texts))
    context = min(target.head.cfg.max_position_embeddings, draft.head.cfg.max_position_embeddings) - n_new - max(ks, default=8) - 1
    t = dict(tokens=0, agree=0, plain_s=0.0, truncated=0, repeated=0, grams=0, self_repeated=0, self_grams=0,
             check_plain_s=0.0)
    sim = {k: ChainRounds() for k in ks}
    real = {k: dict(rounds=0, tokens=0, drafted=0, accepted=0, seconds=0.0, mismatches=0, rounds_differ=0,
                    sim=ChainRounds()) for k in ks}
    tallies = {m: SourceTally() for m in args.modes}
    policies = {m: source_mode(m) for m in args.modes}  # (config, policy): each policy carries over, as in a chat
    for i, text in enumerate(tqdm(texts, desc="HumanEval prompts", file=sys.stderr)):
        prompt = work.encode(text)
        if len(prompt) > context:
            prompt, t["truncated"] = prompt[-context:], t["truncated"] + 1
        plain = generate(target, prompt, n_new, stop_at_eos=False)
        agree = draft_agreement(draft, prompt, plain.tokens)
        repeated, grams = repeated_ngrams(prompt, plain.tokens, 4)
        t["tokens"], t["plain_s"] = t["tokens"] + len(plain.tokens), t["plain_s"] + plain.seconds
        t["agree"] += sum(agree)
        t["repeated"], t["grams"] = t["repeated"] + repeated, t["grams"] + grams
        repeated, grams = repeated_ngrams([], plain.tokens, 4)  # the output against itself only: loops
        t["self_repeated"], t["self_grams"] = t["self_repeated"] + repeated, t["self_grams"] + grams
        for k in ks:
            rounds = simulate_chain(agree, k)
            sim[k].add(rounds)
            if i < check:
                real_k(target, draft, prompt, n_new, k, plain.tokens, rounds, real[k])
        if i < check:
            t["check_plain_s"] += plain.seconds
            t["check_tokens"] = t.get("check_tokens", 0) + len(plain.tokens)
            turn = i % max(len(args.modes), 1)
            for m in args.modes[turn:] + args.modes[:turn]:  # an order that rotates
                spec, policy = policies[m]
                res = generate(target, prompt, n_new, draft=draft, spec=spec, stop_at_eos=False, policy=policy)
                policies[m] = spec, res.policy
                tallies[m].add(res, plain.tokens)
    return report(args, work, ks, texts, check, t, sim, real, tallies)


def report(args, work, ks, texts, check, t, sim, real, tallies) -> dict:
    def real_entry(s: dict) -> dict | None:
        if not check:
            return None
        return dict(prompts=check, tokens_per_round=s["tokens"] / s["rounds"],
                    simulated_tokens_per_round=s["sim"].tokens_per_round,
                    acceptance_rate=s["accepted"] / max(s["drafted"], 1), simulated_acceptance_rate=s["sim"].acceptance_rate,
                    rounds=s["rounds"], simulated_rounds=s["sim"].rounds, prompts_where_rounds_differ=s["rounds_differ"],
                    local_speedup=t["check_plain_s"] / s["seconds"], mismatches=s["mismatches"])

    return dict(
        **work.describe(), machine=machine(), prompts=len(texts), new_tokens_per_prompt=args.max_new_tokens,
        checked_prompts=check, truncated_prompts=t["truncated"],
        draft_agreement=t["agree"] / max(t["tokens"], 1), repeated_4gram_rate=t["repeated"] / max(t["grams"], 1),
        repeated_4gram_rate_within_output=t["self_repeated"] / max(t["self_grams"], 1),
        plain_tokens_per_s=t["tokens"] / t["plain_s"] if t["plain_s"] else None,
        k={k: dict(simulated=dict(tokens_per_round=sim[k].tokens_per_round, acceptance_rate=sim[k].acceptance_rate,
                                  rounds=sim[k].rounds),
                   real=real_entry(real[k])) for k in ks},
        modes={m: dict(prompts=check, tokens_per_round=s.tokens_per_round, rounds=s.rounds,
                       accepted_by_source=s.accepted_by, drafted_by_source=s.drafted_by, rounds_by_source=s.rounds_by,
                       ms_per_token=1000 * s.seconds / max(s.tokens, 1),
                       plain_ms_per_token=1000 * t["check_plain_s"] / max(t.get("check_tokens", 0), 1),
                       local_speedup=t["check_plain_s"] / s.seconds if s.seconds else None,
                       mismatches=s.mismatches) for m, s in tallies.items()},
    )


def print_table(rep: dict) -> None:
    m = rep["machine"]
    print(f"target {rep['model']['spec']} ({rep['model']['dir']}); draft {rep['draft']['spec']} ({rep['draft']['dir']})")
    print(f"machine: {m['processor']}, {m['cpu_count']} CPUs, {m['torch_threads']} torch threads; prompts: "
          f"{rep['prompt_mode']} ({'chat turn through the chat template' if rep['prompt_mode'] == 'chat' else 'completions'})")
    print(f"{rep['prompts']} HumanEval prompts ({rep['truncated_prompts']} truncated), greedy, "
          f"{rep['new_tokens_per_prompt']} new tokens; draft agreement with target (teacher-forced): "
          f"{rep['draft_agreement']:.3f}")
    print(f"repeated 4-grams in the target's output: {rep['repeated_4gram_rate']:.3f} (seen before in prompt + output), "
          f"{rep['repeated_4gram_rate_within_output']:.3f} (seen before in the output itself)")
    if rep["k"]:
        print(f"simulated from agreement on all {rep['prompts']} prompts; real speculative decoding on the first "
              f"{rep['checked_prompts']}:")
        print(" k | sim tokens/round | sim acceptance | real tokens/round | sim, same prompts | rounds differ | "
              "local speedup | != plain greedy")
    for k, e in rep["k"].items():
        s, r = e["simulated"], e["real"]
        line = f"{k:>2} | {s['tokens_per_round']:16.2f} | {s['acceptance_rate']:14.3f} | "
        if r is None:
            line += f"{'-':>17} | {'-':>17} | {'-':>13} | {'-':>13} | -"
        else:
            line += (f"{r['tokens_per_round']:17.2f} | {r['simulated_tokens_per_round']:17.2f} | "
                     f"{r['prompts_where_rounds_differ']:13d} | {r['local_speedup']:13.2f} | {r['mismatches']}")
        print(line)
    if rep["modes"]:
        e = next(iter(rep["modes"].values()))
        print(f"who drafts, real greedy decoding on the first {e['prompts']} prompts (plain greedy: "
              f"{e['plain_ms_per_token']:.1f} ms/token; accepted drafts by source, rounds by who drafted):")
        print(f"{'mode':>10} | tokens/round | accepted model / ngram / both | rounds model / fused / ngram / plain | "
              "ms/token | local speedup | != plain greedy")
        for m, e in rep["modes"].items():
            a, r = e["accepted_by_source"], e["rounds_by_source"]
            print(f"{m:>10} | {e['tokens_per_round']:12.2f} | {a.get('model', 0):>11} / {a.get('ngram', 0):>5} / "
                  f"{a.get('both', 0):>4} | {r.get('model', 0):>12} / {r.get('fused', 0):>5} / {r.get('ngram', 0):>5} / "
                  f"{r.get('plain', 0):>5} | {e['ms_per_token']:8.1f} | {e['local_speedup']:13.2f} | {e['mismatches']}")


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    ks = args.ks
    try:
        work = open_workload(args.model, args.draft, args.chat)
    except WorkloadError as e:
        raise SystemExit(f"error: {e}") from None
    texts = humaneval_prompts(args.limit)
    target, draft = LocalModel.load(work.model_dir), LocalModel.load(work.draft_dir)
    if target.head.cfg.vocab_size != draft.head.cfg.vocab_size:
        raise SystemExit("error: target and draft must share a tokenizer (vocab sizes differ)")
    rep = run(args, work, target, draft, ks, texts)
    if args.json:
        print(json.dumps(rep))
    else:
        print_table(rep)


if __name__ == "__main__":
    main()
