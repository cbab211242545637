"""Speculative decoding: a draft model proposes k tokens, one target step verifies them all.

One round, top to bottom (`speculative_generate`):
  1. the `Drafter` catches its cache up with the committed sequence and drafts k tokens;
  2. the target runs [last committed token] + drafts in ONE step starting at that token's position
     (the start position rolls back whatever the previous round rejected: no extra trip, ever);
  3. `verify_greedy` accepts the longest prefix where draft == target argmax, plus the target's own
     next token, so every round commits at least one token and the output equals plain greedy.

The target is any `RunBlocks` (local blocks here; the chain of peers later). Knows nothing about the
network.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from peer.model import ModelHead, StepLayout

from .generate import GenerationResult, LocalModel, RunBlocks


class Drafter:
    """The draft model with its own cache, kept in step with the committed sequence."""

    def __init__(self, model: LocalModel, max_length: int):
        self.model = model
        self.session = model.session(max_length)
        self.fed: list[int] = []  # tokens whose keys/values sit in the draft cache, in order
        self.steps = 0
        self.seconds = 0.0

    def _step(self, tokens: list[int], start: int) -> torch.Tensor:
        head = self.model.head
        ids = torch.tensor(tokens, dtype=torch.long, device=head.embed_tokens.weight.device)
        hidden = self.session(head.embed(ids), StepLayout(start, len(tokens)))
        self.fed[start:] = tokens
        self.steps += 1
        return head.logits(hidden[-1:])[0]

    def propose(self, context: list[int], k: int) -> list[int]:
        """k greedy draft tokens continuing `context` (reusing whatever prefix the cache already has)."""
        t0 = time.perf_counter()
        keep = 0
        limit = min(len(self.fed), len(context) - 1)  # re-run at least the last token to get its logits
        while keep < limit and self.fed[keep] == context[keep]:
            keep += 1
        logits = self._step(context[keep:], keep)
        drafts: list[int] = []
        for i in range(k):
            drafts.append(int(logits.argmax()))
            if i < k - 1:
                logits = self._step(drafts[-1:], len(self.fed))
        self.seconds += time.perf_counter() - t0
        return drafts


def verify_greedy(drafts: list[int], target_logits: torch.Tensor) -> tuple[int, int]:
    """(number of drafts accepted, the target's token after them). target_logits: [len(drafts)+1, vocab]."""
    choice = target_logits.argmax(-1).tolist()
    accepted = 0
    while accepted < len(drafts) and drafts[accepted] == choice[accepted]:
        accepted += 1
    return accepted, choice[accepted]


@dataclass
class SpeculativeResult(GenerationResult):
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    accepted_per_round: list[int] = field(default_factory=list)

    @property
    def tokens_per_round(self) -> float:
        return len(self.tokens) / self.rounds if self.rounds else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


def speculative_generate(head: ModelHead, run: RunBlocks, drafter: Drafter, prompt: list[int],
                         max_new_tokens: int, k: int, eos_ids: tuple = (),
                         on_tokens: Callable[[list[int]], None] | None = None) -> SpeculativeResult:
    """Greedy speculative decoding with a fixed draft length k (k=0: plain decoding, one token per round)."""
    if not prompt:
        raise ValueError("the prompt must contain at least one token")
    result = SpeculativeResult(prompt_tokens=len(prompt))
    device = head.embed_tokens.weight.device
    t0 = time.perf_counter()
    if len(prompt) > 1:  # the last prompt token travels with the first round
        run(head.embed(torch.tensor(prompt[:-1], device=device)), StepLayout(0, len(prompt) - 1))
    seq = list(prompt)
    while len(result.tokens) < max_new_tokens:
        k_round = min(k, max_new_tokens - len(result.tokens) - 1)
        drafts = drafter.propose(seq, k_round) if k_round > 0 else []
        ids = torch.tensor(seq[-1:] + drafts, device=device)
        logits = head.logits(run(head.embed(ids), StepLayout(len(seq) - 1, len(ids))))
        accepted, extra = verify_greedy(drafts, logits)
        new = drafts[:accepted] + [extra]
        for i, token in enumerate(new):  # stop at the first end-of-sequence token
            if token in eos_ids:
                new, result.stopped_by = new[:i + 1], "eos"
                break
        result.rounds += 1
        result.drafted += len(drafts)
        result.accepted += accepted
        result.accepted_per_round.append(accepted)
        seq += new
        result.tokens += new
        if on_tokens:
            on_tokens(new)
        if result.stopped_by == "eos":
            break
    result.seconds = time.perf_counter() - t0
    return result
