"""Speculative decoding: a draft model proposes tokens, one trip through the target verifies them all.

One round, top to bottom (`speculative_generate`):
  1. `AdaptiveK`, a cost model fed by every round (trip + verify time as a line in the step size,
     draft time per token, the draft's confidence calibrated against the target's verdicts), shapes
     the round: chain or tree, and, token by token while drafting, whether one more draft raises the
     expected tokens per second (or k is fixed);
  2. the `Drafter` catches its cache up with the committed sequence and drafts (or a small greedy
     tree: the draft's top candidates for the next token, each continued greedily);
  3. the target runs [last committed token] + drafts in ONE step that starts at that token's position
     (the start rolls back whatever the previous round rejected: no extra trip, ever; a tree round's
     accepted path is compacted by the next step);
  4. `verify` accepts drafts by rejection sampling (greedy is the one-hot case: accept while the
     draft equals the target's argmax), then adds one token of the target's own, so every round
     commits at least one token and the output distribution is the target's alone;
  5. pipelined (when the cost model expects it to pay, or forced): while a round is on the wire, the
     next one is drafted and sent assuming this one is fully accepted; if it was not, the speculative
     round is thrown away (counted in `wasted_rounds`; its cache entries are overwritten by the next step).
Sampling (temperature > 0) always drafts chains: trees are verified greedily only.
`relaxed` acceptance (opt-in, LOSSY) also accepts a draft whose target probability is close to the
best one, strictly where the target is confident and more loosely where it is unsure (judged on the
target's softmax, also when decoding greedily).

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

from swarm.decode.generate import GenerationResult, LocalModel, RunBlocks
from swarm.decode.sampling import SamplingParams, token_probs


@dataclass(frozen=True)
class SpecConfig:
    k: int | None = None  # None: adaptive
    k_max: int = 8
    tree_width: int = 1  # > 1: draft a tree with this many candidates for the first token (greedy only)
    pipeline: bool | None = None  # None: the cost model decides per round (pays when the trip dwarfs compute)
    relaxed: float | None = None  # LOSSY: accept near-best drafts (0 < tau < 1)
    params: SamplingParams = SamplingParams()

    @property
    def mode(self) -> str:
        kind = "tree" if self.tree_width > 1 else "chain"
        pipe = {True: "-pipelined", False: "", None: "-autopipeline"}[self.pipeline]
        return f"speculative-{kind}{pipe}{'-relaxed(lossy)' if self.relaxed else ''}"


class Drafter:
    """The draft model with its own cache, kept in step with whatever sequence it is asked to extend."""

    def __init__(self, model: LocalModel, max_length: int):
        self.model = model
        self.session = model.session(max_length)
        self.fed: list[int] = []  # tokens whose keys/values sit in the draft cache, in order
        self.confidences: list[float] = []  # of the last proposal's drafts
        self.top: list[list[int]] = []  # greedy: the draft's top-8 tokens at each of the last proposal's positions
        self.first_seconds = 0.0
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

    def propose(self, context: list[int], k: int, params: SamplingParams, generator: torch.Generator | None = None,
                decide: Callable[[list[float]], tuple[bool, bool]] | None = None) -> tuple[list[int], torch.Tensor]:
        """Up to k draft tokens continuing `context` and the draft distributions they were drawn from [k, vocab].

        `decide(confidences)` is asked after each token (its confidence: the draft's probability of
        it) whether to keep it and whether to draft another; without it, exactly k tokens. The
        confidences and (greedy) the draft's top-8 list at every position are left in
        `self.confidences` and `self.top`.
        """
        t0 = time.perf_counter()
        self.confidences, self.top = [], []
        logits = self._logits_after(context) if k > 0 else None
        self.first_seconds = time.perf_counter() - t0  # the catch-up step: paid once per round, whatever k
        tokens, probs = [], []
        for i in range(k):
            q = token_probs(logits, params)
            if params.greedy:
                token = int(logits.argmax())
                confidence = float(torch.softmax(logits.float(), -1)[token])
                self.top.append(logits.topk(min(8, logits.numel())).indices.tolist())
            else:
                token = int(torch.multinomial(q, 1, generator=generator))
                confidence = float(q[token])
            keep, more = decide(self.confidences + [confidence]) if decide is not None else (True, True)
            if not keep:
                self.top = self.top[:len(tokens)]
                break
            tokens.append(token)
            probs.append(q)
            self.confidences.append(confidence)
            if not more:
                break
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
    """The cost model that shapes every round: how many tokens to draft, chain or tree, pipeline or not.

    Expected tokens. A round that drafts x_1..x_k commits 1 + sum_i P_i tokens on average, where
    P_i = a_1 * ... * a_i is the chance that the first i drafts are all accepted and a_i the chance
    that draft i is accepted given the ones before were. a_i is read off the draft's own confidence
    (its probability of the token it proposed), calibrated online: ten confidence bins, each counting
    how often the target accepted a draft of that confidence (a prior of two tries at the bin's
    centre). With one acceptance rate a for all positions this is E(k) = (1 - a^(k+1)) / (1 - a);
    a itself is an exponential moving estimate of accepted / (accepted + rejections).

    Round time. T(k) = c_d * k + c_0 + c_1 * (k + 1): c_d is the draft model's time per token
    (measured), and c_0 + c_1 * n the time of a verification step of n tokens (the trip through the
    chain, every peer's compute, the client's LM head and verify), a least-squares line through the
    recent rounds that were not pipelined. On loopback c_0 is small and c_1 steep; across a WAN c_0
    is the round-trip time and dwarfs everything.

    Drafting (`draft_decision`): after each draft token the model keeps it if its expected tokens per
    second of verification beat the round's average so far (P_i * T >= E * c_1), and drafts another
    one if some longer draft, at the mean acceptance a, raises E / T. Confident drafts and costly
    trips make long rounds; a hesitant draft ends the round early (dynamic draft length).
    `choose(a)` is the same rule before drafting: argmax_k E(k) / T(k) over 1..k_max.

    Trees (greedy, `tree_width` > 1): a tree of width w and depth d commits
    1 + a_w * (1 - a^d) / (1 - a), where a_w = a + (1 - a) * r_w and r_w is how often the target's
    token was among the draft's top w where the draft's first choice was rejected (measured on every
    rejection); it costs c_d * (1 + w (d - 1)) + c_0 + c_1 * (w d + 1). Chosen when its rate beats
    the best chain's.

    Pipelining (`pipeline_pays`): sending the next round before this one's verdict hides the trip
    and the next draft when every draft is accepted (probability P_k), and costs the peers' compute
    for the thrown-away round otherwise. The saving starts at the wire latency (when the target
    knows it, else a guess of c_0 / 2) plus the draft time, the cost at c_0 + c_1 n minus that
    latency; both are then replaced by what pipelined rounds actually saved and cost (the first rounds
    that have a fair chance are pipelined to measure both). A hit also forgoes the round's extra token
    (the next round re-verifies from the last draft), so the saving is net of one token's time.
    Pipeline when P_k * saving > (1 - P_k) * cost.
    """

    BINS = 10

    def __init__(self, k_max: int = 8, k_start: int = 4, memory: float = 0.95, latency: float | None = None):
        self.k_max, self.k_start, self.memory = k_max, k_start, memory
        self.accepted, self.rejections = 2.0, 1.0  # a weak prior: a = 2/3
        self.hits = [2.0 * (b + 0.5) / self.BINS for b in range(self.BINS)]  # calibration: accepted per bin
        self.tries = [2.0] * self.BINS
        self.rescue: dict[int, float] = {}  # w -> how often the target's token was in the draft's top w after a miss
        self.rescue_n = 0.0
        self.points: list[tuple[int, float]] = []  # (tokens sent, seconds) of recent unpipelined rounds
        self.draft_steps: list[float] = []  # recent seconds per draft step after a round's first
        self.draft_firsts: list[float] = []  # recent seconds of a round's first draft step (catches up)
        self.latency = latency  # seconds of wire per round, when the target knows
        self.saved: tuple[float, float] | None = None  # (EMA seconds a pipelined hit saved, weight)
        self.lost: tuple[float, float] | None = None  # (EMA seconds a thrown-away round cost, weight)
        self.explored = 0  # rounds pipelined only to measure what pipelining saves and costs

    # --- what is measured --------------------------------------------------------------------------
    @property
    def acceptance(self) -> float:
        return self.accepted / (self.accepted + self.rejections)

    def alpha(self, confidence: float) -> float:
        """Calibrated chance that a draft the draft model gave probability `confidence` is accepted."""
        b = min(int(confidence * self.BINS), self.BINS - 1)
        return self.hits[b] / self.tries[b]

    def observe(self, drafted: int, accepted: int, sent: int, seconds: float | None, draft_seconds: float,
                confidences: list[float] | None = None, rescue_rank: int | None = None,
                first_seconds: float | None = None) -> None:
        """One verified round: `seconds` its trip and verify time without drafting (None: pipelined, not a
        clean sample), `confidences` the draft's confidence in each draft, `rescue_rank` the rank of the
        target's token in the draft's list at the first rejection (None: not in its top list)."""
        m = self.memory
        self.accepted = m * self.accepted + accepted
        self.rejections = m * self.rejections + (accepted < drafted)
        for i, c in enumerate((confidences or [])[:accepted + 1]):
            b = min(int(c * self.BINS), self.BINS - 1)
            self.hits[b] = m * self.hits[b] + (i < accepted) + (1 - m) * 2.0 * (b + 0.5) / self.BINS
            self.tries[b] = m * self.tries[b] + 1 + (1 - m) * 2.0
        if accepted < drafted and confidences is not None:
            self.rescue_n = m * self.rescue_n + 1
            for w in range(2, 9):
                self.rescue[w] = m * self.rescue.get(w, 0.0) + (rescue_rank is not None and rescue_rank < w)
        if seconds is not None:
            self.points = (self.points + [(sent, seconds)])[-24:]
        if drafted:  # medians of recent samples: one slow round on a busy machine must not set the policy
            first = draft_seconds / drafted if first_seconds is None else first_seconds
            self.draft_firsts = (self.draft_firsts + [first])[-16:]
            if drafted > 1:
                self.draft_steps = (self.draft_steps + [(draft_seconds - first) / (drafted - 1)])[-16:]

    def observe_pipeline(self, saved: float | None = None, lost: float | None = None) -> None:
        """Seconds a pipelined round saved (hit) or a thrown-away one cost the next round (miss)."""
        def ema(old, x):
            if old is None:
                return (x, 1.0)
            value, weight = old
            weight = min(weight + 1, 8)
            return (value + (x - value) / weight, weight)
        if saved is not None:
            self.saved = ema(self.saved, saved)
        if lost is not None:
            self.lost = ema(self.lost, max(lost, 0.0))

    def verify_cost(self) -> tuple[float, float]:
        """(c_0, c_1): seconds of a verification step of n tokens = c_0 + c_1 n, fitted to recent rounds
        (least squares through the median time of each step size, weighted by how often it was seen)."""
        if not self.points:
            return 0.01, 0.001
        by_size: dict[int, list[float]] = {}
        for n, t in self.points:
            by_size.setdefault(n, []).append(t)
        xs, ys, ws = zip(*((n, _median(ts), len(ts)) for n, ts in by_size.items()))
        total = sum(ws)
        mean_x = sum(w * x for x, w in zip(xs, ws)) / total
        mean_y = sum(w * y for y, w in zip(ys, ws)) / total
        var = sum(w * (x - mean_x) ** 2 for x, w in zip(xs, ws))
        if var:
            slope = max(0.0, sum(w * (x - mean_x) * (y - mean_y) for x, y, w in zip(xs, ys, ws)) / var)
        else:  # one size seen so far (exploration will add others): guess 10 % of it per token
            slope = 0.1 * mean_y / mean_x
        slope = min(slope, mean_y / mean_x)  # noise must not make the trip negative
        return max(1e-6, mean_y - slope * mean_x), slope

    @property
    def draft_cost(self) -> float:
        """Seconds per draft token after the first."""
        if len(self.draft_steps) >= 3 or (self.draft_steps and not self.draft_firsts):
            return _median(self.draft_steps)
        return _median(self.draft_firsts) if self.draft_firsts else 0.1 * sum(self.verify_cost())

    def draft_time(self, k: int) -> float:
        if k <= 0:
            return 0.0
        first = _median(self.draft_firsts) if self.draft_firsts else self.draft_cost
        return first + self.draft_cost * (k - 1)

    # --- what is decided ---------------------------------------------------------------------------
    def round_time(self, k: int, sent: int | None = None) -> float:
        c0, c1 = self.verify_cost()
        return self.draft_time(k) + c0 + c1 * ((k + 1) if sent is None else sent)

    def rate(self, k: int, a: float | None = None) -> float:
        a = min(self.acceptance if a is None else a, 0.999)
        return (1 - a ** (k + 1)) / (1 - a) / self.round_time(k)

    def choose(self, a: float | None = None, room: int | None = None) -> int:
        """The k in 1..k_max (and <= room) with the most expected tokens per second at acceptance a."""
        top = max(1, min(self.k_max, room if room is not None else self.k_max))
        if len(self.points) < 2 and a is None:
            return min(self.k_start if not self.points else max(1, self.k_start // 2), top)
        return max(range(1, top + 1), key=lambda k: self.rate(k, a))

    def explore(self) -> int | None:
        """A draft length to force this round so the verify-cost line sees different step sizes, or None.

        A line through one step size has no slope; when the recent rounds' sizes span fewer than 3
        tokens, the next round drafts k_start tokens (or 1, when the rounds have been long)."""
        sizes = [n for n, _ in self.points]
        if len(sizes) >= 3 and max(sizes) - min(sizes) >= 3:
            return None
        return 1 if sizes and sum(sizes) / len(sizes) > (self.k_start + 2) / 2 else self.k_start

    def draft_decision(self, confidences: list[float], room: int, explore: int | None = None) -> tuple[bool, bool]:
        """After drafting tokens with these confidences: (keep the last one, draft another)."""
        if explore is not None:
            return True, len(confidences) < min(explore, room)
        c0, c1 = self.verify_cost()
        cd = self.draft_cost
        k = len(confidences)
        p_before = 1.0
        expected = 1.0
        for c in confidences[:-1]:
            p_before *= self.alpha(c)
            expected += p_before
        time_ = self.draft_time(k) + c0 + c1 * k  # drafting so far, verifying k - 1 kept drafts and the last token
        p_last = p_before * self.alpha(confidences[-1])
        keep = k == 1 or p_last * time_ >= expected * c1
        if not keep or k >= room:
            return keep, False
        expected, time_ = expected + p_last, time_ + c1
        a, gain, p = min(self.acceptance, 0.999), 0.0, p_last
        for m in range(1, room - k + 1):
            p *= a
            gain += p
            if (expected + gain) * time_ > expected * (time_ + m * (cd + c1)):
                return True, True
        return True, False

    def tree_plan(self, width: int, room: int) -> tuple[int, int, float]:
        """The best (width, depth) for a greedy tree, width >= 2, and its expected tokens per second."""
        a = min(self.acceptance, 0.999)
        c0, c1 = self.verify_cost()
        cd = self.draft_cost
        best = (2, 1, 0.0)
        for w in range(2, width + 1):
            r_w = (self.rescue.get(w, 0.0) + 0.3) / (self.rescue_n + 1.0)  # prior: 30 % rescued
            a_w = a + (1 - a) * min(r_w, 1.0)
            for d in range(1, max(1, min(self.k_max, room)) + 1):
                seconds = self.draft_time(1) + cd * w * (d - 1) + c0 + c1 * (w * d + 1)
                rate = (1 + a_w * (1 - a ** d) / (1 - a)) / seconds
                if rate > best[2]:
                    best = (w, d, rate)
        return best

    def pipeline_pays(self, p_all: float, k_next: int) -> bool:
        """Send the next round now, assuming this one is fully accepted (probability p_all)?"""
        c0, c1 = self.verify_cost()
        wire = min(self.latency, c0) if self.latency is not None else c0 / 2  # unknown: a guess, until measured
        unmeasured = not self.saved or self.saved[1] < 2 or not self.lost or self.lost[1] < 2
        if unmeasured and self.explored < 12 and p_all >= 0.05:
            self.explored += 1  # explore: measure both outcomes (the policy outlives a generation)
            return True
        saved = self.saved[0] if self.saved else wire + self.draft_time(k_next)
        lost = self.lost[0] if self.lost else max(c0 - wire, 0.0) + c1 * (k_next + 1)
        # a hit also forgoes this round's extra token (the next round re-verifies from the last draft)
        a = min(self.acceptance, 0.999)
        per_token = self.round_time(k_next) * (1 - a) / (1 - a ** (k_next + 1))
        return p_all * (saved - per_token) > (1 - p_all) * lost


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    return 0.5 * (s[(len(s) - 1) // 2] + s[len(s) // 2])


@dataclass
class SpeculativeResult(GenerationResult):
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    accepted_per_round: list[int] = field(default_factory=list)
    ks: list[int] = field(default_factory=list)
    pipelined_hits: int = 0  # verification rounds that had been sent ahead and were used
    wasted_rounds: int = 0  # rounds sent ahead and thrown away after a rejection (compute spent for nothing)
    tree_rounds: int = 0
    policy: "AdaptiveK | None" = field(default=None, repr=False)  # the cost model as the run left it

    @property
    def tokens_per_round(self) -> float:
        """Committed tokens per verification round whose verdict was used (thrown-away rounds excluded)."""
        return len(self.tokens) / self.rounds if self.rounds else 0.0

    @property
    def trips(self) -> int:
        """Every step sent through the target, used or thrown away."""
        return self.rounds + self.wasted_rounds

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


@dataclass
class _Round:
    """A verification step on the wire: what was sent and what verifying it needs."""
    future: Future
    ids: list[int]
    layout: StepLayout
    compact: object
    drafts: list[int]
    q: torch.Tensor | None
    confidences: list[float]
    top: list[list[int]]
    start: int
    sent_at: float
    draft_seconds: float
    draft_steps: int
    parents: list[int] | None = None  # a tree: every node's parent (node 0 = the last committed token)
    depth: int = 0  # a tree's depth; a chain's is len(drafts)
    draft_first: float | None = None  # seconds of the first draft step (a chain)
    arrived: list[float] = field(default_factory=list)

    def stamp(self) -> "_Round":
        self.future.add_done_callback(lambda _: self.arrived.append(time.perf_counter()))
        return self


def speculative_generate(head: ModelHead, run: RunBlocks, drafter: Drafter, prompt: list[int], max_new_tokens: int,
                         cfg: SpecConfig = SpecConfig(k=4), seed: int = 0, eos_ids: tuple = (),
                         on_tokens: Callable[[list[int]], None] | None = None,
                         policy: "AdaptiveK | None" = None) -> SpeculativeResult:
    """`policy`: a cost model to keep learning in (one from an earlier generation); a fresh one if None."""
    if not prompt:
        raise ValueError("the prompt must contain at least one token")
    params = cfg.params
    tree = cfg.tree_width > 1 and params.greedy  # sampling drafts chains only
    generator = torch.Generator(device=head.embed_tokens.weight.device).manual_seed(seed)
    adaptive = cfg.k is None
    if policy is None:  # it measures in every mode, and decides k if adaptive
        policy = AdaptiveK(cfg.k_max, latency=getattr(run, "latency", None))
    # pipelining needs a target that runs steps in the background; auto mode asks the cost model each round
    auto_pipeline = cfg.pipeline is None and getattr(run, "submit", None) is not None
    result = SpeculativeResult(prompt_tokens=len(prompt), policy=policy)
    t_start = time.perf_counter()
    if len(prompt) > 1:  # the last prompt token travels with the first round
        _submit(run, head, prompt[:-1], StepLayout(0, len(prompt) - 1), None).result()
    seq, compact = list(prompt), None
    ahead: _Round | None = None  # a pipelined round already on the wire
    after_miss, prev_delay = False, 0.0  # the last round threw a pipelined one away; its drafting delayed us

    def draft_chain(context: list[int], start: int, room: int) -> _Round | None:
        steps, d0 = drafter.tokens, drafter.seconds
        if room <= 0:
            drafts, q = [], torch.empty(0)
            drafter.confidences, drafter.top = [], []
        elif adaptive:
            explore = policy.explore()
            drafts, q = drafter.propose(context, min(cfg.k_max, room), params, generator,
                                        lambda conf: policy.draft_decision(conf, min(cfg.k_max, room), explore))
        else:
            drafts, q = drafter.propose(context, min(cfg.k, room), params, generator)
        ids = context[-1:] + drafts
        return _Round(None, ids, StepLayout(start, len(ids)), None, drafts, q, list(drafter.confidences),
                      list(drafter.top), start, 0.0, drafter.seconds - d0, drafter.tokens - steps,
                      draft_first=drafter.first_seconds if drafts else None)

    def send(r: _Round) -> _Round:
        r.sent_at = time.perf_counter()
        r.future = _submit(run, head, r.ids, r.layout, r.compact)
        return r.stamp()

    while len(result.tokens) < max_new_tokens:
        left = max_new_tokens - len(result.tokens) - 1
        start = len(seq) - 1
        t0 = time.perf_counter()
        hit = ahead is not None and ahead.start == start and ahead.ids[0] == seq[-1]
        if hit:
            cur = ahead  # sent while the previous round was on the wire
            result.pipelined_hits += 1
        else:
            shape = None
            if tree and left > 0:
                if adaptive:
                    w, d, tree_rate = policy.tree_plan(cfg.tree_width, min(cfg.k_max, left))
                    chain_rate = policy.rate(policy.choose(room=left))
                    shape = (w, d) if tree_rate > chain_rate else None
                else:
                    shape = (cfg.tree_width, min(cfg.k, left))
            if shape is not None:
                steps, d0 = drafter.tokens, drafter.seconds
                drafts, parents = drafter.propose_tree(seq, shape[1], shape[0])
                ids = seq[-1:] + drafts
                node_parents = [-1] + [p + 1 for p in parents]
                cur = _Round(None, ids, StepLayout(start, len(ids), tuple(node_parents)), compact, drafts, None, [], [],
                             start, 0.0, drafter.seconds - d0, drafter.tokens - steps, node_parents, shape[1])
                result.tree_rounds += 1
            else:
                cur = draft_chain(seq, start, left)
                cur.compact = compact
            send(cur)
        compact, ahead = None, None
        drafts = cur.drafts

        # pipelining: send the next round now, assuming every draft of this one is accepted. It re-sends the
        # last draft and verifies what follows, so it is valid whenever this round accepts all its drafts
        # (whatever its extra token); otherwise it is thrown away and the next step overwrites its cache.
        ahead_draft_s, t_ahead_end = 0.0, None
        room_next = left - len(drafts)
        if cur.parents is None and drafts and room_next > 0 and cfg.pipeline is not False:
            p_all = math.prod(policy.alpha(c) for c in cur.confidences)
            k_plan = min(cfg.k, room_next) if not adaptive else policy.choose(room=room_next)
            if cfg.pipeline or (auto_pipeline and policy.pipeline_pays(p_all, k_plan)):
                ahead = send(draft_chain(seq + drafts, start + len(drafts), room_next))
                ahead_draft_s, t_ahead_end = ahead.draft_seconds, time.perf_counter()
        for attempt in range(4):
            try:
                hidden = cur.future.result()
                break
            except Exception as e:  # noqa: BLE001 - a round abandoned by a failover behind an older one: send it again
                if type(e).__name__ != "Abandoned" or attempt == 3:
                    raise
                if ahead is not None:  # sent after this one: abandoned too, or about to be overwritten
                    result.wasted_rounds += 1
                    ahead = None
                send(cur)
        t_arrived = cur.arrived[-1] if cur.arrived else time.perf_counter()
        logits = head.logits(hidden)
        if cur.parents is not None:
            path, extra = verify_greedy_tree(cur.ids, cur.parents, logits.argmax(-1).tolist())
            new, accepted, compact = [cur.ids[i] for i in path[1:]] + [extra], len(path) - 1, (start, path)
        else:
            soft = torch.softmax(logits.float(), -1) if cfg.relaxed is not None and params.greedy else None
            accepted, extra = verify(drafts, cur.q, token_probs(logits, params), generator, cfg.relaxed, soft)
            new = drafts[:accepted] + [extra]
        if ahead is not None and accepted == len(drafts):
            new = drafts  # the round in flight verifies the next position itself
        elif ahead is not None:
            ahead = None  # a rejection: drop the speculative round (the next step overwrites its cache)
            result.wasted_rounds += 1
        for i, token in enumerate(new):
            if token in eos_ids:
                new, result.stopped_by = new[:i + 1], "eos"
                if ahead is not None:
                    result.wasted_rounds += 1
                ahead = None
                break
        new = new[:max_new_tokens - len(result.tokens)]

        # what the round teaches the cost model
        t_done = time.perf_counter()
        depth = cur.depth if cur.parents is not None else len(drafts)
        delay = max(0.0, t_ahead_end - t_arrived) if t_ahead_end is not None else 0.0  # result waited for drafting
        own = (t_done - t0) - ahead_draft_s + delay  # this round's share of the wall clock
        predicted = policy.round_time(depth, len(cur.ids)) if cur.parents is None else None
        clean = not hit and not after_miss
        seconds = (t_arrived - cur.sent_at) + (t_done - max(t_arrived, t_ahead_end or 0.0)) if clean else None
        rank = None
        if cur.parents is None and accepted < len(drafts) and accepted < len(cur.top) and extra in cur.top[accepted]:
            rank = cur.top[accepted].index(extra)
        policy.observe(depth, accepted, len(cur.ids), seconds, cur.draft_seconds,
                       cur.confidences if cur.parents is None else None, rank, cur.draft_first)
        if hit and predicted is not None:
            policy.observe_pipeline(saved=predicted - own - prev_delay)
        elif after_miss and predicted is not None:
            policy.observe_pipeline(lost=own - predicted + prev_delay)
        after_miss = t_ahead_end is not None and ahead is None and result.stopped_by != "eos"
        prev_delay = delay

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
    # the cost model carries over between generations with the same model, draft and settings (a chat's turns)
    policies = getattr(model, "spec_policies", None)
    if policies is None:
        policies = {}
        try:
            model.spec_policies = policies
        except (AttributeError, TypeError):  # a frozen model object: no memory between generations
            pass
    key = (id(draft), cfg.k_max, cfg.tree_width, cfg.params.greedy, cfg.relaxed)
    policy = policies.get(key)
    if policy is None or (policy.latency is None and getattr(session, "latency", None) is not None):
        policy = policies[key] = AdaptiveK(cfg.k_max, latency=getattr(session, "latency", None))
    try:
        return speculative_generate(model.head, session, Drafter(draft, length), prompt, max_new_tokens, cfg, seed,
                                    eos, on_tokens, policy)
    finally:
        session.close()
