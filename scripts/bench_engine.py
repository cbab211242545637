"""Time one step of a block range for 1..32 new tokens at several cache lengths.

The question it answers: how much more does verifying k drafted tokens cost than decoding one?
On a GPU, small k is nearly free (memory-bound); on a CPU it is not. Uses a checkpoint you point it at
(`--model DIR`) or random weights of a named shape (`--shape llama3-8b`), so no download is needed.

    python scripts/bench_engine.py --shape tinyllama-1.1b --blocks 2 --device cpu
    python scripts/bench_engine.py --model swarm/models/code-target --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from peer.model import BlockRange, Checkpoint, ModelConfig, StepLayout, parse_dtype  # noqa: E402

SHAPES = {  # hidden, intermediate, heads, kv heads, rope theta
    "llama3-8b": (4096, 14336, 32, 8, 500000.0),
    "llama2-7b": (4096, 11008, 32, 32, 10000.0),
    "tinyllama-1.1b": (2048, 5632, 32, 4, 10000.0),
    "qwen2-0.5b": (896, 4864, 14, 2, 1000000.0),
    "tiny": (64, 144, 4, 2, 10000.0),
}


def random_blocks(shape: str, n_blocks: int, dtype, device) -> BlockRange:
    hidden, inter, heads, kv, theta = SHAPES[shape]
    cfg = ModelConfig.from_hf(dict(model_type="llama", vocab_size=32000, hidden_size=hidden, intermediate_size=inter,
                                   num_hidden_layers=n_blocks, num_attention_heads=heads, num_key_value_heads=kv,
                                   rope_theta=theta, max_position_embeddings=8192))
    with torch.device(device):
        blocks = BlockRange(cfg, 0, n_blocks)
    for p in blocks.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return blocks.to(dtype).eval()


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_step(blocks: BlockRange, cache, hidden, start: int, reps: int) -> float:
    """Median seconds of one step of hidden.shape[0] tokens at `start` (rolled back every time)."""
    layout = StepLayout(start, hidden.shape[0])
    blocks(hidden, cache, layout)  # warm-up
    times = []
    for _ in range(reps):
        sync(hidden.device)
        t0 = time.perf_counter()
        blocks(hidden, cache, layout)
        sync(hidden.device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--model", help="HF checkpoint directory (times blocks [0, --blocks))")
    src.add_argument("--shape", choices=sorted(SHAPES), default="tinyllama-1.1b", help="random weights of this shape")
    ap.add_argument("--blocks", type=int, default=1, help="number of consecutive blocks in the range")
    ap.add_argument("--tokens", default="1,2,4,8,16,32", help="new tokens per step")
    ap.add_argument("--cache-lengths", default="0,128,512,2048")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    dtype = parse_dtype(args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    if args.model:
        ckpt = Checkpoint(args.model)
        n = min(args.blocks, ckpt.config.num_hidden_layers)
        blocks, name = ckpt.load_blocks(0, n, dtype, args.device), Path(args.model).name
    else:
        blocks, name = random_blocks(args.shape, args.blocks, dtype, args.device), args.shape
    tokens = [int(t) for t in args.tokens.split(",")]
    lengths = [int(c) for c in args.cache_lengths.split(",")]
    cache = blocks.new_cache(max(lengths) + max(tokens))
    width = blocks.cfg.hidden_size
    rows = []
    with tqdm(total=len(tokens) * len(lengths), desc=f"{name} x{len(blocks.layers)} blocks", file=sys.stderr) as bar:
        for length in lengths:
            if length:  # fill the cache once; each timed step rolls back to `length`
                blocks(torch.randn(length, width, dtype=dtype, device=args.device), cache, StepLayout(0, length))
            for n in tokens:
                hidden = torch.randn(n, width, dtype=dtype, device=args.device)
                rows.append(dict(cache_length=length, new_tokens=n,
                                 ms=1000 * time_step(blocks, cache, hidden, length, args.reps)))
                bar.update()
    report = dict(model=name, blocks=len(blocks.layers), device=str(args.device), dtype=str(dtype).split(".")[-1],
                  torch=torch.__version__, rows=rows)
    if args.json:
        print(json.dumps(report))
        return
    print(f"{name}, {len(blocks.layers)} block(s), {report['device']} {report['dtype']}: ms per step "
          f"(x = relative to 1 new token at the same cache length)")
    print("new tokens | " + " | ".join(f"cache {c:>5}" for c in lengths))
    for n in tokens:
        cells = []
        for length in lengths:
            ms = next(r["ms"] for r in rows if r["cache_length"] == length and r["new_tokens"] == n)
            one = next(r["ms"] for r in rows if r["cache_length"] == length and r["new_tokens"] == 1)
            cells.append(f"{ms:7.2f} ({ms / one:4.1f}x)")
        print(f"{n:>10} | " + " | ".join(cells))


if __name__ == "__main__":
    main()
