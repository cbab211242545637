"""Speculative vs plain decoding over an emulated WAN, side by side, with the simulator's predictions
and, when its venv is here, Petals 2.2 on the same model, links, prompts and token budget.

For every (profile, number of peers), or a --matrix of links: starts the peers on 127.0.0.1 behind
user-space delay proxies (swarm.bench.wan: one per link, one-way delay + jitter + bandwidth cap; a
link the matrix gives no jitter or bandwidth is said, one line per missing field, with the value
used), measures the route (RTTs, compute per block, draft and head costs: `swarm measure`), then runs
on the prompts, interleaved per prompt so background load hits every mode alike:

  --local plain (the reference; every greedy lossless output is compared with it token for token),
  plain client-mediated, plain push, speculative k = 2/4/8, adaptive, adaptive + pipelined,
  a greedy tree, relaxed acceptance (lossy), and plain push / adaptive at temperature 0.7,
  then Petals 2.2 (swarm.bench.petals): its own bootstrap and servers with our block split, each
  behind a delay proxy with the client's link, its client on the same prompts (as our token ids).

Every mode runs on the same prompts with the same --max-new-tokens (a mode that ran on fewer prompts
once inverted the ranking of two modes): to save time, lower --max-new-tokens or --prompts, for all.
Without a Petals venv (--petals-venv PATH, else $PETALS_ANCHOR/venv, else ../shared/anchors/petals/venv)
the Petals row says "not installed". Writes JSON and PNG plots: ms/token vs one-way latency, speedup
vs number of peers, tokens per round vs k, measured vs predicted per mode.

The target is --model (SmolLM2-135M-Instruct by default; `--model tiny`: the small bundled pair),
speculating with its own draft unless --draft names one. Prompts are the first --prompts HumanEval
prompts, or of --prompt-file (JSON lines with a "prompt" field, as HumanEval.jsonl); they go in raw
(completions) by default, with --chat as a chat turn through the model's chat template
(`swarm.bench.prompts.chat_turn`); the token budget is the same fixed count either way.

    python scripts/wan_bench.py                                  # continental, 2 peers, 20 prompts, 128 tokens
    python scripts/wan_bench.py --model tiny --prompts 2 --max-new-tokens 16      # a quick check
    python scripts/wan_bench.py --profiles lan metro continental intercontinental --prompts 3 --max-new-tokens 64
    python scripts/wan_bench.py --matrix links.json --prompt-file my_prompts.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from swarm.bench.measure import Mode, measure  # noqa: E402
from swarm.bench.petals import find_venv, installed, run_petals  # noqa: E402
from swarm.bench.probe import probe_units  # noqa: E402
from swarm.bench.prompts import PromptFileError, load_prompt_file, load_prompts  # noqa: E402
from swarm.bench.report import format_report, plot_report  # noqa: E402
from swarm.bench.simulate import ChainTimings  # noqa: E402
from swarm.bench.wan.links import PROFILES, load_matrix  # noqa: E402
from swarm.bench.wan.swarm import WanSwarm  # noqa: E402
from swarm.bench.workload import WorkloadError, open_workload  # noqa: E402
from swarm.decode.drafter import draft_weights, load_draft  # noqa: E402
from swarm.decode.generate import generate  # noqa: E402
from swarm.decode.sampling import SamplingParams  # noqa: E402
from swarm.decode.speculative import SpecConfig  # noqa: E402
from swarm.decode.target import LocalModel  # noqa: E402
from swarm.flags import add_draft_flag, add_model_flag  # noqa: E402
from peer.model.checkpoint import auto_dtype  # noqa: E402

REPLACED = {  # flags that no longer make sense: what replaced them
    "--sweep-prompts": "every mode now runs on the same prompts (--prompts N or --prompt-file); to save time, "
                       "lower --max-new-tokens (or --prompts) for all modes",
}


MODE_KEYS = {  # --modes: short names for the modes (the default mode is "auto")
    "mediated": "plain client-mediated", "push": "plain push", "k2": "spec k=2", "k4": "spec k=4", "k8": "spec k=8",
    "adaptive": "spec adaptive", "pipeline": "spec adaptive+pipeline", "auto": "spec adaptive (auto pipeline)",
    "tree": "spec tree(2) k=4", "relaxed": "spec relaxed", "push-hot": "plain push T=", "spec-hot": "spec adaptive T=",
    "auto2": "spec adaptive (auto pipeline, 1 ahead)",  # only when named: the default's pipeline, one round shallower
    "fullvocab": "spec adaptive (auto pipeline, whole draft vocabulary)",  # only when named: --draft-vocab 0
    "nomemory": "spec adaptive (auto pipeline, no n-gram memory)",  # only when named: --no-ngram-memory
    "noprefeed": "spec adaptive (auto pipeline, no prefeed)",  # only when named: drafts in flight not prefed
    "ahead": "spec adaptive (auto pipeline, drafting ahead)",  # only when named: anticipation in flight
    "autotree": "spec adaptive (auto pipeline, trees up to 3)",  # only when named: greedy model trees allowed
    "branch": "spec adaptive (auto pipeline, n-gram branches)",  # only when named: the index's runner-up rides along
    "tree-hot": "spec adaptive tree(3) T=",  # only when named: sampling, trees allowed (--tree 3), adaptive k
}


def bench_modes(k_max: int, relaxed: float, temperature: float, keys: list[str] | None = None) -> list[Mode]:
    """The modes to measure, in order: all of them, or those `keys` (of MODE_KEYS) name."""
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
    if keys is None:
        return modes
    if SpecConfig().pipeline is None:
        modes.insert(8, Mode(MODE_KEYS["auto2"], spec=SpecConfig(k_max=k_max, pipeline_depth=2)))
        modes.insert(9, Mode(MODE_KEYS["fullvocab"], spec=SpecConfig(k_max=k_max, draft_vocab=None)))
        modes.insert(10, Mode(MODE_KEYS["nomemory"], spec=SpecConfig(k_max=k_max, ngram_memory=False)))
        modes.insert(11, Mode(MODE_KEYS["noprefeed"], spec=SpecConfig(k_max=k_max, prefeed=False)))
        modes.insert(12, Mode(MODE_KEYS["ahead"], spec=SpecConfig(k_max=k_max, anticipate=True)))
        modes.insert(13, Mode(MODE_KEYS["autotree"], spec=SpecConfig(k_max=k_max, tree_width=3)))
        modes.insert(14, Mode(MODE_KEYS["branch"], spec=SpecConfig(k_max=k_max, ngram_branch=True)))
    modes.append(Mode(f"spec adaptive tree(3) T={temperature:g}", temperature=temperature,
                      spec=SpecConfig(k_max=k_max, tree_width=3, params=hot, pipeline=False)))
    wanted = [MODE_KEYS[k] for k in keys]
    return [m for m in modes if any(m.name == w or (w.endswith(("=", "relaxed")) and m.name.startswith(w))
                                    for w in wanted)]


def same_workload(rep: dict) -> bool:
    """Did every measured mode (Petals' row included) run on the same prompts and tokens? Says so if not."""
    rows = [e for e in rep["entries"] if e["quantity"] == "ms_per_token" and e.get("measured") is not None]
    shapes = {(e["prompts"], e["tokens"]) for e in rows}
    if len(shapes) > 1:
        print("WARNING: the modes did not all run on the same prompts and tokens: "
              + ", ".join(f"{e['mode']} {e['prompts']}x{e['tokens']}" for e in rows), file=sys.stderr)
    return len(shapes) <= 1


def _local_reference(local: LocalModel, prompts, max_new_tokens: int, bar) -> tuple[list[list[int]], dict]:
    """Every prompt through the whole model here: the tokens every lossless greedy mode must equal, and
    the `--local plain` row."""
    ref, seconds, tokens = [], 0.0, 0
    for prompt in prompts:
        r = generate(local, prompt, max_new_tokens, stop_at_eos=False)
        ref.append(r.tokens)
        seconds, tokens = seconds + r.seconds, tokens + len(r.tokens)
        bar.update(1)
    return ref, dict(quantity="ms_per_token", mode="--local plain", measured=round(1000 * seconds / tokens, 3),
                     predicted=None, error=None, prompts=len(prompts), tokens=tokens, speedup_vs_plain_push=None)


def run_config(args, local: LocalModel, draft: LocalModel, prompts, links, n_peers: int, label: str, bar) -> dict:
    """One configuration: our modes on the emulated WAN, the local reference, then Petals' row."""
    modes = bench_modes(args.k_max, args.relaxed, args.temperature, args.modes)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as logs, WanSwarm(args.model, n_peers, links, log_dir=logs,
                                                         dtype=args.dtype) as wan:
        spans = wan.spans
        model = wan.model(timeout=120.0, verify_at_peer=args.verify_at_peer)
        try:  # every mode on every prompt, with the same token budget: no per-mode limits
            rep = measure(model, draft, prompts, args.max_new_tokens, modes, args.reps, progress=bar,
                          probe_every=args.probe_every, links=wan.layout)
        finally:
            model.close()
    delays = {links[i][j].delay_ms for i in range(len(links)) for j in range(len(links)) if i != j}
    nominal = ChainTimings.from_links(links, [])  # the simulator's trips from the links alone, beside the probed
    rep.update(label=label, peers=n_peers, one_way_ms=links[0][1].delay_ms, uniform=len(delays) == 1,
               links=[[asdict(link) for link in row] for row in links],
               links_trip_ms=dict(push=round(nominal.trip(True), 3), client_mediated=round(nominal.trip(False), 3)))
    ref, local_row = _local_reference(local, prompts, args.max_new_tokens, bar)
    rep["entries"].insert(0, local_row)
    rep["outputs_differing_from_local"] = {
        name: sum(out != ref[i] for i, out in enumerate(outs))
        for name, outs in rep.pop("outputs").items()
        if not any(s in name for s in ("relaxed", "T=")) and "local" not in name}
    if not args.no_petals:
        bar.set_description(f"{label}, {n_peers} peers: Petals")
        row = run_petals(args.petals_venv, args.model, spans, links, prompts, args.max_new_tokens, ref, dtype=args.dtype)
        plain = next((e["measured"] for e in rep["entries"] if e.get("mode") == "plain push"), None)
        row["speedup_vs_plain_push"] = round(plain / row["measured"], 3) if plain and row["measured"] else None
        at = next((i + 1 for i, e in enumerate(rep["entries"]) if e.get("mode") == "plain client-mediated"), 1)
        rep["entries"].insert(at, row)  # beside our client-mediated plain decoding, which it does
        if "outputs_differing_from_local" in row:
            rep["outputs_differing_from_local"][row["mode"]] = row["outputs_differing_from_local"]
    rep["same_workload"] = same_workload(rep)
    rep["seconds"] = round(time.perf_counter() - t0, 1)
    return rep


DEFAULT_MODE = MODE_KEYS["auto"]  # what `swarm generate` does through a swarm


def plots(results: list[dict], out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []

    def ms(rep, mode):
        return next((e["measured"] for e in rep["entries"] if e["quantity"] == "ms_per_token" and e["mode"] == mode), None)

    main_modes = [m for m in ("plain client-mediated", "plain push", "spec k=2", "spec k=4", "spec k=8", "spec tree(2) k=4",
                              "spec adaptive", "spec adaptive+pipeline", DEFAULT_MODE)
                  if any(ms(r, m) is not None for r in results)]  # the modes these runs measured
    by_peers: dict[int, list[dict]] = {}
    for rep in results:
        by_peers.setdefault(rep["peers"], []).append(rep)
    for peers, reps in by_peers.items():  # ms/token vs one-way latency
        reps = sorted((r for r in reps if r["uniform"]), key=lambda r: r["one_way_ms"])
        if len(reps) < 2:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for mode in main_modes:
            default = mode == DEFAULT_MODE
            ax.plot([r["one_way_ms"] for r in reps], [ms(r, mode) for r in reps], "o-", linewidth=3 if default else 1.5,
                    label=f"{mode} (the default)" if default else mode)
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


def mode_keys(text: str) -> list[str]:
    keys = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in keys if k not in MODE_KEYS]
    if unknown or not keys:
        raise argparse.ArgumentTypeError(f"unknown mode {', '.join(unknown) or '(none)'}; choose from {', '.join(MODE_KEYS)}")
    return keys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flag(ap)
    add_draft_flag(ap)
    ap.add_argument("--chat", action="store_true",
                    help="feed each prompt as a chat turn through the model's chat template (default: raw completion)")
    ap.add_argument("--profiles", nargs="+", default=["continental"], choices=sorted(PROFILES))
    ap.add_argument("--matrix", help="a JSON matrix of one-way links (client first) instead of --profiles: each "
                    "link a delay in ms, or {delay_ms, jitter_ms, mbit_s}; missing fields are reported")
    ap.add_argument("--peers", type=int, nargs="+", default=[2], help="chain lengths (each at most the model's blocks)")
    ap.add_argument("--prompts", type=int, default=20, help="the first N prompts, for every mode [default: 20]")
    ap.add_argument("--all-prompts", action="store_true", help="every prompt (all 164 of HumanEval, or of --prompt-file)")
    ap.add_argument("--prompt-file", metavar="FILE.jsonl",
                    help="prompts from a JSON-lines file (a \"prompt\" field a line, as HumanEval.jsonl[.gz]) "
                    "instead of HumanEval's")
    ap.add_argument("--max-new-tokens", type=int, default=128, help="tokens every mode generates per prompt")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="weights and activations of the peers, the client's head, the --local reference and Petals' "
                    "servers and client: every row alike (the draft has --draft-dtype); auto as `swarm`'s (bfloat16 on a CPU with "
                    "bfloat16 instructions, else float32) [default: auto]")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--relaxed", type=float, default=0.5)
    ap.add_argument("--k-max", type=int, default=8)
    ap.add_argument("--modes", type=mode_keys, metavar="KEY,KEY", help="measure only these modes (plus --local "
                    f"and Petals), comma-separated, of: {', '.join(MODE_KEYS)} [default: all]")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of each probe")
    ap.add_argument("--probe-every", type=int, default=None,
                    help="probe the route before every N-th prompt (and after the last) [default: 2; 1 for fewer "
                    "than 6 prompts, so that a short run still has 3 probes or more]")
    ap.add_argument("--petals-venv", metavar="PATH", help="a Petals 2.2 venv to run beside ours [default: "
                    "$PETALS_ANCHOR/venv if set, else ../shared/anchors/petals/venv if it exists]")
    ap.add_argument("--no-petals", action="store_true", help="no Petals row, even with its venv here")
    ap.add_argument("--out", default="wan_bench", help="JSON file stem and plot folder [default: ./wan_bench]")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--verify-at-peer", action=argparse.BooleanOptionalAction, default=None,
                    help="the last peer verifies speculative rounds and returns verdicts, not hidden states (README, "
                    "'Verification at the last peer') [default: auto, as `swarm generate`]")
    argv = sys.argv[1:] if argv is None else argv
    for flag, instead in REPLACED.items():
        if any(a == flag or a.startswith(flag + "=") for a in argv):
            raise SystemExit(f"wan_bench.py: {flag} is gone: {instead}")
    args = ap.parse_args(argv)
    if min(args.prompts, args.max_new_tokens, args.probe_every or 1) < 1:
        raise SystemExit("wan_bench.py: --prompts, --max-new-tokens and --probe-every must be at least 1")
    args.petals_venv = find_venv(args.petals_venv, ROOT)
    if args.dtype == "auto":
        args.dtype = auto_dtype("cpu")
    return args


