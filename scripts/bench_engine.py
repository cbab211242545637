"""Time one step of a block range for 1..32 new tokens at several cache lengths, beside its memory floor.

The question it answers: how much more does verifying k drafted tokens cost than decoding one?
On a GPU, small k is nearly free (memory-bound); on a CPU it is not. Uses a checkpoint you point it at
(`--model DIR`) or random weights of a named shape (`--shape llama3-8b`), so no download is needed.
`--quant int8` times int8 weights (peer/model/quant.py). `--engines` times the ways a step can run, side by
side: `graphs` (CUDA graphs over static shapes, peer/model/graphs.py: what a CUDA peer runs), `eager`
(one kernel launch per operation from Python), `static` (the graphs' static shapes without a graph: the
CPU's check of that path). Default: graphs,eager on CUDA, eager on a CPU.

The memory floor of a step is the bytes it must read (the blocks' weights, plus the keys and values of
the cache and the new tokens) divided by the memory bandwidth, measured in the same run as a large
tensor copy (`x.copy_(y)`, counting the bytes read and written): no kernel can do a step faster than
that, and a step near it is memory-bound (HBM on a GPU, DRAM on a CPU). `--json`: each row has its
`floor_ms`; the report's `floor_ms` is that of one new token at the longest cache length.

    python scripts/bench_engine.py --shape tinyllama-1.1b --blocks 2 --device cpu
    python scripts/bench_engine.py --shape llama3-8b --blocks 4 --device cuda --quant int8
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
from peer.model.quant import QUANTS, quantize_linears  # noqa: E402

ENGINES = {"graphs": "cuda", "eager": "off", "static": "eager"}  # --engines -> BlockRange.static_steps mode
SHAPES = {  # hidden, intermediate, heads, kv heads, rope theta
    "llama3-8b": (4096, 14336, 32, 8, 500000.0),
    "llama2-7b": (4096, 11008, 32, 32, 10000.0),
    "tinyllama-1.1b": (2048, 5632, 32, 4, 10000.0),
    "qwen2-0.5b": (896, 4864, 14, 2, 1000000.0),
    "smollm2-135m": (576, 1536, 9, 3, 100000.0),  # the default model's blocks (30 of them)
    "tiny": (64, 144, 4, 2, 10000.0),
}


def random_blocks(shape: str, n_blocks: int, dtype, device, quant: str = "none") -> BlockRange:
    hidden, inter, heads, kv, theta = SHAPES[shape]
    cfg = ModelConfig.from_hf(dict(model_type="llama", vocab_size=32000, hidden_size=hidden, intermediate_size=inter,
                                   num_hidden_layers=n_blocks, num_attention_heads=heads, num_key_value_heads=kv,
                                   rope_theta=theta, max_position_embeddings=8192))
    with torch.device(device):
        blocks = BlockRange(cfg, 0, n_blocks)
    for p in blocks.parameters():
        torch.nn.init.normal_(p, std=0.02)
    blocks = blocks.to(dtype)
    quantize_linears(blocks, blocks.linear_names(), dtype, quant)
    return blocks.eval()


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device, mib: int, reps: int = 5) -> float:
    """Bytes per second a large tensor copy moves here (read + write), the best of `reps`."""
    n = mib * 2**20 // 4
    src, dst = torch.randn(n, device=device), torch.empty(n, device=device)
    dst.copy_(src)  # warm-up (page faults, lazy allocation)
    best = float("inf")
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best


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


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--model", help="HF checkpoint directory (times blocks [0, --blocks))")
    src.add_argument("--shape", choices=sorted(SHAPES), default="tinyllama-1.1b", help="random weights of this shape")
    ap.add_argument("--blocks", type=int, default=1, help="number of consecutive blocks in the range")
    ap.add_argument("--tokens", default="1,2,4,8,16,32", help="new tokens per step")
    ap.add_argument("--cache-lengths", default="0,128,512,2048")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--quant", default="none", choices=QUANTS, help="int8 / nf4: weight-only quantized linear layers")
    ap.add_argument("--copy-mib", type=int, default=None,
                    help="size of the copy that measures memory bandwidth [default: 1024 on cuda, 256 on cpu]")
    ap.add_argument("--engines", default=None,
                    help="comma-separated: graphs, eager, static [default: graphs,eager on cuda, eager on cpu]")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--json", action="store_true")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    dtype = parse_dtype(args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    if args.model:
        ckpt = Checkpoint(args.model)
        n = min(args.blocks, ckpt.config.num_hidden_layers)
        blocks, name = ckpt.load_blocks(0, n, dtype, args.device, args.quant), Path(args.model).name
    else:
        try:
            blocks, name = random_blocks(args.shape, args.blocks, dtype, args.device, args.quant), args.shape
        except ValueError as e:  # e.g. nf4 on a shape whose layers do not split into groups of 64
            sys.exit(f"bench_engine: {e}")
    bandwidth = copy_bandwidth(args.device, args.copy_mib or (1024 if args.device.startswith("cuda") else 256))
    weight_bytes, kv_per_token = blocks.weight_bytes(), blocks.bytes_per_token()
    tokens = [int(t) for t in args.tokens.split(",")]
    lengths = [int(c) for c in args.cache_lengths.split(",")]
    engines = (args.engines or ("graphs,eager" if args.device.startswith("cuda") else "eager")).split(",")
    width = blocks.cfg.hidden_size
    rows = []
    with tqdm(total=len(engines) * len(tokens) * len(lengths), desc=f"{name} x{len(blocks.layers)} blocks",
              file=sys.stderr) as bar:
        for engine in engines:
            if blocks.static_steps(ENGINES[engine]) is None and engine != "eager":
                sys.exit(f"bench_engine: --engines {engine} needs a CUDA device")
            cache = blocks.new_cache(max(lengths) + max(tokens))
            for length in lengths:
                if length:  # fill the cache once; each timed step rolls back to `length`
                    blocks(torch.randn(length, width, dtype=dtype, device=args.device), cache, StepLayout(0, length))
                for n in tokens:
                    hidden = torch.randn(n, width, dtype=dtype, device=args.device)
                    floor = (weight_bytes + (length + n) * kv_per_token) / bandwidth
                    ms = 1000 * time_step(blocks, cache, hidden, length, args.reps)
                    rows.append(dict(engine=engine, cache_length=length, new_tokens=n, ms=ms, floor_ms=1000 * floor))
                    bar.update()
            del cache
    floor_ms = 1000 * (weight_bytes + (max(lengths) + 1) * kv_per_token) / bandwidth  # 1 token, longest cache
    report = dict(model=name, blocks=len(blocks.layers), device=str(args.device), dtype=str(dtype).split(".")[-1],
                  quant=args.quant, engines=engines, weight_bytes=weight_bytes, kv_bytes_per_token=kv_per_token,
                  copy_gb_per_s=bandwidth / 1e9, floor_ms=floor_ms, torch=torch.__version__, rows=rows)
    if args.json:
        print(json.dumps(report))
        return
    for engine in engines:
        print_table(report, tokens, lengths, engine)


def print_table(report: dict, tokens: list[int], lengths: list[int], engine: str) -> None:
    rows = [r for r in report["rows"] if r["engine"] == engine]
    quant = "" if report["quant"] == "none" else f" ({report['quant']} weights)"
    print(f"{report['model']}, {report['blocks']} block(s), {report['device']} {report['dtype']}{quant}, {engine}: "
          f"ms per step "
          f"(x = relative to 1 new token at the same cache length; floor = the step's memory floor)")
    print(f"memory floor = (weights {report['weight_bytes'] / 2**20:.1f} MiB + KV {report['kv_bytes_per_token']} B "
          f"per cached token) / copy bandwidth {report['copy_gb_per_s']:.1f} GB/s (measured here)")
    print("new tokens | " + " | ".join(f"cache {c:>5} (floor)" for c in lengths))
    for n in tokens:
        cells = []
        for length in lengths:
            row = next(r for r in rows if r["cache_length"] == length and r["new_tokens"] == n)
            one = next(r["ms"] for r in rows if r["cache_length"] == length and r["new_tokens"] == 1)
            cells.append(f"{row['ms']:7.2f} ({row['ms'] / one:4.1f}x) {row['floor_ms']:6.2f}")
        print(f"{n:>10} | " + " | ".join(cells))


if __name__ == "__main__":
    main()
