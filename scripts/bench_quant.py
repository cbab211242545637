"""The quality and memory cost of `--quant int8` and `--quant nf4` on a model (SmolLM2-135M-Instruct by default),
on this CPU.

For fp32, bf16, bf16+int8, fp32+int8, bf16+nf4 and fp32+nf4 (swarm/bench/quant.py says how each figure is
taken): the bytes of the blocks, held-out loss on the HumanEval canonical solutions (nats/token,
teacher-forced), greedy agreement with bf16 and fp32 (tokens identical before the first divergence; share
of identical positions) over N prompts x T tokens, and CPU ms per token of that greedy generation. Prints a
markdown table; --json PATH saves the report.

    python scripts/bench_quant.py --prompts 20 --new-tokens 64 --json docs/quant_smollm2.json
    python scripts/bench_quant.py --model tiny --prompts 4 --new-tokens 16 --loss-problems 4
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from peer import set_threads  # noqa: E402
from swarm.bench.quant import measure, report_table  # noqa: E402
from swarm.bench.workload import machine  # noqa: E402
from swarm.flags import add_model_flag  # noqa: E402
from swarm.registry import resolve_model  # noqa: E402
from swarm.text import load_tokenizer  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flag(ap)
    ap.add_argument("--prompts", type=int, default=20, help="HumanEval prompts for greedy agreement and speed")
    ap.add_argument("--new-tokens", type=int, default=64, help="greedy tokens per prompt")
    ap.add_argument("--loss-problems", type=int, default=40, help="HumanEval canonical solutions for the loss")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: half the cores)")
    ap.add_argument("--json", metavar="PATH", help="save the report here")
    args = ap.parse_args()
    set_threads(args.threads)
    model_dir = resolve_model(args.model)
    tokenizer = load_tokenizer(model_dir)
    total = args.loss_problems + args.prompts
    with tqdm(total=total, unit="text", file=sys.stderr) as bar:
        report = measure(model_dir, tokenizer, args.prompts, args.new_tokens, args.loss_problems, progress=bar)
    report = dict(model=dict(spec=args.model, dir=str(model_dir)), machine=machine(), **report)
    print(f"{args.model}: {args.prompts} HumanEval prompts x {args.new_tokens} greedy tokens; loss over "
          f"{args.loss_problems} canonical solutions ({report['rows'][0]['loss_tokens']} tokens); "
          f"{report['machine']['torch_threads']} torch thread(s) on {report['machine']['cpu_count']} CPUs")
    print(report_table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
