"""Text in and out of token ids for the face (CLI, chat): the model's tokenizer and streamed decoding.

Knows `tokenizers` and a model directory's `tokenizer.json`; nothing of peers, routes or sampling.
"""

from __future__ import annotations

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
