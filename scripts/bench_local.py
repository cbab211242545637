"""Local greedy decoding speed: this project's engine against `transformers` on the same model, prompts
and machine, in one run.

Both load the same converted directory in the same dtype and thread count, generate the same number of
greedy tokens (no early stop) for each prompt, in alternating order (ours first on even prompts,
transformers first on odd ones), after one warm-up generation each. Reported: tokens per second over
the whole generation (prefill included) and over decoding only (time after the first new token), their
ratio, and how many outputs are token-for-token identical.

    python scripts/bench_local.py                              # SmolLM2-135M-Instruct, 8 prompts x 128 tokens
    python scripts/bench_local.py --model tiny --prompts 4 --json

Needs `transformers` (the test extra: `scripts/venv.sh` with SPECSWARM_EXTRAS=test, as `scripts/test.sh`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from swarm.bench.prompts import humaneval_prompts  # noqa: E402
from swarm.bench.workload import WorkloadError, machine, open_workload  # noqa: E402
from swarm.decode.generate import generate  # noqa: E402
from swarm.decode.target import LocalModel  # noqa: E402
from swarm.flags import add_model_flag  # noqa: E402


def ours_run(model: LocalModel, prompt: list[int], n: int) -> tuple[list[int], float, float]:
    """Tokens, seconds in all, seconds to the first new token."""
    first = []
    t0 = time.perf_counter()
    res = generate(model, prompt, n, stop_at_eos=False,
                   on_tokens=lambda toks: first or first.append(time.perf_counter()))
    total = time.perf_counter() - t0
    return res.tokens, total, (first[0] - t0) if first else total


def hf_run(model, prompt: list[int], n: int) -> tuple[list[int], float, float]:
    from transformers import StoppingCriteria, StoppingCriteriaList

    first = []

    class FirstToken(StoppingCriteria):  # called after every new token: note when the first one came
        def __call__(self, input_ids, scores, **kwargs):
            if not first:
                first.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    ids = torch.tensor([prompt])
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                             min_new_tokens=n, eos_token_id=None, pad_token_id=0,
                             stopping_criteria=StoppingCriteriaList([FirstToken()]))
    total = time.perf_counter() - t0
    return out[0, len(prompt):].tolist(), total, (first[0] - t0) if first else total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flag(ap)
    ap.add_argument("--prompts", type=int, default=8, help="first N HumanEval prompts (raw)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=2, help="torch threads, for both")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    try:
        import transformers
    except ImportError:
        print("error: bench_local.py needs transformers (SPECSWARM_EXTRAS=test bash scripts/venv.sh)", file=sys.stderr)
        return 1
    try:
        work = open_workload(args.model)
    except WorkloadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    dtype = getattr(torch, args.dtype)
    ours = LocalModel.load(work.model_dir, dtype=args.dtype)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(work.model_dir), dtype=dtype).eval()
    prompts = [work.encode(t) for t in humaneval_prompts(args.prompts)]
    n = args.max_new_tokens
    ours_run(ours, prompts[0], 8), hf_run(hf, prompts[0], 8)  # warm-up: first-call allocations, kernel choice
    totals = {name: dict(tokens=0, seconds=0.0, decode_seconds=0.0) for name in ("ours", "transformers")}
    identical = 0
    for i, prompt in enumerate(tqdm(prompts, desc="prompts (ours and transformers)", file=sys.stderr)):
        order = [("ours", ours_run, ours), ("transformers", hf_run, hf)]
        got = {}
        for name, run, model in (order if i % 2 == 0 else order[::-1]):
            toks, total, to_first = run(model, prompt, n)
            got[name] = toks
            t = totals[name]
            t["tokens"] += len(toks)
            t["seconds"] += total
            t["decode_seconds"] += total - to_first
        identical += got["ours"] == got["transformers"]
    for t in totals.values():
        t["tokens_per_s"] = t["tokens"] / t["seconds"]
        t["decode_tokens_per_s"] = (t["tokens"] - len(prompts)) / t["decode_seconds"]
    report = dict(**work.describe(), machine=machine(), dtype=args.dtype, prompts=len(prompts), new_tokens=n,
                  transformers_version=transformers.__version__, ours=totals["ours"], transformers=totals["transformers"],
                  ratio=totals["ours"]["tokens_per_s"] / totals["transformers"]["tokens_per_s"],
                  decode_ratio=totals["ours"]["decode_tokens_per_s"] / totals["transformers"]["decode_tokens_per_s"],
                  identical=identical)
    if args.json:
        print(json.dumps(report))
        return 0
    m = report["machine"]
    print(f"{work.model_spec} ({work.model_dir.name}), {args.dtype}, {len(prompts)} HumanEval prompts x {n} greedy "
          f"tokens; {m['processor']}, {m['cpu_count']} CPUs, torch {m['torch']} on {m['torch_threads']} threads")
    print("engine       | tokens/s (all) | tokens/s (decode)")
    for name in ("ours", "transformers"):
        t = totals[name]
        print(f"{name:<12} | {t['tokens_per_s']:14.1f} | {t['decode_tokens_per_s']:17.1f}")
    print(f"ours / transformers: {report['ratio']:.2f}x (decode {report['decode_ratio']:.2f}x); "
          f"identical outputs {identical}/{len(prompts)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
