"""How fast this machine runs one block, measured once and cached; and which blocks a new peer should take.

Throughput is tokens per second through ONE block during decoding (one new token per step, a short
cache), measured on the real weights of one block on the chosen device, dtype and quantization (an int8
or nf4 block is what the peer will serve, so that is what is timed). It is cached in
`~/.cache/specswarm/throughput.json` (override with SPECSWARM_CACHE) per model, device, dtype, quantization
and thread count, so a restarted peer joins at once.

Block choice (as Petals does): every block's swarm throughput is the sum over online peers serving
it; a new peer takes the `n` consecutive blocks whose throughputs, sorted ascending, are smallest
in lexicographic order: the weakest block first, then the next weakest. Ties go to the lowest start.
(Moving a serving peer's blocks later: peer/rebalance.py.)
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from peer.model import Checkpoint, StepLayout


def cache_file() -> Path:
    return Path(os.environ.get("SPECSWARM_CACHE", Path.home() / ".cache" / "specswarm")) / "throughput.json"


def measure_block_throughput(ckpt: Checkpoint, device: str = "cpu", dtype: str = "float32", steps: int = 32,
                             quant: str = "none") -> float:
    """Decode steps per second through one block (block 0 of the checkpoint, loaded as the peer will serve it)."""
    blocks = ckpt.load_blocks(0, 1, dtype, device, quant)
    cache = blocks.new_cache(steps + 8)
    x = torch.randn(1, ckpt.config.hidden_size, dtype=blocks.dtype, device=blocks.device)
    blocks(x.repeat(8, 1), cache, StepLayout(0, 8))  # warm up and give attention something to read
    blocks(x, cache, StepLayout(8, 1))  # a decode step's warm-up (on CUDA: its graph's capture); rolled back below
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(steps):
        blocks(x, cache, StepLayout(8 + i, 1))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return steps / (time.perf_counter() - t0)


def block_throughput(ckpt: Checkpoint, device: str, dtype: str, refresh: bool = False, quant: str = "none") -> float:
    """Cached `measure_block_throughput`."""
    key = f"{ckpt.model_id}|{device}|{dtype}|threads={torch.get_num_threads()}"
    key += "" if quant == "none" else f"|{quant}"  # keys of float blocks as before
    path = cache_file()
    try:
        known = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        known = {}
    if not refresh and isinstance(known.get(key), (int, float)):
        return float(known[key])
    value = measure_block_throughput(ckpt, device, dtype, quant=quant)
    known[key] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(known, indent=1))
    return value


def choose_blocks(num_blocks: int, spans: list[tuple[tuple[int, int], float]], n: int) -> tuple[int, int]:
    """Where a new peer serving `n` blocks helps most, given the swarm's (span, throughput) list."""
    n = max(1, min(n, num_blocks))
    per_block = [0.0] * num_blocks
    for (a, b), throughput in spans:
        for i in range(max(0, a), min(b, num_blocks)):
            per_block[i] += throughput
    best = min(range(num_blocks - n + 1), key=lambda s: (sorted(per_block[s:s + n]), s))
    return best, best + n
