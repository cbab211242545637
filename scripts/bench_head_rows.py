"""The LM head's cost by rows: what a speculative round's verification pays on the client for 1..8 nodes.

For the default model (or --model), float32 and bfloat16: ms of the final norm + LM head for n rows, as
a plain matmul, as `ModelHead.logits` computes it (2 or 3 rows padded to 4 where its one-off timing
says that is faster: on this project's CPU, float32's BLAS runs 2-3 rows as separate matrix-vector
products), and as `ModelHead.argmax` finds greedy tokens (float32: from a bfloat16 copy and a bound where that
pays, `peer.model.argmax`; its candidates per row and whether its tokens are the logits' argmax are printed).
The rows are real hidden states: this file's text run through the model. The ways take turns, so background
load hits them alike. One torch thread, the CPU.

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
from peer.model import StepLayout  # noqa: E402
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
    print(f"{'dtype':>9} | {'rows':>4} | plain matmul | ModelHead.logits | padded | ModelHead.argmax | candidates/row | same tokens")
    for dtype in ("float32", "bfloat16"):
        head = ckpt.load_head(dtype, "cpu")
        hidden = real_hidden(ckpt, head, dtype, max(args.rows))
        for n in args.rows:
            x = hidden[-n:]
            head.logits(x), head.argmax(x)  # warm-up (and the one-off timings of padding and the certified argmax)
            cert = head.certified or None
            seen = (cert.candidates, cert.rows) if cert else (0, 0)
            times = {"plain": [], "logits": [], "argmax": []}
            with torch.inference_mode():
                for _ in range(args.reps):
                    t0 = time.perf_counter()
                    head.lm_head(head.norm(x)).float()
                    times["plain"].append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    want = head.logits(x).argmax(-1)
                    times["logits"].append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    got = head.argmax(x)
                    times["argmax"].append(time.perf_counter() - t0)
            plain, logits, argmax = (1000 * statistics.median(times[k]) for k in ("plain", "logits", "argmax"))
            used = cert.rows - seen[1] if cert else 0  # rows the certified path answered (this row count may not use it)
            per_row = f"{(cert.candidates - seen[0]) / used:.1f}" if used else "-"
            print(f"{dtype:>9} | {n:>4} | {plain:12.2f} | {logits:16.2f} | {'yes' if head._padding.get(n) else 'no':>6} | "
                  f"{argmax:16.2f} | {per_row:>14} | {bool(torch.equal(got, want))}")


def real_hidden(ckpt: Checkpoint, head, dtype: str, rows: int) -> torch.Tensor:
    """The model's final hidden states over this file's text (its first 256 bytes-as-ids would do as well for
    timing, but real states give real near-ties): the last `rows` of up to 256 positions."""
    from tokenizers import Tokenizer
    tokenizer = ckpt.path / "tokenizer.json"
    text = Path(__file__).read_text()
    ids = Tokenizer.from_file(str(tokenizer)).encode(text).ids[:256] if tokenizer.exists() else list(range(256))
    ids = [i % ckpt.config.vocab_size for i in ids][: max(rows, 32)]
    blocks = ckpt.load_blocks(0, ckpt.config.num_hidden_layers, dtype, "cpu")
    with torch.inference_mode():
        return blocks(head.embed(torch.tensor(ids)), blocks.new_cache(len(ids)), StepLayout(0, len(ids)))


if __name__ == "__main__":
    main()
