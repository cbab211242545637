"""Generation, top to bottom: `generate` decodes plainly or speculatively through any `Model`.

Plain decoding is `generate_tokens` (a prefill, then one step per token; greedy tokens come from
`ModelHead.argmax`, which needs no float32 logits where a bfloat16 copy of the head is faster). With a draft model and a `SpecConfig`, `generate` runs `speculative_decode` instead.
Either way the session is opened and closed here, and the output is the target's own.

The model's context (`max_position_embeddings`) bounds the whole sequence, prompt plus reply, as
`max_model_len` does in vLLM: a prompt longer than the context is refused before anything is sent
(`ContextTooLong`, "prompt too long for this model (N > M)"); a reply that would run past it stops
there (`stopped_by` "length", as when max_new_tokens is reached), and no session asks for more
positions than the context, speculative slack included (`fit_context`).

A speculative session is opened with the sampling parameters, so that a model whose blocks end at a
verifying peer may verify the rounds there (verification at the last peer; not with LOSSY `relaxed`
acceptance, which needs the target's softmax here); under sampling its drafts then come from the
draft's top K (`SpecConfig.draft_top_k`).

Knows `ModelHead` and `RunBlocks`; nothing of the network, peers, failover or tokenizers.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Callable, Iterator

import torch

from peer.model import ContextTooLong, ModelHead, StepLayout
from swarm.decode.ngram import NgramMemory
from swarm.decode.round_policy import CostModel
from swarm.decode.sampling import MAX_CHECK_DRAFTS, SamplingParams, sample
from swarm.decode.speculative import Drafter, SpecConfig, SpeculativeResult, speculative_decode
from swarm.decode.target import GenerationResult, LocalModel, Model, RunBlocks, embed_step

DRAFT_TOP_K = 16  # sampling, verified at the last peer: drafts come from the draft's top 16, renormalised


def step_hidden(head: ModelHead, run: RunBlocks, ids: list[int], start: int) -> torch.Tensor:
    """One chain step of `ids` from position `start` through the blocks: their final hidden states [n, d]."""
    return run.submit(embed_step(head, ids), StepLayout(start=start, n=len(ids))).result()


def generate_tokens(head: ModelHead, run: RunBlocks, prompt: list[int], max_new_tokens: int,
                    params: SamplingParams = SamplingParams(), seed: int = 0,
                    eos_ids: tuple = ()) -> Iterator[int]:
    """Yield new token ids one by one: plain autoregressive decoding, one step per token. Greedy takes the
    argmax without float32 logits where that pays (`ModelHead.argmax`)."""
    if not prompt:
        raise ValueError("the prompt must contain at least one token")
    generator = torch.Generator(device=head.embed_tokens.weight.device).manual_seed(seed)

    def next_token(hidden: torch.Tensor) -> int:
        if params.greedy:
            return int(head.argmax(hidden[-1:])[0])
        return sample(head.logits(hidden[-1:])[0], params, generator)

    hidden = step_hidden(head, run, prompt, 0)
    for i in range(max_new_tokens):
        token = next_token(hidden)
        yield token
        if token in eos_ids or i == max_new_tokens - 1:
            return
        hidden = step_hidden(head, run, [token], len(prompt) + i)


def fit_context(model: Model, prompt: list[int], max_new_tokens: int) -> int:
    """The new tokens that fit in the model's context after `prompt` (at most `max_new_tokens`); a
    prompt longer than the context is refused (`ContextTooLong`)."""
    context = model.head.cfg.max_position_embeddings
    if len(prompt) > context:
        raise ContextTooLong(len(prompt), context)
    return min(max_new_tokens, context - len(prompt))


def generate(model: Model, prompt: list[int], max_new_tokens: int, params: SamplingParams = SamplingParams(), *,
             draft: LocalModel | None = None, spec: SpecConfig | None = None, seed: int = 0,
             stop_at_eos: bool = True, on_tokens: Callable[[list[int]], None] | None = None,
             policy: CostModel | None = None, memory: NgramMemory | None = None) -> GenerationResult | SpeculativeResult:
    """Decode `max_new_tokens` after `prompt` with a LocalModel or a SwarmModel, or fewer where the
    context ends (a prompt longer than the context: `ContextTooLong`, before any session is opened).

    Plain when `spec` is None; speculative with `draft` (same tokenizer as the model) otherwise, its
    sampling parameters from `params` or `spec.params` (either; not two different ones). `policy`: the round policy an earlier generation left
    (`result.policy`), so a conversation keeps what it learnt; `memory`: earlier generations' n-grams to
    draft from (`spec.ngram_memory`; this one joins them); `on_tokens` gets every committed batch."""
    if spec is not None and draft is None:
        raise ValueError("speculative decoding needs a draft model")
    max_new_tokens = fit_context(model, prompt, max_new_tokens)
    eos = tuple(model.head.cfg.eos_token_ids) if stop_at_eos else ()
    if spec is None:
        return _plain(model, prompt, max_new_tokens, params, seed, eos, on_tokens)
    if draft.head.cfg.vocab_size != model.head.cfg.vocab_size:
        raise ValueError(f"the draft's vocabulary ({draft.head.cfg.vocab_size}) differs from the target's "
                         f"({model.head.cfg.vocab_size}); they must share a tokenizer")
    if spec.params != params:  # the sampling parameters may be given in either place, not two different ones
        if spec.params != SamplingParams() and params != SamplingParams():
            raise ValueError(f"sampling parameters given twice and different: {params} and {spec.params}")
        spec = replace(spec, params=params if spec.params == SamplingParams() else spec.params)
    length = min(len(prompt) + max_new_tokens + 2 * spec.slack + 2, model.head.cfg.max_position_embeddings)
    # verification at the last peer may take the rounds, unless relaxed (it needs the target's softmax here) or a
    # sampled round could hold more drafts than a check carries
    elsewhere = spec.relaxed is None and (spec.params.greedy or spec.slack <= MAX_CHECK_DRAFTS)
    session = model.session(length, spec.params if elsewhere else None)
    if session.verdicts and not spec.params.greedy and spec.draft_top_k is None:  # the peer is told the draft's q
        spec = replace(spec, draft_top_k=DRAFT_TOP_K)
    try:
        drafter = Drafter(draft, length, spec.draft_vocab)
        return speculative_decode(model.head, session, drafter, prompt, max_new_tokens, spec,
                                  seed=seed, eos_ids=eos, on_tokens=on_tokens, policy=policy, max_length=length,
                                  memory=memory if spec.ngram_memory else None)
    finally:
        session.close()


def _plain(model: Model, prompt: list[int], max_new_tokens: int, params: SamplingParams, seed: int, eos: tuple,
           on_tokens) -> GenerationResult:
    result = GenerationResult(prompt_tokens=len(prompt))
    session = model.session(len(prompt) + max_new_tokens)
    t0 = time.perf_counter()
    try:
        for token in generate_tokens(model.head, session, prompt, max_new_tokens, params, seed, eos):
            result.tokens.append(token)
            if on_tokens:
                on_tokens([token])
            if token in eos:
                result.stopped_by = "eos"
    finally:
        session.close()
    result.seconds = time.perf_counter() - t0
    return result
