"""Where bfloat16 stands on this CPU, for SmolLM2 (or --model): what-if measurements behind two README passages.

1. The LM head (`peer.model.argmax.worth_it`'s question): bfloat16 (packed, as `CertifiedArgmax` runs it) over
   float32 time at 1 and 8 rows, for the whole head and for an 8192-row slice that fits in a cache (what the
   decision once timed). Medians, the two taking turns.
2. The blocks in bfloat16, batch invariance: a step of n tokens after a prefill of P - 1 (as speculation sends its
   first round) against n 1-token steps after a prefill of P (as plain decoding), bit for bit, and ms per step,
   for float32 and bfloat16 as the engine runs them and for an "exact" bfloat16 variant patched in here only
   (not the engine's): each row's attention a call of its own over exactly the keys a 1-token step sees, linears
   in calls of at most 16 rows. One torch thread.

    python scripts/bench_bf16_rows.py
    python scripts/bench_bf16_rows.py --blocks 15 --steps 1 9 17
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from peer.model import StepLayout, layers, packed  # noqa: E402
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


def exact_linear(self, x):
    flat = x.reshape(-1, self.in_features).contiguous()
    parts = [torch.ops.mkldnn._linear_pointwise(p, self.packed, self.bias, "none", [], "") for p in flat.split(16)]
    return (parts[0] if len(parts) == 1 else torch.cat(parts)).reshape(*x.shape[:-1], self.out_features)


def exact_attend(self, q, k, v, seg, layer):
    keys, values = seg.cache.write(layer, seg.start, k, v)
    mask = seg.masks[self.window]
    n, length = q.shape[2], keys.shape[2]
    heads, kv, d = q.shape[1], keys.shape[1], q.shape[-1]
    out = []
    for j in range(n):
        if mask is None:  # a 1-token step, or a prefill (causal): the row's prefix
            seen = length - n + j + 1
            kj, vj = keys[:, :, :seen], values[:, :, :seen]
        else:
            idx = mask.reshape(-1, length)[j].nonzero()[:, 0]
            kj, vj = keys[:, :, idx], values[:, :, idx]
        scores = torch.matmul(q[:, :, j:j + 1].reshape(1, kv, heads // kv, d), kj.transpose(-1, -2)).float() / math.sqrt(d)
        out.append(torch.matmul(torch.softmax(scores, dim=-1).to(vj.dtype), vj).reshape(1, heads, 1, d))
    return out[0] if n == 1 else torch.cat(out, dim=2)


def blocks_table(ckpt: Checkpoint, n_blocks: int, steps: list[int], prefill: int, reps: int) -> None:
    print(f"blocks 0:{n_blocks}: a step after {prefill} positions, bit for bit against 1-token steps; ms (median of {reps})")
    saved = packed.PackedLinear.forward, layers.Attention._attend
    ids = torch.randint(0, ckpt.config.vocab_size, (prefill + max(steps) + 1,), generator=torch.Generator().manual_seed(0))
    for name, dtype, exact in (("float32", "float32", False), ("bfloat16", "bfloat16", False),
                               ("bfloat16 exact", "bfloat16", True)):
        head, blocks = ckpt.load_head(dtype, "cpu"), ckpt.load_blocks(0, n_blocks, dtype, "cpu")
        if exact:
            packed.PackedLinear.forward, layers.Attention._attend = exact_linear, exact_attend
        try:
            with torch.inference_mode():
                e = head.embed(ids)
                row = []
                for n in steps:
                    a, b = blocks.new_cache(len(ids) + 1), blocks.new_cache(len(ids) + 1)
                    blocks(e[:prefill - 1], a, StepLayout(0, prefill - 1))
                    blocks(e[:prefill], b, StepLayout(0, prefill))
                    multi = blocks(e[prefill - 1:prefill + n], a, StepLayout(prefill - 1, n + 1))[1:]
                    single = torch.cat([blocks(e[prefill + j:prefill + j + 1], b, StepLayout(prefill + j, 1))
                                        for j in range(n)])
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
        finally:
            packed.PackedLinear.forward, layers.Attention._attend = saved
        print(f"  {name:>14} | " + " | ".join(row))


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
