"""Lazy loading of a Hugging Face checkpoint directory, one block range (or the head) at a time.

`Checkpoint(path)` also takes a `.gguf` file: it is converted once into a cached directory
(`gguf.convert_gguf`) and that directory is loaded; `source` is what was given, `path` what is read.

Reads `config.json` and the safetensors headers up front; tensors are read one by one with
`safe_open` only when a `BlockRange` or `ModelHead` asks for them, so a peer serving blocks 8-15
never touches the bytes of blocks 0-7. Single-file (`model.safetensors`) and sharded
(`model.safetensors.index.json`) layouts are both understood. `quant="int8"` or `"nf4"` (weight-only
int8, or 4-bit NormalFloat: `quant.py`) quantizes each block's linear weights right after reading that block.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open

from .blocks import LINEARS, BlockRange, ModelHead
from .config import ConfigError, ModelConfig
from .gguf import GGUFError, convert_gguf
from .layers import HALF, rope_inv_freq
from .packed import bfloat16_native, pack_linears
from .quant import QUANTIZERS, check_quant, quantize_linears

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def auto_dtype(device: str = "cpu") -> str:
    """What `--dtype auto` means on `device`: bfloat16 on a CPU with bfloat16 instructions where oneDNN packs it
    (`packed.bfloat16_native`; its rows computed as if alone, `invariant`, so speculation stays exact: SmolLM2's
    blocks ~1.4x faster than float32 at 1 row and at 9), else float32 (a CPU that would emulate bfloat16; a GPU,
    whose half-precision kernels are not made row-invariant here)."""
    return "bfloat16" if str(device).split(":")[0] == "cpu" and bfloat16_native() else "float32"


class CheckpointError(ValueError):
    """The checkpoint directory is incomplete or inconsistent."""


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of float32, bfloat16, float16") from None


class Checkpoint:
    def __init__(self, path: str | Path):
        self.source = self.path = Path(path)
        if self.path.is_file() or (self.path.suffix.lower() == ".gguf" and not self.path.is_dir()):
            self.path = _from_gguf(self.path)
        elif not self.path.is_dir():
            raise CheckpointError(f"model directory {self.path} does not exist")
        self.config = ModelConfig.from_dir(self.path)
        self.weight_map = self._weight_map()
        self.prefix = "model." if "model.norm.weight" in self.weight_map else ""

    @property
    def model_id(self) -> str:
        """Names the model for peers and clients: a hash of config.json and the tensor layout (not the path)."""
        h = hashlib.sha256((self.path / "config.json").read_bytes())
        h.update(json.dumps(sorted(self.weight_map.items())).encode())
        return h.hexdigest()[:16]

    def _weight_map(self) -> dict[str, str]:
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            try:
                return dict(json.loads(index.read_text())["weight_map"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index} is not a valid safetensors index: {e}") from None
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"no *.safetensors weights in {self.path} (PyTorch .bin checkpoints are not supported)")
        weight_map = {}
        for file in files:
            with safe_open(file, framework="pt") as f:  # reads the header only
                weight_map.update({name: file.name for name in f.keys()})
        return weight_map

    def read(self, names: list[str], dtype: torch.dtype, device="cpu") -> dict[str, torch.Tensor]:
        """Read exactly these tensors, grouped by file, converted to dtype on device."""
        by_file: dict[str, list[str]] = {}
        for name in names:
            if name not in self.weight_map:
                raise CheckpointError(f"tensor {name!r} is missing from the checkpoint in {self.path}")
            by_file.setdefault(self.weight_map[name], []).append(name)
        out = {}
        for file, file_names in by_file.items():
            with safe_open(self.path / file, framework="pt") as f:
                for name in file_names:
                    out[name] = f.get_tensor(name).to(device=device, dtype=dtype)
        return out

    def load_blocks(self, start: int, end: int, dtype="float32", device="cpu", quant: str = "none",
                    invariant: bool | None = None) -> BlockRange:
        """Blocks [start, end) in `dtype` on `device`; with quant="int8" or "nf4" their linear weights are quantized
        block by block as they are read (`quant.QUANTIZERS`): no float copy of the range is ever held. nf4 refuses
        (ValueError naming the layer) a model whose linear layers' inputs are not a multiple of 64. Unquantized
        half-precision blocks on a CPU compute every row as if alone where their kernels allow it
        (`BlockRange.make_invariant`; `invariant` True / False: float32 too / not even half precision, a draft's
        choice: its rows need not match anything). Float32 is not by default: its last-bit differences have not
        moved an argmax in any run, and rows as if alone cost it ~10 % (`scripts/bench_bf16_rows.py`)."""
        cfg, dtype, quant = self.config, parse_dtype(dtype), check_quant(quant)
        with torch.device("meta"):
            blocks = BlockRange(cfg, start, end)
            quantize_linears(blocks, blocks.linear_names(), dtype, quant)
        state = {}
        for j, i in enumerate(range(start, end)):
            state.update(self._block_state(i, f"layers.{j}.", dtype, device, quant))
        _check_shapes(blocks, state, self.path)
        blocks.load_state_dict(state, strict=True, assign=True)
        blocks.inv_freq = rope_inv_freq(cfg.rope, cfg.head_dim).to(device)
        if quant == "none":  # float32/bfloat16 on a CPU: oneDNN's packed layout (`packed`), ~2x on verification steps
            pack_linears(blocks, blocks.linear_names())
            if invariant or (invariant is None and dtype in HALF):  # every row as if alone (`make_invariant`)
                blocks.make_invariant()
        return blocks.eval()

    def _block_state(self, i: int, dst: str, dtype: torch.dtype, device, quant: str) -> dict[str, torch.Tensor]:
        """Block i's tensors under the names BlockRange gives them (prefix `dst`): q/k/v and gate/up fused;
        linear weights as codes + scales when quant is "int8" or "nf4" (read in float32 for that, one block at a
        time)."""
        cfg, src = self.config, f"{self.prefix}layers.{i}."
        attn, mlp = ["q_proj", "k_proj", "v_proj"], ["gate_proj", "up_proj"]
        names = [f"{src}{n}.weight" for n in ("input_layernorm", "post_attention_layernorm",
                                               "self_attn.o_proj", "mlp.down_proj")]
        names += [f"{src}self_attn.{p}.weight" for p in attn] + [f"{src}mlp.{p}.weight" for p in mlp]
        if cfg.qkv_bias:
            names += [f"{src}self_attn.{p}.bias" for p in attn]
        if cfg.o_bias:
            names.append(f"{src}self_attn.o_proj.bias")
        if cfg.mlp_bias:
            names += [f"{src}mlp.{p}.bias" for p in ("gate_proj", "up_proj", "down_proj")]
        t = self.read(names, dtype if quant == "none" else torch.float32, device)
        state = {}
        for n in ("input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.o_proj.weight",
                  "mlp.down_proj.weight", "self_attn.o_proj.bias", "mlp.down_proj.bias"):
            if src + n in t:
                state[dst + n] = t.pop(src + n)
        for kind in ("weight", "bias"):
            qkv = [t.pop(f"{src}self_attn.{p}.{kind}", None) for p in attn]
            if qkv[0] is not None:
                state[f"{dst}self_attn.qkv_proj.{kind}"] = torch.cat(qkv)
            gate_up = [t.pop(f"{src}mlp.{p}.{kind}", None) for p in mlp]
            if gate_up[0] is not None:
                state[f"{dst}mlp.gate_up_proj.{kind}"] = torch.cat(gate_up)
        if quant != "none":
            for name in LINEARS:
                state[f"{dst}{name}.weight"], state[f"{dst}{name}.scale"] = \
                    QUANTIZERS[quant](state.pop(f"{dst}{name}.weight"), dtype)
        return {k: v if v.dtype in (torch.int8, torch.uint8) else v.to(dtype) for k, v in state.items()}

    def load_head(self, dtype="float32", device="cpu", quant: str = "none", invariant: bool = True) -> ModelHead:
        """Embeddings, final norm and LM head only (tied embeddings are read once). quant="int8" or "nf4"
        quantizes an untied LM head; a tied one stays in `dtype` (why: `ModelHead`). A half-precision head on a
        CPU computes every row as if alone (`ModelHead.make_invariant`) unless `invariant` is False."""
        cfg, dtype, quant = self.config, parse_dtype(dtype), check_quant(quant)
        embed, norm = f"{self.prefix}embed_tokens.weight", f"{self.prefix}norm.weight"
        names = [embed, norm]
        quantized = quant != "none" and not cfg.tie_word_embeddings
        if not cfg.tie_word_embeddings:
            if "lm_head.weight" not in self.weight_map:
                raise CheckpointError("config says tie_word_embeddings=false but the checkpoint has no lm_head.weight")
            if not quantized:
                names.append("lm_head.weight")
        t = self.read(names, dtype, device)
        with torch.device("meta"):
            head = ModelHead(cfg)
            if quantized:
                quantize_linears(head, ["lm_head"], dtype, quant)
        state = {"embed_tokens.weight": t[embed], "norm.weight": t[norm]}
        if quantized:
            lm_head = self.read(["lm_head.weight"], torch.float32, device)["lm_head.weight"]
            state["lm_head.weight"], state["lm_head.scale"] = QUANTIZERS[quant](lm_head, dtype)
            del lm_head
        else:
            state["lm_head.weight"] = t.get("lm_head.weight", t[embed])
        _check_shapes(head, state, self.path)
        head.load_state_dict(state, strict=True, assign=True)
        if cfg.tie_word_embeddings:
            head.lm_head.weight = head.embed_tokens.weight
        if invariant:
            head.make_invariant()
        return head.eval()


def _from_gguf(path: Path) -> Path:
    """The converted directory of a GGUF file; CheckpointError if it is missing, broken or not a model we run."""
    if not path.is_file():
        raise CheckpointError(f"GGUF file {path} does not exist")
    try:
        return convert_gguf(path)
    except (GGUFError, ConfigError) as e:
        raise CheckpointError(f"cannot load {path}: {e}") from e


def _check_shapes(module: torch.nn.Module, state: dict, path: Path) -> None:
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    for name, shape in expected.items():
        if name not in state:
            raise CheckpointError(f"{path}: no weights found for {name}")
        if tuple(state[name].shape) != shape:
            raise CheckpointError(f"{path}: {name} has shape {tuple(state[name].shape)}, config implies {shape}")


__all__ = ["Checkpoint", "CheckpointError", "ConfigError", "parse_dtype"]
