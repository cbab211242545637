"""Load on a local swarm: N concurrent sessions from one client process, peers batching or not.

Starts 2 peers (--peers) of the model on 127.0.0.1 for each peer configuration (batching off, on with
the peers' default gathering window, or on with another latency budget, `wait=MS`, `wait=0`: no window;
the configurations' peers run side by side and take turns, so a shared machine's load falls on all
alike), and for plain and speculative greedy decoding runs N = 1, 2, 4, 8, 16, 32 sessions at once:
threads of one client process sharing one `SwarmModel`, each generation with its own sessions on the
peers, every output checked token for token against the local run. --repeat R runs each R times
(interleaved) and reports the median.
Reports aggregate tokens/s (and its ratio to one session and to batching off), the per-token latency
at p50 / p99 (the time between a session's committed tokens; prefill excluded), how many steps the
peers' batches held and the CPU each process spent per token (swarm/bench/load.py has the details).
The commands behind docs/load_*.json (README, Performance):

    python scripts/bench_load.py --model tiny --repeat 3 --configs off on wait=1   # ~10 min here
    python scripts/bench_load.py --model smollm2-135m --sessions 1 2 4 8 16 32 --modes plain --new-tokens 32 --min-generations 4 --repeat 3
    (each with --json docs/load_MODEL.json --plot docs/load_MODEL.png)
    python scripts/bench_load.py --model tiny --configs on wait=0 --modes plain   # with and without the window

Exit code 1 if any output differs from the local run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from swarm.bench.load import MODES, SESSIONS, Workload, bench, config_flags, plot, table  # noqa: E402
from swarm.bench.prompts import humaneval_prompts  # noqa: E402
from swarm.bench.workload import WorkloadError, machine, open_workload  # noqa: E402
from swarm.flags import add_draft_flag, add_model_flag  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flag(ap)
    add_draft_flag(ap)
    ap.add_argument("--sessions", type=int, nargs="+", default=list(SESSIONS), help="numbers of concurrent sessions")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--configs", nargs="+", default=["off", "on"], help="peer configurations: off, on, wait=MS")
    ap.add_argument("--peers", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=8, help="first N HumanEval prompts, cycled over the sessions")
    ap.add_argument("--prompt-tokens", type=int, default=64, help="keep each prompt's last N tokens")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--min-generations", type=int, default=8, help="generations per run at least (N=1 runs them "
                    "back to back)")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each (configuration, mode, N), interleaved; the "
                    "table shows the median")
    ap.add_argument("--json", nargs="?", const="-", metavar="FILE", help="the report as JSON (to FILE, or stdout)")
    ap.add_argument("--plot", metavar="PATH", help="tokens/s and p99 ms/token vs sessions (matplotlib)")
    args = ap.parse_args()
    for name in args.configs:
        try:
            config_flags(name)
        except ValueError as e:
            ap.error(str(e))
    if min(args.sessions) < 1 or min(args.new_tokens, args.prompts, args.repeat, args.min_generations) < 1:
        ap.error("--sessions, --new-tokens, --prompts, --repeat and --min-generations want positive numbers")
    torch.set_num_threads(1)  # the client shares 2 cores with the peers
    try:
        work = open_workload(args.model, args.draft)
    except WorkloadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    prompts = [work.encode(t)[-args.prompt_tokens:] for t in humaneval_prompts(args.prompts)]
    load = Workload(str(work.model_dir), str(work.draft_dir), prompts, args.new_tokens, args.min_generations,
                    args.peers)
    load_before = os.getloadavg()  # (the machine may be shared: its load average, beside the numbers)
    total = len(args.configs) * len(args.modes) * len(args.sessions) * args.repeat
    with tqdm(total=total, desc="runs", file=sys.stderr) as bar, tempfile.TemporaryDirectory() as logs:
        def progress(row: dict) -> None:
            bar.set_postfix_str(f"{row['mode']} {row['config']} N={row['sessions']}: {row['tokens_per_s']:.0f} tok/s")
            bar.update()
        rows = bench(load, args.configs, args.modes, args.sessions, Path(logs), args.repeat, progress)
    title = (f"{work.model_spec}: {args.peers} peers on 127.0.0.1, one client process, {args.new_tokens} greedy "
             f"tokens per generation; {machine()['cpu_count']} CPUs, no GPU")
    report = dict(**work.describe(), machine=machine(), peers=args.peers, prompts=args.prompts,
                  prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, min_generations=args.min_generations,
                  repeat=args.repeat, load_average=dict(start=load_before, end=os.getloadavg()),
                  configs={c: config_flags(c) for c in args.configs}, rows=rows)
    if args.plot:
        plot(rows, args.plot, title)
    if args.json == "-":
        print(json.dumps(report))
    else:
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
        print(title)
        print(table(rows))
    differing = sum(r["generations"] - r["identical"] for r in rows)
    if differing:
        print(f"{differing} outputs differ from the local run", file=sys.stderr)
    return 1 if differing else 0


if __name__ == "__main__":
    sys.exit(main())
