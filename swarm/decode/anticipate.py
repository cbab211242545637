"""Drafting the next round during this one's flight, for its likeliest verdicts (greedy chains).

Across a WAN the client waits a whole trip for each verdict, and then drafts the next round while the
peers wait for it: the draft model's steps after a verdict are on the critical path (on SmolLM2's pair,
continental: ~30 ms of a ~160 ms round that the model drafts). A chain round's verdict is one of k + 1
outcomes: its first j drafts accepted, then the target's own token after them. `anticipate` ranks the
guesses (j, t), t a token the target may put after the first j drafts, by their chance, and drafts the next round's
tokens after the likeliest ones while the round is on the wire (`Drafter.anticipate`); when the verdict is one
of them, the next round's model drafts are ready (`Drafter.propose` takes them), otherwise nothing is lost but
idle time (the draft's cache catches up as always).

The chance of a guess: P(j) = a_1 ... a_j (1 - a_{j+1}), each a_i the policy's calibrated chance that draft i is
accepted (the model's confidence bins, or the n-gram cells), times the chance that the target's token is t:
where the draft's top-8 list is known (the model's own positions), the rank-r candidate after a rejected first
choice has the chance the policy measures for trees (`rescue.Rescue`: rate(r + 1) - rate(r)); elsewhere (n-gram
positions, and after the whole round) one step of the draft gives the list, its first candidate taken at the
acceptance rate (all accepted) or the rank-1 rescue rate. Guesses below `FLOOR` are not drafted. Each guess gets
as many drafts as the model's recent rounds kept (`Anticipator.depth`); drafting stops before the verdict is due
(the policy's own prediction of the trip), so that the verdict never waits for it.

Knows the round's drafts and the draft's lists, the round policy's calibrations and the `Drafter`'s methods;
nothing of tensors, peers or the network.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from swarm.decode.drafter import Drafter
    from swarm.decode.round_policy import CostModel
    from swarm.decode.rounds import Round

FLOOR = 0.04  # a guess less likely than this is not worth its draft steps
GUESSES = 6  # the most guesses drafted ahead per round


def draft_chances(policy: CostModel, rnd: Round) -> list[float]:
    """Per draft of a chain round, the calibrated chance that it is accepted given the ones before were."""
    out = []
    for i, source in enumerate(rnd.sources):
        if source != "ngram" and i < len(rnd.confidences):
            out.append(policy.alpha(rnd.confidences[i]))
        elif rnd.cells and rnd.cells[i] is not None:
            out.append(policy.ngram.alpha(rnd.cells[i]))
        else:
            out.append(policy.acceptance)
    return out


def outcomes(policy: CostModel, rnd: Round) -> list[float]:
    """P(j) for j = 0 .. k: the chance that exactly the first j drafts are accepted."""
    chances, p, out = draft_chances(policy, rnd), 1.0, []
    for a in chances:
        out.append(p * (1 - a))
        p *= a
    return out + [p]


def rank_chances(policy: CostModel, ranks: int = 8) -> list[float]:
    """After a rejected first choice: the chance that the target's token is the draft's rank-r candidate, r = 0 .. 7
    (rank 0 is the rejected draft: 0)."""
    rate = [0.0, 0.0] + [policy.rescue.rate(w) for w in range(2, ranks + 1)]
    return [0.0] + [max(0.0, rate[r + 1] - rate[r]) for r in range(1, ranks)]


class Anticipator:
    """Drafts ahead for one generation's rounds; learns how many drafts the model's rounds keep."""

    def __init__(self, drafter: Drafter, policy: CostModel):
        self.drafter, self.policy = drafter, policy
        self.depth = 3.0  # drafts per guess: a moving mean of the model's drafts per round that it drafted
        self.guessed = 0  # guesses drafted ahead
        self.used = 0  # rounds whose model drafts came from a guess

    def observe(self, rnd: Round) -> None:
        """A verified round: how many drafts the model kept (rounds it drafted), and whether they were drafted ahead."""
        if rnd.model_depth:
            self.depth += 0.1 * (rnd.model_depth - self.depth)
        self.used += rnd.anticipated > 0

    def run(self, rnd: Round, seq: list[int], due: float, done: Callable[[], bool]) -> int:
        """While `rnd` (a greedy chain continuing `seq`) is on the wire: draft the next round after its likeliest
        verdicts until `done()` or the time `due` (perf_counter seconds) when its verdict is expected.
        Returns the guesses drafted."""
        self.drafter.forget_ahead()
        step = max(self.policy.draft_cost, 1e-4)

        def stop() -> bool:
            return done() or time.perf_counter() + step > due

        probs, top = outcomes(self.policy, rnd), rnd.top
        ranks, accept = rank_chances(self.policy), self.policy.acceptance
        guesses = []  # (chance, j, token or None: one step of the draft decides it)
        for j, p in enumerate(probs):
            if j < len(rnd.drafts) and j < len(top):
                guesses += [(p * ranks[r], j, t) for r, t in enumerate(top[j]) if t != rnd.drafts[j] and r < len(ranks)]
            else:
                guesses.append((p * (accept if j == len(rnd.drafts) else ranks[1]), j, None))
        guesses = sorted((g for g in guesses if g[0] >= FLOOR), key=lambda g: -g[0])[:GUESSES]
        n, depth = 0, max(1, math.ceil(self.depth))
        for _, j, token in guesses:
            if stop():
                break
            context = seq + rnd.drafts[:j]
            if token is None:
                banned = rnd.drafts[j] if j < len(rnd.drafts) else None
                token = next((t for t in self.drafter.top_after(context) if t != banned), None)
                if token is None or stop():
                    break
            self.drafter.anticipate(context + [token], depth, stop)
            n += 1
        self.guessed += n
        return n
