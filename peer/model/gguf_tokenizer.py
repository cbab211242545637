"""The tokenizer a GGUF describes in its metadata, rebuilt as a `tokenizers` tokenizer.json.

`tokenizer.ggml.model` "gpt2" is byte-level BPE (tokens and merges as stored); how text is split
before the merges follows `tokenizer.ggml.pre` the way llama.cpp reads it (`PRE_TOKENIZERS`: GPT-2's
regex; GPT-2's regex after single digits for SmolLM, StarCoder and kin; Llama 3's and Qwen2's split
regexes). "llama" is SentencePiece BPE: merges rebuilt from the token scores (a pair merges with the
score of the token it makes), byte fallback, "▁" for spaces and before each stretch of text, as llama.cpp. Tokens typed CONTROL become special
added tokens, USER_DEFINED ones plain added tokens, each keeping its id. Anything else: ConfigError.

Also gives `tokenizer_config.json` (chat template, special tokens, whether BOS/EOS are added) and the
end-of-generation ids: EOS, EOT/EOM when the metadata names them, and the chat template's end-of-turn
token. Knows the GGUF tokenizer keys and `tokenizers`; nothing of tensors or the engine.
"""

from __future__ import annotations

import logging

from .config import ConfigError

log = logging.getLogger(__name__)

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_GPT2 = "gpt2"
_DIGITS = "digits"  # single digits first, then GPT-2's regex (llama.cpp: STARCODER, SMOLLM, ...)
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre -> how a byte-level vocabulary splits text (llama.cpp's groups of the same regexes)
PRE_TOKENIZERS = {
    **dict.fromkeys(("gpt2", "mpt", "olmo", "jais", "exaone4"), _GPT2),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"), _DIGITS),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral", "dbrx", "smaug-bpe"), _LLAMA3_REGEX),
    **dict.fromkeys(("qwen2", "stablelm2", "deepseek-r1-qwen", "megrez"), _QWEN2_REGEX),
}
IGNORE_MERGES = (_LLAMA3_REGEX,)  # llama.cpp (and Llama 3's tokenizer.json) take a whole word found in the vocab
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|end_of_turn|>")


def build_tokenizer(meta: dict, vocab_size: int) -> tuple[str, dict, list[int]]:
    """(tokenizer.json text, tokenizer_config dict, end-of-generation ids) of a GGUF's tokenizer metadata."""
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ConfigError("the GGUF has no tokenizer (tokenizer.ggml.tokens)")
    if len(tokens) > vocab_size:
        raise ConfigError(f"the GGUF tokenizer has {len(tokens)} tokens, more than the model's {vocab_size} embeddings")
    types = list(meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
    if len(types) != len(tokens):
        raise ConfigError("tokenizer.ggml.token_type and tokenizer.ggml.tokens differ in length")
    if kind == "gpt2":  # llama.cpp adds BOS by default for Llama 3's kind of vocabulary only
        tok, bos_by_default = _byte_level(meta, tokens)
    elif kind == "llama":
        tok, bos_by_default = _sentencepiece(meta, tokens, types), True
    else:
        raise ConfigError(f"GGUF tokenizer model {kind!r} is not supported (supported: gpt2 byte-level BPE, "
                          "llama SentencePiece BPE)")
    _add_special_tokens(tok, tokens, types)
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", bos_by_default))
    special = {name: _token(meta, tokens, key) for name, key in (("bos_token", "bos_token_id"),
               ("eos_token", "eos_token_id"), ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id"))}
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    _post_processor(tok, meta, special, add_bos, add_eos)
    config = {"add_bos_token": add_bos, "add_eos_token": add_eos, "clean_up_tokenization_spaces": False,
              "tokenizer_class": "PreTrainedTokenizerFast",
              **{name: value for name, value in special.items() if value is not None}}
    template = meta.get("tokenizer.chat_template")
    if template:
        config["chat_template"] = template
    return tok.to_str(), config, end_of_generation_ids(meta, tokens)


def end_of_generation_ids(meta: dict, tokens: list[str]) -> list[int]:
    """EOS, then EOT / EOM, then the chat template's end-of-turn token, each once."""
    ids = [meta.get(f"tokenizer.ggml.{key}") for key in ("eos_token_id", "eot_token_id", "eom_token_id")]
    template = meta.get("tokenizer.chat_template") or ""
    index = {token: i for i, token in reversed(list(enumerate(tokens)))}
    ids += [index.get(marker) for marker in END_OF_TURN if marker in template]
    out = []
    for i in ids:
        if i is not None and 0 <= int(i) < len(tokens) and int(i) not in out:
            out.append(int(i))
    return out


def _token(meta: dict, tokens: list[str], key: str) -> str | None:
    i = meta.get(f"tokenizer.ggml.{key}")
    return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None


def _vocab(tokens: list[str]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        vocab.setdefault(token, i)  # a repeated token keeps its first id, as its text can name only one
    if len(vocab) != len(tokens):
        log.warning("GGUF tokenizer lists %d tokens twice; their later ids cannot be produced", len(tokens) - len(vocab))
    return vocab


def _byte_level(meta: dict, tokens: list[str]):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    pre = meta.get("tokenizer.ggml.pre") or "default"
    if pre == "default":  # files from before llama.cpp wrote the key: GPT-2's split is the usual guess
        log.warning("GGUF has no tokenizer.ggml.pre; splitting text with GPT-2's regex")
    split = PRE_TOKENIZERS.get(pre, _GPT2 if pre == "default" else None)
    if split is None:
        raise ConfigError(f"GGUF pre-tokenizer {pre!r} is not supported (supported: {', '.join(sorted(PRE_TOKENIZERS))})")
    merges = []
    for merge in meta.get("tokenizer.ggml.merges") or []:
        pair = merge.split(" ")
        if len(pair) != 2:
            raise ConfigError(f"GGUF merge {merge!r} is not two tokens")
        merges.append((pair[0], pair[1]))
    if not merges:
        raise ConfigError("the GGUF's byte-level BPE tokenizer has no merges (tokenizer.ggml.merges)")
    tok = Tokenizer(models.BPE(vocab=_vocab(tokens), merges=merges, ignore_merges=split in IGNORE_MERGES))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split in (_GPT2, _DIGITS))
    if split == _DIGITS:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif split == _GPT2:
        tok.pre_tokenizer = byte_level
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), "isolated"), byte_level])
    tok.decoder = decoders.ByteLevel()
    return tok, split == _LLAMA3_REGEX


