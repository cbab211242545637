"""`swarm measure`: what a swarm costs per token, and what the simulator says it should cost.

Against any swarm the client can reach (a real one, or an emulated WAN from `swarm.bench.wan`):
  1. the route is probed (`swarm.bench.probe`: round trips, per-hop compute, head and draft costs,
     chain compute) before every `probe_every`-th prompt, between the runs;
  2. every mode (plain decoding client-mediated and push; speculative with a fixed k sweep, adaptive,
     optionally pipelined / tree / relaxed) runs on every prompt, interleaved per prompt so
     background load hits every mode alike; each speculative setting keeps its round policy from
     prompt to prompt, as a chat keeps it between turns;
  3. the simulator (`swarm.bench.simulate`) predicts every run from the medians of all probes, and
     `swarm.bench.report` puts measurement and prediction side by side.

Knows the run loop over modes and prompts, `generate`'s interface and the client's `with_config`
view (each mode's push setting). Must not know how a probe measures, how the report is laid out,
or how an emulated WAN is built (it is given its links, if any).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from swarm.bench.probe import EmulatedLinks, merge_probes, probe, probe_units, timings_from
from swarm.bench.report import ModeTotals, format_report, plot_report, report
from swarm.bench.simulate import ChainTimings, plain_ms_per_token, speculative_ms_per_token
from swarm.decode.generate import generate
from swarm.decode.sampling import SamplingParams
from swarm.decode.speculative import SpecConfig
from swarm.decode.target import LocalModel


@dataclass(frozen=True)
class Mode:
    """One way of decoding to measure: plain (spec None) or speculative, over push or client-mediated."""

    name: str
    push: bool = True
    spec: SpecConfig | None = None
    temperature: float = 0.0


def default_modes(ks=(2, 4, 8), adaptive=True, pipeline=False, tree=0, relaxed=None, temperature=0.0,
                  k_max=8) -> list[Mode]:
    params = SamplingParams(temperature)
    suffix = f" T={temperature:g}" if temperature else ""
    modes = [Mode("plain client-mediated" + suffix, False, None, temperature), Mode("plain push" + suffix, True, None, temperature)]
    modes += [Mode(f"spec k={k}" + suffix, True, SpecConfig(k=k, k_max=k_max, pipeline=False, params=params), temperature)
              for k in ks]
    if adaptive:
        modes.append(Mode("spec adaptive" + suffix, True, SpecConfig(k_max=k_max, pipeline=False, params=params),
                          temperature))
    if pipeline:
        modes.append(Mode("spec adaptive+pipeline" + suffix, True, SpecConfig(k_max=k_max, pipeline=True, params=params),
                          temperature))
    if tree and not temperature:
        modes.append(Mode(f"spec tree({tree}) k=4", True, SpecConfig(k=4, tree_width=tree, pipeline=False, params=params)))
    if relaxed:
        modes.append(Mode(f"spec adaptive relaxed({relaxed:g}, lossy)" + suffix, True,
                          SpecConfig(k_max=k_max, relaxed=relaxed, pipeline=False, params=params), temperature))
    return modes


def run_mode(model, draft, mode: Mode, prompt: list[int], new_tokens: int, seed: int = 0, policy=None):
    """One generation in `mode` (plain or speculative), timed by the generation itself. `model` is the
    client configured for the mode's push setting; `policy` a round policy an earlier run left."""
    if mode.spec is None:
        return generate(model, prompt, new_tokens, SamplingParams(mode.temperature), seed=seed, stop_at_eos=False)
    return generate(model, prompt, new_tokens, draft=draft, spec=mode.spec, seed=seed, stop_at_eos=False,
                    policy=policy)


def predict_seconds(mode: Mode, result, prompt_tokens: int, timings: ChainTimings) -> float:
    """The simulator's time for what this run did (its tokens; for speculation, its rounds and drafts)."""
    n = len(result.tokens)
    if mode.spec is None:
        return plain_ms_per_token(timings, n, prompt_tokens, mode.push) * n / 1000
    width = mode.spec.tree_width if mode.spec.params.greedy else 1
    sent = sum(k * width + 1 for k in result.ks)
    draft_steps = sum(k * width for k in result.ks)
    return speculative_ms_per_token(timings, n, prompt_tokens, result.rounds, sent, draft_steps,
                                    result.pipelined_hits, mode.push, result.wasted_rounds) * n / 1000


