"""The target's side of speculative verification: sampling distributions, lossless verifiers, a round's verdict.

`token_probs` is the distribution a sampler draws from (`SamplingParams`: temperature, then top-k, then
top-p, as Hugging Face's warpers; every sampled draw, the draft's and the target's, goes through it, so the
target's law verified against is the filtered one); `verify` (lossless rejection sampling of a
chain), `verify_tree` (its multi-candidate form for a sampled tree) and `verify_greedy_tree` compare
the target's and the draft's versions of it. The client's decoder (`swarm.decode`) and a last peer
that verifies rounds itself (`peer.verify`, "verification at the last peer") share this one
implementation. `check_round` is that peer's whole job for one round: the target's logits and what
the client sent (`RoundCheck`: the drafts, the sparse top-K distributions they were sampled from, a
seed) in, a `RoundVerdict` out (the target's argmax after every node; under sampling the accepted
path and the next token too). Every random draw is made on the generator's device (`uniform`,
`draw`). Knows tensors of logits and token ids; nothing of caches, peers, messages or tokenizers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int | None = None  # keep the k likeliest tokens (ties at the k-th kept: `token_probs`); None or 0: off

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)
                                       or self.top_k < 0):
            raise ValueError(f"top_k must be a positive integer (0 or None: off), got {self.top_k!r}")
        if self.top_k == 0:  # one spelling of "off", so equal parameters compare equal
            object.__setattr__(self, "top_k", None)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def token_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Probabilities [..., vocab] after temperature, top-k and top-p (Hugging Face's order; top-p judges the
    top-k distribution renormalised); one-hot at the argmax when greedy, whatever top-k and top-p say.

    Top-k keeps every token whose logit is at least the k-th largest: exactly k tokens unless others tie with
    the k-th, and then all of them (as Hugging Face's and vLLM's top-k): a set fixed by the logits' values
    alone, never by how a sort orders equal values, so the client and a verifying peer agree on it."""
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).to(torch.float32)
    scores = logits.float()
    if params.top_k is not None and params.top_k < scores.shape[-1]:
        kth = scores.topk(params.top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores / params.temperature, dim=-1)
    if params.top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # keep the smallest set of tokens whose mass reaches top_p (the top token always stays)
        drop = (sorted_p.cumsum(-1) - sorted_p) >= params.top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


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


def verify_tree(tokens: list[int], parents: list[int], q: Sequence[torch.Tensor | None], p: torch.Tensor,
                generator: torch.Generator | None = None) -> tuple[list[int], int]:
    """Lossless verification of a sampled draft tree: (accepted path of node indices starting at 0, the next token).

    Nodes as in `verify_greedy_tree` (node 0 = the last committed token; parents[i] into the node
    list). p [n, vocab]: the target's distribution after every node. q[i] for a draft node i > 0:
    the distribution tokens[i] was drawn from, or None for a deterministic candidate (an n-gram or
    prompt-lookup token, a top-k pick: read as one-hot at the token); q[0] is unused.

    Recursive rejection sampling: from the root, try the current node's children in order; accept
    child c with probability min(1, r(x_c)/q_c(x_c)), r the residual (p[node] at first); on a
    rejection r <- norm(max(r - q_c, 0)) (None: r with x_c removed) and the next sibling is tried.
    An accepted child becomes the current node (r resets to p[c]); when none is, the next token is
    drawn from r. One-hot p (greedy) gives `verify_greedy_tree`'s answer, with no random draw.

    Why it is exact: one step (x ~ q; accept w.p. min(1, r(x)/q(x)), else draw from norm(max(r - q, 0)))
    outputs a draw from r. Here the "else" draw is the same step again, on the next sibling, with the
    residual as its target; by induction over the siblings (the last falls back to a real draw) the
    token committed after a node follows p[node]. That needs every sibling's token to follow its
    q[i] GIVEN the earlier siblings' tokens, and to be drawn independently of this function's
    random numbers:
      - i.i.d. draws from one q (with replacement, duplicates allowed): q[i] = that q for each;
      - draws without replacement: q[i] must be the conditional, q with the earlier siblings' tokens
        removed and renormalised (`draw_siblings(replace=False)` returns those); declaring the
        plain q there (or de-duplicating after the fact) is biased;
      - deterministic candidates (None): one-hot at x is x's distribution given x itself, so accept
        w.p. r(x), else r without x, is exact however x was chosen, and mixes with sampled siblings.
    Once child c is accepted the same argument holds at c with target p[c], provided c's children
    follow their q given c (drafted before verification, from the draft's law after c's path, as
    above), so by induction over the depth the committed tokens follow the target's own law.
    O(nodes x vocab) at worst: every node is tried once, a rejection costs one residual.
    """
    if not len(q) == len(tokens) == len(parents) == p.shape[0]:
        raise ValueError(f"tokens, parents, q and p must all have one entry per node: got {len(tokens)}, "
                         f"{len(parents)}, {len(q)} and {p.shape[0]}")
    children: dict[int, list[int]] = {}
    for i, parent in enumerate(parents[1:], 1):
        children.setdefault(parent, []).append(i)
    path = [0]
    while True:
        residual = p[path[-1]]
        for c in children.get(path[-1], []):
            x, qc = tokens[c], q[c]
            rx, qx = float(residual[x]), 1.0 if qc is None else float(qc[x])
            if rx > 0 and (rx >= qx or uniform(generator) < rx / qx):
                path.append(c)
                break
            residual = _residual(residual, qc, x)
        else:
            return path, _draw(residual, generator)


