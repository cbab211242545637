"""What a peer hosts: consecutive transformer blocks `[start, end)`; and what a client holds: the head.

`BlockRange.forward` runs one step of one session: hidden states of `n` new nodes (a chain or a draft
tree), written into that session's `KVCache` at `layout.start`. `ModelHead` holds the embeddings, the
final norm and the LM head. Neither knows where its weights came from or who is asking.
"""

from __future__ import annotations

import torch
from torch import nn

from .cache import CacheError, KVCache, StepLayout
from .config import ContextTooLong, ModelConfig
from .layers import Block, RMSNorm, rope_inv_freq, rope_tables


class BlockRange(nn.Module):
    def __init__(self, cfg: ModelConfig, start: int, end: int):
        super().__init__()
        if not 0 <= start < end <= cfg.num_hidden_layers:
            raise ValueError(f"block range [{start}, {end}) is not inside the model's {cfg.num_hidden_layers} blocks")
        self.cfg, self.start, self.end = cfg, start, end
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(start, end))
        self.register_buffer("inv_freq", rope_inv_freq(cfg.rope, cfg.head_dim), persistent=False)
        self._windows = tuple(cfg.sliding_windows[start:end])

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
        return view

    @property
    def dtype(self) -> torch.dtype:
        return self.layers[0].mlp.down_proj.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.layers[0].mlp.down_proj.weight.device

    def new_cache(self, max_length: int) -> KVCache:
        """A session's cache of `max_length` positions: at most the model's context (`ContextTooLong`)."""
        cfg = self.cfg
        if max_length > cfg.max_position_embeddings:
            raise ContextTooLong(max_length, cfg.max_position_embeddings, "session")
        return KVCache(len(self.layers), cfg.num_key_value_heads, cfg.head_dim, max_length,
                       dtype=self.dtype, device=self.device)

    def bytes_per_token(self) -> int:
        cfg = self.cfg
        return KVCache.bytes_per_token(len(self.layers), cfg.num_key_value_heads, cfg.head_dim, self.dtype)

    @torch.inference_mode()
    def forward(self, hidden: torch.Tensor, cache: KVCache, layout: StepLayout) -> torch.Tensor:
        """hidden [n, hidden_size] (or [1, n, hidden_size]) -> the same shape after these blocks."""
        squeeze = hidden.dim() == 2
        x = hidden.unsqueeze(0) if squeeze else hidden
        if x.shape[0] != 1 or x.shape[1] != layout.n or x.shape[2] != self.cfg.hidden_size:
            raise CacheError(f"hidden states of shape {tuple(hidden.shape)} do not match {layout.n} nodes "
                             f"of width {self.cfg.hidden_size}")
        x = x.to(self.dtype)
        cache.begin_step(layout)
        cos, sin = rope_tables(self.inv_freq, layout.positions(x.device), x.dtype)
        masks = layout.attention_mask(self._windows, x.device)
        for i, block in enumerate(self.layers):
            x = block(x, cos, sin, cache, i, layout.start, masks[self._windows[i]])
        return x.squeeze(0) if squeeze else x


class ModelHead(nn.Module):
    """Token embeddings in, logits out: the parts of the model a client keeps."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @torch.inference_mode()
    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        if token_ids.numel() and (int(token_ids.min()) < 0 or int(token_ids.max()) >= self.cfg.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.cfg.vocab_size})")
        return self.embed_tokens(token_ids)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head, returned in fp32."""
        return self.lm_head(self.norm(hidden.to(self.lm_head.weight.dtype))).float()
