"""Autoregressive generation, written against a `RunBlocks` callable so it does not care where the blocks run.

`LocalModel` runs every block in this process; it is the reference every other mode (peers over the
network, speculative decoding) is compared with, token for token. Knows nothing about the network.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Protocol

import torch
from tokenizers import Tokenizer

from peer.model import BlockRange, Checkpoint, KVCache, ModelHead, StepLayout

from swarm.decode.sampling import SamplingParams, sample


class RunBlocks(Protocol):
    """Runs hidden states [n, d] of a step through every block of the model, returns [n, d]."""

    def __call__(self, hidden: torch.Tensor, layout: StepLayout) -> torch.Tensor: ...


def load_tokenizer(model_dir: str | Path) -> Tokenizer:
    path = Path(model_dir) / "tokenizer.json"
    if not path.exists():
        raise FileNotFoundError(f"no tokenizer.json in {model_dir}; the client needs the model's tokenizer")
    return Tokenizer.from_file(str(path))


@dataclass
class LocalModel:
    """The whole model in one process: the head plus one BlockRange over every block."""

    head: ModelHead
    blocks: BlockRange
    tokenizer: Tokenizer | None = None

    @classmethod
    def load(cls, model_dir: str | Path, dtype="float32", device="cpu") -> "LocalModel":
        ckpt = Checkpoint(model_dir)
        head = ckpt.load_head(dtype, device)
        blocks = ckpt.load_blocks(0, ckpt.config.num_hidden_layers, dtype, device)
        tok = load_tokenizer(model_dir) if (Path(model_dir) / "tokenizer.json").exists() else None
        return cls(head, blocks, tok)

    def session(self, max_length: int) -> "LocalSession":
        return LocalSession(self.blocks, self.blocks.new_cache(max_length))


@dataclass
class LocalSession:
    blocks: BlockRange
    cache: KVCache

    def __call__(self, hidden: torch.Tensor, layout: StepLayout, compact=None) -> torch.Tensor:
        if compact is not None:  # keep only the accepted path of the previous tree step
            self.cache.compact(*compact)
        return self.blocks(hidden, self.cache, layout)

    def close(self) -> None:
        pass


@dataclass
class GenerationResult:
    tokens: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    seconds: float = 0.0
    stopped_by: str = "length"  # "length" or "eos"

    @property
    def tokens_per_s(self) -> float:
        return len(self.tokens) / self.seconds if self.seconds > 0 else 0.0


def prefill(head: ModelHead, run: RunBlocks, prompt: list[int]) -> torch.Tensor:
    """Run the prompt through the blocks; return the logits [vocab] of its last position."""
    ids = torch.tensor(prompt, dtype=torch.long, device=head.embed_tokens.weight.device)
    hidden = run(head.embed(ids), StepLayout(start=0, n=len(prompt)))
    return head.logits(hidden[-1:])[0]


def decode_one_token(head: ModelHead, run: RunBlocks, token: int, position: int) -> torch.Tensor:
    ids = torch.tensor([token], dtype=torch.long, device=head.embed_tokens.weight.device)
    hidden = run(head.embed(ids), StepLayout(start=position, n=1))
    return head.logits(hidden)[0]


def generate_tokens(head: ModelHead, run: RunBlocks, prompt: list[int], max_new_tokens: int,
                    params: SamplingParams = SamplingParams(), seed: int = 0,
                    eos_ids: tuple = ()) -> Iterator[int]:
    """Yield new token ids one by one: plain autoregressive decoding, one step per token."""
    if not prompt:
        raise ValueError("the prompt must contain at least one token")
    generator = torch.Generator(device=head.embed_tokens.weight.device).manual_seed(seed)
    logits = prefill(head, run, prompt)
    position = len(prompt)
    for i in range(max_new_tokens):
        token = sample(logits, params, generator)
        yield token
        if token in eos_ids or i == max_new_tokens - 1:
            return
        logits = decode_one_token(head, run, token, position)
        position += 1


def generate(model, prompt: list[int], max_new_tokens: int, params: SamplingParams = SamplingParams(),
             seed: int = 0, stop_at_eos: bool = True,
             on_token: Callable[[int], None] | None = None) -> GenerationResult:
    """Plain decoding with a LocalModel or a SwarmModel (anything with .head and .session(max_length))."""
    eos = tuple(model.head.cfg.eos_token_ids) if stop_at_eos else ()
    result = GenerationResult(prompt_tokens=len(prompt))
    session = model.session(len(prompt) + max_new_tokens)
    t0 = time.perf_counter()
    try:
        for token in generate_tokens(model.head, session, prompt, max_new_tokens, params, seed, eos):
            result.tokens.append(token)
            if on_token:
                on_token(token)
            if token in eos:
                result.stopped_by = "eos"
    finally:
        session.close()
    result.seconds = time.perf_counter() - t0
    return result
