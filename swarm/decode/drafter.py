"""The draft model's side of a round: `Drafter` (the draft with its own cache, kept in step with whatever
sequence it is asked to extend: chains token by token, trees, greedy or sampled; `prefeed` takes drafts in flight
in ahead of the verdict), `DraftVocab` (its LM
head over part of the vocabulary) and `load_draft` (its weights: by default bfloat16, with int8 linear
layers on a CPU, where torch's int8 kernel for bfloat16 is the fastest way to run a small model with the
fewest bytes); the
target verifies every draft, so the draft's precision changes how fast drafts come and how often they
are accepted, never the output).

Knows `LocalModel`, the model engine's steps and sampling; nothing of rounds, policies, peers or the network.
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from peer.model import ModelHead, StepLayout
from peer.model.packed import packed_product
from swarm.decode.sampling import SamplingParams, draw, draw_siblings, token_probs, top_k_probs
from swarm.decode.target import LocalModel


DRAFT_DTYPES = ("auto", "float32", "bfloat16", "float16")
DRAFT_QUANTS = ("auto", "none", "int8", "nf4")


def draft_weights(device: str = "cpu", dtype: str = "auto", quant: str = "auto") -> tuple[str, str]:
    """(dtype, quant) of the draft's weights: "auto" is bfloat16, and int8 on a CPU (none on a GPU, where
    bfloat16 matmuls are the fast path). `scripts/bench_draft_weights.py` measures the settings (on this
    project's CPU bfloat16 packed for oneDNN, `peer.model.packed`, is as fast as int8 and twice the bytes)."""
    if dtype not in DRAFT_DTYPES or quant not in DRAFT_QUANTS:
        raise ValueError(f"draft weights: dtype one of {DRAFT_DTYPES}, quant one of {DRAFT_QUANTS}; got {dtype}, {quant}")
    cpu = str(device).split(":")[0] == "cpu"
    return ("bfloat16" if dtype == "auto" else dtype), (("int8" if cpu else "none") if quant == "auto" else quant)


def load_draft(path, device: str = "cpu", dtype: str = "auto", quant: str = "auto") -> LocalModel:
    """The draft model, its weights as `draft_weights` says. On a CPU with half-precision activations its KV
    cache is float32 (`BlockRange.cache_dtype`): a drafted token's attention then runs in float32 SDPA, ~3x
    faster there than half-precision matmuls over a slice of the cache (SmolLM2's draft at 300 positions,
    one thread: 0.08 vs 0.24 ms a layer), for twice the cache's bytes (a small model's: 15 KB a token)."""
    dtype, quant = draft_weights(device, dtype, quant)
    model = LocalModel.load(path, dtype, device, quant, invariant=False)  # (its rows need not match anything)
    if str(device).split(":")[0] == "cpu" and model.blocks.dtype in (torch.bfloat16, torch.float16):
        model.blocks.cache_dtype = torch.float32
    return model


def _greedy(logits: torch.Tensor) -> tuple[int, float, list[int]]:
    """The greedy draft after these logits: its token, its confidence (the draft's probability of it), the top-8."""
    token = int(logits.argmax())
    return token, float(torch.softmax(logits.float(), -1)[token]), logits.topk(min(8, logits.numel())).indices.tolist()


class DraftVocab:
    """The draft's LM head over part of the vocabulary (as FR-Spec does with frequency-ranked tokens): the first
    `size` ids plus every id the context holds. The head is a large part of a small draft's cost and the ids it
    leaves out are rare (`scripts/bench_draft_vocab.py` measures both: SmolLM2's draft, README). Logits of the ids left out are -inf,
    so greedy drafts, confidences and sampled drafts' q are all over the subset: the target still verifies
    every draft, and a sampled draft's q is the law it was drawn from, so the output is unchanged in law and,
    greedy, token for token. A quantized (untied int8/nf4) head, or `size` None or >= the vocabulary: the
    whole head."""

    def __init__(self, head: ModelHead, size: int | None):
        vocab = head.cfg.vocab_size
        linear = isinstance(head.lm_head, torch.nn.Linear)
        self.head, self.size = head, (size if size is not None and size < vocab and linear else None)
        self.extra: set[int] = set()  # context ids >= size
        self._extra_t = None
        # the first `size` rows of the head, packed for oneDNN where that works (a copy: size x d)
        self._first = packed_product(head.lm_head.weight.detach()[:self.size]) if self.size is not None else None

    def see(self, context: list[int]) -> None:
        """Add the context's ids beyond the first `size` to the subset (they stay for the draft's lifetime)."""
        if self.size is None:
            return
        new = {t for t in context if t >= self.size} - self.extra
        if new:
            self.extra |= new
            self._extra_t = torch.tensor(sorted(self.extra), device=self.head.lm_head.weight.device)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits [vocab] after one hidden state [hidden_size]; -inf outside the subset."""
        head = self.head
        if self.size is None:
            return head.logits(hidden[None])[0]
        weight = head.lm_head.weight
        x = head.norm(hidden.to(head.norm.weight.dtype))
        out = torch.full((head.cfg.vocab_size,), float("-inf"), device=weight.device)
        out[:self.size] = self._first(x[None])[0].float()
        if self._extra_t is not None:
            out[self._extra_t] = torch.nn.functional.linear(x, weight[self._extra_t]).float()
        return out


class Drafter:
    """The draft model with its own cache, kept in step with whatever sequence it is asked to extend."""

    def __init__(self, model: LocalModel, max_length: int, vocab: int | None = None):
        """`vocab`: draft only from the first `vocab` token ids (a BPE vocabulary's ids follow its merges, the
        likeliest first) and any token of the context (`DraftVocab`); None: the whole vocabulary."""
        self.model = model
        self.vocab = DraftVocab(model.head, vocab)
        self.max_length = min(max_length, model.head.cfg.max_position_embeddings)  # never past its own context
        self.session = model.session(self.max_length)
        self.fed: list[int] = []  # tokens whose keys/values sit in the draft cache, in order
        self.confidences: list[float] = []  # of the last proposal's drafts
        self.top: list[list[int]] = []  # greedy: the draft's top-8 tokens at each of the last proposal's positions
        self.first_seconds = 0.0
        self.seconds = 0.0
        self.tokens = 0
        self._ready: dict[tuple, list[tuple[int, float, list[int]]]] = {}  # drafted ahead, by the context continued
        self.anticipated = 0  # of the last proposal's drafts, those drafted ahead
        self.ahead_seconds = 0.0  # spent drafting ahead (`anticipate`, `top_after`)

    def room(self, length: int) -> int:
        """Drafts it can propose after a sequence of `length` tokens: all but the last one go through its cache."""
        return max(0, self.max_length + 1 - length)

    def _feed(self, tokens: list[int], start: int) -> torch.Tensor:
        """Hidden states of `tokens` put through the cache from position `start`."""
        head = self.model.head
        ids = torch.tensor(tokens, dtype=torch.long, device=head.embed_tokens.weight.device)
        hidden = self.session.submit(head.embed(ids), StepLayout(start, len(tokens))).result()
        self.fed[start:] = tokens
        return hidden

    def _step(self, tokens: list[int], start: int) -> torch.Tensor:
        self.tokens += 1
        return self.vocab.logits(self._feed(tokens, start)[-1])

    def _cached(self, tokens: list[int], most: int) -> int:
        """How many of the first `most` of `tokens` the cache already holds."""
        keep, limit = 0, min(len(self.fed), most)
        while keep < limit and self.fed[keep] == tokens[keep]:
            keep += 1
        return keep

    def prefeed(self, tokens: list[int]) -> int:
        """Put `tokens` (a context and drafts in flight) through the cache now, without logits, so that a later
        proposal after a prefix of them feeds only what differs: run while a round is on the wire, on the guess that
        its drafts are accepted (where they are not, the next step overwrites them). Returns the tokens fed."""
        tokens = tokens[:self.max_length]
        keep = self._cached(tokens, len(tokens))
        if keep < len(tokens):
            self._feed(tokens[keep:], keep)
        return len(tokens) - keep

    def _logits_after(self, context: list[int]) -> torch.Tensor:
        self.vocab.see(context)
        keep = self._cached(context, len(context) - 1)  # re-run at least the last token
        return self._step(context[keep:], keep)

    def propose(self, context: list[int], k: int, params: SamplingParams, generator: torch.Generator | None = None,
                decide: Callable[[list[float]], tuple[bool, bool]] | None = None,
                top_k: int | None = None) -> tuple[list[int], torch.Tensor]:
        """Up to k draft tokens continuing `context` and the draft distributions they were drawn from [k, vocab].

        `decide(confidences)` is asked after each token (its confidence: the draft's probability of
        it) whether to keep it and whether to draft another; without it, exactly k tokens. The
        confidences and (greedy) the draft's top-8 list at every position are left in
        `self.confidences` and `self.top`. `top_k` (sampling): draw from the draft's top-k only, renormalised
        (the distribution returned is that one: what a verifier must be told). Greedy, after a context
        drafted ahead (`anticipate`), those drafts come first, for free (`self.anticipated` counts them).
        """
        t0 = time.perf_counter()
        self.confidences, self.top = [], []
        ready = self._ready.get(tuple(context), []) if params.greedy and self._ready else []
        self._ready, self.anticipated = {}, 0
        logits = self._logits_after(context) if k > 0 and not ready else None
        self.first_seconds = time.perf_counter() - t0  # the catch-up step: paid once per round, whatever k
        tokens, probs = [], []
        for i in range(k):
            if i < len(ready):  # drafted during the last flight
                token, confidence, top = ready[i]
                q = torch.nn.functional.one_hot(torch.tensor(token), self.model.head.cfg.vocab_size).float()
            else:
                if logits is None:  # past what was drafted ahead: catch the cache up first
                    logits = self._logits_after(context + tokens)
                q = token_probs(logits, params)
                if top_k is not None and not params.greedy:
                    q = top_k_probs(q, top_k)
                if params.greedy:
                    token, confidence, top = _greedy(logits)
                else:
                    token, top = draw(q, generator), None
                    confidence = float(q[token])
            keep, more = decide(self.confidences + [confidence]) if decide is not None else (True, True)
            if not keep:
                break
            tokens.append(token)
            probs.append(q)
            self.confidences.append(confidence)
            if top is not None:
                self.top.append(top)
            self.anticipated += i < len(ready)
            if not more:
                break
            if i < k - 1 and i + 1 >= len(ready):
                logits = self._step([token], len(self.fed)) if i >= len(ready) else None
        self.seconds += time.perf_counter() - t0
        return tokens, torch.stack(probs) if probs else torch.empty(0)

    def top_after(self, context: list[int]) -> list[int]:
        """Greedy: the draft's top-8 tokens after `context` (one step through the cache)."""
        return _greedy(self._logits_after(context))[2]

    def forget_ahead(self) -> None:
        """Drop whatever was drafted ahead."""
        self._ready = {}

    def anticipate(self, context: list[int], k: int, stop: Callable[[], bool] = lambda: False) -> int:
        """Greedy: draft up to k tokens continuing `context` now, for a later `propose` after exactly that context
        (while a round is on the wire, `context` one of its likely verdicts: its accepted drafts and a guess of
        the target's next token); stops early when `stop()` says so. Kept until the next `propose`, which takes
        them when its context is this one. Returns the tokens drafted ahead."""
        t0 = time.perf_counter()
        drafted = [_greedy(self._logits_after(context))]
        while len(drafted) < k and not stop():
            drafted.append(_greedy(self._step([drafted[-1][0]], len(self.fed))))
        self._ready[tuple(context)] = drafted
        self.ahead_seconds += time.perf_counter() - t0
        return len(drafted)

    def propose_tree(self, context: list[int], depth: int, width: int, params: SamplingParams = SamplingParams(),
                     generator: torch.Generator | None = None, top_k: int | None = None) -> tuple[list, list, list]:
        """A tree of `width` first tokens, each continued to `depth` tokens: (tokens, parents, qs), parents[i] = -1
        for first-level nodes, qs[i] the distribution token i was drawn from (None: a deterministic pick).

        Greedy: the `width` likeliest first tokens, each continued by the draft's argmax (qs all None).
        Sampling: the first tokens drawn without replacement from the draft's distribution (its top `top_k`
        renormalised, when given), each with the conditional it was drawn from (`draw_siblings`), and each
        continued by draws from the draft's distribution after its own path: what `verify_tree` needs to
        keep the target's law exactly.
        """
        t0 = time.perf_counter()
        sampled = not params.greedy

        def law(logits):
            q = token_probs(logits, params)
            return top_k_probs(q, top_k) if top_k is not None else q

        logits = self._logits_after(context)
        if sampled:
            first, first_qs = draw_siblings(law(logits), width, generator, replace=False)
        else:
            first, first_qs = logits.topk(width).indices.tolist(), [None] * width
        tokens, parents, qs = [], [], []
        for candidate, q in zip(first, first_qs):
            parent, token = -1, candidate
            for d in range(depth):
                tokens.append(token)
                parents.append(parent)
                qs.append(q)
                parent = len(tokens) - 1
                if d < depth - 1:
                    logits = self._step([token], len(context) + d)
                    q = law(logits) if sampled else None
                    token = draw(q, generator) if sampled else int(logits.argmax())
        self.seconds += time.perf_counter() - t0
        return tokens, parents, qs
