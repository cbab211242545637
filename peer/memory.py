"""How much of this machine a peer takes: how many blocks, and how many KV cache tokens it grants.

`plan_memory` is a pure function of numbers (free bytes, bytes per block, KV bytes per token per block,
what the user asked for) -> `MemoryPlan(blocks, cache_tokens, reason)`. The rule:

- `usable` (80 %) of the free memory, less what is reserved (a last peer's head: final norm and LM head,
  for verification at the last peer), is shared between the blocks and the KV cache budget; the rest is
  for activations, the allocator and other programs;
- blocks: as many as the user asked (--blocks / --num-blocks), else as many as fit beside a KV cache of
  the target size (--cache-tokens when given, else `default_cache_tokens`), at least one, at most the model's;
- cache tokens: as given (--cache-tokens), else what the memory left after the blocks holds, between a
  floor (one session of the longest length a peer grants: `min_cache_tokens`) and a ceiling
  (`max_cache_tokens`: on a CPU the 32768 of old, on a GPU all sessions at their longest).

So a small model on a CPU with room gets every block and 32768 tokens, as before; a GPU gets as many
blocks as fit (where the blocks' weights dominate: twice as many under --quant int8, ~3.7x as many under nf4;
SmolLM2's block is 6.75 MiB in bf16, 3.39 MiB in int8, 1.80 MiB in nf4) and the rest of its memory as cache.
`free_memory(device)` says what is free (CUDA: `torch.cuda.mem_get_info`; CPU: MemAvailable).
Knows bytes and counts; nothing of models, checkpoints or the network.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

USABLE = 0.8  # share of free memory for blocks + KV cache
DEFAULT_CACHE_TOKENS = 32768  # the CPU budget of old, and the cache a block count leaves room for


@dataclass(frozen=True, slots=True)
class MemoryPlan:
    blocks: int
    cache_tokens: int
    reason: str  # why these numbers, in words (the peer's log line)


def plan_memory(free_bytes: int, block_bytes: int, kv_bytes_per_token: int, num_blocks_cap: int,
                requested_blocks: int | None = None, requested_cache_tokens: int | None = None, *,
                min_cache_tokens: int = 8192, max_cache_tokens: int = DEFAULT_CACHE_TOKENS,
                default_cache_tokens: int = DEFAULT_CACHE_TOKENS, usable: float = USABLE,
                reserved_bytes: int = 0) -> MemoryPlan:
    """Blocks and cache tokens for `free_bytes` of memory. `kv_bytes_per_token` is per block (keys and values of
    one position in one block); `num_blocks_cap` the model's block count; `reserved_bytes` come off the budget
    first (a last peer's head: final norm and LM head)."""
    if block_bytes <= 0 or kv_bytes_per_token <= 0 or num_blocks_cap < 1:
        raise ValueError("block_bytes, kv_bytes_per_token and num_blocks_cap must be positive")
    budget = max(0, int(free_bytes * usable) - reserved_bytes)
    ceiling = max(max_cache_tokens, min_cache_tokens)
    target = requested_cache_tokens or min(max(default_cache_tokens, min_cache_tokens), ceiling)
    if requested_blocks:
        blocks = min(requested_blocks, num_blocks_cap)
        why_blocks = f"{blocks} blocks as asked"
    else:
        fit = budget // (block_bytes + target * kv_bytes_per_token)
        blocks = max(1, min(num_blocks_cap, fit))
        why_blocks = (f"all {blocks} blocks fit" if fit >= num_blocks_cap else
                      f"{blocks} of {num_blocks_cap} blocks fit beside a {target}-token cache" if fit >= 1 else
                      "1 block: not even one fits beside the cache (memory is short)")
    per_token = blocks * kv_bytes_per_token
    left = budget - blocks * block_bytes
    if requested_cache_tokens:
        cache, why_cache = requested_cache_tokens, "cache as given"
        if left < cache * per_token:
            why_cache += " (more than the memory left after the blocks holds)"
    else:
        fits = max(0, left) // per_token
        cache = max(min_cache_tokens, min(ceiling, fits))
        why_cache = (f"cache capped at {ceiling} tokens" if fits >= ceiling else
                     "cache: the memory left after the blocks" if fits >= min_cache_tokens else
                     f"cache at its floor of one {min_cache_tokens}-token session (memory is short)")
    if blocks * block_bytes > budget:
        why_blocks += f" (more than {usable:.0%} of free memory holds)"
    head = f"; {_size(reserved_bytes)} kept for the head" if reserved_bytes else ""
    return MemoryPlan(blocks, int(cache), f"{why_blocks}; {why_cache}{head}")


def describe(plan: MemoryPlan, free_bytes: int, block_bytes: int, kv_bytes_per_token: int, where: str,
             usable: float = USABLE) -> str:
    """The peer's one log line about its plan: what was chosen, why, and the numbers it came from."""
    return (f"memory plan: {plan.blocks} blocks, KV cache {plan.cache_tokens} tokens ({plan.reason}); "
            f"free {_size(free_bytes)} on {where}, {usable:.0%} usable; {_size(block_bytes)} a block, "
            f"{_size(plan.blocks * kv_bytes_per_token)} a cache token over {plan.blocks} blocks")


def free_memory(device: str) -> int:
    """Free bytes where blocks would go: free GPU memory (cuda), or the RAM available to a new process (cpu:
    MemAvailable, and no more than a cgroup v2 memory limit leaves, as in a container)."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()  # what the throughput probe left in torch's cache is free for us
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    available = _read_int("/proc/meminfo", "MemAvailable:", 1024)
    if available is None:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    limit, used = _read_int("/sys/fs/cgroup/memory.max"), _read_int("/sys/fs/cgroup/memory.current")
    if limit is not None and used is not None:
        available = min(available, max(0, limit - used))
    return available


def _read_int(path: str, key: str | None = None, unit: int = 1) -> int | None:
    """The number in a file (after `key` on its line, when given); None if absent or not a number ("max")."""
    try:
        with open(path) as f:
            for line in f:
                if key is None or line.startswith(key):
                    return int(line.split()[1 if key else 0]) * unit
    except (OSError, ValueError, IndexError):
        pass
    return None


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
