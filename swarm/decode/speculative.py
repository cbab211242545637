"""Speculative decoding: a draft model proposes tokens, one trip through the target verifies them all.

One round, top to bottom (`speculative_decode`; the round's own pieces in `rounds`):
  1. plan: the n-gram index (`ngram`: the prompt and every committed token, indexed as they come)
     proposes a continuation for free; the round policy (`round_policy`, `sources`) decides who drafts,
     the draft model, the proposal alone, both, or neither (a plain step, when no draft pays), and the
     model's shape: a chain of up to k drafts (how many is decided token by token while drafting) or a
     small greedy tree;
  2. draft: the `Drafter` (`drafter`) catches its cache up with the committed sequence and drafts (its
     head over the first `draft_vocab` ids and the context's, `DraftVocab`); the proposal is
     fused in (`rounds.fuse_proposal`): where it agrees with the model's first drafts the nodes are
     shared, the rest is a sibling branch (one greedy tree) or continues the model's chain;
  3. send: the target runs [last committed token] + drafts in ONE step that starts at that token's
     position (the start rolls back whatever the previous round rejected: no extra trip, ever; a
     tree round's accepted path is compacted by the next step, `StepLayout.compact`);
  4. send ahead (pipelining, when the policy says it pays or it is forced): while this round is on the
     wire the next one is drafted and sent assuming this one is fully accepted, and the one after it
     assuming both are, up to `pipeline_depth` rounds in flight (the policy judges each further round
     by the chance that every round before it is fully accepted); on the first rejection every round
     sent ahead is thrown away (`wasted_rounds`; the next step overwrites their cache entries); and
     while chain rounds are in flight the draft takes their drafts into its cache (`Drafter.prefeed`,
     `SpecConfig.prefeed`), so that its next catch-up is one token wherever they are accepted (n-gram
     rounds' drafts otherwise wait, several rows at once, for the next round the model drafts);
  5. verify: `sampling.verify` accepts drafts by rejection sampling (greedy is the one-hot case:
     accept while the draft equals the target's argmax; an n-gram draft has a one-hot q) and adds one
     token of the target's own, so every round commits at least one token and the output
     distribution is the target's alone; a tree's longest path of drafts equal to the target's
     argmax is accepted (`verify_greedy_tree`). Verification at the last peer (`RunBlocks.verdicts`):
     the round's step comes back as a verdict instead of hidden states, the target's argmax after every
     node (greedy: judged here exactly as above) or, sampling, the peer's own rejection sampling of the
     round (`Round.check`: the drafts, drawn from the draft's top K, with those K (id, prob) pairs, and a
     seed from this generation's generator: exact for what was sampled, and reproducible);
  6. commit and observe: the new tokens join the sequence (and the n-gram index); the result counts
     the accepted tokens of each source; the policy learns from the round's timing and verdicts.
Sampling (temperature > 0) drafts trees too (`--tree W`): the model's first tokens drawn without
replacement, each with the conditional law it was drawn from, each continued by draws from the
draft, n-gram nodes as deterministic siblings; `verify_tree` keeps the target's law exactly (recursive
rejection sampling over siblings). The adaptive policy learns trees' worth from the draft's top lists when
greedy and, under sampling, from sampled tree rounds it tries now and then (`rescue`). `relaxed` acceptance
(opt-in, LOSSY) also accepts a draft whose target probability is close to the best one, judged on
the target's softmax (also when decoding greedily).

Near the end of the target's session (`max_length`: generate caps it at the model's context) rounds
shrink so that no step reaches past it: chains never hold more drafts than tokens are left to
generate, trees give way to chains once the widest tree might not fit, and an n-gram branch is
grafted only where the tree still fits. The draft drafts only within its own context and session;
past them rounds carry n-gram drafts or none (plain steps).

The target is any `RunBlocks` (local blocks or the chain of peers). Knows `ModelHead`, `RunBlocks`,
sampling, the n-gram index, the rounds and the round policy; nothing of peers, routes, failover,
sockets or tokenizers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from peer.model import ModelHead, StepLayout
from swarm.decode.anticipate import Anticipator
from swarm.decode.ngram import NgramIndex, NgramMemory
from swarm.decode.round_policy import CostModel, RoundTiming, make_policy
from swarm.decode.rounds import Round, draft_round, judge
from swarm.decode.drafter import Drafter
from swarm.decode.sampling import SamplingParams
from swarm.decode.sources import NgramCalibration
from swarm.decode.target import GenerationResult, RunBlocks, embed_step


@dataclass(frozen=True)
class SpecConfig:
    k: int | None = None  # None: adaptive
    k_max: int = 8
    tree_width: int = 1  # > 1: draft a tree with this many candidates for the first token
    pipeline: bool | None = None  # None: the cost model decides per round (pays when the trip dwarfs compute)
    relaxed: float | None = None  # LOSSY: accept near-best drafts (0 < tau < 1)
    params: SamplingParams = SamplingParams()
    ngram: bool | None = None  # draft from the text itself too (n-gram index); None: with adaptive k, not fixed k
    ngram_max: int = 8  # the longest n-gram the index matches
    ngram_memory: bool = True  # draft from earlier generations' n-grams too (the caller's NgramMemory)
    ngram_drafts: int = 16  # the most n-gram drafts on one path of a round (free to draft: the policy cuts them)
    pipeline_depth: int = 3  # rounds in flight at most when pipelining (the one awaited and those sent ahead of it)
    draft_vocab: int | None = 8192  # the draft drafts from the first N token ids and the context's (DraftVocab)
    ngram_branch: bool = False  # greedy: an n-gram-only chain may carry the index's runner-up as a sibling branch
    # (off: measured no gain on SmolLM2's pair over continental links; wan_bench's `branch` mode turns it on)
    prefeed: bool = True  # while chain rounds are in flight, the draft takes their drafts in (step 4)
    anticipate: bool = False  # greedy: while a chain round flies, draft the next one after its likeliest verdicts
    # (off: measured no gain on SmolLM2's pair over continental links; wan_bench's `ahead` mode turns it on)
    draft_top_k: int | None = None  # sampling: drafts come from the draft's top K, renormalised (verification at the
    # last peer sends those K (id, prob) pairs per draft); None: from the draft's whole distribution

    def __post_init__(self):
        if self.k is not None and self.k < 1:
            raise ValueError(f"k must be at least 1 (or None: adaptive), got {self.k}")
        if min(self.k_max, self.tree_width, self.ngram_max, self.ngram_drafts) < 1:
            raise ValueError(f"k_max, tree_width, ngram_max and ngram_drafts must be at least 1, got {self.k_max}, "
                             f"{self.tree_width}, {self.ngram_max} and {self.ngram_drafts}")
        if self.pipeline_depth < 2:
            raise ValueError(f"pipeline_depth counts the round awaited too: at least 2, got {self.pipeline_depth}")
        if self.draft_top_k is not None and not 1 <= self.draft_top_k <= 64:
            raise ValueError(f"draft_top_k must lie in [1, 64] (the pairs one draft sends), got {self.draft_top_k}")
        if self.relaxed is not None and not 0 < self.relaxed < 1:
            raise ValueError(f"relaxed must be in (0, 1), got {self.relaxed}")

    @property
    def ngram_on(self) -> bool:
        return self.ngram if self.ngram is not None else self.k is None

    @property
    def draft_max(self) -> int:
        """The most drafts of the draft model on one path of a round."""
        return max(self.k or 0, self.k_max)

    @property
    def slack(self) -> int:
        """The most draft nodes one round may send (a tree of the widest shape, and an n-gram branch)."""
        return self.draft_max * max(1, self.tree_width) + (self.ngram_drafts if self.ngram_on else 0)

    @property
    def trees(self) -> bool:
        """Trees are allowed: width > 1 (greedy: the draft's top candidates; sampling: drawn without replacement)."""
        return self.tree_width > 1

    def policy(self) -> CostModel:
        """A fresh round policy for this configuration (adaptive, or this fixed shape)."""
        return make_policy(self.k, self.k_max, self.tree_width, self.pipeline)

    @property
    def mode(self) -> str:
        kind = "tree" if self.tree_width > 1 else "chain"
        pipe = {True: "-pipelined", False: "", None: "-autopipeline"}[self.pipeline]
        return f"speculative-{kind}{pipe}{'-ngram' if self.ngram_on else ''}{'-relaxed(lossy)' if self.relaxed else ''}"


SOURCES = ("model", "ngram", "both")
CHOICES = ("model", "fused", "ngram", "branched", "plain")
# where a round's wall time goes, in order: planning and drafting it until its step left (nothing when it
# was sent ahead), sending rounds ahead and prefeeding the draft while it flies, waiting for its result
# (idle), verifying and committing it
PHASES = ("drafting", "overlapped", "waiting", "verifying")


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
    accepted_by: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SOURCES, 0))  # accepted drafts by source
    drafted_by: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SOURCES[:2], 0))  # model: on its path
    rounds_by: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CHOICES, 0))  # rounds by who drafted
    recalled: int = 0  # accepted n-gram drafts recalled from earlier generations (NgramMemory)
    anticipated: int = 0  # rounds whose model drafts were drafted ahead, during the flight of the round before
    phases: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))  # seconds, summed over rounds
    drafting_by: dict[str, float] = field(default_factory=lambda: dict.fromkeys(CHOICES, 0.0))  # "drafting" by choice
    policy: CostModel | None = field(default=None, repr=False)  # the round policy as the run left it

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
        """The draft model's: of its drafts (on its longest path), the share accepted."""
        model = self.accepted_by["model"] + self.accepted_by["both"]
        return model / self.drafted_by["model"] if self.drafted_by["model"] else 0.0

    @property
    def ngram_acceptance_rate(self) -> float:
        """Of the n-gram drafts the model did not draft too, the share accepted."""
        return self.accepted_by["ngram"] / self.drafted_by["ngram"] if self.drafted_by["ngram"] else 0.0

    def count(self, rnd: Round) -> None:
        """A verified round: its drafts and accepted drafts by source, and who drafted it."""
        for node in rnd.path[1:]:
            self.accepted_by[rnd.sources[node - 1]] += 1
            cell = rnd.cells[node - 1] if rnd.cells else None
            self.recalled += cell is not None and NgramCalibration.recalled(cell)
        self.drafted_by["model"] += rnd.model_depth
        self.drafted_by["ngram"] += rnd.sources.count("ngram")
        self.rounds_by[rnd.choice] += 1
        self.anticipated += rnd.anticipated > 0

    def stats(self) -> dict:
        """Rounds and acceptance (the draft model's, the n-gram index's); drafted and accepted drafts by
        source ("both": drafted by the model and proposed by the n-gram index too, counted as the
        model's drafts), rounds by who drafted them, and accepted drafts recalled from earlier generations."""
        return {"rounds": self.rounds, "tokens_per_round": round(self.tokens_per_round, 3),
                "round_ms": {k: round(1000 * v / max(1, self.rounds), 3) for k, v in self.phases.items()},
                "drafting_ms_by_source": {k: round(1000 * v, 1) for k, v in self.drafting_by.items()},
                "wasted_rounds": self.wasted_rounds, "anticipated_rounds": self.anticipated, "acceptance_rate": round(self.acceptance_rate, 4),
                "ngram_acceptance_rate": round(self.ngram_acceptance_rate, 4), "recalled": self.recalled,
                "accepted_by_source": dict(self.accepted_by), "drafted_by_source": dict(self.drafted_by),
                "rounds_by_source": dict(self.rounds_by)}


