"""What the draft's weights cost and change: ms per drafted token and greedy drafts against float32's.

For the default model's draft (or --model/--draft), each weight setting (float32, bfloat16, int8 linear
layers over float32 and over bfloat16; `--draft-dtype/--draft-quant` pick one, "auto" is int8/bfloat16
on a CPU; every half-precision setting keeps its KV cache in float32 as `load_draft` does on a CPU, and the
last row is auto with a bfloat16 cache): ms per drafted token of `Drafter.propose` (8 drafts a round, the default draft vocabulary),
the settings taking turns round by round so that background load hits them alike; and the draft's
agreement with the target (float32): over the target's greedy continuation (--new-tokens) of the first
--prompts HumanEval prompts, the share of positions where the draft's argmax (teacher-forced, the whole
vocabulary) is the target's next token, what decides acceptance. The target verifies every draft, so a
setting changes the speed of drafting and how often drafts are accepted, never the output. One torch
thread, the CPU.

    python scripts/bench_draft_weights.py                       # SmolLM2-135M-Instruct's draft
    python scripts/bench_draft_weights.py --model tiny --rounds 40 --prompts 10
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from peer.model import StepLayout  # noqa: E402
from swarm.bench.prompts import humaneval_prompts  # noqa: E402
from swarm.decode.drafter import Drafter, draft_weights, load_draft  # noqa: E402
from swarm.decode.generate import generate  # noqa: E402
from swarm.decode.sampling import SamplingParams  # noqa: E402
from swarm.decode.speculative import SpecConfig  # noqa: E402
from swarm.decode.target import LocalModel  # noqa: E402
from swarm.registry import DEFAULT_MODEL, resolve_draft, resolve_model  # noqa: E402
from swarm.text import load_tokenizer  # noqa: E402

SETTINGS = {"float32": ("float32", "none"), "bfloat16": ("bfloat16", "none"), "int8/float32": ("float32", "int8"),
            "int8/bfloat16": ("bfloat16", "int8"), "int8/bf16, bf16 cache": ("bfloat16", "int8")}
HALF_CACHE = "int8/bf16, bf16 cache"  # the default weights with the KV cache in their dtype (not float32's)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--draft", default=None, help="default: the model's own draft")
    ap.add_argument("--rounds", type=int, default=20, help="timed rounds of 8 drafts per setting [default: 20]")
    ap.add_argument("--prompts", type=int, default=20, help="HumanEval prompts for the agreement [default: 20]")
    ap.add_argument("--new-tokens", type=int, default=64, help="the target's tokens per prompt [default: 64]")
    args = ap.parse_args()
    if min(args.rounds, args.prompts, args.new_tokens) < 1:
        sys.exit("bench_draft_weights: --rounds, --prompts and --new-tokens must be at least 1")
    torch.set_num_threads(1)
    draft_dir = resolve_draft(args.model, args.draft)
    if draft_dir is None:
        sys.exit(f"bench_draft_weights: {args.model} has no draft; give --draft")
    auto = "/".join(draft_weights("cpu")[::-1])
    drafts = {name: load_draft(draft_dir, "cpu", dtype, quant) for name, (dtype, quant) in SETTINGS.items()}
    drafts[HALF_CACHE].blocks.cache_dtype = None
    print(f"draft {draft_dir.name}: {drafts['float32'].head.cfg.num_hidden_layers} layers; auto on a CPU: {auto}")
    vocab = SpecConfig().draft_vocab
    tokenizer = load_tokenizer(str(resolve_model(args.model)))
    prompts = [tokenizer.encode(p, add_special_tokens=False).ids[-256:] for p in humaneval_prompts(args.prompts)]
    target = LocalModel.load(resolve_model(args.model))
    times: dict[str, list[float]] = {name: [] for name in drafts}
    agree: dict[str, int] = dict.fromkeys(drafts, 0)
    total = 0
    with tqdm(total=args.rounds * len(drafts) + len(prompts), desc="drafting, then agreement", file=sys.stderr) as bar:
        for r in range(args.rounds):
            context = prompts[r % len(prompts)]
            for name, draft in drafts.items():
                drafter = Drafter(draft, len(context) + 16, vocab)
                drafter.propose(context, 1, SamplingParams())  # the prompt goes in, untimed
                t0 = time.perf_counter()
                drafter.propose(context, 8, SamplingParams())
                times[name].append((time.perf_counter() - t0) * 1000 / 8)
                bar.update(1)
        for prompt in prompts:
            out = generate(target, prompt, args.new_tokens, stop_at_eos=False).tokens
            total += len(out)
            for name, draft in drafts.items():
                agree[name] += sum(a == b for a, b in zip(teacher_forced(draft, prompt, out), out))
            bar.update(1)
    print(f"{'weights':>20} | ms / drafted token (median) | agreement with the target ({total} tokens)")
    for name in drafts:
        label = f"{name}{' (auto)' if name == auto else ''}"
        print(f"{label:>20} | {statistics.median(times[name]):27.2f} | {agree[name] / total:.1%}")


def teacher_forced(draft, prompt: list[int], out: list[int]) -> list[int]:
    """The draft's argmax after the prompt and each token of `out` but the last (one step, one session)."""
    ids = prompt + out
    session = draft.session(len(ids) + 1)
    try:
        with torch.no_grad():
            hidden = session.submit(draft.head.embed(torch.tensor(ids)), StepLayout(0, len(ids))).result()
            return draft.head.logits(hidden[len(prompt) - 1:-1]).argmax(-1).tolist()
    finally:
        session.close()

if __name__ == "__main__":
    main()
