"""Many sessions at once through a local swarm: aggregate tokens/s and per-token latency, peers batching
or not (scripts/bench_load.py).

Each peer configuration (batching off, on, or on with another gathering window: `config_flags`) gets its own
peers on 127.0.0.1, started with its flags; all run side by side and take turns (`bench`). For each
decoding mode (plain, speculative; greedy) and each number N of concurrent sessions, N threads of ONE
client process (one `SwarmModel` per configuration, shared as the API server shares it; each
generation opens its own sessions) generate at the same time, each thread `ceil(min_generations / N)`
generations back to back, every one checked token for token against the local run of its prompt.

Measured: aggregate tokens/s (all new tokens / wall time), its ratio to one session and to batching
off, the per-token latency (the time between a session's committed tokens, divided among them;
prefill excluded) at p50 / p99 over every token of the run, how the peers batched (from their summary
lines: engine runs and steps, `--summary-every`), and the CPU each process spent per token (client,
peers): on one machine their sum bounds aggregate tokens/s by the cores.

Knows local peers (`swarm.launch`), the client (`SwarmModel`), decoding (`generate`), the peers'
summary line and processes' CPU times (/proc); must not know flags (the script hands it everything)
or where prompts come from (token ids in).
"""

from __future__ import annotations

import math
import re
import resource
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from swarm.client.swarm_model import SwarmModel
from swarm.decode.generate import generate
from swarm.decode.speculative import SpecConfig
from swarm.decode.target import LocalModel
from swarm.launch import even_spans, start_peers

SESSIONS = (1, 2, 4, 8, 16, 32)
MODES = ("plain", "speculative")
SUMMARY_EVERY = 0.5  # seconds between the peers' summary lines (how the bench reads their batch counters)


def config_flags(name: str) -> list[str]:
    """`swarm peer` flags of a configuration: "off", "on" (the peers' defaults), or "wait=MS" (on, with that
    latency budget for the gathering window; wait=0: none)."""
    if name == "off":
        return ["--no-batching"]
    if name == "on":
        return ["--batching"]
    if name.startswith("wait="):
        ms = float(name.removeprefix("wait="))
        if not 0 <= ms <= 1000:
            raise ValueError(f"wait=MS wants 0..1000 ms, got {name!r}")
        return ["--batching", "--batch-wait-ms", f"{ms:g}"]
    raise ValueError(f"unknown configuration {name!r}: use off, on or wait=MS")


@dataclass
class Workload:
    model_dir: str
    draft_dir: str | None  # None: plain decoding only
    prompts: list[list[int]]
    new_tokens: int = 48
    min_generations: int = 8  # per run: N threads x ceil(this / N) generations each
    peers: int = 2
    references: dict[int, list[int]] = field(default_factory=dict)  # prompt index -> the local greedy tokens


@dataclass
class Gen:
    tokens: list[int]
    gaps: list[float]  # seconds per token between committed batches (the first, after prefill, not counted)
    seconds: float


def one_generation(model, prompt: list[int], n: int, draft, spec) -> Gen:
    stamps: list[tuple[float, int]] = []
    t0 = time.perf_counter()
    res = generate(model, prompt, n, draft=draft, spec=spec, stop_at_eos=False,
                   on_tokens=lambda toks: stamps.append((time.perf_counter(), len(toks))))
    gaps = []
    for (t_prev, _), (t, k) in zip(stamps, stamps[1:]):
        gaps += [(t - t_prev) / k] * k
    return Gen(res.tokens, gaps, time.perf_counter() - t0)


