"""Speculative vs plain decoding over an emulated WAN, side by side, with the simulator's predictions.

For every (profile, number of peers): starts the peers on 127.0.0.1 behind user-space delay proxies
(swarm.bench.wan: one per link, one-way delay + jitter + bandwidth cap), measures the route (RTTs,
compute per block, draft and head costs: `swarm measure`), then runs on HumanEval prompts, interleaved
per prompt so background load hits every mode alike:

  --local plain (the reference; every greedy lossless output is compared with it token for token),
  plain client-mediated, plain push, speculative k = 2/4/8, adaptive, adaptive + pipelined,
  a greedy tree, relaxed acceptance (lossy), and plain push / adaptive at temperature 0.7.

Over long links plain decoding costs a full trip per token, so the slow modes (everything but the
main ones: adaptive and adaptive + pipelined) run on the first --sweep-prompts prompts only; plain
ms/token barely depends on the prompt. Writes JSON and PNG plots: ms/token vs one-way latency,
speedup vs number of peers, tokens per round vs k, measured vs predicted per mode.

The target is --model (SmolLM2-135M-Instruct by default; `--model tiny`: the small bundled pair),
speculating with its own draft unless --draft names one. Prompts go in raw (completions) by default,
with --chat as a chat turn through the model's chat template (`swarm.bench.prompts.chat_turn`); the
token budget is the same fixed count either way.

    python scripts/wan_bench.py                                  # continental, 2 peers, 20 prompts, 128 tokens
    python scripts/wan_bench.py --profiles lan metro continental intercontinental --prompts 3 --sweep-prompts 2
    python scripts/wan_bench.py --peers 2 4 --all-prompts --sweep-prompts 164
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from swarm.bench.measure import Mode, measure  # noqa: E402
from swarm.bench.probe import probe_units  # noqa: E402
from swarm.bench.prompts import load_prompts  # noqa: E402
from swarm.bench.report import format_report, plot_report  # noqa: E402
from swarm.bench.wan.links import PROFILES, load_matrix  # noqa: E402
from swarm.bench.wan.swarm import WanSwarm  # noqa: E402
from swarm.bench.workload import WorkloadError, open_workload  # noqa: E402
from swarm.decode.generate import generate  # noqa: E402
from swarm.decode.sampling import SamplingParams  # noqa: E402
from swarm.decode.speculative import SpecConfig  # noqa: E402
from swarm.decode.target import LocalModel  # noqa: E402
from swarm.flags import add_draft_flag, add_model_flag  # noqa: E402

PETALS = ROOT.parent / "shared" / "anchors" / "petals"
MAIN_MODES = ("spec adaptive", "spec adaptive+pipeline", "spec adaptive (auto pipeline)")  # on every prompt; the rest on --sweep-prompts


def bench_modes(k_max: int, relaxed: float, temperature: float) -> list[Mode]:
    hot = SamplingParams(temperature)
    modes = [
        Mode("plain client-mediated", push=False), Mode("plain push"),
        *[Mode(f"spec k={k}", spec=SpecConfig(k=k, pipeline=False)) for k in (2, 4, 8)],
        Mode("spec adaptive", spec=SpecConfig(k_max=k_max, pipeline=False)),
        Mode("spec adaptive+pipeline", spec=SpecConfig(k_max=k_max, pipeline=True)),
        Mode("spec tree(2) k=4", spec=SpecConfig(k=4, tree_width=2, pipeline=False)),
        Mode(f"spec relaxed({relaxed:g}, lossy)", spec=SpecConfig(k_max=k_max, relaxed=relaxed, pipeline=False)),
        Mode(f"plain push T={temperature:g}", temperature=temperature),
        Mode(f"spec adaptive T={temperature:g}", spec=SpecConfig(k_max=k_max, params=hot, pipeline=False),
             temperature=temperature),
    ]
    if SpecConfig().pipeline is None:  # the default of `swarm generate`: the cost model pipelines when it pays
        modes.insert(7, Mode("spec adaptive (auto pipeline)", spec=SpecConfig(k_max=k_max)))
    return modes


def run_config(args, local: LocalModel, draft: LocalModel, prompts, links, n_peers: int, label: str, bar) -> dict:
    modes = bench_modes(args.k_max, args.relaxed, args.temperature)
    limits = {m.name: args.sweep_prompts for m in modes if m.name not in MAIN_MODES}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as logs, WanSwarm(args.model, n_peers, links, log_dir=logs) as wan:
        model = wan.model(timeout=120.0)
        try:
            rep = measure(model, draft, prompts, args.max_new_tokens, modes, args.reps, progress=bar, limits=limits,
                          probe_every=args.probe_every, links=wan.layout)
        finally:
            model.close()
    delays = {links[i][j].delay_ms for i in range(len(links)) for j in range(len(links)) if i != j}
    rep.update(label=label, peers=n_peers, one_way_ms=links[0][1].delay_ms, uniform=len(delays) == 1,
               seconds=round(time.perf_counter() - t0, 1))
    # the reference, and which lossless greedy outputs differ from it
    ref, local_s, local_n = [], 0.0, 0
    for prompt in prompts:
        r = generate(local, prompt, args.max_new_tokens, stop_at_eos=False)
        ref.append(r.tokens)
        local_s, local_n = local_s + r.seconds, local_n + len(r.tokens)
        bar.update(1)
    rep["entries"].insert(0, dict(quantity="ms_per_token", mode="--local plain", measured=round(1000 * local_s / local_n, 3),
                                  predicted=None, error=None, prompts=len(prompts), tokens=local_n,
                                  speedup_vs_plain_push=None))
    rep["outputs_differing_from_local"] = {
        name: sum(out != ref[i] for i, out in enumerate(outs))
        for name, outs in rep.pop("outputs").items()
        if not any(s in name for s in ("relaxed", "T=")) and "local" not in name}
    return rep


def petals_baseline() -> dict:
    venv = PETALS / "venv" / "bin" / "python"
    stored = []
    if (PETALS / "results.jsonl").exists():
        stored = [json.loads(line) for line in (PETALS / "results.jsonl").read_text().splitlines() if line.strip()]
    if not venv.exists():
        print(f"Petals baseline skipped: no Petals venv at {venv} (see {PETALS / 'RECIPE.md'}); the JSON carries "
              f"its stored results for reference", file=sys.stderr)
        return dict(measured=False, why=f"no Petals venv at {venv}", stored_results=stored)
    return dict(measured=False, why="a Petals venv exists but this script does not drive it yet", stored_results=stored)


def plots(results: list[dict], out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []

    def ms(rep, mode):
        return next((e["measured"] for e in rep["entries"] if e["quantity"] == "ms_per_token" and e["mode"] == mode), None)

    main_modes = ["plain client-mediated", "plain push", "spec k=4", "spec adaptive", "spec adaptive+pipeline"]
    by_peers: dict[int, list[dict]] = {}
    for rep in results:
        by_peers.setdefault(rep["peers"], []).append(rep)
    for peers, reps in by_peers.items():  # ms/token vs one-way latency
        reps = sorted((r for r in reps if r["uniform"]), key=lambda r: r["one_way_ms"])
        if len(reps) < 2:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for mode in main_modes:
            ax.plot([r["one_way_ms"] for r in reps], [ms(r, mode) for r in reps], "o-", label=mode)
        ax.set_xlabel("one-way latency per link (ms)")
        ax.set_ylabel("ms per token")
        ax.set_title(f"{peers} peers, emulated WAN, greedy")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        written.append(str(out_dir / f"wan_latency_{peers}peers.png"))
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    by_label: dict[str, list[dict]] = {}
    for rep in results:
        by_label.setdefault(rep["label"], []).append(rep)
    for label, reps in by_label.items():  # speedup vs number of peers
        reps = sorted(reps, key=lambda r: r["peers"])
        if len(reps) < 2:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for mode in main_modes[2:]:
            ax.plot([r["peers"] for r in reps], [ms(r, "plain push") / ms(r, mode) for r in reps], "o-", label=mode)
        ax.set_xlabel("peers on the chain")
        ax.set_ylabel("speedup over plain push")
        ax.set_title(f"{label}: speedup vs chain length")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        written.append(str(out_dir / f"wan_peers_{label}.png"))
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4.5))  # tokens per round vs k
    for rep in results:
        tpr = {e["mode"]: e["measured"] for e in rep["entries"] if e["quantity"] == "tokens_per_round"}
        ks = [k for k in (2, 4, 8) if f"spec k={k}" in tpr]
        ax.plot(ks, [tpr[f"spec k={k}"] for k in ks], "o-", label=f"{rep['label']}, {rep['peers']} peers")
    ax.set_xlabel("k (drafted tokens per round)")
    ax.set_ylabel("tokens per round")
    ax.set_title("tokens committed per round, greedy")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    written.append(str(out_dir / "wan_tokens_per_round.png"))
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
    for rep in results:  # measured vs predicted per mode
        written.append(str(out_dir / f"wan_{rep['label']}_{rep['peers']}peers.png"))
        plot_report(rep, written[-1], f"{rep['label']}, {rep['peers']} peers: measured vs simulator")
    return written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flag(ap)
    add_draft_flag(ap)
    ap.add_argument("--chat", action="store_true",
                    help="feed each prompt as a chat turn through the model's chat template (default: raw completion)")
    ap.add_argument("--profiles", nargs="+", default=["continental"], choices=sorted(PROFILES))
    ap.add_argument("--matrix", help="a JSON one-way latency matrix (client first) instead of --profiles")
    ap.add_argument("--peers", type=int, nargs="+", default=[2], help="chain lengths (each at most the model's blocks)")
    ap.add_argument("--prompts", type=int, default=20, help="first N HumanEval prompts")
    ap.add_argument("--all-prompts", action="store_true", help="all 164 HumanEval prompts")
    ap.add_argument("--sweep-prompts", type=int, default=5,
                    help="prompts for the slow modes (plain, k sweep, tree, relaxed, temperature)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--relaxed", type=float, default=0.5)
    ap.add_argument("--k-max", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3, help="repetitions of each probe")
    ap.add_argument("--probe-every", type=int, default=2, help="probe the route before every N-th prompt")
    ap.add_argument("--out", default="wan_bench", help="JSON file stem and plot folder [default: ./wan_bench]")
    ap.add_argument("--no-plots", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    try:
        work = open_workload(args.model, args.draft, args.chat)
    except WorkloadError as e:
        raise SystemExit(f"error: {e}") from None
    args.model, args.draft = str(work.model_dir), str(work.draft_dir)
    local, draft = LocalModel.load(args.model), LocalModel.load(args.draft)
    n_blocks = local.head.cfg.num_hidden_layers
    prompts = load_prompts(work.tokenizer, 164 if args.all_prompts else args.prompts, args.max_new_tokens,
                           local.head.cfg.max_position_embeddings, work.template)
    args.sweep_prompts = min(args.sweep_prompts, len(prompts))
    configs = []
    if args.matrix:
        links = load_matrix(args.matrix)
        configs.append((Path(args.matrix).stem, links, len(links) - 1))
    else:
        for name in args.profiles:
            for n in args.peers:
                if n > n_blocks:
                    print(f"skipping {n} peers: the model has only {n_blocks} blocks", file=sys.stderr)
                    continue
                configs.append((name, PROFILES[name].matrix(n), n))
    modes = bench_modes(args.k_max, args.relaxed, args.temperature)
    main_modes = sum(m.name in MAIN_MODES for m in modes)
    runs_per = len(prompts) * (main_modes + 1) + args.sweep_prompts * (len(modes) - main_modes)
    probes = (len(prompts) + args.probe_every - 1) // args.probe_every
    bar = tqdm(total=sum(runs_per + probes * probe_units(n) for _, _, n in configs), desc="wan bench", file=sys.stderr)
    results = []
    for label, links, n in configs:
        bar.set_description(f"{label}, {n} peers")
        rep = run_config(args, local, draft, prompts, links, n, label, bar)
        rep["matrix"] = args.matrix
        results.append(rep)
        print(f"\n== {label}, {n} peers, {len(prompts)} prompts x {args.max_new_tokens} tokens "
              f"({args.sweep_prompts} for the slow modes), {rep['seconds']:.0f} s ==", file=sys.stderr)
        print(format_report(rep), file=sys.stderr)
        print(f"outputs differing from --local: {rep['outputs_differing_from_local']}", file=sys.stderr)
    bar.close()
    out = dict(command=" ".join(sys.argv), model=args.model, draft=args.draft, model_spec=work.model_spec,
               draft_spec=work.draft_spec, prompt_mode=work.prompt_mode, prompts=len(prompts),
               sweep_prompts=args.sweep_prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
               cpu_count=os.cpu_count(), petals=petals_baseline(), results=results)
    Path(f"{args.out}.json").write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}.json", file=sys.stderr)
    if not args.no_plots:
        try:
            folder = Path(args.out)
            folder.mkdir(parents=True, exist_ok=True)
            for path in plots(results, folder):
                print(f"wrote {path}", file=sys.stderr)
        except ImportError:
            print("plots skipped: matplotlib is not installed (pip install -e '.[dev]')", file=sys.stderr)


if __name__ == "__main__":
    main()
