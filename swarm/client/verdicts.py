"""The client's half of verification at the last peer: checks to send, verdicts to trust or to compute.

A session that verifies at the last peer (`RemoteBlocks.verdicts`) gets one `RoundVerdict` per step. When
the route's last peer verifies, its `Verdict` is hostile input like any other: `checked` refuses one that
does not fit the step (argmax count and ids, a path that is not a path of the round, a token outside the
vocabulary) as that peer's failure (a `RemoteError`: the session fails over and bans it). When the
route's last peer holds no head (a failover onto a peer started with --no-head), `computed` runs the
very verifier the peer would have (`peer.verify.judge`, same seed) on the hidden states
here: the verdicts, and so the output, are the same either way.

Knows the protocol's verdict and check, the model head and the peer's verifier; nothing of drafts,
policies or tokenizers.
"""

from __future__ import annotations

import torch

from peer import verify
from peer.model import ModelHead, StepLayout
from peer.model.sampling import RoundCheck, RoundVerdict, SamplingParams
from protocol import messages as m
from protocol.messages import ErrorCode
from swarm.client.chain import RemoteError


def wire_check(check: RoundCheck | None) -> m.Check | None:
    if check is None:
        return None
    return m.Check(list(check.drafts), [list(pairs) for pairs in check.q], check.seed)


def checked(v: m.Verdict, vocab: int, layout: StepLayout, check: RoundCheck | None, params: SamplingParams,
            peer: str) -> RoundVerdict:
    """A last peer's verdict on a step, if it fits the step; else that peer failed (RemoteError)."""
    n, why = layout.n, None
    if len(v.argmax) != min(n, m.MAX_ARGMAX) or max(v.argmax, default=0) >= vocab:
        why = f"{len(v.argmax)} argmax tokens for a step of {n} nodes, or one outside the vocabulary"
    elif check is not None and not params.greedy:
        path = v.path or []
        if v.token is None or not 0 <= v.token < vocab or not path or path[0] != 0 or max(path) >= n:
            why = "no path of the round's nodes, or no next token"
        elif layout.parents is None and path != list(range(len(path))):
            why = "the path of a chain round must be its first nodes"
        elif layout.parents is not None and any(layout.parents[b] != a for a, b in zip(path, path[1:])):
            why = "the path does not follow the round's tree"
    if why is not None:
        raise RemoteError(ErrorCode.BAD_REQUEST, f"sent a malformed verdict: {why}", peer)
    return RoundVerdict(tuple(v.argmax), tuple(v.path) if v.path is not None and check is not None else None,
                        v.token if check is not None else None)


def computed(head: ModelHead, hidden: torch.Tensor, layout: StepLayout, check: RoundCheck | None,
             params: SamplingParams) -> RoundVerdict:
    """The verdict the last peer would have given, from the final hidden states (a route whose last peer has no head)."""
    return verify.judge(head, hidden, params, check, layout.parents)
