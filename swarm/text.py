"""Text in and out of token ids for the face (CLI, chat): the model's tokenizer, streamed decoding, and the
model's own chat template.

`ChatTemplate` renders a conversation (system / user / assistant turns) with the Jinja template a model
ships in `tokenizer_config.json` (`chat_template`, or a `chat_template.jinja` file), in a sandboxed
Jinja environment as the Hugging Face ecosystem does, and knows which tokens end the assistant's turn
(the eos ids of `generation_config.json`, `config.json` and `tokenizer_config.json`).

Knows `tokenizers`, `jinja2` and a model directory's tokenizer and config files; nothing of peers,
routes or sampling.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from tokenizers import Tokenizer


def load_tokenizer(model_dir: str | Path) -> Tokenizer:
    path = Path(model_dir) / "tokenizer.json"
    if not path.exists():
        raise FileNotFoundError(f"no tokenizer.json in {model_dir}; the client needs the model's tokenizer")
    return Tokenizer.from_file(str(path))


class TextStream:
    """Decodes a growing list of token ids and hands out only the text each new batch added
    (a token may change how the ones before it decode, so the whole reply is decoded each time)."""

    def __init__(self, tokenizer: Tokenizer, on_text=None):
        self.tokenizer, self.on_text = tokenizer, on_text
        self.tokens: list[int] = []
        self.text = ""

    def add(self, tokens: list[int]) -> str:
        self.tokens += tokens
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        piece, self.text = text[len(self.text):], text
        if piece and self.on_text is not None:
            self.on_text(piece)
        return piece


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    return value if isinstance(value, dict) else {}


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json gives it: a string, or {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value if isinstance(value, str) else None


def _ids(value) -> list[int]:
    return [v for v in (value if isinstance(value, list) else [value]) if isinstance(v, int)]


def end_of_turn_ids(model_dir: str | Path, tokenizer: Tokenizer) -> tuple[int, ...]:
    """The tokens that end a reply: every eos id of generation_config.json and config.json, and the
    eos token of tokenizer_config.json (e.g. ChatML's <|im_end|>)."""
    model_dir = Path(model_dir)
    found = _ids(_read_json(model_dir / "generation_config.json").get("eos_token_id"))
    found += _ids(_read_json(model_dir / "config.json").get("eos_token_id"))
    eos = _token_text(_read_json(model_dir / "tokenizer_config.json").get("eos_token"))
    if eos is not None and tokenizer.token_to_id(eos) is not None:
        found.append(tokenizer.token_to_id(eos))
    return tuple(dict.fromkeys(found))


def _template_source(model_dir: Path, config: dict) -> str | None:
    jinja = model_dir / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text()
    source = config.get("chat_template")
    if isinstance(source, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default")
    return source if isinstance(source, str) and source.strip() else None


class TemplateError(ValueError):
    """The model's chat template failed (or refused the conversation, through raise_exception)."""


class ChatTemplate:
    """A model's chat template, compiled once in a sandbox (`ImmutableSandboxedEnvironment`: a template
    cannot reach Python objects or change its arguments), with the helpers templates expect
    (`raise_exception`, `strftime_now`, a `tojson` that keeps non-ASCII text) and the special tokens'
    text (`bos_token`, `eos_token`, ...). `stop_ids`: the tokens that end the assistant's turn."""

    def __init__(self, source: str, special: dict[str, str], stop_ids: tuple[int, ...] = ()):
        from jinja2.exceptions import TemplateError as JinjaError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self.template = env.from_string(source)
        except JinjaError as e:
            raise TemplateError(f"the model's chat template does not compile: {e}") from None
        self.special, self.stop_ids = special, stop_ids

    @classmethod
    def load(cls, model_dir: str | Path, tokenizer: Tokenizer) -> ChatTemplate | None:
        """The template of the model in `model_dir`; None when it has none (a base or code model)."""
        model_dir = Path(model_dir)
        config = _read_json(model_dir / "tokenizer_config.json")
        source = _template_source(model_dir, config)
        if source is None:
            return None
        special = {name: text for name in ("bos_token", "eos_token", "unk_token", "pad_token")
                   if (text := _token_text(config.get(name))) is not None}
        return cls(source, special, end_of_turn_ids(model_dir, tokenizer))

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The conversation as the model saw it in training, ending where the assistant's reply begins."""
        from jinja2.exceptions import TemplateError as JinjaError

        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt, tools=None,
                                        documents=None, **self.special)
        except JinjaError as e:
            raise TemplateError(f"the model's chat template failed: {e}") from None


def _raise(message: str):
    from jinja2.exceptions import TemplateError as JinjaError

    raise JinjaError(message)


def _tojson(value, ensure_ascii: bool = False, indent=None, separators=None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
