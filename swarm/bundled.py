"""The models shipped with the package, and which draft fits which model.

`TINY_MODEL` / `TINY_DRAFT` are the directories of the bundled 4 M-parameter code pair (`--model tiny`),
for scripts and tests that run on it explicitly. `draft_fits` and `speculative_default` decide whether
a command speculates when not told: with a draft that fits the model.

Knows the registry's table of names (`swarm.registry`) and file paths; never loads, fetches or
converts a model, never parses flags.
"""

from __future__ import annotations

from pathlib import Path

from swarm.registry import MODELS, SHIPPED, own_draft

TINY_MODEL = SHIPPED / MODELS["tiny"].shipped
TINY_DRAFT = SHIPPED / MODELS["tiny"].draft


def _tiny(spec: str | None) -> bool:
    """Whether `spec` is the tiny pair (by name, or either of its directories)."""
    if spec is None or spec == "tiny":
        return spec == "tiny"
    try:
        return Path(spec).resolve() in (TINY_MODEL.resolve(), TINY_DRAFT.resolve())
    except OSError:
        return False


def draft_fits(model: str | None, draft: str | None) -> bool:
    """Whether speculation has a draft for `model` (NAME, DIR or FILE, as given). `draft` as given (None:
    the model's own): a draft the user named is taken at their word, except the tiny pair's, which
    fits only the tiny target (same tokenizer); without one, the model's own draft, when it has one."""
    if draft:
        return not _tiny(draft) or _tiny(model)
    return model is not None and own_draft(model) is not None


def speculative_default(model: str | None, draft: str | None, reference: bool) -> bool:
    """Speculate unless asked otherwise: always when a draft fits the model, except for the in-process
    reference run (`swarm generate --local`), which decodes plainly."""
    return not reference and draft_fits(model, draft)
