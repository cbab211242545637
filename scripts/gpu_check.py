"""Is this machine's CUDA path right and fast? One run: packages, exactness, a swarm of CUDA peers, the engine.

Run it through `bash scripts/gpu_check.sh` on a machine with an NVIDIA GPU (under 5 minutes on one
H100/H200). It prints one line per check (`ok` / `FAIL`) and a JSON report with `--json PATH`; the exit
code is 0 only when every check passed. `--device cpu --quick` runs the same code small on CPU (the
tests do). The model defaults to the bundled tiny pair (a GPU machine with no network cannot fetch the
default model; give `--model DIR --draft DIR` for another); the engine is timed on random weights of
the Llama-3-8B block shape and of the default model's shape (SmolLM2-135M), bf16 and int8.

    bash scripts/gpu_check.sh                      # cuda, everything
    python scripts/gpu_check.py --device cpu --quick
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from swarm.bench.gpu_check import missing_packages  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (a small dry run of the same checks)")
    ap.add_argument("--quick", action="store_true", help="fewer tokens and repetitions, small engine shapes")
    ap.add_argument("--model", default=None, help="HF model directory [default: the bundled tiny model]")
    ap.add_argument("--draft", default=None, help="its draft [default: the bundled tiny draft]")
    ap.add_argument("--tokens", type=int, default=None, help="tokens per generation [default: 48, quick: 12]")
    ap.add_argument("--skip", nargs="*", default=[], choices=["exactness", "swarm", "engine"])
    ap.add_argument("--json", metavar="PATH", help="write the report here")
    args = ap.parse_args()
    missing = missing_packages()
    if missing:
        print(f"gpu_check: missing packages: {', '.join(missing)} (on a machine without network, carry them: "
              "bash scripts/gpu_wheels.sh here, then carry .gpu/)", file=sys.stderr)
        return 2
    import torch

    from swarm.bench import gpu_check as gc
    from swarm.bundled import TINY_DRAFT, TINY_MODEL
    from swarm.flags import check_device
    from swarm.text import load_tokenizer

    try:
        check_device(args.device)
    except ValueError as e:
        print(f"gpu_check: {e}", file=sys.stderr)
        return 2
    gpu = torch.cuda.get_device_name(torch.device(args.device)) if args.device.startswith("cuda") else "cpu"
    model, draft = args.model or str(TINY_MODEL), args.draft or str(TINY_DRAFT)
    tokens = args.tokens or (12 if args.quick else 48)
    prompt = load_tokenizer(model).encode("def fibonacci(n):").ids
    print(f"gpu_check on {gpu} (torch {torch.__version__}), model {Path(model).name}, {time.strftime('%Y-%m-%d')}",
          flush=True)
    rows, t0 = [], time.perf_counter()
    if "exactness" not in args.skip:
        rows += gc.exactness(model, args.device, prompt, tokens)
    if "swarm" not in args.skip:
        rows += gc.swarm_check(model, draft, args.device, prompt, tokens)
    if "engine" not in args.skip:
        shapes = [("tiny", 2)] if args.quick else [("llama3-8b", 1), ("smollm2-135m", 30)]
        for shape, blocks in shapes:
            for quant in (None, "int8"):
                report = gc.engine(args.device, shape, blocks, quant, 2 if args.quick else 20,
                                   "1,2,16" if args.quick else "1,2,4,8,16,32")
                rows.append(gc.judge_engine(report) | {"report": report})
    print(gc.format_rows(rows), flush=True)
    ok = all(r["ok"] for r in rows)
    print(f"{sum(r['ok'] for r in rows)}/{len(rows)} checks passed in {time.perf_counter() - t0:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(gpu=gpu, torch=torch.__version__, device=args.device,
                                                   date=time.strftime("%Y-%m-%d"), model=model, rows=rows), indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
