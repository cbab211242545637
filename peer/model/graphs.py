"""Steps of a block range at static shapes, captured as CUDA graphs: decode and verify steps without launch overhead.

On a GPU a step of a few tokens reads every weight once and computes little; what it costs beyond the
memory floor is the launch of a few hundred small kernels (norms, rotary, attention, every matmul) from
Python. A CUDA graph records those launches once and replays them with one call. A graph needs static
shapes and addresses, so a step is run as follows (`StaticSteps.run`):

- its `n` nodes are padded to a size bucket (`BUCKETS`: 1, 2, 4, 8, 16, 32); padding rows carry zeros,
  write their keys and values to the cache's spare slots (`KVCache.spare`, beyond `max_length`) and
  attend only to their own slot, so they touch nothing of the session;
- every layer writes the rows' keys and values at slot indices (`index_copy_`, an input tensor) and
  attends to every allocated slot of the cache under a boolean mask (an input tensor): the prefix below
  `start`, the step's own chain or tree, sliding windows — the same mask `StepLayout.attention_mask`
  gives, widened to the whole cache;
- inputs (hidden states, positions, slots, masks) are copied into the graph's static buffers, the graph
  is replayed, the output copied out.

One graph per (session cache, bucket), captured on the session's first step of that size (warm-up runs
on a side stream first; the warm-up computes that very step, so nothing is run twice in effect) and
kept on the cache (`KVCache.graphs`): it dies with the session. Graphs of one block range share one
memory pool and replay one at a time (a lock). Compaction and rollback stay `KVCache`'s, done before
the replay exactly as for an eager step. Anything else runs eagerly as before: prefill and steps over 32
nodes, batches of several sessions, the CPU, caches made without spare slots, and every step after a
capture failed (logged once).

With `capture=False` (`BlockRange.static_steps("eager")`) the same static-shape step runs without a
graph: how the CPU tests check the padded, masked computation against the eager step.

Knows the block range, its layers' `forward_static`, the cache and a step's layout; nothing of
sessions' owners, the network or checkpoints.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from .cache import KVCache, StepLayout
from .layers import rope_tables

BUCKETS = (1, 2, 4, 8, 16, 32)
ALIGN = 8  # allocated slots are a multiple of this (attention kernels like aligned masks)


def bucket(n: int) -> int | None:
    """The smallest bucket holding `n` nodes, None if the step is larger than every bucket."""
    return next((b for b in BUCKETS if b >= n), None)


def spare_slots(max_length: int) -> int:
    """Spare slots a cache of `max_length` positions needs for static steps: room for the padding rows of the
    largest bucket, rounded up so that the allocated length is a multiple of ALIGN."""
    need = BUCKETS[-1] - 1
    return need + (-(max_length + need)) % ALIGN


def static_inputs(layout: StepLayout, size: int, cache: KVCache, windows) -> tuple:
    """(positions [size], slots [size], {window: mask [size, allocated]}) of a step padded to `size` rows, on
    the CPU (copied into a graph's buffers on the device).

    Rows [0, n) are the step's nodes at slots start..start+n-1 with the layout's mask; padding row n+j sits
    at spare slot max_length+j, position `start`, and attends to that slot alone."""
    n, start, max_length = layout.n, layout.start, cache.max_length
    allocated = max_length + cache.spare
    pad = size - n
    positions = torch.cat([layout.positions(), torch.full((pad,), start, dtype=torch.long)])
    slots = torch.cat([torch.arange(start, start + n), torch.arange(max_length, max_length + pad)])
    masks = {}
    for window, mask in layout.attention_mask(windows).items():
        full = torch.zeros(size, allocated, dtype=torch.bool)
        if mask is None:
            full[:n, :start + n] = True
        else:
            full[:n, :start + n] = mask
        full[torch.arange(n, size), slots[n:]] = True
        masks[window] = full
    return positions, slots, masks


@dataclass
class _Static:
    """The static buffers of one (cache, bucket), and its graph once captured."""

    x: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor
    masks: dict
    out: torch.Tensor | None = None
    graph: object = None


class StaticSteps:
    """One block range's single-session steps of up to 32 nodes, at static shapes (captured when `capture`)."""

    def __init__(self, blocks, capture: bool):
        self.blocks, self.capture = blocks, capture
        self._pool = torch.cuda.graph_pool_handle() if capture else None
        self._lock = threading.Lock()
        self.captures = self.replays = 0

    def accepts(self, cache: KVCache, layout: StepLayout) -> bool:
        """Whether this step can run here: it fits a bucket and the cache has the spare slots for its padding."""
        size = bucket(layout.n)
        return size is not None and cache.spare >= size - layout.n and cache.keys.device == self.blocks.device

    def run(self, hidden: torch.Tensor, cache: KVCache, layout: StepLayout) -> torch.Tensor:
        """hidden [n, hidden] -> [n, hidden] after the blocks; `cache.begin_step(layout)` has been called."""
        size = bucket(layout.n)
        with self._lock:
            positions, slots, masks = static_inputs(layout, size, cache, self.blocks._windows)
            st = cache.graphs.get(size)
            if st is None:
                device, width = self.blocks.device, self.blocks.cfg.hidden_size
                x = torch.zeros(1, size, width, dtype=self.blocks.dtype, device=device)
                st = cache.graphs[size] = _Static(x, positions.to(device), slots.to(device),
                                                  {w: m.to(device) for w, m in masks.items()})
            else:
                st.positions.copy_(positions)
                st.slots.copy_(slots)
                for window, mask in masks.items():
                    st.masks[window].copy_(mask)
            st.x[0, :layout.n].copy_(hidden)
            st.x[0, layout.n:].zero_()
            if not self.capture:
                return self._forward(st, cache)[0, :layout.n].clone()
            if st.graph is None:
                self._capture(st, cache)
            st.graph.replay()
            self.replays += 1
            return st.out[0, :layout.n].clone()

    def _forward(self, st: _Static, cache: KVCache) -> torch.Tensor:
        cos, sin = rope_tables(self.blocks.inv_freq, st.positions, st.x.dtype)
        x = st.x
        for j, block in enumerate(self.blocks.layers):
            x = block.forward_static(x, cos, sin, cache, j, st.slots, st.masks)
        return x

    def _capture(self, st: _Static, cache: KVCache) -> None:
        """Warm up on a side stream (this computes the step), then record the graph of the same step."""
        side = torch.cuda.Stream(device=st.x.device)
        side.wait_stream(torch.cuda.current_stream(st.x.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward(st, cache)
        torch.cuda.current_stream(st.x.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            st.out = self._forward(st, cache)
        st.graph = graph
        self.captures += 1


_default_mode = "cuda"


def set_default_mode(mode: str) -> None:
    """The static-step mode of block ranges that were not told one (`--cuda-graphs/--no-cuda-graphs`)."""
    global _default_mode
    if mode not in ("cuda", "eager", "off"):
        raise ValueError(f"unknown static-step mode {mode!r}; use cuda, eager or off")
    _default_mode = mode


def default_mode() -> str:
    return _default_mode


def make_static_steps(blocks, mode: str) -> StaticSteps | None:
    """The static-step engine for `mode`: "cuda" (graphs; only on a CUDA device, else None), "eager" (static
    shapes, no graph: tests), "off" (None)."""
    if mode == "off":
        return None
    if mode == "eager":
        return StaticSteps(blocks, capture=False)
    if mode == "cuda":
        return StaticSteps(blocks, capture=True) if blocks.device.type == "cuda" else None
    raise ValueError(f"unknown static-step mode {mode!r}; use cuda, eager or off")