def _runs(model, draft, prompts, new_tokens, modes, reps, bar, limits, probe_every, links):
    """Probes and runs, interleaved: ([probe, ...], [(mode, result, prompt tokens), ...])."""
    policies = {}  # per speculative setting: the round policy as the last run left it
    probes, done = [], []
    for i, prompt in enumerate(prompts):
        if i % probe_every == 0:
            probes.append(probe(model, draft, prompt, reps, bar, links))
        for mode in modes:  # interleaved, so background load hits every mode alike
            if (mode.spec is not None and draft is None) or i >= limits.get(mode.name, len(prompts)):
                continue
            result = run_mode(model.with_config(push=mode.push), draft, mode, prompt, new_tokens,
                              policy=policies.get(mode.spec))
            if mode.spec is not None:
                policies[mode.spec] = result.policy
            done.append((mode, result, len(prompt)))
            bar.update(1)
    return probes, done


def measure(model, draft: LocalModel | None, prompts: list[list[int]], new_tokens: int, modes: list[Mode],
            reps: int = 5, progress=None, label: str = "", limits: dict[str, int] | None = None,
            probe_every: int = 1, links: EmulatedLinks | None = None) -> dict:
    """Everything `swarm measure` reports, as a dict with `entries` (one per measured quantity).

    The route is probed before every `probe_every`-th prompt, between the runs, and the simulator
    predicts every run from the medians of all probes. `limits` runs a mode on only the first N
    prompts (slow modes over long links). `links`: an emulated WAN's links, pinged between peers."""
    from tqdm import tqdm

    limits = limits or {}
    runs = sum(min(limits.get(mode.name, len(prompts)), len(prompts)) for mode in modes)
    n_probes = (len(prompts) + probe_every - 1) // probe_every
    bar = progress or tqdm(total=n_probes * probe_units(len(model.route)) + runs, desc=label or "measuring",
                           file=sys.stderr, leave=False)
    try:
        probes, done = _runs(model, draft, prompts, new_tokens, modes, reps, bar, limits, probe_every, links)
    finally:
        if progress is None:
            bar.close()
    net = merge_probes(probes)
    timings = timings_from(net)
    totals = {mode.name: ModeTotals() for mode in modes}
    for mode, result, prompt_tokens in done:
        totals[mode.name].add(result, predict_seconds(mode, result, prompt_tokens, timings), mode.spec is not None)
    return report(model.route, timings, net, totals, modes, new_tokens, len(prompts))


# --- `swarm measure` ------------------------------------------------------------------------------
def _open(args, config):
    """(client, emulated WAN or None) for the command's arguments."""
    from swarm.client.swarm_model import SwarmModel

    if not (args.emulate or args.matrix):
        if not args.initial_peers:
            raise SystemExit("swarm measure: give --initial-peers MULTIADDR (or --emulate PROFILE)")
        return SwarmModel(args.model, args.initial_peers, config), None
    from swarm.bench.wan.links import PROFILES, load_matrix
    from swarm.bench.wan.swarm import WanSwarm

    links = load_matrix(args.matrix) if args.matrix else PROFILES[args.emulate]
    n_peers = len(links) - 1 if args.matrix else args.peers
    print(f"starting an emulated WAN ({args.matrix or args.emulate}, {n_peers} peers) ...", file=sys.stderr)
    wan = WanSwarm(args.model, n_peers, links)
    try:
        return wan.model(config), wan
    except BaseException:
        wan.close()
        raise


def run_cli(args, config=None) -> int:
    """`swarm measure` from its parsed arguments (see `swarm.cli`). `config`: the client's
    `ClientConfig` (from the shared client flags); if None, the defaults with `--timeout`."""
    import json

    from peer import set_threads

    from swarm.bench.prompts import load_prompts
    from swarm.client.config import ClientConfig
    from swarm.text import load_tokenizer

    set_threads(args.threads or 1)
    config = config or ClientConfig(timeout=args.timeout)
    draft = LocalModel.load(args.draft) if args.draft and args.speculative else None
    model, wan = _open(args, config)
    try:
        prompts = load_prompts(load_tokenizer(args.model), args.prompts, args.max_new_tokens,
                               model.head.cfg.max_position_embeddings)
        modes = default_modes(args.k, args.adaptive, args.pipeline, args.tree, args.relaxed, args.temperature)
        rep = measure(model, draft, prompts, args.max_new_tokens, modes, args.reps,
                      links=wan.layout if wan is not None else None)
    finally:
        model.close()
        if wan is not None:
            wan.close()
    rep.pop("outputs")
    rep["emulated"] = args.matrix or args.emulate or None
    if args.plot:
        plot_report(rep, args.plot)
    print(json.dumps(rep) if args.json else format_report(rep))
    return 0
