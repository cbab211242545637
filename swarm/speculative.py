"""Speculative decoding: a draft model proposes tokens, one trip through the target verifies them all.

One round, top to bottom (`speculative_generate`):
  1. `AdaptiveK` picks how many tokens to draft from the measured round time, draft cost and
     acceptance (or k is fixed);
  2. the `Drafter` catches its cache up with the committed sequence and drafts k tokens (or a small
     tree: the draft's top candidates for the next token, each continued greedily);
  3. the target runs [last committed token] + drafts in ONE step that starts at that token's position
     (the start rolls back whatever the previous round rejected: no extra trip, ever; a tree round's
     accepted path is compacted by the next step);
  4. `verify` accepts drafts by rejection sampling (greedy is the one-hot case: accept while the
     draft equals the target's argmax), then adds one token of the target's own, so every round
     commits at least one token and the output distribution is the target's alone;
  5. pipelined: while a round is on the wire, the next one is drafted and sent assuming this one is
     fully accepted; if it was not, the speculative round is dropped (its cache entries are
     overwritten by the next step).
`relaxed` acceptance (opt-in, LOSSY) also accepts a draft whose target probability is close to the
best one, strictly where the target is confident and more loosely where it is unsure.

The target is any `RunBlocks` (local blocks or the chain of peers). Knows nothing about the network.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import torch

from peer.model import ModelHead, StepLayout

from .generate import GenerationResult, LocalModel, RunBlocks
from .sampling import SamplingParams, token_probs


@dataclass(frozen=True)
class SpecConfig:
    k: int | None = None  # None: adaptive
    k_max: int = 8
    tree_width: int = 1  # > 1: draft a tree with this many candidates for the first token (greedy only)
    pipeline: bool = False  # measured: pays only when the trip dwarfs compute (a WAN); a loss on loopback
    relaxed: float | None = None  # LOSSY: accept near-best drafts (0 < tau < 1)
    params: SamplingParams = SamplingParams()

    @property
    def mode(self) -> str:
        kind = "tree" if self.tree_width > 1 else "chain"
        return f"speculative-{kind}{'-pipelined' if self.pipeline else ''}{'-relaxed(lossy)' if self.relaxed else ''}"


class Drafter:
    """The draft model with its own cache, kept in step with whatever sequence it is asked to extend."""

    def __init__(self, model: LocalModel, max_length: int):
        self.model = model
        self.session = model.session(max_length)
        self.fed: list[int] = []  # tokens whose keys/values sit in the draft cache, in order
        self.seconds = 0.0
        self.tokens = 0

    def _step(self, tokens: list[int], start: int) -> torch.Tensor:
        head = self.model.head
        ids = torch.tensor(tokens, dtype=torch.long, device=head.embed_tokens.weight.device)
        hidden = self.session(head.embed(ids), StepLayout(start, len(tokens)))
        self.fed[start:] = tokens
        self.tokens += 1
        return head.logits(hidden[-1:])[0]

    def _logits_after(self, context: list[int]) -> torch.Tensor:
        keep, limit = 0, min(len(self.fed), len(context) - 1)  # re-run at least the last token
        while keep < limit and self.fed[keep] == context[keep]:
            keep += 1
        return self._step(context[keep:], keep)

    def propose(self, context: list[int], k: int, params: SamplingParams,
                generator: torch.Generator | None = None) -> tuple[list[int], torch.Tensor]:
        """k draft tokens continuing `context` and the draft distributions they were drawn from [k, vocab]."""
        t0 = time.perf_counter()
        logits = self._logits_after(context)
        tokens, probs = [], []
        for i in range(k):
            q = token_probs(logits, params)
            token = int(q.argmax()) if params.greedy else int(torch.multinomial(q, 1, generator=generator))
            tokens.append(token)
            probs.append(q)
            if i < k - 1:
                logits = self._step([token], len(self.fed))
        self.seconds += time.perf_counter() - t0
        return tokens, torch.stack(probs) if probs else torch.empty(0)

    def propose_tree(self, context: list[int], depth: int, width: int) -> tuple[list[int], list[int]]:
        """Greedy tree: the `width` likeliest first tokens, each continued greedily to `depth` tokens.

        Returns (tokens, parents) with parents[i] = -1 for first-level nodes.
        """
        t0 = time.perf_counter()
        first = self._logits_after(context).topk(width).indices.tolist()
        tokens, parents = [], []
        for candidate in first:
            parent = -1
            token = candidate
            for d in range(depth):
                tokens.append(token)
                parents.append(parent)
                parent = len(tokens) - 1
                if d < depth - 1:
                    token = int(self._step([token], len(context) + d).argmax())
        self.seconds += time.perf_counter() - t0
        return tokens, parents


def verify(drafts: list[int], q: torch.Tensor, p: torch.Tensor, generator: torch.Generator | None = None,
           relaxed: float | None = None) -> tuple[int, int]:
    """(drafts accepted, the next token). p: target distributions [len(drafts)+1, vocab], q: draft's [len(drafts), vocab].

    Rejection sampling: accept draft x with probability min(1, p(x)/q(x)); at the first rejection
    draw from norm(max(p - q, 0)); if all are accepted draw the extra token from p. One-hot p and q
    (greedy) make this "accept while equal to the argmax, then the argmax".
    """
    for i, x in enumerate(drafts):
        px, qx = float(p[i, x]), float(q[i, x])
        if relaxed is not None and _relaxed_ok(p[i], x, relaxed):
            continue
        if px >= qx or float(torch.rand((), generator=generator)) < px / qx:
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
    return int(torch.multinomial(probs, 1, generator=generator))


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


class AdaptiveK:
    """Chooses k to maximise expected tokens per second.

    Accepted drafts per round follow a truncated geometric law with per-token acceptance a, so a
    round of k drafts commits E(k) = (1 - a^(k+1)) / (1 - a) tokens. A round costs
    T(k) = t0 + t1 * (k + 1) + c * k: t0 is the trip through the chain, t1 the verify cost per token
    (a least-squares line through recent rounds' times without drafting), c the draft cost per token.
    k = argmax over 1..k_max of E(k) / T(k).
    """

    def __init__(self, k_max: int = 8, k_start: int = 4, memory: float = 0.9):
        self.k_max, self.k_start, self.memory = k_max, k_start, memory
        self.accepted, self.rejections = 2.0, 1.0  # a weak prior: a = 2/3
        self.points: list[tuple[int, float]] = []  # (tokens sent, seconds) of recent rounds
        self.draft_s_per_token = 0.0

    @property
    def acceptance(self) -> float:
        return self.accepted / (self.accepted + self.rejections)

    def observe(self, drafted: int, accepted: int, sent: int, seconds: float, draft_seconds: float) -> None:
        self.accepted = self.memory * self.accepted + accepted
        self.rejections = self.memory * self.rejections + (accepted < drafted)
        self.points = (self.points + [(sent, seconds)])[-32:]
        if drafted:
            self.draft_s_per_token = 0.8 * self.draft_s_per_token + 0.2 * draft_seconds / drafted

    def round_time(self, k: int) -> float:
        xs = [n for n, _ in self.points]
        ys = [t for _, t in self.points]
        mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
        var = sum((x - mean_x) ** 2 for x in xs)
        slope = max(0.0, sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / var) if var else 0.0
        base = max(1e-6, mean_y - slope * mean_x)
        return base + slope * (k + 1) + self.draft_s_per_token * k

    def choose(self) -> int:
        if len(self.points) < 2:  # two different sizes first, to see the slope
            return self.k_start if not self.points else max(1, self.k_start // 2)
        a = min(self.acceptance, 0.999)  # k >= 1 always: a round without drafts would teach us nothing
        return max(range(1, self.k_max + 1), key=lambda k: (1 - a ** (k + 1)) / (1 - a) / self.round_time(k))


@dataclass
class SpeculativeResult(GenerationResult):
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    accepted_per_round: list[int] = field(default_factory=list)
    ks: list[int] = field(default_factory=list)
    pipelined_hits: int = 0  # rounds that were already in flight when needed

    @property
    def tokens_per_round(self) -> float:
        return len(self.tokens) / self.rounds if self.rounds else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


def _submit(run: RunBlocks, head: ModelHead, ids: list[int], layout: StepLayout, compact) -> Future:
    hidden = head.embed(torch.tensor(ids, device=head.embed_tokens.weight.device))
    submit = getattr(run, "submit", None)
    if submit is not None:
        return submit(hidden, layout, compact)
    done: Future = Future()
    done.set_result(run(hidden, layout, compact) if compact is not None else run(hidden, layout))
    return done


def speculative_generate(head: ModelHead, run: RunBlocks, drafter: Drafter, prompt: list[int], max_new_tokens: int,
                         cfg: SpecConfig = SpecConfig(k=4), seed: int = 0, eos_ids: tuple = (),
                         on_tokens: Callable[[list[int]], None] | None = None) -> SpeculativeResult:
    if not prompt:
        raise ValueError("the prompt must contain at least one token")
    params = cfg.params
    tree = cfg.tree_width > 1 and params.greedy
    generator = torch.Generator(device=head.embed_tokens.weight.device).manual_seed(seed)
    adaptive = AdaptiveK(cfg.k_max) if cfg.k is None else None
    result = SpeculativeResult(prompt_tokens=len(prompt))
    t_start = time.perf_counter()
    if len(prompt) > 1:  # the last prompt token travels with the first round
        _submit(run, head, prompt[:-1], StepLayout(0, len(prompt) - 1), None).result()
    seq, compact = list(prompt), None
    ahead = None  # a pipelined round already on the wire: (future, ids, drafts, q, start)
    while len(result.tokens) < max_new_tokens:
        left = max_new_tokens - len(result.tokens) - 1
        start = len(seq) - 1
        t0, d0 = time.perf_counter(), drafter.seconds
        parents = None
        if ahead is not None and ahead[4] == start and ahead[1][0] == seq[-1]:
            future, ids, drafts, q, _ = ahead  # sent while the previous round was on the wire
            result.pipelined_hits += 1
        else:
            k = min(adaptive.choose() if adaptive else cfg.k, left)
            if tree and k > 0:
                drafts, parents = drafter.propose_tree(seq, k, cfg.tree_width)
                ids, q = seq[-1:] + drafts, None
                layout = StepLayout(start, len(ids), tuple([-1] + [p + 1 for p in parents]))
            else:
                drafts, q = drafter.propose(seq, k, params, generator) if k > 0 else ([], torch.empty(0))
                ids, layout = seq[-1:] + drafts, StepLayout(start, k + 1)
            future = _submit(run, head, ids, layout, compact)
        compact, ahead = None, None
        k_next = min(len(drafts), left - len(drafts))
        if cfg.pipeline and parents is None and drafts and k_next > 0:
            # assume every draft is accepted: the next round re-sends the last draft and verifies what
            # follows it, so it is valid whenever this round accepts all its drafts (whatever its extra token)
            nxt, q_nxt = drafter.propose(seq + drafts, k_next, params, generator)
            nxt_ids = drafts[-1:] + nxt
            ahead = (_submit(run, head, nxt_ids, StepLayout(start + len(drafts), len(nxt_ids)), None),
                     nxt_ids, nxt, q_nxt, start + len(drafts))
        try:
            hidden = future.result()
        except Exception as e:  # noqa: BLE001 - a pipelined round abandoned by a failover: send it again
            if type(e).__name__ != "Abandoned":
                raise
            ahead = None
            hidden = _submit(run, head, ids, StepLayout(start, len(ids)), None).result()
        logits = head.logits(hidden)
        if parents is not None:
            path, extra = verify_greedy_tree(ids, [-1] + [p + 1 for p in parents], logits.argmax(-1).tolist())
            new, accepted, compact = [ids[i] for i in path[1:]] + [extra], len(path) - 1, (start, path)
        else:
            accepted, extra = verify(drafts, q, token_probs(logits, params), generator, cfg.relaxed)
            new = drafts[:accepted] + [extra]
        if ahead is not None and accepted == len(drafts):
            new = drafts  # the round in flight verifies the next position itself
        else:
            ahead = None  # a rejection: drop the speculative round (the next step overwrites its cache)
        for i, token in enumerate(new):
            if token in eos_ids:
                new, result.stopped_by, ahead = new[:i + 1], "eos", None
                break
        new = new[:max_new_tokens - len(result.tokens)]
        depth = len(drafts) // cfg.tree_width if parents is not None else len(drafts)  # a tree: its depth
        if adaptive:
            drafting = drafter.seconds - d0  # the round's own trip and verify time, without drafting
            adaptive.observe(depth, accepted, len(ids), time.perf_counter() - t0 - drafting, drafting)
        result.rounds += 1
        result.drafted += depth
        result.accepted += accepted
        result.accepted_per_round.append(accepted)
        result.ks.append(depth)
        seq += new
        result.tokens += new
        if on_tokens:
            on_tokens(new)
        if result.stopped_by == "eos":
            break
    result.seconds = time.perf_counter() - t_start
    return result


def generate_speculative(model, draft: LocalModel, prompt: list[int], max_new_tokens: int, cfg: SpecConfig = SpecConfig(),
                         seed: int = 0, stop_at_eos: bool = True,
                         on_tokens: Callable[[list[int]], None] | None = None) -> SpeculativeResult:
    """Speculative decoding with a LocalModel or a SwarmModel as the target (sessions opened and closed here)."""
    if draft.head.cfg.vocab_size != model.head.cfg.vocab_size:
        raise ValueError(f"the draft's vocabulary ({draft.head.cfg.vocab_size}) differs from the target's "
                         f"({model.head.cfg.vocab_size}); they must share a tokenizer")
    eos = tuple(model.head.cfg.eos_token_ids) if stop_at_eos else ()
    length = len(prompt) + max_new_tokens + 2 * max(cfg.k or 0, cfg.k_max) * max(1, cfg.tree_width) + 2
    session = model.session(length)
    try:
        return speculative_generate(model.head, session, Drafter(draft, length), prompt, max_new_tokens, cfg, seed,
                                    eos, on_tokens)
    finally:
        session.close()
