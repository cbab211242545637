"""What decoding runs on: the `RunBlocks` seam, the in-process reference model, and results.

`RunBlocks` is a session over every block of the model for one generation: `submit(hidden, layout)`
runs one step (its `StepLayout` says where the new nodes sit and which tree path to keep first) and
returns a future of the output hidden states; `overlaps` says whether steps run in the background
(so sending one more before a verdict can hide a trip). A session opened with sampling parameters may
verify rounds where the blocks end (`verdicts`: verification at the last peer): its futures hold
`RoundVerdict`s instead (the target's argmax after every node; for a sampled round, whose
`RoundCheck` goes with `submit`, the accepted path and the next token). `LocalModel` runs every block in this
process: the reference every other mode (peers over the network, speculative decoding) is compared
with, token for token. A client-side model (`swarm.client.SwarmModel`) has the same shape. No session
holds more positions than the model's context (`max_position_embeddings`): `LocalModel.session`
refuses more (`ContextTooLong`), as peers do; `generate` fits every generation into it.

Knows the model engine (`peer.model`); nothing of the network, peers, failover or tokenizers.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from peer.model import BlockRange, Checkpoint, KVCache, ModelHead, StepLayout
from peer.model.sampling import RoundCheck, SamplingParams


class RunBlocks(Protocol):
    """Runs steps of one generation through every block of the model, [n, d] hidden states in and out."""

    overlaps: bool  # steps run in the background: submit returns before the step is done
    verdicts: bool  # steps answer with RoundVerdicts (verified where the blocks end), not hidden states

    def submit(self, hidden: torch.Tensor, layout: StepLayout, check: RoundCheck | None = None) -> Future: ...

    def close(self) -> None: ...


class Model(Protocol):
    """Anything generation can drive: a head here and sessions over every block (`LocalModel`, `SwarmModel`)."""

    head: ModelHead

    # max_length <= head.cfg.max_position_embeddings; sampling: the rounds' parameters, for a session that may verify
    # them where the blocks end (None: plain decoding, hidden states always)
    def session(self, max_length: int, sampling: SamplingParams | None = None) -> RunBlocks: ...


@dataclass
class LocalModel:
    """The whole model in one process: the head plus one BlockRange over every block."""

    head: ModelHead
    blocks: BlockRange

    @classmethod
    def load(cls, model_dir: str | Path, dtype="float32", device="cpu", quant: str = "none",
             invariant: bool | None = None) -> "LocalModel":
        """Every block and the head of a checkpoint (quant="int8" / "nf4": quantized linear weights, as peers load
        them; `invariant`: rows as if alone, as peers compute them, `Checkpoint.load_blocks`)."""
        ckpt = Checkpoint(model_dir)
        return cls(ckpt.load_head(dtype, device, quant, invariant is not False),
                   ckpt.load_blocks(0, ckpt.config.num_hidden_layers, dtype, device, quant, invariant))

    def session(self, max_length: int, sampling: SamplingParams | None = None) -> "LocalSession":
        return LocalSession(self.blocks, self.blocks.new_cache(max_length))  # (verifies nothing: hidden states)


@dataclass
class LocalSession:
    """`RunBlocks` in this process: each step runs at once, in the caller's thread."""

    blocks: BlockRange
    cache: KVCache
    overlaps: bool = False
    verdicts: bool = False

    def submit(self, hidden: torch.Tensor, layout: StepLayout, check: RoundCheck | None = None) -> Future:
        done: Future = Future()
        done.set_result(self.blocks(hidden, self.cache, layout))
        return done

    def close(self) -> None:
        pass


def embed_step(head: ModelHead, ids: list[int]) -> torch.Tensor:
    """Token ids -> the hidden states a step sends into the first block."""
    return head.embed(torch.tensor(ids, dtype=torch.long, device=head.embed_tokens.weight.device))


@dataclass
class GenerationResult:
    tokens: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    seconds: float = 0.0
    stopped_by: str = "length"  # "length" or "eos"

    @property
    def tokens_per_s(self) -> float:
        return len(self.tokens) / self.seconds if self.seconds > 0 else 0.0

    def stats(self) -> dict:
        """Mode-specific numbers for reports (speculative results add rounds and acceptance)."""
        return {}

    def summary(self) -> dict:
        """What a report says of any generation, JSON-ready."""
        return {"prompt_tokens": self.prompt_tokens, "tokens": self.tokens, "new_tokens": len(self.tokens),
                "stopped_by": self.stopped_by, "seconds": round(self.seconds, 6),
                "tokens_per_s": round(self.tokens_per_s, 3)}
