"""float32 blocks on a CPU, packed (oneDNN's weight layout, peer/model/packed.py) against plain `F.linear`.

Loads the same block range of the default model (or --model) twice, packed as peers load it and with
packing off, and times one step of n new tokens after a cached prompt, the two taking turns (so background
load hits both alike); prints ms per step and the ratio, and the largest difference of their outputs
against the output's scale. One torch thread.

    python scripts/bench_packed.py                          # SmolLM2's blocks 0:15 (one of two peers' share)
    python scripts/bench_packed.py --blocks 0 30 --rows 1 9 --reps 20
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from peer.model import Checkpoint, StepLayout  # noqa: E402
from peer.model import packed  # noqa: E402
from swarm.registry import DEFAULT_MODEL, resolve_model  # noqa: E402


def load(ckpt: Checkpoint, start: int, end: int, pack: bool):
    os.environ["SPECSWARM_PACKED"] = "1" if pack else "0"
    packed.packing_works.cache_clear()
    blocks = ckpt.load_blocks(start, end)
    if pack and not any(isinstance(m, packed.PackedLinear) for m in blocks.modules()):
        sys.exit("bench_packed: this torch cannot pack float32 weights (no oneDNN)")
    return blocks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--blocks", type=int, nargs=2, default=[0, 15], metavar=("START", "END"))
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 3, 4, 5, 9, 17])
    ap.add_argument("--prompt", type=int, default=200, help="cached positions before the step [200]")
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    if min(args.rows) < 1 or args.reps < 1 or args.prompt < 1:
        sys.exit("bench_packed: --rows, --reps and --prompt must be at least 1")
    torch.set_num_threads(1)
    ckpt = Checkpoint(resolve_model(args.model))
    start, end = args.blocks
    if not 0 <= start < end <= ckpt.config.num_hidden_layers:
        sys.exit(f"bench_packed: --blocks must lie in [0, {ckpt.config.num_hidden_layers}]")
    ranges = {"packed": load(ckpt, start, end, True), "F.linear": load(ckpt, start, end, False)}
    g = torch.Generator().manual_seed(0)
    prompt = torch.randn(args.prompt, ckpt.config.hidden_size, generator=g)
    print(f"{args.model}: blocks {start}:{end}, float32, 1 thread, {args.prompt} cached positions; "
          f"ms per step (median of {args.reps})")
    print(f"{'rows':>4} | {'F.linear':>9} | {'packed':>9} | speed-up | max |diff| / max |out|")
    for n in args.rows:
        x = torch.randn(n, ckpt.config.hidden_size, generator=g)
        caches = {k: b.new_cache(args.prompt + n) for k, b in ranges.items()}
        for k, b in ranges.items():
            b(prompt, caches[k], StepLayout(0, args.prompt))
        times, outs = {k: [] for k in ranges}, {}
        for _ in range(args.reps + 1):
            for k, b in ranges.items():
                t0 = time.perf_counter()
                outs[k] = b(x, caches[k], StepLayout(args.prompt, n))
                times[k].append(time.perf_counter() - t0)
        plain, fast = (1000 * statistics.median(times[k][1:]) for k in ("F.linear", "packed"))
        diff = float((outs["packed"] - outs["F.linear"]).abs().max() / outs["F.linear"].abs().max())
        print(f"{n:>4} | {plain:9.2f} | {fast:9.2f} | {plain / fast:7.2f}x | {diff:.1e}")


if __name__ == "__main__":
    main()