def send(run: RunBlocks, head: ModelHead, rnd: Round, spec: SpecConfig, generator: torch.Generator,
         compact=None) -> Round:
    """Submit a round (to a session that verifies it where the blocks end, with its check when sampling: a seed drawn
    from the generation's generator, so a seeded generation is reproducible)."""
    check = None
    if run.verdicts and not spec.params.greedy:
        seed = int(torch.randint(0, 2**62, (), generator=generator, device=generator.device))
        check = rnd.check(seed)
    rnd.sent_at = time.perf_counter()
    rnd.future = run.submit(embed_step(head, rnd.ids), rnd.layout(compact), check)
    rnd.future.add_done_callback(lambda _: rnd.arrived_at.append(time.perf_counter()))
    rnd.left_at = time.perf_counter()
    return rnd


def send_ahead(run: RunBlocks, head: ModelHead, drafter: Drafter, ngram: NgramIndex | None, policy: CostModel,
               spec: SpecConfig, generator: torch.Generator, seq: list[int], left: int, cur: Round,
               queue: list[Round]) -> list[Round]:
    """While `cur` is on the wire, send more rounds (chains), each assuming every round before it is fully
    accepted, while the policy says the next one pays and fewer than `spec.pipeline_depth` are in flight.
    Appends them to `queue` (rounds already sent ahead of `cur`); returns those sent now."""
    sent: list[Round] = []
    while 1 + len(queue) < spec.pipeline_depth:
        tail = queue[-1] if queue else cur
        if tail.parents is not None or not tail.drafts:
            break
        pending = [cur, *queue]
        ahead_seq = seq + [t for r in pending for t in r.drafts]
        room = min(left - (len(ahead_seq) - len(seq)), drafter.room(len(ahead_seq)))
        if not policy.send_ahead(tail, room, run.overlaps, before=pending[:-1]):
            break
        rnd = send(run, head, draft_round(drafter, ngram, policy, ahead_seq, room, spec, generator, 0), spec, generator)
        queue.append(rnd)
        sent.append(rnd)
    return sent


