"""A sampled round's check as it travels to a last peer that verifies it (inside a Step or a Control).

Knows JSON values and the bounds of a check; nothing of models, vocabularies (the peer checks ids against
its own) or sockets.
"""

from __future__ import annotations

from dataclasses import dataclass

from .fields import MAX_INT
from .fields import bad as _bad
from .fields import float_field
from .fields import int_field as _int
from .fields import int_list as _int_list

MAX_CHECK_DRAFTS = 64  # drafts one round's check may carry (the peer's dense q: 64 x vocab floats at most)
MAX_Q_PAIRS = 64  # (id, prob) pairs of one draft distribution: the draft's top K
MAX_SEED = 2**63 - 1


@dataclass
class Check:
    """A sampled round as its verifier needs it: the drafts (nodes 1.. of the step), for each the distribution it
    was drawn from as (id, prob) pairs (at most MAX_Q_PAIRS, distinct ids, probs in [0, 1] summing to at most 1,
    the draft's own id among them with prob > 0), and the seed of the verifier's random draws.
    Ids are checked against the vocabulary by the peer."""

    drafts: list[int]
    q: list[list[tuple[int, float]]]
    seed: int

    def header(self) -> dict:
        return {"drafts": list(self.drafts), "q": [[[i, p] for i, p in pairs] for pairs in self.q], "seed": self.seed}

    @classmethod
    def parse(cls, h):
        if not isinstance(h, dict):
            raise _bad("field 'check' must be an object")
        drafts = _int_list(h, "drafts", 0, MAX_INT, MAX_CHECK_DRAFTS, optional=False)
        q = h.get("q")
        if not isinstance(q, list) or len(q) != len(drafts):
            raise _bad("field 'q' must hold one list of (id, prob) pairs per draft")
        return cls(drafts, [_pairs(pairs, x) for pairs, x in zip(q, drafts)], _int(h, "seed", 0, MAX_SEED))


def _pairs(pairs, token: int) -> list[tuple[int, float]]:
    if not isinstance(pairs, list) or not 1 <= len(pairs) <= MAX_Q_PAIRS:
        raise _bad(f"a draft distribution must be 1 to {MAX_Q_PAIRS} (id, prob) pairs")
    out = []
    for pair in pairs:
        if not isinstance(pair, list) or len(pair) != 2:
            raise _bad("a draft distribution's entries must be [id, prob] pairs")
        out.append((_int({"id": pair[0]}, "id"), float_field({"prob": pair[1]}, "prob", 0.0, 1.0)))
    probs = dict(out)
    if len(probs) != len(out) or sum(probs.values()) > 1.0 + 1e-4 or not probs.get(token, 0.0) > 0:
        raise _bad("a draft distribution needs distinct ids, probs summing to at most 1 and its draft among them")
    return out
