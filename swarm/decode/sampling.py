"""Turning logits into tokens: greedy, temperature and nucleus (top-p) sampling, and verifying drafts.

`token_probs` is the distribution a sampler draws from; speculative verification (`verify`, lossless
rejection sampling; `verify_greedy_tree`) compares the target's and the draft's versions of it, so
both paths share this one definition. Knows tensors of logits and token ids; nothing of models,
caches, peers or tokenizers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def token_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Probabilities [..., vocab] after temperature and top-p; one-hot at the argmax when greedy."""
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).to(torch.float32)
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # keep the smallest set of tokens whose mass reaches top_p (the top token always stays)
        drop = (sorted_p.cumsum(-1) - sorted_p) >= params.top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> int:
    """One token id from logits [vocab]."""
    if params.greedy:
        return int(logits.argmax(-1))
    return draw(token_probs(logits, params), generator)


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> int:
    """One index drawn from `probs` with `generator`, on the generator's device whatever the tensor's: a
    CUDA generator with CPU probabilities (or the reverse) is what crashed speculative decoding on a GPU."""
    if generator is not None and probs.device != generator.device:
        probs = probs.to(generator.device)
    return int(torch.multinomial(probs, 1, generator=generator))


def uniform(generator: torch.Generator | None = None) -> float:
    """One U[0, 1) number from `generator`, made on its own device (CPU without one)."""
    return float(torch.rand((), generator=generator, device=generator.device if generator is not None else "cpu"))


def verify(drafts: list[int], q: torch.Tensor, p: torch.Tensor, generator: torch.Generator | None = None,
           relaxed: float | None = None, soft: torch.Tensor | None = None) -> tuple[int, int]:
    """(drafts accepted, the next token). p: target distributions [len(drafts)+1, vocab], q: draft's [len(drafts), vocab].
    `soft`: the target's full softmax for `relaxed` to judge by where p is one-hot (greedy); default p.

    Rejection sampling: accept draft x with probability min(1, p(x)/q(x)); at the first rejection
    draw from norm(max(p - q, 0)); if all are accepted draw the extra token from p. One-hot p and q
    (greedy) make this "accept while equal to the argmax, then the argmax".
    """
    for i, x in enumerate(drafts):
        px, qx = float(p[i, x]), float(q[i, x])
        if relaxed is not None and _relaxed_ok(p[i] if soft is None else soft[i], x, relaxed):
            continue
        if px >= qx or uniform(generator) < px / qx:
            continue
        residual = (p[i] - q[i]).clamp_min(0)
        if float(residual.sum()) <= 0:  # p == q up to rounding: any draw from p is right
            residual = p[i]
        return i, _draw(residual / residual.sum(), generator)
    return len(drafts), _draw(p[len(drafts)], generator)


def _relaxed_ok(p: torch.Tensor, x: int, tau: float) -> bool:
    """Accept x if p(x) >= max p * (1 - tau * H(p)/log V): strict where the target is sure (low entropy)."""
    entropy = float(-(p * p.clamp_min(1e-12).log()).sum()) / math.log(p.numel())
    return float(p[x]) >= float(p.max()) * (1 - tau * entropy)


def _draw(probs: torch.Tensor, generator) -> int:
    if float(probs.max()) >= 1.0:
        return int(probs.argmax())
    return draw(probs, generator)


def verify_greedy_tree(tokens: list[int], parents: list[int], argmax: list[int]) -> tuple[list[int], int]:
    """Tree nodes (node 0 = the last committed token, tokens[i] its descendants with parents[i] into
    the node list) and the target's argmax after every node: (accepted path of node indices starting
    at 0, the next token)."""
    children: dict[int, list[int]] = {}
    for i, parent in enumerate(parents):
        children.setdefault(parent, []).append(i)
    path = [0]
    while True:
        nxt = [c for c in children.get(path[-1], []) if tokens[c] == argmax[path[-1]]]
        if not nxt:
            return path, argmax[path[-1]]
        path.append(nxt[0])