def run_sessions(model, work: Workload, n_sessions: int, mode: str, draft) -> dict:
    """N threads generating at once; what they did, and whether every output was the local one."""
    per_thread = math.ceil(work.min_generations / n_sessions)
    spec = SpecConfig() if mode == "speculative" else None
    results: list[tuple[int, Gen]] = []
    errors: list[BaseException] = []
    lock, start = threading.Lock(), threading.Barrier(n_sessions)

    def worker(i: int) -> None:
        try:
            start.wait()
            for g in range(per_thread):
                index = (i + g * n_sessions) % len(work.prompts)
                gen = one_generation(model, work.prompts[index], work.new_tokens, draft, spec)
                with lock:
                    results.append((index, gen))
        except BaseException as e:  # noqa: BLE001 - reported with the run
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(n_sessions)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} of {n_sessions} sessions failed: {errors[0]!r}") from errors[0]
    tokens = sum(len(g.tokens) for _, g in results)
    gaps = sorted(x for _, g in results for x in g.gaps)
    return dict(sessions=n_sessions, generations=len(results), tokens=tokens, seconds=wall,
                tokens_per_s=tokens / wall, ms_p50=1000 * percentile(gaps, 50), ms_p99=1000 * percentile(gaps, 99),
                session_ms_per_token=1000 * sum(g.seconds / len(g.tokens) for _, g in results) / len(results),
                identical=sum(g.tokens == work.references[i] for i, g in results))


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = (len(sorted_values) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


_BATCHES = re.compile(r"batches: (\d+) for (\d+) steps")


def batch_counters(logs: list[Path]) -> list[tuple[int, int]]:
    """(engine runs, steps) since start, from each peer's latest summary line."""
    out = []
    for path in logs:
        found = _BATCHES.findall(path.read_text(errors="replace")) if path.exists() else []
        out.append(tuple(map(int, found[-1])) if found else (0, 0))
    return out


def references(work: Workload, local: LocalModel) -> None:
    """The local greedy tokens of every prompt: what every run must reproduce."""
    for i, prompt in enumerate(work.prompts):
        work.references[i] = generate(local, prompt, work.new_tokens, stop_at_eos=False).tokens


@dataclass
class Swarm:
    """One configuration's peers, the client on them, and their batch counters as last read."""

    name: str
    peers: list
    model: SwarmModel | None = None
    logs: list[Path] = field(default_factory=list)
    counters: list[tuple[int, int]] = field(default_factory=list)


def start_swarm(work: Workload, name: str, num_blocks: int, sessions: int, log_dir: Path) -> Swarm:
    """A configuration's peers (room for `sessions` sessions of the longest prompt) and a client on them."""
    logs = log_dir / name.replace("=", "")
    logs.mkdir(parents=True, exist_ok=True)
    longest = max(map(len, work.prompts)) + work.new_tokens + 2 * SpecConfig().slack + 2
    room = str(sessions + 8)
    peers = start_peers(work.model_dir, even_spans(num_blocks, work.peers), *config_flags(name), "--max-sessions", room,
                        "--max-sessions-per-client", room, "--cache-tokens", str((sessions + 8) * longest),
                        "--summary-every", str(SUMMARY_EVERY), log_dir=logs)
    swarm = Swarm(name, peers, logs=[logs / f"peer{i}.log" for i in range(len(peers))])
    try:
        swarm.model = SwarmModel(work.model_dir, [p.addr for p in peers])
    except BaseException:
        stop_swarm(swarm)
        raise
    swarm.counters = batch_counters(swarm.logs)
    return swarm


def stop_swarm(swarm: Swarm) -> None:
    if swarm.model is not None:
        swarm.model.close()
    for p in swarm.peers:
        p.stop()


def bench(work: Workload, configs: list[str], modes: list[str], sessions: list[int], log_dir: Path, repeat: int = 1,
          progress: Callable[[dict], None] = lambda row: None) -> list[dict]:
    """One row per (configuration, mode, N): the median of `repeat` runs by tokens/s (every run's outputs are
    checked). Every configuration's peers run side by side, idle but for their turn; the configurations
    take turns run by run (in an order that flips every repetition), and each repetition sweeps every
    mode and N: a shared machine's load then falls on all of them alike."""
    local = LocalModel.load(work.model_dir)
    if not work.references:
        references(work, local)
    draft = LocalModel.load(work.draft_dir) if work.draft_dir and "speculative" in modes else None
    swarms: list[Swarm] = []
    runs: dict[tuple, list[dict]] = {}
    try:
        for name in configs:
            swarms.append(start_swarm(work, name, local.head.cfg.num_hidden_layers, max(sessions), log_dir))
        for rep in range(repeat):  # each repetition a whole sweep: a load that comes and goes hits every row
            for mode in modes:
                for n in sessions:
                    for swarm in swarms if rep % 2 == 0 else swarms[::-1]:
                        cpu0 = cpu_seconds(swarm)
                        row = dict(config=swarm.name, mode=mode, **run_sessions(swarm.model, work, n, mode, draft))
                        row["cpu_ms_per_token"] = [round(1000 * (b - a) / row["tokens"], 3)
                                                   for a, b in zip(cpu0, cpu_seconds(swarm))]
                        time.sleep(1.5 * SUMMARY_EVERY)  # the peers' next summary line
                        after = batch_counters(swarm.logs)
                        row["mean_batch"] = [round((s1 - s0) / max(1, b1 - b0), 2)
                                             for (b0, s0), (b1, s1) in zip(swarm.counters, after)]
                        swarm.counters = after
                        runs.setdefault((swarm.name, mode, n), []).append(row)
                        progress(row)
    finally:
        for swarm in swarms:
            stop_swarm(swarm)
    rows = [median_run(runs[(s.name, mode, n)]) for mode in modes for s in swarms for n in sessions
            if (s.name, mode, n) in runs]
    add_ratios(rows)
    return rows


def cpu_seconds(swarm: Swarm) -> list[float]:
    """CPU seconds used so far by this (client) process and by each of the swarm's peers (Linux /proc;
    NaN where unknown). The client's count includes every configuration's client (all idle but one)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    out = [usage.ru_utime + usage.ru_stime]
    return out + [p.cpu_seconds() for p in swarm.peers]


def median_run(rows: list[dict]) -> dict:
    """The run with the median tokens/s, with every run's tokens/s and the outputs of all runs counted."""
    ranked = sorted(rows, key=lambda r: r["tokens_per_s"])
    row = dict(ranked[(len(ranked) - 1) // 2])
    row.update(runs=[round(r["tokens_per_s"], 1) for r in rows], generations=sum(r["generations"] for r in rows),
               identical=sum(r["identical"] for r in rows))
    return row


def add_ratios(rows: list[dict]) -> None:
    """x_one: tokens/s over one session's (same configuration and mode); x_off: over batching off (same mode, N)."""
    index = {(r["config"], r["mode"], r["sessions"]): r for r in rows}
    for r in rows:
        one = index.get((r["config"], r["mode"], 1))
        off = index.get(("off", r["mode"], r["sessions"]))
        r["x_one"] = r["tokens_per_s"] / one["tokens_per_s"] if one else None
        r["x_off"] = r["tokens_per_s"] / off["tokens_per_s"] if off else None


def table(rows: list[dict]) -> str:
    def num(x, fmt):
        return "-" if x is None else format(x, fmt)

    lines = ["mode        | batching | sessions | x 1 session | x off | tokens/s | ms/token p50 | p99    | "
             "steps/batch (peers) | CPU ms/token (client; peers) | == local",
             "-" * 147]
    for r in rows:
        cpu = r.get("cpu_ms_per_token") or [float("nan")]
        cpu_text = f"{cpu[0]:.2f}; " + " / ".join(f"{c:.2f}" for c in cpu[1:])
        lines.append(f"{r['mode']:<11} | {r['config']:<8} | {r['sessions']:8d} | {num(r['x_one'], '11.2f')} | "
                     f"{num(r['x_off'], '5.2f')} | {r['tokens_per_s']:8.1f} | {r['ms_p50']:12.1f} | "
                     f"{r['ms_p99']:6.1f} | "
                     f"{' / '.join(f'{b:.2f}' for b in r['mean_batch']):<19} | {cpu_text:<28} | "
                     f"{r['identical']}/{r['generations']}")
    return "\n".join(lines)


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for key in sorted({(r["mode"], r["config"]) for r in rows}):
        runs = sorted((r for r in rows if (r["mode"], r["config"]) == key), key=lambda r: r["sessions"])
        style = dict(marker="o", linestyle="-" if key[1] != "off" else "--", label=f"{key[0]}, batching {key[1]}")
        left.plot([r["sessions"] for r in runs], [r["tokens_per_s"] for r in runs], **style)
        right.plot([r["sessions"] for r in runs], [r["ms_p99"] for r in runs], **style)
    for ax, label in ((left, "aggregate tokens/s"), (right, "p99 ms/token (per session)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent sessions (one client process)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    left.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
