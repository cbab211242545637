"""The round policy: the shape of every speculative round, and the cost model that decides it.

A policy answers the loop's questions (`swarm.decode.speculative`): how should the next round
look (`plan`: who drafts, the model, the n-gram index, both or neither (`swarm.decode.sources`), and
the model's shape: a chain of up to k drafts, or a tree), keep drafting after this token
(`keep_drafting`), how much of the n-gram proposal joins the model's drafts (`graft`), send the next
round before this one's verdict (`send_ahead`), and what did this round teach (`observe_round`: the
timing arithmetic lives here, not in the loop). `CostModel` decides adaptively from what it
measures; `FixedShape` has the same interface with a fixed k (or tree), the model always drafting
(with the whole n-gram proposal grafted on, when n-gram drafting is on), and still measures, for
the pipelining decision. A policy outlives a generation: a chat keeps its own.

Knows seconds, acceptance counts, the draft's confidences and n-gram scores; nothing of tensors,
models, peers or the network.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import median
from typing import Protocol

from swarm.decode.rescue import SAMPLED_PRIOR, Rescue, best_tree, sampled_tree_rescue
from swarm.decode.sources import NgramCalibration, choose_source, graft_length, model_verdict, observe_ngram


@dataclass(frozen=True, slots=True)
class RoundPlan:
    """A round's shape: k model drafts at most (a tree: depth k with `width` first candidates), or
    `ngram` drafts of the n-gram proposal alone, or none (plain)."""

    k: int
    width: int = 1
    explore: int | None = None  # adaptive: the draft length forced to measure other step sizes
    source: str = "model"  # "model" (the proposal may be grafted on), "ngram" or "plain"
    ngram: int = 0  # n-gram drafts of an n-gram-only round

    @property
    def tree(self) -> bool:
        return self.width > 1


class RoundRecord(Protocol):
    """What the policy reads of a finished round (the loop's `speculative.Round` has these)."""

    ids: list[int]  # the tokens sent: the last committed one, then the drafts
    drafts: list[int]
    parents: list[int] | None  # a tree's parent indices; None for a chain
    depth: int
    model_depth: int  # the model's drafts on its longest path (its chain: the first nodes)
    sources: list[str]  # per draft: "model", "ngram" or "both"
    cells: list[int | None]  # per draft from the n-gram proposal: its calibration cell
    path: list[int]  # the accepted nodes (0: the last committed token)
    ngram_seconds: float
    confidences: list[float]  # the model's chain drafts'
    top: list[list[int]]
    draft_seconds: float
    draft_first: float | None
    anticipated: int  # drafts drafted ahead (during the previous flight): not a sample of drafting's cost


@dataclass(frozen=True, slots=True)
class RoundTiming:
    """When a round's moments happened (time.perf_counter seconds), as the loop saw them."""

    began: float  # the loop turned to this round
    sent: float  # its step left (a hit: when it was sent ahead, during the round before)
    arrived: float  # its result was in
    done: float  # verified and committed
    hit: bool  # sent ahead by the previous round, and used
    ahead_drafted: float = 0.0  # seconds spent drafting the round sent ahead during this one
    ahead_sent: float | None = None  # when that round had left (None: none was sent)


class CostModel:
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

    Trees (`tree_width` > 1): a tree of width w and depth d commits 1 + a_w * (1 - a^d) / (1 - a),
    where a_w = a + (1 - a) * r_w and r_w is how often a candidate among the draft's first w rescued a
    round whose first draft was rejected (`rescue.Rescue`: greedy, from the draft's top list at every
    chain's rejection; sampling, from sampled tree rounds, which are tried now and then to measure it);
    it costs c_d * (1 + w (d - 1)) + c_0 + c_1 * (w d + 1). Chosen when its rate beats the best chain's.

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

    def __init__(self, k_max: int = 8, k_start: int = 4, memory: float = 0.95, latency: float | None = None,
                 pipeline: bool | None = None):
        self.k_max, self.k_start, self.memory = k_max, k_start, memory
        self.pipeline = pipeline  # True/False: forced; None: decided per round (`send_ahead`)
        self._after_miss, self._prev_delay = False, 0.0  # the last round threw a pipelined one away; its delay
        self.accepted, self.rejections = 2.0, 1.0  # a weak prior: a = 2/3
        self.hits = [2.0 * (b + 0.5) / self.BINS for b in range(self.BINS)]  # calibration: accepted per bin
        self.tries = [2.0] * self.BINS
        self.rescue = Rescue(memory)  # greedy: how often the target's token was in the draft's top w after a miss
        self.sampled_rescue = Rescue(memory, SAMPLED_PRIOR)  # sampling: how often a sampled tree's later candidates rescued a round
        self.sampled, self.since_tree = False, 0  # this generation samples; rounds since its last tree
        self.points: list[tuple[int, float]] = []  # (tokens sent, seconds) of recent unpipelined rounds
        self._fit: tuple[list, tuple[float, float]] = ([], (0.0, 0.0))  # verify_cost's last line, and its points
        self.draft_steps: list[float] = []  # recent seconds per draft step after a round's first
        self.draft_firsts: list[float] = []  # recent seconds of a round's first draft step (catches up)
        self.latency = latency  # seconds of wire per round, when the target knows
        self.saved: tuple[float, float] | None = None  # (EMA seconds a pipelined hit saved, weight)
        self.lost: tuple[float, float] | None = None  # (EMA seconds a thrown-away round cost, weight)
        self.explored = 0  # rounds pipelined only to measure what pipelining saves and costs
        self.ngram = NgramCalibration()  # how often n-gram drafts are accepted, by score
        self.ngram_seconds, self.idle, self.recalls = 0.0, 0, 0  # an n-gram proposal's seconds; rounds the
        # model sat out; rounds it was made to draft to stay measured (`sources.choose_source`)

    # --- what is measured --------------------------------------------------------------------------
    @property
    def acceptance(self) -> float:
        return self.accepted / (self.accepted + self.rejections)

    def alpha(self, confidence: float) -> float:
        """Calibrated chance that a draft the draft model gave probability `confidence` is accepted."""
        b = min(int(confidence * self.BINS), self.BINS - 1)
        return self.hits[b] / self.tries[b]

    def observe(self, drafted: int, accepted: int, sent: int, seconds: float | None, draft_seconds: float | None,
                confidences: list[float] | None = None, rescue_rank: int | None = None,
                first_seconds: float | None = None) -> None:
        """One verified round: `seconds` its trip and verify time without drafting (None: pipelined, not a
        clean sample), `draft_seconds` the model's drafting (None: drafted ahead, not a sample of its cost),
        `confidences` the draft's confidence in each draft, `rescue_rank` the rank of the
        target's token in the draft's list at the first rejection (None: not in its top list)."""
        m = self.memory
        self.accepted = m * self.accepted + accepted
        self.rejections = m * self.rejections + (accepted < drafted)
        for i, c in enumerate((confidences or [])[:accepted + 1]):
            b = min(int(c * self.BINS), self.BINS - 1)
            self.hits[b] = m * self.hits[b] + (i < accepted) + (1 - m) * 2.0 * (b + 0.5) / self.BINS
            self.tries[b] = m * self.tries[b] + 1 + (1 - m) * 2.0
        if accepted < drafted and confidences is not None and not self.sampled:  # (sampling has no top list)
            self.rescue.observe(rescue_rank, 8)
        if seconds is not None:
            self.points = (self.points + [(sent, seconds)])[-24:]
        if drafted and draft_seconds is not None:  # medians of recent samples: one slow round mustn't set the policy
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
        if self._fit[0] is self.points:  # the same points (a new list after every observation): the same line
            return self._fit[1]
        by_size: dict[int, list[float]] = {}
        for n, t in self.points:
            by_size.setdefault(n, []).append(t)
        xs, ys, ws = zip(*((n, median(ts), len(ts)) for n, ts in by_size.items()))
        total = sum(ws)
        mean_x = sum(w * x for x, w in zip(xs, ws)) / total
        mean_y = sum(w * y for y, w in zip(ys, ws)) / total
        var = sum(w * (x - mean_x) ** 2 for x, w in zip(xs, ws))
        if var:
            slope = max(0.0, sum(w * (x - mean_x) * (y - mean_y) for x, y, w in zip(xs, ys, ws)) / var)
        else:  # one size seen so far (exploration will add others): guess 10 % of it per token
            slope = 0.1 * mean_y / mean_x
        slope = min(slope, mean_y / mean_x)  # noise must not make the trip negative
        self._fit = (self.points, (max(1e-6, mean_y - slope * mean_x), slope))
        return self._fit[1]

    @property
    def draft_cost(self) -> float:
        """Seconds per draft token after the first."""
        if len(self.draft_steps) >= 3 or (self.draft_steps and not self.draft_firsts):
            return median(self.draft_steps)
        return median(self.draft_firsts) if self.draft_firsts else 0.1 * sum(self.verify_cost())

    def draft_time(self, k: int) -> float:
        if k <= 0:
            return 0.0
        first = median(self.draft_firsts) if self.draft_firsts else self.draft_cost
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
        """The best (width, depth) for a tree, width >= 2, and its expected tokens per second (its rescues as
        measured for this generation's decoding, greedy or sampled)."""
        c0, c1 = self.verify_cost()
        return best_tree(self.sampled_rescue if self.sampled else self.rescue, min(self.acceptance, 0.999), width,
                         max(1, min(self.k_max, room)), self.draft_time(1), self.draft_cost, c0, c1)

    def pipeline_pays(self, p_all: float, k_next: int, probe: bool = False) -> bool:
        """Send the next round now, assuming this one is fully accepted (probability p_all)? (`probe`: only asked,
        nothing is sent: an exploring answer spends none of the exploration.)"""
        c0, c1 = self.verify_cost()
        wire = min(self.latency, c0) if self.latency is not None else c0 / 2  # unknown: a guess, until measured
        unmeasured = not self.saved or self.saved[1] < 2 or not self.lost or self.lost[1] < 2
        if unmeasured and self.explored < 12 and p_all >= 0.05:
            self.explored += not probe  # explore: measure both outcomes (the policy outlives a generation)
            return True
        saved = self.saved[0] if self.saved else wire + self.draft_time(k_next)
        lost = self.lost[0] if self.lost else max(c0 - wire, 0.0) + c1 * (k_next + 1)
        # a hit also forgoes this round's extra token (the next round re-verifies from the last draft)
        a = min(self.acceptance, 0.999)
        per_token = self.round_time(k_next) * (1 - a) / (1 - a ** (k_next + 1))
        return p_all * (saved - per_token) > (1 - p_all) * lost

    # --- the round policy --------------------------------------------------------------------------
    def begin(self, sampled: bool = False) -> None:
        """A new generation starts (`sampled`: it samples, rather than decoding greedily): forget the previous
        generation's last round."""
        self._after_miss, self._prev_delay, self.sampled = False, 0.0, sampled

    def plan(self, room: int, tree_width: int = 1, cells: list[int] = (), ngram_room: int = 0,
             fuse: bool = False) -> RoundPlan:
        """The next round: who drafts (`sources.choose_source`; `cells`: the n-gram proposal's, of which
        `ngram_room` may be used; `fuse`: sibling branches allowed) and the model's shape: a chain of
        at most k drafts (the rest decided while drafting), or a tree when its expected rate beats the
        best chain's (`tree_width` > 1 allows trees)."""
        shape = RoundPlan(min(self.k_max, room), explore=self.explore()) if room > 0 else RoundPlan(0)
        if room > 0 and tree_width > 1:
            w, d, tree_rate = self.tree_plan(tree_width, min(self.k_max, room))
            if tree_rate > self.rate(self.choose(room=room)):
                shape = RoundPlan(d, w)
            elif self.sampled and self.sampled_rescue.due(self.since_tree):  # sampled trees are measured by trying them
                shape = RoundPlan(min(room, 2), 2)
        return choose_source(self, shape, list(cells), ngram_room, fuse)

    def keep_drafting(self, confidences: list[float], plan: RoundPlan) -> tuple[bool, bool]:
        """After drafting tokens with these confidences: (keep the last one, draft another)."""
        return self.draft_decision(confidences, plan.k, plan.explore)

    def graft(self, confidences: list[float] | None, depth: int, nodes: int, shared: int, cells: list[int]) -> int:
        """How many n-gram tokens (calibration `cells`) to hang below the `shared` ones in the model's tree."""
        return graft_length(self, confidences, depth, nodes, shared, cells)

    def next_k(self, room: int) -> int:
        """The draft length a round sent ahead would plan (to judge whether sending it pays)."""
        return self.choose(room=room)

    def send_ahead(self, rnd: RoundRecord, room: int, overlaps: bool, before=(), probe: bool = False) -> bool:
        """Send the next round (a chain's) before `rnd`'s verdict and those of `before` (rounds in flight ahead of it)?
        Forced by `pipeline`; else only where steps run in the background and the cost model expects a gain.
        `probe`: the question is asked before `rnd` is sent (`pipeline_pays`)."""
        if self.pipeline is False or room <= 0 or not rnd.drafts:
            return False
        if self.pipeline:
            return True
        p_all = math.prod(self.alpha(c) for r in (*before, rnd) for c in r.confidences) * math.prod(
            self.ngram.alpha(c) for r in (*before, rnd) for c, s in zip(r.cells, r.sources) if s == "ngram")
        return overlaps and self.pipeline_pays(p_all, self.next_k(room), probe)

    def observe_round(self, rnd: RoundRecord, accepted: int, extra: int, t: RoundTiming, ahead_kept: bool,
                      eos: bool) -> None:
        """What a verified round teaches: acceptance, calibration, verify and draft costs, and (after a
        pipelined hit or a thrown-away round) what pipelining saved or cost. `ahead_kept`: a round
        sent ahead during this one is still in flight and will be the next."""
        chain = rnd.parents is None
        delay = max(0.0, t.ahead_sent - t.arrived) if t.ahead_sent is not None else 0.0  # result waited for drafting
        own = (t.done - t.began) - t.ahead_drafted + delay  # this round's share of the wall clock
        predicted = self.round_time(rnd.model_depth, len(rnd.ids)) if chain else None
        clean = not t.hit and not self._after_miss
        seconds = (t.arrived - t.sent) + (t.done - max(t.arrived, t.ahead_sent or 0.0)) if clean else None
        ok, rank = model_verdict(rnd, extra)
        seen = sampled_tree_rescue(rnd.parents, rnd.sources, rnd.path) if self.sampled and not chain else None
        if seen is not None:
            self.sampled_rescue.observe(*seen)
        self.since_tree = 0 if not chain else self.since_tree + 1
        drafted = None if rnd.anticipated else rnd.draft_seconds  # drafted ahead: not a sample of its cost
        self.observe(rnd.model_depth, ok, len(rnd.ids), seconds, drafted, rnd.confidences or None, rank, rnd.draft_first)
        observe_ngram(self, rnd)
        if t.hit and predicted is not None:
            self.observe_pipeline(saved=predicted - own - self._prev_delay)
        elif self._after_miss and predicted is not None:
            self.observe_pipeline(lost=own - predicted + self._prev_delay)
        self._after_miss = t.ahead_sent is not None and not ahead_kept and not eos
        self._prev_delay = delay


class FixedShape(CostModel):
    """The same interface with a fixed shape: chains of exactly k drafts, or trees of the given width
    and depth k. It still measures every round (the pipelining decision needs the costs)."""

    def __init__(self, k: int, tree_width: int = 1, pipeline: bool | None = None, latency: float | None = None):
        super().__init__(k_max=k, pipeline=pipeline, latency=latency)
        self.k, self.tree_width = k, tree_width

    def plan(self, room: int, tree_width: int = 1, cells: list[int] = (), ngram_room: int = 0,
             fuse: bool = False) -> RoundPlan:
        if room <= 0:
            return RoundPlan(0)
        return RoundPlan(min(self.k, room), tree_width if tree_width > 1 else 1)

    def keep_drafting(self, confidences: list[float], plan: RoundPlan) -> tuple[bool, bool]:
        return True, True

    def graft(self, confidences: list[float] | None, depth: int, nodes: int, shared: int, cells: list[int]) -> int:
        return len(cells)

    def next_k(self, room: int) -> int:
        return min(self.k, room)


def make_policy(k: int | None, k_max: int = 8, tree_width: int = 1, pipeline: bool | None = None,
                latency: float | None = None) -> CostModel:
    """The policy for a speculative configuration: adaptive (k None) or a fixed shape."""
    if k is None:
        return CostModel(k_max, pipeline=pipeline, latency=latency)
    return FixedShape(k, tree_width, pipeline, latency)
