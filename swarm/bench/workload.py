"""What a benchmark script runs on: the model pair, how its prompts become token ids, and the machine.

`open_workload(model, draft, chat)` resolves `--model NAME|DIR|FILE` and `--draft` (None: the model's
own draft) through `swarm.registry` when the script runs (a named model is fetched on first use), loads
the target's tokenizer and, with `chat`, its chat template (a model without one is refused: a benchmark
that asked for chat turns must not silently measure completions). Every failure is one
`WorkloadError` line for the script to print. `machine()` describes where the numbers were taken.

Knows the registry, tokenizers and chat templates (`swarm.text`) and prompt encoding
(`swarm.bench.prompts`); must not know flags (scripts hand it the specs as given), decoding, peers or
how results are reported.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path

from swarm.bench.prompts import encode_prompt
from swarm.registry import FetchError, resolve_draft, resolve_model
from swarm.text import ChatTemplate, load_tokenizer


class WorkloadError(ValueError):
    """The model, its draft or its chat template cannot be had: one line that says why."""


@dataclass
class Workload:
    model_spec: str  # --model as given
    model_dir: Path
    draft_spec: str | None  # --draft as given (None: the model's own)
    draft_dir: Path
    tokenizer: object  # the target's `tokenizers.Tokenizer`
    template: ChatTemplate | None  # set when prompts go in as chat turns

    @property
    def prompt_mode(self) -> str:
        return "chat" if self.template is not None else "raw"

    def encode(self, text: str) -> list[int]:
        """A HumanEval prompt as token ids: raw, or as a chat turn through the model's template."""
        return encode_prompt(self.tokenizer, text, self.template)

    def describe(self) -> dict:
        return dict(model=dict(spec=self.model_spec, dir=str(self.model_dir)),
                    draft=dict(spec=self.draft_spec or "(the model's own)", dir=str(self.draft_dir)),
                    prompt_mode=self.prompt_mode)


def open_workload(model: str, draft: str | None = None, chat: bool = False) -> Workload:
    """The pair to benchmark and its prompt encoding; `WorkloadError` (one line) when it cannot be had."""
    try:
        model_dir = resolve_model(model)
        draft_dir = resolve_draft(model, draft)
        if draft_dir is None:
            raise WorkloadError(f"--model {model} has no draft of its own; give one with --draft NAME|DIR|FILE")
        tokenizer = load_tokenizer(model_dir)
        template = ChatTemplate.load(model_dir, tokenizer) if chat else None
    except (FetchError, ValueError, OSError) as e:
        raise WorkloadError(str(e)) from None
    if chat and template is None:
        raise WorkloadError(f"--chat: the model {model} ({model_dir}) has no chat template (a base or code model: "
                            "it continues text); run without --chat")
    return Workload(str(model), Path(model_dir), draft, Path(draft_dir), tokenizer, template)


def machine() -> dict:
    """Where the numbers were taken: processor, CPU count, torch threads."""
    import torch

    return dict(processor=platform.processor() or platform.machine(), cpu_count=os.cpu_count(),
                torch_threads=torch.get_num_threads(), torch=torch.__version__)