def _sentencepiece(meta: dict, tokens: list[str], types: list[int]):
    from tokenizers import Tokenizer, decoders, models, normalizers

    scores = meta.get("tokenizer.ggml.scores")
    if not scores or len(scores) != len(tokens):
        raise ConfigError("a SentencePiece GGUF tokenizer needs one score per token (tokenizer.ggml.scores)")
    vocab = _vocab(tokens)
    mergeable = {t for t, i in vocab.items() if types[i] in (NORMAL, USER_DEFINED)}
    found = []  # (score of the merged token, left id, right id, left, right)
    for token in mergeable:
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in mergeable and right in mergeable:
                found.append((-scores[vocab[token]], vocab[left], vocab[right], left, right))
    merges = [(left, right) for *_, left, right in sorted(found)]
    unk = next((tokens[i] for i, t in enumerate(types) if t == UNKNOWN), None)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    # llama.cpp (like sentencepiece) puts a space before every stretch of text that starts the input or follows a
    # special token, whether or not the text starts with one: a normalizer does that, Metaspace would not.
    steps = [normalizers.Prepend("\u2581")] if prefix else []
    tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "\u2581")])
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return tok


def _add_special_tokens(tok, tokens: list[str], types: list[int]) -> None:
    """CONTROL (and UNKNOWN) tokens as special added tokens, USER_DEFINED ones as plain added tokens, ids kept."""
    from tokenizers import AddedToken

    vocab = tok.get_vocab(with_added_tokens=False)
    special = [AddedToken(t, special=True, normalized=False) for i, (t, kind) in enumerate(zip(tokens, types))
               if kind in (CONTROL, UNKNOWN) and vocab.get(t) == i]
    user = [AddedToken(t, special=False, normalized=False) for i, (t, kind) in enumerate(zip(tokens, types))
            if kind == USER_DEFINED and vocab.get(t) == i]
    tok.add_special_tokens(special)
    tok.add_tokens(user)
    if tok.get_vocab_size(with_added_tokens=True) != tok.get_vocab_size(with_added_tokens=False):
        raise ConfigError("the GGUF tokenizer's added tokens do not all have ids in its vocabulary")


def _post_processor(tok, meta: dict, special: dict, add_bos: bool, add_eos: bool) -> None:
    from tokenizers import processors

    pieces, ids = [], {}
    for wanted, name, key in ((add_bos, "bos_token", "bos_token_id"), (add_eos, "eos_token", "eos_token_id")):
        if not wanted:
            continue
        if special[name] is None:
            raise ConfigError(f"the GGUF asks for {name} to be added but names no tokenizer.ggml.{key}")
        pieces.append(special[name])
        ids[special[name]] = int(meta[f"tokenizer.ggml.{key}"])
    if not pieces:
        return
    bos = pieces[:1] if add_bos else []
    eos = pieces[-1:] if add_eos else []
    single = " ".join(bos + ["$A"] + eos)
    pair = " ".join([single] + [b + ":1" for b in bos] + ["$B:1"] + [e + ":1" for e in eos])
    tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=list(ids.items()))
