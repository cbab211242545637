"""Turning logits into tokens on the client: sampling, drawing tree siblings, the draft's top-K.

The distributions and the lossless verifiers themselves (`SamplingParams`, `token_probs`, `verify`,
`verify_tree`, `verify_greedy_tree`, `check_round`) live in `peer.model.sampling`, one implementation
for the client's decoder and for a last peer that verifies rounds itself; they are re-exported here.
`sample` draws one token; `draw_siblings` draws the first level of a sampled tree; `top_k_probs` cuts a
draft distribution to its K likeliest tokens, renormalised (what a draft samples from when the last
peer verifies: the peer gets exactly those K (id, prob) pairs). Knows tensors of logits and token ids;
nothing of models, caches, peers or tokenizers.
"""

from __future__ import annotations

import torch

from peer.model.sampling import (  # noqa: F401 - re-exported: the decoder's vocabulary
    MAX_CHECK_DRAFTS, RoundCheck, RoundVerdict, SamplingParams, check_round, draw, sparse_q, token_probs, uniform, verify,
    verify_greedy_tree, verify_tree)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> int:
    """One token id from logits [vocab]."""
    if params.greedy:
        return int(logits.argmax(-1))
    return draw(token_probs(logits, params), generator)


def top_k_probs(q: torch.Tensor, k: int) -> torch.Tensor:
    """q [..., vocab] kept on its k likeliest tokens and renormalised (ties broken by torch.topk)."""
    if k >= q.shape[-1]:
        return q
    values, idx = q.topk(k, dim=-1)
    out = torch.zeros_like(q).scatter_(-1, idx, values)
    return out / out.sum(-1, keepdim=True)


def draw_siblings(q: torch.Tensor, width: int, generator: torch.Generator | None = None,
                  replace: bool = True) -> tuple[list[int], list[torch.Tensor]]:
    """Up to `width` sibling tokens drawn from q [vocab], and the distribution each was drawn from, to pass
    to `verify_tree` as their q. replace=True: i.i.d. (duplicates possible; q itself for each).
    replace=False: distinct tokens, each from q without the earlier ones (fewer than `width` when q
    has fewer tokens of non-zero probability)."""
    tokens: list[int] = []
    conditionals: list[torch.Tensor] = []
    left = q
    while len(tokens) < width:
        mass = float(left.sum())
        if mass <= 0:
            break
        conditionals.append(q if replace else left / mass)
        tokens.append(draw(conditionals[-1], generator))
        if not replace:
            left = left.clone()
            left[tokens[-1]] = 0
    return tokens, conditionals
