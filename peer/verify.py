"""Verification at the last peer: a session whose blocks end the model may verify each round here and answer
with the verdict (`protocol.messages.Verdict`) instead of the final hidden states.

A peer offers it when it holds the model's last block and loaded the head (final norm and LM head;
`swarm peer` does unless `--no-head`). The client asks for it in its Open (`VerifyAt`: its sampling
parameters, temperature, top-p and top-k, each bounded by the parser; a top-k past the vocabulary keeps
every token, as on the client); greedy rounds need nothing more (the verdict is the target's argmax
after every node, and the client's own judge runs on it); a sampled round's Step (or, in sealed push
mode, this hop's onion layer) carries a `Check`: the drafts, the sparse distributions they were drawn
from, a seed.
Here everything from the network is checked against this model before use (ids inside the
vocabulary, one distribution per draft, one draft per node after the first), and the verdict is
`peer.model.sampling.check_round`, the client's own verifier, run on this peer's logits.

Knows the model head, the sampling primitives and the protocol's messages; nothing of sockets,
sessions' codecs or clients' tokenizers.
"""

from __future__ import annotations

import asyncio

import torch

from peer.model import ModelHead
from peer.model.sampling import MAX_CHECK_DRAFTS, RoundCheck, RoundVerdict, SamplingParams, check_round
from protocol import messages as m
from protocol.messages import ErrorCode, ProtocolError

assert MAX_CHECK_DRAFTS == m.MAX_CHECK_DRAFTS, "the engine's and the wire's bound on a round's drafts differ"
ARGMAX_CHUNK = 256  # rows whose logits are computed at once: a long prefill never holds [n, vocab] logits


def offers(head: ModelHead | None, end: int) -> bool:
    """Whether a peer with this head (None: not loaded) whose blocks end at `end` verifies rounds."""
    return head is not None and end == head.cfg.num_hidden_layers


def accept_open(head: ModelHead | None, msg: m.Open) -> SamplingParams | None:
    """The sampling parameters an Open asks this peer to verify with (None: it asks for hidden states); refused
    (`no_head`) unless this peer holds the head and the session is the route's last hop."""
    if msg.verify is None:
        return None
    if not offers(head, msg.blocks[1]):
        why = "does not hold the LM head (started with --no-head, or not serving the last block)" if head is None \
            else f"verifies only sessions that end at the last block ({head.cfg.num_hidden_layers})"
        raise ProtocolError(ErrorCode.NO_HEAD, f"this peer {why}")
    if msg.next is not None:
        raise ProtocolError(ErrorCode.NO_HEAD, "a session that pushes to a next peer is not the last hop")
    return SamplingParams(msg.verify.temperature, msg.verify.top_p, msg.verify.top_k)


def round_check(params: SamplingParams | None, step: m.Step, n: int, vocab: int) -> RoundCheck | None:
    """A sampled round's check from a Step, checked against the step (one draft per node after the first)
    and the vocabulary; None for greedy sessions and steps without one (their verdict is the argmax alone)."""
    if params is None or params.greedy or step.check is None:
        return None
    c = step.check
    if len(c.drafts) + 1 != n:
        raise ProtocolError(ErrorCode.BAD_CHECK, f"a check of {len(c.drafts)} drafts needs a step of "
                            f"{len(c.drafts) + 1} nodes, got {n}")
    if step.parents is not None and len(step.parents) != n:
        raise ProtocolError(ErrorCode.BAD_CHECK, f"a tree step of {n} nodes needs {n} parents")
    ids = list(c.drafts) + [i for pairs in c.q for i, _ in pairs]
    if max(ids, default=0) >= vocab:
        raise ProtocolError(ErrorCode.BAD_CHECK, f"token ids must lie in [0, {vocab}), got {max(ids)}")
    return RoundCheck(tuple(c.drafts), tuple(tuple(pairs) for pairs in c.q), c.seed)


def judge(head: ModelHead, out: torch.Tensor, params: SamplingParams, check: RoundCheck | None,
          parents=None) -> RoundVerdict:
    """The verdict on a step's final hidden states [n, d]: with a sampled round's check, `check_round` on its
    logits (at most MAX_CHECK_DRAFTS + 1 rows); else the argmax of its last `MAX_ARGMAX` rows, a chunk of rows at a
    time. The client runs this too where a route's last peer holds no head (`swarm.client.verdicts`)."""
    if check is not None and not params.greedy:
        return check_round(head.logits(out), params, check, parents, m.MAX_ARGMAX)
    rows = out[-m.MAX_ARGMAX:]
    return RoundVerdict(tuple(i for chunk in rows.split(ARGMAX_CHUNK) for i in head.argmax(chunk).tolist()))


async def verdict(head: ModelHead, session: str, step: m.Step, out: torch.Tensor, params: SamplingParams,
                  check: RoundCheck | None) -> m.Verdict:
    """The verdict on a step's output as the message that carries it, computed off the event loop."""
    v = await asyncio.to_thread(judge, head, out, params, check, step.parents)
    return m.Verdict(session, step.step, list(v.argmax), list(v.path) if v.path is not None else None, v.token)