def speculative_decode(head: ModelHead, run: RunBlocks, drafter: Drafter, prompt: list[int], max_new_tokens: int,
                       spec: SpecConfig = SpecConfig(k=4), *, seed: int = 0, eos_ids: tuple = (),
                       on_tokens: Callable[[list[int]], None] | None = None, policy: CostModel | None = None,
                       max_length: int | None = None, memory: NgramMemory | None = None) -> SpeculativeResult:
    """Decode speculatively: plan -> draft -> send (-> send ahead) -> verify -> commit -> observe.
    `policy`: a round policy to keep learning in (one from an earlier generation); else a fresh one.
    `memory`: earlier generations' n-grams, drafted from beside this text's; this output (after the
    prompt's last n-grams) joins it at the end.
    `max_length`: the length of `run`'s session, which no step may pass (None: it has room for
    max_new_tokens plus two rounds of `spec.slack`)."""
    if not prompt:
        raise ValueError("the prompt must contain at least one token")
    policy = policy if policy is not None else spec.policy()
    generator = torch.Generator(device=head.embed_tokens.weight.device).manual_seed(seed)
    result = SpeculativeResult(prompt_tokens=len(prompt), policy=policy)
    t_start = time.perf_counter()
    if len(prompt) > 1:  # the last prompt token travels with the first round
        run.submit(embed_step(head, prompt[:-1]), StepLayout(0, len(prompt) - 1)).result()
    seq, compact, queue = list(prompt), None, []  # queue: rounds sent before the verdicts on the ones before them
    ngram = NgramIndex(seq, spec.ngram_max, memory=memory) if spec.ngram_on else None
    policy.begin(sampled=not spec.params.greedy)
    ahead = Anticipator(drafter, policy) if spec.anticipate and spec.params.greedy and run.overlaps else None
    try:
        while len(result.tokens) < max_new_tokens and result.stopped_by != "eos":
            left, began = max_new_tokens - len(result.tokens) - 1, time.perf_counter()
            hit = bool(queue) and queue[0].start == len(seq) - 1 and queue[0].ids[0] == seq[-1]
            tree_nodes = None if max_length is None else max_length - len(seq)  # no step may pass the session
            if ngram is not None:
                ngram.sync(seq)
            cur = queue.pop(0) if hit else send(run, head, draft_round(drafter, ngram, policy, seq, left, spec, generator,
                                                                       tree_nodes, run.overlaps), spec, generator, compact)
            t_left = time.perf_counter()
            sent_ahead = send_ahead(run, head, drafter, ngram, policy, spec, generator, seq, left, cur, queue)
            if run.overlaps and spec.prefeed and all(r.parents is None for r in [cur] + queue):
                drafter.prefeed(seq + [t for r in [cur] + queue for t in r.drafts])  # during the flight
            if ahead is not None and not queue and cur.parents is None and left > len(cur.drafts):
                c0, c1 = policy.verify_cost()  # the verdict is due then: drafting ahead stops before
                ahead.run(cur, seq, cur.sent_at + c0 + c1 * len(cur.ids), cur.future.done)
            t_wait = time.perf_counter()
            out = cur.future.result()  # final hidden states, or a verdict from where the blocks end
            t_out = time.perf_counter()
            accepted, new, extra, compact = judge(head, cur, out, spec, generator)
            if queue and accepted == len(cur.drafts):
                new = cur.drafts  # the round in flight verifies the next position itself
            for i, token in enumerate(new):
                if token in eos_ids:
                    new, result.stopped_by = new[:i + 1], "eos"
                    break
            if queue and (accepted < len(cur.drafts) or result.stopped_by == "eos"):
                queue, result.wasted_rounds = [], result.wasted_rounds + len(queue)  # the next step overwrites their cache
            new = new[:max_new_tokens - len(result.tokens)]
            timing = RoundTiming(began, cur.sent_at, cur.arrived_at[-1] if cur.arrived_at else time.perf_counter(),
                                 time.perf_counter(), hit, sum(r.draft_seconds for r in sent_ahead),
                                 sent_ahead[-1].left_at if sent_ahead else None)
            policy.observe_round(cur, accepted, extra, timing, bool(queue), result.stopped_by == "eos")
            for phase, seconds in zip(PHASES, (t_left - began, t_wait - t_left, t_out - t_wait, timing.done - t_out)):
                result.phases[phase] += seconds
            result.drafting_by[cur.choice] += t_left - began
            result.pipelined_hits += hit
            result.tree_rounds += cur.parents is not None and not hit
            result.count(cur)
            if ahead is not None:
                ahead.observe(cur)
            result.rounds, result.drafted, result.accepted = result.rounds + 1, result.drafted + cur.depth, result.accepted + accepted
            result.accepted_per_round.append(accepted)
            result.ks.append(cur.depth)
            seq += new
            result.tokens += new
            if on_tokens:
                on_tokens(new)
    finally:  # what was committed, also when the caller stopped the generation (a stop string, a cancel)
        if memory is not None and ngram is not None:
            memory.remember(seq[max(0, len(prompt) - memory.n_max):])
    result.seconds = time.perf_counter() - t_start
    return result
