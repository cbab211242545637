"""The LM head's cost by rows: what a speculative round's verification pays on the client for 1..8 nodes.

For the default model (or --model), float32 and bfloat16: ms of the final norm + LM head for n rows, as
a plain matmul and as `ModelHead.logits` computes it (2 or 3 rows padded to 4 where its one-off timing
says that is faster: on this project's CPU, float32's BLAS runs 2-3 rows as separate matrix-vector
products). The two ways take turns, so background load hits them alike. One torch thread, the CPU.

    python scripts/bench_head_rows.py
    python scripts/bench_head_rows.py --rows 1 2 3 4 5 --reps 20
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from peer.model.checkpoint import Checkpoint  # noqa: E402
from swarm.registry import DEFAULT_MODEL, resolve_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 3, 4, 5, 8])
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    if min(args.rows) < 1 or args.reps < 1:
        sys.exit("bench_head_rows: --rows and --reps must be at least 1")
    torch.set_num_threads(1)
    ckpt = Checkpoint(resolve_model(args.model))
    print(f"{ckpt.config.vocab_size} x {ckpt.config.hidden_size} head; ms per call (median of {args.reps})")
    print(f"{'dtype':>9} | {'rows':>4} | plain matmul | ModelHead.logits | padded")
    for dtype in ("float32", "bfloat16"):
        head = ckpt.load_head(dtype, "cpu")
        for n in args.rows:
            x = torch.randn(n, ckpt.config.hidden_size).to(head.norm.weight.dtype)
            head.logits(x)  # warm-up (and the one-off timing of whether padding pays)
            times = {"plain": [], "logits": []}
            with torch.inference_mode():
                for _ in range(args.reps):
                    t0 = time.perf_counter()
                    head.lm_head(head.norm(x)).float()
                    times["plain"].append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    head.logits(x)
                    times["logits"].append(time.perf_counter() - t0)
            plain, logits = (1000 * statistics.median(times[k]) for k in ("plain", "logits"))
            print(f"{dtype:>9} | {n:>4} | {plain:12.2f} | {logits:16.2f} | {'yes' if head._padding.get(n) else 'no'}")


if __name__ == "__main__":
    main()
