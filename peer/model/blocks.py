"""What a peer hosts: consecutive transformer blocks `[start, end)`; and what a client holds: the head.

`BlockRange.forward` runs one step of one session: hidden states of `n` new nodes (a chain or a draft
tree), written into that session's `KVCache` at `layout.start`. `BlockRange.forward_batch` runs steps
of several sessions at once: their rows concatenated for every norm, rotary table and linear layer
(weights read once per batch), attention per session against its own cache (its own start, chain or
tree mask, sliding windows), each cache rolled back or compacted by its own layout as `forward` does.
A step the cache refuses (`CacheError`) is that step's answer alone; the others still run. One step
alone is computed exactly as `forward` computes it; in a batch of several, or a verification step of
several rows, a row's matmuls may round differently in the last bits (a CPU BLAS picks its kernel by the
number of rows: 1 row is a matrix-vector product, a few rows or a tail of rows another kernel): up to
~5e-7 of the largest value in fp32 as measured. Greedy tokens stay the local run's in the tests and the
load benchmark; only a near-tie between two logits could flip one. Half precision rounds coarsely enough
to flip them, so half-precision blocks on a CPU compute every row as if alone (`make_invariant`,
`invariant`: linears in calls of a probed row-invariant span, attention in float64), as do their heads.
`ModelHead` holds the embeddings, the final norm and the LM head. Its `logits` batches calls that
overlap in time (`BatchedCalls`: threads of one client sharing a head, e.g. the API server's or the
load benchmark's sessions): the LM head is the client's largest matmul (SmolLM2: 49152 x 576, ~7 ms a
row on one CPU core, ~20 ms for 16 rows), so rows of calls that arrive while one runs are computed
together by the next; a call alone runs at once, exactly as before. A call of 2 or 3 rows (a short
speculative round) runs padded to 4 rows where a timing on first use says that is faster (a CPU BLAS
quirk: `ModelHead._pads`). Greedy tokens need no logits: `ModelHead.argmax` finds them from a bfloat16 copy of a
float32 head and a bound on its error where that is faster (`argmax.CertifiedArgmax`). Neither knows where its weights came from or who is asking.

On a CUDA device a single session's step of up to 32 nodes runs as a CUDA graph at static shapes
(`graphs.StaticSteps`; caches get spare slots for its padding), unless `static_steps("off")` or
`--no-cuda-graphs`; everything else (prefill, batches of sessions, the CPU) runs eagerly as above.

Under `--quant int8` the linear layers of a block (`LINEARS`) are `quant.Int8Linear`s, and a head's
untied LM head too: `dtype` is then still the activations' (the norms' weights), never int8. Unquantized
(float32, bfloat16) blocks on a CPU are loaded with `packed.PackedLinear`s (oneDNN's packed weight layout: ~2x faster on a verification
step's few rows); the forward does not care which it gets.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch
from torch import nn

from . import invariant
from .argmax import CertifiedArgmax, median_seconds, worth_it
from .batched import BatchedCalls
from .cache import CacheError, KVCache, StepLayout
from . import graphs
from .config import ContextTooLong, ModelConfig
from .invariant import RowPolicy
from .layers import HALF, Block, RMSNorm, Segment, rope_inv_freq, rope_tables
from .packed import PackedLinear, packed_product
from .quant import check_quant, quantize_linears, state_bytes

PAD_ROWS, PAD_TO = (2, 3), 4  # LM-head calls of this many rows may run padded to PAD_TO (ModelHead._pads)
PAD_MIN_WEIGHTS = 1 << 22  # ... when the head has at least this many weights (smaller ones: not worth a timing)


def pad_pays(linear: nn.Module, rows: int, like: torch.Tensor, reps: int = 5) -> bool:
    """Whether `linear` on `rows` rows takes under 0.85x as long padded to PAD_TO rows (medians of `reps`)."""
    x = torch.randn(rows, like.shape[-1], dtype=like.dtype, device=like.device)
    padded = torch.cat([x, x.new_zeros(PAD_TO - rows, x.shape[1])])
    with torch.inference_mode():
        return median_seconds(linear, padded, reps) < 0.85 * median_seconds(linear, x, reps)

log = logging.getLogger(__name__)

LINEARS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")  # of each block


class BlockRange(nn.Module):
    def __init__(self, cfg: ModelConfig, start: int, end: int):
        super().__init__()
        if not 0 <= start < end <= cfg.num_hidden_layers:
            raise ValueError(f"block range [{start}, {end}) is not inside the model's {cfg.num_hidden_layers} blocks")
        self.cfg, self.start, self.end = cfg, start, end
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(start, end))
        self.register_buffer("inv_freq", rope_inv_freq(cfg.rope, cfg.head_dim), persistent=False)
        self._windows = tuple(cfg.sliding_windows[start:end])
        self._static_mode, self._static = None, None
        self.cache_dtype: torch.dtype | None = None  # the KV cache's, when not the activations' (`new_cache`)
        self.invariant: str | None = None  # rows computed as if alone: how (`make_invariant`)

    def view(self, start: int, end: int) -> "BlockRange":
        """Blocks [start, end) of this range, sharing its weights (a peer serving part of its span)."""
        if (start, end) == (self.start, self.end):
            return self
        if not self.start <= start < end <= self.end:
            raise ValueError(f"blocks [{start}, {end}) are not inside [{self.start}, {self.end})")
        view = BlockRange.__new__(BlockRange)
        nn.Module.__init__(view)
        view.cfg, view.start, view.end = self.cfg, start, end
        view.layers = nn.ModuleList(self.layers[start - self.start:end - self.start])
        view.register_buffer("inv_freq", self.inv_freq, persistent=False)
        view._windows = self._windows[start - self.start:end - self.start]
        view._static_mode, view._static = None, None
        view.cache_dtype, view.invariant = self.cache_dtype, self.invariant
        return view

    def make_invariant(self) -> str | None:
        """Compute every row of a step as if it were alone (`invariant`): a verification step of n tokens then
        gives, bit for bit, what n 1-token steps give, and a batch of sessions what each alone gives. Takes
        packed linear layers (`packed.PackedLinear`, a CPU's float32 / bfloat16) whose kernels have a
        row-invariant span of rows; returns how, for a log line, or None (nothing changed) where they are not
        packed or have none."""
        linears = [m for m in self.modules() if isinstance(m, PackedLinear)]
        if len(linears) != len(self.layers) * len(LINEARS) or not all(m.make_invariant() for m in linears):
            for m in linears:
                m.rows = None
            return None
        for block in self.layers:
            block.self_attn.exact = True
        spans = sorted({(m.rows.lo, m.rows.hi) for m in linears})
        self.invariant = ("linears in calls of " + ", ".join(f"{lo}-{hi}" for lo, hi in spans) +
                          " rows, attention in float64")
        return self.invariant

    def static_steps(self, mode: str) -> "graphs.StaticSteps | None":
        """How single-session steps of up to 32 nodes run (`graphs`): "cuda" (CUDA graphs, on a CUDA device;
        the process default, see `graphs.set_default_mode`), "eager" (static shapes without a graph) or "off".
        Applies to caches made afterwards (they need spare slots)."""
        self._static_mode, self._static = mode, graphs.make_static_steps(self, mode)
        return self._static

    def _static_engine(self) -> "graphs.StaticSteps | None":
        if self._static_mode is None:  # the process default, fixed on first use (the weights are in place by then)
            self.static_steps(graphs.default_mode())
        return self._static

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (the norms'): what hidden states and the KV cache are kept in."""
        return self.layers[0].input_layernorm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.layers[0].input_layernorm.weight.device

    @property
    def quant(self) -> str:
        """"int8" or "nf4" when the linear weights are stored so (`quant.Int8Linear`, `quant.Nf4Linear`), else "none"."""
        return getattr(self.layers[0].mlp.down_proj, "quant", "none")

    def linear_names(self) -> list[str]:
        """The dotted names of every block's linear layers (what `--quant` quantizes)."""
        return [f"layers.{j}.{name}" for j in range(len(self.layers)) for name in LINEARS]

    def weight_bytes(self) -> int:
        """Bytes the weights of these blocks take (codes and their scales under --quant int8 / nf4)."""
        return state_bytes(self)

    @staticmethod
    def bytes_per_block(cfg: ModelConfig, dtype: torch.dtype, quant: str = "none") -> int:
        """Bytes of one block's weights in `dtype` (and `quant`), computed on the meta device: nothing allocated."""
        with torch.device("meta"):
            block = BlockRange(cfg, 0, 1).to(dtype)
        quantize_linears(block, block.linear_names(), dtype, check_quant(quant))
        return state_bytes(block)

    def new_cache(self, max_length: int) -> KVCache:
        """A session's cache of `max_length` positions: at most the model's context (`ContextTooLong`). It holds
        `cache_dtype` when set (float32 under half-precision activations: attention then runs in float32, the
        fast way for one query row on a CPU; a draft's choice, `swarm.decode.drafter.load_draft`), else the
        activations' dtype."""
        cfg = self.cfg
        if max_length > cfg.max_position_embeddings:
            raise ContextTooLong(max_length, cfg.max_position_embeddings, "session")
        spare = graphs.spare_slots(max_length) if self._static_engine() is not None else 0
        return KVCache(len(self.layers), cfg.num_key_value_heads, cfg.head_dim, max_length,
                       dtype=self.cache_dtype or self.dtype, device=self.device, spare=spare)

    def bytes_per_token(self) -> int:
        cfg = self.cfg
        return KVCache.bytes_per_token(len(self.layers), cfg.num_key_value_heads, cfg.head_dim,
                                       self.cache_dtype or self.dtype)

    @torch.inference_mode()
    def forward(self, hidden: torch.Tensor, cache: KVCache, layout: StepLayout) -> torch.Tensor:
        """hidden [n, hidden_size] (or [1, n, hidden_size]) -> the same shape after these blocks."""
        (out,) = self.forward_batch([(hidden, cache, layout)])
        if isinstance(out, CacheError):
            raise out
        return out

    @torch.inference_mode()
    def forward_batch(self, steps: Sequence[tuple[torch.Tensor, KVCache, StepLayout]]) -> list:
        """One step of each of several sessions (hidden, its cache, its layout), computed together.

        Returns one entry per step, in order: its output (the shape of its hidden states), or the
        `CacheError` that refused it (a shape that does not match its layout, a start past its cache,
        a bad compaction), as `forward` would have refused it alone: the others still run."""
        out: list = [None] * len(steps)
        kept = []
        for i, (hidden, cache, layout) in enumerate(steps):
            try:
                self._check(hidden, layout)
                cache.begin_step(layout)
            except CacheError as e:
                out[i] = e
                continue
            kept.append((i, hidden, cache, layout))
        if not kept:
            return out
        device = self.device
        if len(kept) == 1 and self._static is not None and self._static.accepts(kept[0][2], kept[0][3]):
            i, hidden, cache, layout = kept[0]
            y = self._run_static(hidden, cache, layout)
            if y is not None:
                out[i] = y
                return out
        if len(kept) == 1:  # exactly an unbatched step
            i, hidden, cache, layout = kept[0]
            x = (hidden.unsqueeze(0) if hidden.dim() == 2 else hidden).to(self.dtype)
            positions = layout.positions(device)
            segments = [Segment(0, layout.n, cache, layout.start, layout.attention_mask(self._windows, device))]
        else:
            x = torch.cat([h if h.dim() == 2 else h[0] for _, h, _, _ in kept]).to(self.dtype).unsqueeze(0)
            positions = torch.tensor([lay.start + d for _, _, _, lay in kept for d in lay.depths()], device=device)
            segments, offset = [], 0
            for _, _, cache, layout in kept:
                segments.append(Segment(offset, layout.n, cache, layout.start,
                                        layout.attention_mask(self._windows, device)))
                offset += layout.n
        cos, sin = rope_tables(self.inv_freq, positions, x.dtype)
        for j, block in enumerate(self.layers):
            x = block(x, cos, sin, segments, j)
        parts = [x] if len(kept) == 1 else [y.unsqueeze(0) for y in x[0].split([s.n for s in segments])]
        for (i, hidden, _, _), y in zip(kept, parts):
            out[i] = y.squeeze(0) if hidden.dim() == 2 else y
        return out

    def _run_static(self, hidden, cache: KVCache, layout: StepLayout) -> torch.Tensor | None:
        """The step at static shapes (a CUDA graph's replay); None when a capture failed: eager from then on."""
        static = self._static
        try:
            y = static.run(hidden.reshape(layout.n, -1).to(self.dtype), cache, layout)
        except RuntimeError as e:
            if not static.capture:
                raise
            log.warning("CUDA graph capture of blocks [%d, %d) failed, running eagerly from now on: %s",
                        self.start, self.end, str(e).splitlines()[0] if str(e) else type(e).__name__)
            self._static = None
            return None
        return y.reshape(hidden.shape)

    def _check(self, hidden: torch.Tensor, layout: StepLayout) -> None:
        """CacheError unless `hidden` is [n, hidden_size] or [1, n, hidden_size] for the layout's n nodes."""
        shape = tuple(hidden.shape)
        if shape not in ((layout.n, self.cfg.hidden_size), (1, layout.n, self.cfg.hidden_size)):
            raise CacheError(f"hidden states of shape {shape} do not match {layout.n} nodes "
                             f"of width {self.cfg.hidden_size}")


class ModelHead(nn.Module):
    """Token embeddings in, logits out: the parts of the model a client keeps.

    Under --quant int8 only an untied LM head becomes an `Int8Linear`. A tied one (SmolLM2, Llama 3.2,
    Qwen2 small) IS the embedding table, which is read row by row in float: an int8 copy beside it would
    add half the table's bf16 bytes instead of saving any, and quantizing the shared table would change
    the input embeddings as well; so a tied head stays in the model's dtype."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self._batched = BatchedCalls(self._logits)
        self._padding: dict[int, bool] = {}  # rows -> computed padded to PAD_TO rows (`_pads`)
        self.certified: CertifiedArgmax | bool | None = None  # `argmax`'s fast path; None: not decided yet
        self.certified_for = (True, True)  # ... taken for 1 row, for several (`argmax.worth_it` decides them apart)
        self.rows: RowPolicy | None = None  # the LM head's rows as if alone (`make_invariant`) ...
        self._fast: tuple = ()  # ... computed by this (a packed copy of the head, or F.linear on it)

    @property
    def quant(self) -> str:
        return getattr(self.lm_head, "quant", "none")

    @torch.inference_mode()
    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        if token_ids.numel() and (int(token_ids.min()) < 0 or int(token_ids.max()) >= self.cfg.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.cfg.vocab_size})")
        return self.embed_tokens(token_ids)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head, returned in fp32 (calls from several threads at once share one matmul)."""
        return self._batched(hidden.to(self.norm.weight.dtype))

    @torch.inference_mode()
    def argmax(self, hidden: torch.Tensor) -> torch.Tensor:
        """The greedy tokens [rows] after hidden states [rows, d]: `logits(hidden).argmax(-1)`, from a bfloat16 copy
        of a float32 LM head and a bound where that pays (`argmax.CertifiedArgmax`, decided on first use, for 1 row and
        for several apart)."""
        if self.certified is None:
            self._decide_argmax()
        if self.certified is False or not self.certified_for[hidden.dim() == 2 and len(hidden) > 1]:
            return self.logits(hidden).argmax(-1)
        return self.certified(self.norm(hidden.to(self.norm.weight.dtype)).float())

    def decide_argmax(self) -> str:
        """Decide `argmax`'s path now (once: a one-off timing, ~0.4 s for SmolLM2's head; else on first use) and
        say which it is, for a log line."""
        if self.certified is None:
            self._decide_argmax()
        if self.certified is False:
            weight = getattr(self.lm_head, "weight", None)
            kind = str(weight.dtype).removeprefix("torch.") if weight is not None and weight.dtype in HALF else "float32"
            return f"{kind} logits" + (f", {self.rows.lo}-{self.rows.hi} rows a call (each as if alone)" if self.rows else "")
        return {(True, True): "a bfloat16 copy and a bound", (True, False): "a bfloat16 copy and a bound for 1 row, "
                "float32 logits for several", (False, True): "float32 logits for 1 row, a bfloat16 copy and a bound "
                "for several"}[self.certified_for]

    def _decide_argmax(self) -> None:
        weight = self.lm_head.weight if isinstance(self.lm_head, nn.Linear) else None
        pays = worth_it(weight) if weight is not None else (False, False)
        self.certified = CertifiedArgmax(weight) if any(pays) else False
        if any(pays):
            self.certified_for = pays

    def make_invariant(self) -> str | None:
        """Compute the LM head's rows as if each were alone (`invariant`), where its kernel has a row-invariant span:
        a half-precision head on a CPU, whose rounding moves argmaxes (a float32 head's greedy tokens come from
        `argmax`'s per-candidate float32 products, alone already). Its logits then come from a copy of the head in
        oneDNN's packed layout where that works (`packed.packed_product`; SmolLM2's bfloat16 head, the wan bench's
        probe: 7.8 / 9.1 ms at 1 / 9 rows through `F.linear`), the bytes of another table (a last peer's
        memory plan counts them: `peer.serve.head_bytes`).
        Returns how, for a log line, or None."""
        linear = self.lm_head
        if type(linear) is not nn.Linear or linear.weight.device.type != "cpu" or linear.weight.dtype not in HALF:
            return None
        weight = linear.weight.detach()
        product = packed_product(weight)
        key = ("head", *weight.shape, weight.dtype, isinstance(product, PackedLinear))
        self.rows = invariant.row_policy(key, product, weight.shape[1], weight.dtype)
        self._fast = (product,) if self.rows is not None else ()  # (a tuple: not a submodule of the head)
        return None if self.rows is None else f"LM head in calls of {self.rows.lo}-{self.rows.hi} rows"

    @torch.inference_mode()
    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        x = self.norm(hidden)
        if self.rows is not None:
            return self.rows.apply(self._fast[0], x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1).float()
        rows = x.shape[0] if x.dim() == 2 else 0
        if rows in PAD_ROWS and self._pads(rows, x):
            return self.lm_head(torch.cat([x, x.new_zeros(PAD_TO - rows, x.shape[1])]))[:rows].float()
        return self.lm_head(x).float()

    def _pads(self, rows: int, like: torch.Tensor) -> bool:
        """Whether `rows` rows are computed faster as PAD_TO: timed once per head and row count on a CPU with
        a large head (a CPU BLAS may run 2-3 rows as separate matrix-vector products and 4 as one blocked
        matrix product: SmolLM2's float32 head on this project's CPU, 26 / 40 ms for 2 / 3 rows, 18 for 4;
        `python scripts/bench_head_rows.py` prints it). The padding rows are zeros and are dropped."""
        if rows not in self._padding:
            big = like.device.type == "cpu" and self.cfg.vocab_size * self.cfg.hidden_size >= PAD_MIN_WEIGHTS
            self._padding[rows] = big and pad_pays(self.lm_head, rows, like)
        return self._padding[rows]
