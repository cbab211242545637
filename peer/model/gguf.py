"""GGUF files (llama.cpp's format) turned into the Hugging Face directory the engine loads.

`convert_gguf(file)` reads a GGUF of a Llama-family model (`general.architecture` llama, mistral or
qwen2) with the `gguf` package, dequantizes every tensor (F32, F16, BF16, Q4_0/Q4_1/Q5_0/Q5_1/Q8_0,
the K-quants and whatever else gguf's numpy dequantizer knows), undoes llama.cpp's Q/K row order
(llama and mistral files only: llama.cpp permutes those for its interleaved RoPE, qwen2's it leaves
as they are) and writes `config.json`, `model.safetensors` (shards with an index past 2 GB),
`tokenizer.json`, `tokenizer_config.json` and `generation_config.json` (the config from
`gguf_config`, the tokenizer files from `gguf_tokenizer`).

The output is the same bytes on every machine (sorted JSON, no timestamps, no paths), so every peer
that converts the same file gets the same `Checkpoint.model_id`. A file is converted once: into a
temporary directory beside the target, with a marker written last, then renamed into place; a
complete directory with a matching marker is reused, and two processes converting at once both end
up with the one that was renamed first. The file's sha256 (which names the cached directory) is
remembered per path, size and mtime, so a large file is hashed once.

Knows GGUF and Hugging Face files; nothing of blocks, caches, sessions or peers.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from .config import ConfigError, ModelConfig
from .gguf_config import ROPE_FREQS, hf_config
from .gguf_tokenizer import build_tokenizer

CONVERTER_VERSION = 1
MARKER = "specswarm-gguf.json"
SHARD_BYTES = 2 * 1024**3
OUT_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
              "float16": torch.float16, "fp16": torch.float16}
PERMUTED_ARCHS = ("llama", "mistral")  # llama.cpp's LlamaModel (and Mistral through it) permutes Q and K rows
TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
BLOCK_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
               "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
               "ffn_down": "mlp.down_proj"}


class GGUFError(ValueError):
    """The file is missing, not a GGUF, or broken (truncated, inconsistent)."""


def default_out_dir(path: str | Path, digest: str, dtype: str = "bfloat16") -> Path:
    """`$XDG_CACHE_HOME/specswarm/models/<stem>-<12 hex of sha256>` (`-<dtype>` added unless bfloat16)."""
    suffix = "" if dtype == "bfloat16" else f"-{dtype}"
    return _cache_root() / f"{Path(path).stem}-{digest[:12]}{suffix}"


def _cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "specswarm" / "models"


def convert_gguf(path: str | Path, out_dir: Path | None = None, dtype: str = "bfloat16",
                 progress: bool = True) -> Path:
    """Convert a Llama-family GGUF file into a Hugging Face directory (once) and return that directory.

    Raises GGUFError for a missing or broken file, ConfigError for a model or tokenizer we cannot run."""
    path = Path(path)
    if dtype not in OUT_DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of float32, bfloat16, float16")
    dtype = str(OUT_DTYPES[dtype]).removeprefix("torch.")
    if not path.is_file():
        raise GGUFError(f"GGUF file {path} does not exist")
    digest = _sha256(path)
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir(path, digest, dtype)
    marker = {"converter": CONVERTER_VERSION, "dtype": dtype, "sha256": digest, "source": path.name}
    if _marker(out_dir) == marker:
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        _convert_into(path, tmp, OUT_DTYPES[dtype], progress)
        (tmp / MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
        _install(tmp, out_dir, marker)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _install(tmp: Path, out_dir: Path, marker: dict) -> None:
    """Rename the finished conversion into place; another process's identical one may have won."""
    try:
        os.rename(tmp, out_dir)
        return
    except OSError:
        if not out_dir.exists():
            raise
    found = _marker(out_dir)
    if found == marker:
        return  # a concurrent conversion of the same file finished first: same bytes
    if found is None:
        raise GGUFError(f"{out_dir} exists and is not a conversion made by specswarm; remove it or choose another "
                        "out_dir")
    old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.rename(out_dir, old)  # an older conversion (other file, dtype or converter version): replace it
    os.rename(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def _marker(out_dir: Path) -> dict | None:
    try:
        return json.loads((out_dir / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _sha256(path: Path) -> str:
    """The file's sha256, remembered per (path, size, mtime) under the cache so a big file is read once."""
    stat, path = path.stat(), path.resolve()
    key = {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    memo = _cache_root() / ".sha256" / f"{hashlib.sha256(str(path).encode()).hexdigest()[:32]}.json"
    try:
        found = json.loads(memo.read_text())
        if {k: found.get(k) for k in key} == key and len(found.get("sha256", "")) == 64:
            return found["sha256"]
    except (OSError, ValueError, AttributeError):
        pass
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_suffix(f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        tmp.write_text(json.dumps({**key, "sha256": h.hexdigest()}, sort_keys=True))
        os.replace(tmp, memo)
    except OSError:
        pass  # a read-only cache only costs hashing again
    return h.hexdigest()


def read_gguf(path: str | Path):
    """(gguf.GGUFReader, metadata dict) of a file; GGUFError if it cannot be parsed."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
        meta = {key: _value(field) for key, field in reader.fields.items() if not key.startswith("GGUF.")}
    except FileNotFoundError:
        raise GGUFError(f"GGUF file {path} does not exist") from None
    except (ValueError, KeyError, IndexError, TypeError, OverflowError, UnicodeDecodeError) as e:
        raise GGUFError(f"{path} is not a readable GGUF file (truncated or corrupt?): {e}") from None
    return reader, meta


def _value(field):
    from gguf import GGUFValueType

    value = field.contents()
    if field.types and field.types[-1] == GGUFValueType.FLOAT32:  # shortest decimal that is the same float32
        value = [float(str(np.float32(v))) for v in value] if isinstance(value, list) else float(str(np.float32(value)))
    return value


def _convert_into(path: Path, out: Path, dtype: torch.dtype, progress: bool) -> None:
    reader, meta = read_gguf(path)
    shapes = {t.name: tuple(int(d) for d in reversed(t.shape.tolist())) for t in reader.tensors}
    rope_freqs = None
    if ROPE_FREQS in shapes:
        rope_freqs = _dequantize(next(t for t in reader.tensors if t.name == ROPE_FREQS), path)
    try:
        config = hf_config(meta, shapes, rope_freqs)
        ModelConfig.from_hf(config)  # refuse here what the engine would refuse, before writing any tensor
    except ConfigError:
        raise
    except (TypeError, ValueError, ZeroDivisionError) as e:
        raise ConfigError(f"the GGUF metadata does not describe a model we can run: {e}") from None
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    tokenizer_json, tokenizer_config, eos_ids = build_tokenizer(meta, config["vocab_size"])
    config["eos_token_id"] = eos_ids[0] if len(eos_ids) == 1 else eos_ids
    _write_tensors(reader, path, config, out, dtype, progress)
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id") if config.get(k) is not None}
    tokenizer_config["model_max_length"] = config["max_position_embeddings"]
    for name, value in (("config.json", config), ("generation_config.json", generation),
                        ("tokenizer_config.json", tokenizer_config)):
        (out / name).write_text(json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    (out / "tokenizer.json").write_text(tokenizer_json)


def hf_name(name: str) -> str | None:
    """The HF name of a GGUF tensor name (None: not a tensor of the model's weights)."""
    if name in TOP_NAMES:
        return TOP_NAMES[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in BLOCK_NAMES \
            and parts[3] in ("weight", "bias"):
        return f"model.layers.{int(parts[1])}.{BLOCK_NAMES[parts[2]]}.{parts[3]}"
    return None


def unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation: per head, rows (pairs interleaved) back to HF's two halves."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)


def _dequantize(tensor, path: Path) -> np.ndarray:
    from gguf import dequantize

    try:
        out = dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise ConfigError(f"tensor {tensor.name} has type {tensor.tensor_type.name}, which gguf cannot "
                          "dequantize") from None
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    if out.size != math.prod(shape):
        raise GGUFError(f"{path}: tensor {tensor.name} has {out.size} values, its shape says {shape}")
    return np.array(out, dtype=np.float32).reshape(shape)  # a copy: F32 data is a read-only view of the file


def _plan(reader, config: dict) -> list:
    """(HF name, GGUF tensor) of every weight, checked complete; ConfigError for a tensor we have no place for."""
    plan, n_layers = [], config["num_hidden_layers"]
    for tensor in reader.tensors:
        name = hf_name(tensor.name)
        if name is None and tensor.name == ROPE_FREQS:
            continue
        if name is None or (name.startswith("model.layers.") and int(name.split(".")[2]) >= n_layers):
            raise ConfigError(f"GGUF tensor {tensor.name!r} has no place in a {config['model_type']} model with "
                              f"{n_layers} layers (another architecture?)")
        plan.append((name, tensor))
    names = {name for name, _ in plan}
    needed = ["model.embed_tokens.weight", "model.norm.weight"] + \
        [f"model.layers.{i}.{part}.weight" for i in range(n_layers) for part in BLOCK_NAMES.values()]
    missing = [name for name in needed if name not in names]
    if missing:
        raise ConfigError(f"the GGUF lacks {len(missing)} weight tensors of the model, e.g. {missing[0]}")
    return plan


def _write_tensors(reader, path: Path, config: dict, out: Path, dtype: torch.dtype, progress: bool) -> None:
    from tqdm import tqdm

    plan = _plan(reader, config)
    item = torch.empty((), dtype=dtype).element_size()
    shards, size = [[]], 0
    for name, tensor in plan:
        nbytes = int(tensor.n_elements) * item
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, tensor))
        size += nbytes
    files = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    permute = config["model_type"] in PERMUTED_ARCHS
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    bar = tqdm(total=len(plan), desc=f"converting {path.name}", unit="tensor", disable=not progress)
    weight_map = {}
    for file, shard in zip(files, shards):
        tensors = {}
        for name, tensor in shard:
            array = _dequantize(tensor, path)
            proj = name.split(".")[-2]
            if permute and proj in heads:
                array = unpermute(array, heads[proj])
            tensors[name] = torch.from_numpy(array).to(dtype).contiguous()
            weight_map[name] = file
            bar.update()
        save_file(tensors, out / file, metadata={"format": "pt"})
        os.chmod(out / file, 0o644)  # safetensors writes 0600; a shared cache is read by other users' peers
        del tensors
    bar.close()
    if len(files) > 1:
        total = sum(int(t.n_elements) * item for _, t in plan)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