def configurations(args, n_blocks: int) -> list[tuple[str, list, int]]:
    """(label, links, peers) for every run: the matrix's, or every profile x number of peers."""
    if args.matrix:
        try:
            links = load_matrix(args.matrix, warn=lambda line: print(f"note: {line}", file=sys.stderr))
        except (OSError, ValueError) as e:
            raise SystemExit(f"wan_bench.py: --matrix: {e}") from None
        if len(links) - 1 > n_blocks:
            raise SystemExit(f"wan_bench.py: --matrix has {len(links) - 1} peers; the model has only {n_blocks} blocks")
        return [(Path(args.matrix).stem, links, len(links) - 1)]
    configs = []
    for name in args.profiles:
        for n in args.peers:
            if n > n_blocks:
                print(f"skipping {n} peers: the model has only {n_blocks} blocks", file=sys.stderr)
                continue
            configs.append((name, PROFILES[name].matrix(n), n))
    return configs


def main() -> None:
    args = parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    try:
        work = open_workload(args.model, args.draft, args.chat)
        texts = load_prompt_file(args.prompt_file) if args.prompt_file else None
    except (WorkloadError, PromptFileError) as e:
        raise SystemExit(f"error: {e}") from None
    args.model, args.draft = str(work.model_dir), str(work.draft_dir)
    local = LocalModel.load(args.model, args.dtype)
    draft = load_draft(args.draft, "cpu", args.draft_dtype, args.draft_quant)
    n_blocks = local.head.cfg.num_hidden_layers
    prompts = load_prompts(work.tokenizer, None if args.all_prompts else args.prompts, args.max_new_tokens,
                           local.head.cfg.max_position_embeddings, work.template, texts)
    configs = configurations(args, n_blocks)
    if args.probe_every is None:  # one probe under a load burst must not set a short run's predictions
        args.probe_every = 1 if len(prompts) < 6 else 2
    modes = bench_modes(args.k_max, args.relaxed, args.temperature, args.modes)
    probes = (len(prompts) + args.probe_every - 1) // args.probe_every + 1
    bar = tqdm(total=sum(len(prompts) * (len(modes) + 1) + probes * probe_units(n) for _, _, n in configs),
               desc="wan bench", file=sys.stderr)
    results = []
    for label, links, n in configs:
        bar.set_description(f"{label}, {n} peers")
        rep = run_config(args, local, draft, prompts, links, n, label, bar)
        rep["matrix"] = args.matrix
        results.append(rep)
        print(f"\n== {label}, {n} peers, {len(prompts)} prompts x {args.max_new_tokens} tokens for every mode, "
              f"{rep['seconds']:.0f} s ==", file=sys.stderr)
        print(format_report(rep), file=sys.stderr)
        print(f"outputs differing from --local: {rep['outputs_differing_from_local']}", file=sys.stderr)
    bar.close()
    out = dict(command=" ".join(sys.argv), model=args.model, draft=args.draft, model_spec=work.model_spec,
               dtype=args.dtype, draft_weights="/".join(draft_weights("cpu", args.draft_dtype, args.draft_quant)[::-1]),
               draft_spec=work.draft_spec, prompt_mode=work.prompt_mode, prompt_source=args.prompt_file or "HumanEval",
               prompts=len(prompts), max_new_tokens=args.max_new_tokens, temperature=args.temperature,
               cpu_count=os.cpu_count(), petals=dict(venv=str(args.petals_venv), installed=installed(args.petals_venv),
                                                     run=not args.no_petals), results=results)
    Path(f"{args.out}.json").parent.mkdir(parents=True, exist_ok=True)
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