def _residual(r: torch.Tensor, q: torch.Tensor | None, x: int) -> torch.Tensor:
    """norm(max(r - q, 0)) after rejecting x drawn from q (None: one-hot at x, so r without x)."""
    if q is None:
        left = r.clone()
        left[x] = 0
    else:
        left = (r - q.to(r.device)).clamp_min(0)
    mass = float(left.sum())
    return r if mass <= 0 else left / mass  # mass 0: r == q up to rounding, so any draw from r is right




MAX_CHECK_DRAFTS = 64  # the most drafts one sampled round verified elsewhere may hold (protocol.check bounds the wire)


@dataclass(frozen=True, slots=True)
class RoundCheck:
    """What a verifier needs beyond the target's logits to judge one sampled round: the drafted tokens
    (nodes 1.. of the step; node 0 is the last committed token), for each the distribution it was drawn
    from as sparse (id, prob) pairs (the draft's top-K renormalised; one pair (id, 1.0) for a
    deterministic draft), and the seed of the round's random draws (reproducible wherever it runs)."""

    drafts: tuple[int, ...]
    q: tuple[tuple[tuple[int, float], ...], ...]
    seed: int


@dataclass(frozen=True, slots=True)
class RoundVerdict:
    """A round judged where the logits are: the target's argmax after each of the step's last rows (all of a
    round's), and under sampling the accepted path of node indices (from 0) and the token that follows it."""

    argmax: tuple[int, ...]
    path: tuple[int, ...] | None = None
    token: int | None = None


def sparse_q(q: torch.Tensor | None, token: int) -> tuple[tuple[int, float], ...]:
    """A draft distribution as the (id, prob) pairs of its support (None: one-hot at `token`)."""
    if q is None:
        return ((token, 1.0),)
    ids = torch.nonzero(q > 0).flatten().tolist()
    return tuple((i, float(q[i])) for i in ids)


def dense_q(pairs: Sequence[tuple[int, float]], vocab: int) -> torch.Tensor:
    q = torch.zeros(vocab, dtype=torch.float32)
    for i, prob in pairs:
        q[i] = prob
    return q


def check_round(logits: torch.Tensor, params: SamplingParams, check: RoundCheck | None = None,
                parents: Sequence[int] | None = None, max_argmax: int = 4096) -> RoundVerdict:
    """Judge one step's logits [n, vocab]: the argmax of its last `max_argmax` rows; with a `check` under
    sampling, rejection sampling of its drafts (`verify` for a chain, `verify_tree` when `parents` makes a
    tree) with a CPU generator seeded from the check, so the verdict is the same on any device. The step's
    rows must be the round's: n == len(check.drafts) + 1 (the caller checks it)."""
    argmax = tuple(logits[-max_argmax:].argmax(-1).tolist())
    if params.greedy or check is None:
        return RoundVerdict(argmax)
    generator = torch.Generator().manual_seed(check.seed)
    p = token_probs(logits.float().cpu(), params)
    vocab = p.shape[-1]
    qs = [dense_q(pairs, vocab) for pairs in check.q]
    drafts = list(check.drafts)
    if parents is None:
        accepted, token = verify(drafts, torch.stack(qs) if qs else p.new_zeros(0, vocab), p, generator)
        return RoundVerdict(argmax, tuple(range(accepted + 1)), token)
    path, token = verify_tree([-1] + drafts, list(parents), [None] + qs, p, generator)
    return RoundVerdict(argmax, tuple(path), token)
