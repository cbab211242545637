"""Where a speculative round's time goes, by kind of round, on an emulated WAN.

Starts the peers behind delay proxies (`swarm.bench.wan`, as `wan_bench.py` does), runs the default
speculative mode (or --temperature / --tree) on the first --prompts HumanEval prompts with one round policy
carried from prompt to prompt (as `wan_bench.py` and a chat do), and records every round as the loop saw it
(`RoundTiming`): drafting (the loop turned to the round -> its step left), the flight (left -> verdict in),
verifying and committing. Prints, per kind of round (who drafted it: model, fused, ngram, plain; chain or
tree), how many there were, tokens sent, model drafts, drafts accepted, tokens committed, ms drafting, ms in
flight, ms in all and ms per committed token, and the share of model-drafted rounds that were fully
accepted (the most a round drafted ahead during the flight could ever reuse). The first prompt (cold policy)
is left out of the table. Also times plain push decoding on the last prompt, for scale. One torch thread.

    python scripts/bench_rounds.py                                     # SmolLM2, continental, 4 prompts x 128
    python scripts/bench_rounds.py --profile metro --prompts 6 --max-new-tokens 64
    python scripts/bench_rounds.py --model tiny --prompts 2 --max-new-tokens 16      # a quick check
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from swarm.bench.measure import RoundLog  # noqa: E402
from swarm.bench.prompts import load_prompts  # noqa: E402
from swarm.bench.wan.links import PROFILES  # noqa: E402
from swarm.bench.wan.swarm import WanSwarm  # noqa: E402
from swarm.bench.workload import WorkloadError, open_workload  # noqa: E402
from swarm.decode.drafter import load_draft  # noqa: E402
from swarm.decode.generate import generate  # noqa: E402
from swarm.decode.ngram import NgramMemory  # noqa: E402
from swarm.decode.sampling import SamplingParams  # noqa: E402
from swarm.decode.speculative import SpecConfig  # noqa: E402


class Recorder(RoundLog):
    """`wan_bench`'s round log (a round policy, unchanged in every decision), that also keeps each round's kind and
    timing (`timed`)."""

    def __init__(self, policy):
        super().__init__(policy)
        object.__setattr__(self, "timed", [])

    def observe_round(self, rnd, accepted, extra, t, ahead_kept, *args, **kwargs):
        self.timed.append(dict(
            kind=f"{rnd.choice}{' tree' if rnd.parents is not None else ''}", sent=len(rnd.ids),
            model=rnd.model_depth, accepted=accepted, hit=t.hit,
            committed=accepted + (not (ahead_kept and accepted == len(rnd.drafts))),  # a hit ahead re-verifies the last
            full=bool(rnd.drafts) and accepted == len(rnd.drafts),
            draft=0.0 if t.hit else 1e3 * (t.sent - t.began), flight=1e3 * (t.arrived - t.sent),
            total=1e3 * (t.done - t.began)))
        return super().observe_round(rnd, accepted, extra, t, ahead_kept, *args, **kwargs)


def table(rounds: list[dict]) -> list[str]:
    by = defaultdict(list)
    for r in rounds:
        by[r["kind"]].append(r)
    lines = [f"{'round':>11} | {'n':>4} | {'sent':>5} | {'model':>5} | {'acc':>4} | {'tokens':>6} | {'draft ms':>8} | "
             f"{'flight ms':>9} | {'all ms':>7} | ms/token"]
    for kind, rs in sorted(by.items(), key=lambda kv: -len(kv[1])) + [("all", rounds)]:
        mean = lambda key: statistics.fmean(r[key] for r in rs)  # noqa: E731
        tokens = sum(r["committed"] for r in rs)
        lines.append(f"{kind:>11} | {len(rs):>4} | {mean('sent'):5.1f} | {mean('model'):5.1f} | {mean('accepted'):4.1f} | "
                     f"{mean('committed'):6.2f} | {mean('draft'):8.1f} | {mean('flight'):9.1f} | {mean('total'):7.1f} | "
                     f"{sum(r['total'] for r in rs) / tokens:.1f}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--profile", choices=sorted(PROFILES), default="continental")
    ap.add_argument("--peers", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--tree", type=int, default=1, help="allow trees up to this width [1: chains]")
    args = ap.parse_args()
    if args.prompts < 2 or args.max_new_tokens < 1 or args.peers < 1 or args.tree < 1 or args.temperature < 0:
        sys.exit("bench_rounds: --prompts >= 2 (the first is left out), --max-new-tokens, --peers, --tree >= 1, "
                 "--temperature >= 0")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    try:
        work = open_workload(args.model)
    except WorkloadError as e:
        sys.exit(f"bench_rounds: {e}")
    draft = load_draft(str(work.draft_dir))
    prompts = load_prompts(work.tokenizer, args.prompts, args.max_new_tokens,
                           draft.head.cfg.max_position_embeddings, work.template)
    spec = SpecConfig(tree_width=args.tree, params=SamplingParams(args.temperature))
    warm, policy, memory = [], None, NgramMemory()
    with WanSwarm(str(work.model_dir), args.peers, PROFILES[args.profile]) as wan:
        model = wan.model(timeout=120.0)
        try:
            for i, prompt in enumerate(prompts):
                recorder = Recorder(policy or spec.policy())
                t0 = time.perf_counter()
                res = generate(model, prompt, args.max_new_tokens, draft=draft, spec=spec, stop_at_eos=False,
                               policy=recorder, memory=memory)
                ms = 1e3 * (time.perf_counter() - t0) / len(res.tokens)
                policy = recorder.policy
                print(f"prompt {i}: {len(prompt)} tokens, {ms:.1f} ms/token, {res.tokens_per_round:.2f} tokens/round"
                      f"{' (cold policy: left out)' if i == 0 else ''}", file=sys.stderr)
                if i:
                    warm.extend(recorder.timed)
            t0 = time.perf_counter()
            plain = generate(model, prompts[-1], args.max_new_tokens, stop_at_eos=False)
            plain_ms = 1e3 * (time.perf_counter() - t0) / len(plain.tokens)
        finally:
            model.close()
    print(f"{args.model}, {args.profile}, {args.peers} peers, prompts 2..{len(prompts)} x {args.max_new_tokens} "
          f"tokens, temperature {args.temperature:g}, tree width {args.tree}; one torch thread, "
          f"{os.cpu_count()} CPUs")
    print("\n".join(table(warm)))
    drafted = [r for r in warm if r["model"] and not r["hit"]]
    if drafted:
        print(f"model-drafted rounds fully accepted: {sum(r['full'] for r in drafted) / len(drafted):.0%} "
              f"(of {len(drafted)}); drafting in all: {sum(r['draft'] for r in warm) / sum(r['total'] for r in warm):.0%} "
              f"of the rounds' time")
    print(f"plain push on the last prompt: {plain_ms:.1f} ms/token")


if __name__ == "__main__":
    main()
