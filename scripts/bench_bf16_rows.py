"""Where bfloat16 stands on this CPU, for SmolLM2 (or --model): what-if measurements behind two README passages.

1. The LM head (`peer.model.argmax.worth_it`'s question): bfloat16 (packed, as `CertifiedArgmax` runs it) over
   float32 time at 1 and 8 rows, for the whole head and for an 8192-row slice that fits in a cache (what the
   decision once timed). Medians, the two taking turns.
2. The blocks in bfloat16, batch invariance: a step of n tokens after a prefill of P - 1 (as speculation sends its
   first round) against n 1-token steps after a prefill of P (as plain decoding), bit for bit, and ms per step,
   for float32 and bfloat16, each as before and with rows computed as if alone (`peer.model.invariant`, what
   the engine loads by default: linears in calls of a probed row-invariant span, attention in float64; the
   load time includes the one-off probe). One torch thread.

    python scripts/bench_bf16_rows.py
    python scripts/bench_bf16_rows.py --blocks 15 --steps 1 9 17
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from peer.model import StepLayout, packed  # noqa: E402
from peer.model.argmax import paired_medians  # noqa: E402
from peer.model.checkpoint import Checkpoint  # noqa: E402
from swarm.registry import DEFAULT_MODEL, resolve_model  # noqa: E402


def head_ratios(ckpt: Checkpoint, reps: int) -> None:
    weight = ckpt.load_head("float32", "cpu").lm_head.weight.detach()
    print(f"LM head {tuple(weight.shape)}: bfloat16 / float32 time (medians of {reps}, taking turns)")
    with torch.inference_mode():
        for name, w in (("whole head", weight), ("8192-row slice", weight[:8192].contiguous())):
            low = packed.packed_product(w.to(torch.bfloat16))
            for rows in (1, 8):
                x = torch.randn(rows, w.shape[1])
                fast, slow = paired_medians(lambda v: low(v.to(torch.bfloat16)).float(), lambda v: F.linear(v, w), x, reps)
                print(f"  {name:>15}, {rows} row(s): {1e3 * fast:6.2f} / {1e3 * slow:6.2f} ms = {fast / slow:.2f}x")


def step_row(blocks, e, steps: list[int], prefill: int, reps: int) -> list[str]:
    """Per step size: median ms and how many rows are bit-identical to 1-token steps; then a prefill's ms."""
    row = []
    with torch.inference_mode():
        for n in steps:
            a, b = blocks.new_cache(len(e) + 1), blocks.new_cache(len(e) + 1)
            blocks(e[:prefill - 1], a, StepLayout(0, prefill - 1))
            blocks(e[:prefill], b, StepLayout(0, prefill))
            multi = blocks(e[prefill - 1:prefill + n], a, StepLayout(prefill - 1, n + 1))[1:]
            single = torch.cat([blocks(e[prefill + j:prefill + j + 1], b, StepLayout(prefill + j, 1)) for j in range(n)])
            same = sum(bool(torch.equal(multi[j], single[j])) for j in range(n))
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                blocks(e[prefill:prefill + n], b, StepLayout(prefill, n))
                times.append(1e3 * (time.perf_counter() - t0))
            row.append(f"{n} tokens: {sorted(times)[reps // 2]:5.1f} ms, {same}/{n} rows identical")
        t0 = time.perf_counter()
        blocks(e[:prefill], blocks.new_cache(prefill), StepLayout(0, prefill))
        row.append(f"prefill of {prefill}: {1e3 * (time.perf_counter() - t0):.0f} ms")
    return row


def blocks_table(ckpt: Checkpoint, n_blocks: int, steps: list[int], prefill: int, reps: int) -> None:
    print(f"blocks 0:{n_blocks}: a step after {prefill} positions, bit for bit against 1-token steps; ms (median of {reps})")
    ids = torch.randint(0, ckpt.config.vocab_size, (prefill + max(steps) + 1,), generator=torch.Generator().manual_seed(0))
    for dtype in ("float32", "bfloat16"):
        with torch.inference_mode():
            e = ckpt.load_head(dtype, "cpu").embed(ids)
        for invariant in (False, True):
            name = dtype + (", rows as if alone" if invariant else ", as before")
            t0 = time.perf_counter()
            blocks = ckpt.load_blocks(0, n_blocks, dtype, "cpu", invariant=invariant)
            loaded = time.perf_counter() - t0
            if invariant and blocks.invariant is None:
                print(f"  {name:>26} | not available here: no linear kernel has a row-invariant span")
                continue
            row = step_row(blocks, e, steps, prefill, reps)
            print(f"  {name:>26} | " + " | ".join(row) + f" | loaded in {loaded:.1f} s" +
                  (f" ({blocks.invariant})" if invariant else ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--blocks", type=int, default=15)
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 9, 17])
    ap.add_argument("--prefill", type=int, default=150)
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    if min(args.steps) < 1 or args.reps < 1 or args.prefill < 2 or args.blocks < 1:
        sys.exit("bench_bf16_rows: --steps and --reps must be at least 1, --prefill at least 2, --blocks at least 1")
    torch.set_num_threads(1)
    ckpt = Checkpoint(resolve_model(args.model))
    if args.blocks > ckpt.config.num_hidden_layers:
        sys.exit(f"bench_bf16_rows: --blocks {args.blocks}: the model has {ckpt.config.num_hidden_layers}")
    head_ratios(ckpt, args.reps)
    blocks_table(ckpt, args.blocks, args.steps, args.prefill, args.reps)


if __name__ == "__main__":
    main()
