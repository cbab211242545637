"""KV cache of one session on one block range, and the shape of a step (chain or draft tree).

A cache slot `s < length` always holds the token at position `s`: the prefix is compacted. A step
writes its new nodes into slots `[start, start + n)` after truncating everything at and after
`start` (rollback is free). Tree nodes sit at those slots but carry position `start + depth`; they
become a valid prefix only once `compact` keeps a single root-to-node path.

Knows nothing about weights, the network or sessions' owners.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class CacheError(ValueError):
    """A step or compaction that the cache cannot honour (bad start, overflow, invalid tree/path)."""


@dataclass(frozen=True, slots=True)
class StepLayout:
    """Where the `n` new nodes of a step sit: a chain (parents None) or a tree given by parent indices.

    `parents[i]` is -1 for a node that follows the cached prefix directly, else the index of an
    earlier node of the same step (parents[i] < i). `compact` = (start, path): before this step,
    keep only that accepted path of the previous tree step (`KVCache.compact`).
    """

    start: int
    n: int
    parents: tuple | None = None
    compact: tuple[int, tuple[int, ...]] | None = None

    def __post_init__(self):
        if self.start < 0 or self.n <= 0:
            raise CacheError(f"a step needs start >= 0 and at least one node (start={self.start}, n={self.n})")
        if self.parents is not None:
            if len(self.parents) != self.n:
                raise CacheError(f"{len(self.parents)} parent indices for {self.n} nodes")
            for i, p in enumerate(self.parents):
                if not -1 <= p < i:
                    raise CacheError(f"tree node {i} has parent {p}; parents must be -1 or an earlier node")

    @property
    def is_chain(self) -> bool:
        return self.parents is None

    def depths(self) -> list[int]:
        if self.parents is None:
            return list(range(self.n))
        depth: list[int] = []
        for p in self.parents:
            depth.append(0 if p < 0 else depth[p] + 1)
        return depth

    def positions(self, device=None) -> torch.Tensor:
        return torch.tensor(self.depths(), dtype=torch.long, device=device) + self.start

    def attention_mask(self, windows=(None,), device=None) -> dict:
        """Boolean masks [n, start + n] (True = may attend), one per distinct sliding window.

        Returns {window: mask or None}; None means "no mask needed" (every query sees every key).
        """
        n, start = self.n, self.start
        need_tree = not (self.is_chain and n == 1)
        masks = {}
        for window in set(windows):
            if not need_tree and (window is None or start + 1 <= window):
                masks[window] = None
                continue
            masks[window] = self._mask(window, device)
        return masks

    def _mask(self, window, device) -> torch.Tensor:
        n, start = self.n, self.start
        if self.parents is None:
            new = torch.ones(n, n, dtype=torch.bool, device=device).tril_()
        else:
            new = torch.zeros(n, n, dtype=torch.bool, device=device)
            for i, p in enumerate(self.parents):
                if p >= 0:
                    new[i] = new[p]
                new[i, i] = True
        mask = torch.cat([torch.ones(n, start, dtype=torch.bool, device=device), new], dim=1)
        if window is not None:
            q_pos = self.positions(device)
            k_pos = torch.cat([torch.arange(start, device=device), q_pos])
            mask &= (q_pos[:, None] - k_pos[None, :]) < window
        return mask


class KVCache:
    """Preallocated keys and values for `n_layers` consecutive blocks of one session (batch 1)."""

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, max_length: int,
                 dtype=torch.float32, device="cpu", spare: int = 0):
        """`spare` slots beyond `max_length` hold nothing of the session: a static-shape step writes its padding
        rows there (`graphs.StaticSteps`). `graphs` is that engine's per-cache state (captured steps hold the
        addresses of `keys` and `values`, so they live and die with this cache; the tensors are never replaced)."""
        if max_length <= 0:
            raise CacheError(f"max_length must be positive, got {max_length}")
        shape = (n_layers, 1, n_kv_heads, max_length + spare, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.max_length, self.spare = max_length, spare
        self.length = 0  # slots [0, length) are valid
        self._last_tree: tuple[int, tuple] | None = None  # (start, parents) of the last tree step
        self.graphs: dict = {}

    @staticmethod
    def bytes_per_token(n_layers: int, n_kv_heads: int, head_dim: int, dtype=torch.float32) -> int:
        return 2 * n_layers * n_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    def begin_step(self, layout: StepLayout) -> None:
        """Compact the previous tree step if asked, roll back to `layout.start`, reserve the step's slots."""
        if layout.compact is not None:
            self.compact(*layout.compact)
        if layout.start > self.length:
            raise CacheError(f"step starts at {layout.start} but only {self.length} positions are cached")
        if layout.start + layout.n > self.max_length:
            raise CacheError(f"step needs {layout.start + layout.n} positions; the session holds {self.max_length}")
        self.length = layout.start + layout.n
        self._last_tree = None if layout.is_chain else (layout.start, layout.parents)

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v [1, heads, n, dim] at slots [start, start+n); return the valid keys/values."""
        end = start + k.shape[2]
        self.keys[layer, :, :, start:end] = k
        self.values[layer, :, :, start:end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def compact(self, start: int, path: list[int]) -> None:
        """Keep only `path` (node indices of the last step beginning at `start`, root first).

        For a chain step, `path` must be a prefix 0..m-1; for a tree step, a root followed by a
        child of each previous node. Afterwards the cache holds start + len(path) positions.
        """
        if not 0 <= start <= self.length:
            raise CacheError(f"cannot compact at {start}: {self.length} positions cached")
        n = self.length - start
        parents = self._last_tree[1] if self._last_tree and self._last_tree[0] == start else None
        prev = -1
        for node in path:
            if not 0 <= node < n:
                raise CacheError(f"path node {node} is not one of the {n} nodes after position {start}")
            expected_parent = parents[node] if parents is not None else node - 1
            if expected_parent != prev:
                raise CacheError(f"path {path} is not a root-to-node path of the last step")
            prev = node
        if list(path) != list(range(len(path))):
            src = torch.tensor(path, device=self.keys.device) + start
            dst = slice(start, start + len(path))
            self.keys[:, :, :, dst] = self.keys[:, :, :, src]
            self.values[:, :, :, dst] = self.values[:, :, :, src]
        self.length = start + len(path)
        self._last_tree = None
