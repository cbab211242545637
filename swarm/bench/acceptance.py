"""What greedy speculative decoding with fixed-length chains commits per round, from one teacher-forced pass.

Greedy chains are deterministic: with the target's greedy output `reference` known, the draft's
proposal in a round that starts after i committed tokens is its own greedy continuation of
prompt + reference[:i], and it is accepted exactly as long as it agrees with the reference. So the
agreement vector `agree[j]` (does the draft's argmax after prompt + reference[:j] equal reference[j]?,
from ONE teacher-forced pass of the draft) fixes every round: a round at position i drafts
d = min(k, n - i - 1) tokens (`speculative_decode` never drafts past the last token to generate),
accepts the run of consecutive agreements agree[i], agree[i+1], ... capped at d, and commits those
plus one token of the target's own (`simulate_chain`). Real decoding matches this up to numerical
ties (the draft's cached steps and the teacher-forced pass may round differently).

`repeated_ngrams` measures how much of an output repeats itself, so that a target stuck in a loop
(which a draft predicts easily) cannot flatter the agreement figure.

`source_mode` names the decoding modes that show who drafts (the draft model, the n-gram index, both,
under the cost model or a fixed shape) and `SourceTally` adds up what each committed: tokens per
round, accepted drafts by source, rounds by who drafted them, seconds.

Knows `LocalModel`'s head and session interface (for the teacher-forced pass), the arithmetic of
greedy chain rounds and the speculative configurations and round policies; must not know tokenizers,
prompts, flags, peers or how results are reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from peer.model import StepLayout
from swarm.decode.round_policy import CostModel
from swarm.decode.speculative import SpecConfig, SpeculativeResult
from swarm.decode.target import LocalModel


def draft_agreement(draft: LocalModel, prompt: list[int], reference: list[int]) -> list[bool]:
    """agree[j]: whether the draft's argmax after prompt + reference[:j] is reference[j], for every j,
    teacher-forced on the reference in one pass."""
    if not reference:
        return []
    seq = torch.tensor(prompt + reference[:-1], dtype=torch.long, device=draft.head.embed_tokens.weight.device)
    session = draft.session(len(seq))
    try:
        with torch.inference_mode():
            hidden = session.submit(draft.head.embed(seq), StepLayout(0, len(seq))).result()
            guesses = draft.head.logits(hidden[len(prompt) - 1:]).argmax(-1).cpu()
    finally:
        close = getattr(session, "close", None)
        if close is not None:
            close()
    return (guesses == torch.tensor(reference)).tolist()


@dataclass
class ChainRounds:
    """What greedy chains of k drafts commit over one or more generations."""

    rounds: int = 0
    tokens: int = 0
    drafted: int = 0
    accepted: int = 0
    per_round: list[int] | None = None  # drafts accepted in each round (one generation only)

    @property
    def tokens_per_round(self) -> float:
        return self.tokens / self.rounds if self.rounds else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    def add(self, other: ChainRounds) -> None:
        self.rounds, self.tokens = self.rounds + other.rounds, self.tokens + other.tokens
        self.drafted, self.accepted = self.drafted + other.drafted, self.accepted + other.accepted


def simulate_chain(agree: list[bool], k: int) -> ChainRounds:
    """The rounds greedy speculative decoding with chains of k drafts takes to commit len(agree) tokens:
    a round at position i drafts d = min(k, n - i - 1), accepts the run of consecutive agreements from i
    capped at d, and commits it plus one token of the target's."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    n, i = len(agree), 0
    out = ChainRounds(per_round=[])
    while i < n:
        d = min(k, n - i - 1)
        m = 0
        while m < d and agree[i + m]:
            m += 1
        out.rounds, out.drafted, out.accepted = out.rounds + 1, out.drafted + d, out.accepted + m
        out.per_round.append(m)
        i += m + 1
    out.tokens = n
    return out


def repeated_ngrams(prompt: list[int], generated: list[int], n: int = 4) -> tuple[int, int]:
    """(repeated, counted) over the n-grams that END at a generated token: with s = prompt + generated,
    every position t >= len(prompt) with t >= n - 1 counts its n-gram s[t-n+1 : t+1] once, and it is
    repeated when the same n-gram already ended at some earlier position u < t (u >= n - 1) of s, in the
    prompt or in the generated text before it. The rate over many prompts is sum(repeated) / sum(counted)."""
    seq = list(prompt) + list(generated)
    seen: set[tuple[int, ...]] = set()
    repeated = counted = 0
    for t in range(n - 1, len(seq)):
        gram = tuple(seq[t - n + 1:t + 1])
        if t >= len(prompt):
            counted += 1
            repeated += gram in seen
        seen.add(gram)
    return repeated, counted


class NgramOnly(CostModel):
    """The cost model with the draft model left out: each round drafts the n-gram proposal, or nothing."""

    def plan(self, room, tree_width=1, cells=(), ngram_room=0, fuse=False):
        return super().plan(0, 1, cells, ngram_room, fuse)


SOURCE_MODES = {  # name -> (configuration, the round policy's class or None: the configuration's own)
    "model": (SpecConfig(pipeline=False, ngram=False), None),  # the draft model or a plain step, per round
    "ngram": (SpecConfig(pipeline=False, ngram=True), NgramOnly),  # the n-gram proposal or a plain step
    "fused": (SpecConfig(pipeline=False, ngram=True), None),  # all of them, and both in one tree
    "fused-tree": (SpecConfig(pipeline=False, ngram=True, tree_width=2), None),  # ... and the model's own trees
    "k4": (SpecConfig(k=4, pipeline=False), None),  # the draft model's chains of 4, every round
    "k4-ngram": (SpecConfig(k=4, pipeline=False, ngram=True), None),  # ... with the whole proposal grafted on
}


def source_mode(name: str) -> tuple[SpecConfig, CostModel]:
    """A mode of `SOURCE_MODES`: its configuration and a fresh round policy."""
    spec, policy = SOURCE_MODES[name]
    return spec, policy(spec.k_max, pipeline=spec.pipeline) if policy else spec.policy()


@dataclass
class SourceTally:
    """What one decoding mode committed over several generations, and how."""

    rounds: int = 0
    tokens: int = 0
    seconds: float = 0.0
    mismatches: int = 0  # generations whose tokens differ from the reference
    accepted_by: dict[str, int] = field(default_factory=dict)
    drafted_by: dict[str, int] = field(default_factory=dict)
    rounds_by: dict[str, int] = field(default_factory=dict)

    def add(self, res: SpeculativeResult, reference: list[int]) -> None:
        self.rounds, self.tokens, self.seconds = self.rounds + res.rounds, self.tokens + len(res.tokens), \
            self.seconds + res.seconds
        self.mismatches += res.tokens != reference
        for mine, theirs in ((self.accepted_by, res.accepted_by), (self.drafted_by, res.drafted_by),
                             (self.rounds_by, res.rounds_by)):
            for key, value in theirs.items():
                mine[key] = mine.get(key, 0) + value

    @property
    def tokens_per_round(self) -> float:
        return self.tokens / self.rounds if self.rounds else 0.0
