"""Where the models shipped with the package live, and which of them pair up.

Knows file paths of the bundled models only; never loads them, never parses flags.
"""

from __future__ import annotations

from pathlib import Path

BUNDLED_MODELS = Path(__file__).parent / "models"
DEFAULT_MODEL = BUNDLED_MODELS / "code-target"
DEFAULT_DRAFT = BUNDLED_MODELS / "code-draft"


def default_model() -> str | None:
    """The bundled target's directory, if the package ships it."""
    return str(DEFAULT_MODEL) if (DEFAULT_MODEL / "config.json").exists() else None


def default_draft() -> str | None:
    """The bundled draft's directory, if the package ships it."""
    return str(DEFAULT_DRAFT) if (DEFAULT_DRAFT / "config.json").exists() else None


def draft_fits(model: str | None, draft: str | None) -> bool:
    """Whether `draft` may draft for `model`: the bundled draft fits only the bundled target (same
    tokenizer); a draft the user named is taken at their word."""
    if not draft:
        return False
    return draft != default_draft() or model == default_model()


def speculative_default(model: str | None, draft: str | None, reference: bool) -> bool:
    """Speculate unless asked otherwise: always when a draft fits the model, except for the in-process
    reference run (`swarm generate --local`), which decodes plainly."""
    return not reference and draft_fits(model, draft)
