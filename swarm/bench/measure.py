"""`swarm measure`: what a swarm costs per token, and what the simulator says it should cost.

Against any swarm the client can reach (a real one, or an emulated WAN from `swarm.bench.wan`):
  1. the route is probed (`swarm.bench.probe`: round trips, per-hop compute, head and draft costs,
     chain compute) before every `probe_every`-th prompt and after the last, between the runs;
  2. every mode (plain decoding client-mediated and push; speculative with a fixed k sweep, adaptive,
     optionally pipelined / tree / relaxed) runs on every prompt, interleaved per prompt so
     background load hits every mode alike; each speculative setting keeps its round policy from
     prompt to prompt, as a chat keeps it between turns, and its `NgramMemory` (the n-grams of its
     runs on the prompts before: never of the prompt at hand, which runs once per mode);
  3. the simulator (`swarm.bench.simulate`) predicts every run from the medians of all probes, and
     `swarm.bench.report` puts measurement and prediction side by side. A speculative run is
     predicted from its own rounds, in order, cold ones first (`RoundLog` records their shapes
     through the round policy's interface, changing no decision).

Knows the run loop over modes and prompts, `generate`'s interface, the round policy's interface (to
record rounds, deciding nothing) and the client's `with_config` view (each mode's push setting).
Must not know how a probe measures, how the report is laid out,
or how an emulated WAN is built (it is given its links, if any).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace

from swarm.bench.probe import EmulatedLinks, merge_probes, probe, probe_units, timings_from
from swarm.bench.report import ModeTotals, format_report, plot_report, report
from swarm.bench.simulate import ChainTimings, RoundShape, plain_ms_per_token, speculative_timeline_ms
from swarm.decode.drafter import load_draft
from swarm.decode.generate import generate
from swarm.decode.ngram import NgramMemory
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


class RoundLog:
    """A round policy, unchanged in every decision, that also records each round's shape for the
    simulator (`rounds`: `RoundShape`s of the last generation, in order): the tokens it sent, the draft
    steps it took (a dropped last draft counts: it cost a step), whether it had been sent ahead, and
    the round sent ahead during it, used or thrown away (with `pipeline_depth` > 2, the next round in
    flight: the simulator replays one round ahead). Everything else goes to the policy itself."""

    def __init__(self, policy):
        object.__setattr__(self, "policy", policy)
        object.__setattr__(self, "rounds", [])
        object.__setattr__(self, "_drafting", [])  # per round drafted and not yet verified: draft-step counts

    def __getattr__(self, name):
        return getattr(self.policy, name)

    def __setattr__(self, name, value):
        setattr(self.policy, name, value)

    def begin(self, *args, **kwargs):
        object.__setattr__(self, "rounds", [])
        self._drafting.clear()
        return self.policy.begin(*args, **kwargs)

    def plan(self, *args, **kwargs):
        self._drafting.append([0, 0])  # draft steps, drafts kept
        return self.policy.plan(*args, **kwargs)

    def keep_drafting(self, *args, **kwargs):
        keep, more = self.policy.keep_drafting(*args, **kwargs)
        if self._drafting:  # one draft step per question, the draft kept or not
            self._drafting[-1][0] += 1
            self._drafting[-1][1] += bool(keep)
        return keep, more

    def observe_round(self, rnd, accepted, extra, timing, ahead_kept, *args, **kwargs):
        steps = self._drafting.pop(0)[0] if self._drafting else 0
        if not steps and rnd.parents is not None:  # a tree the draft model drafted without asking
            steps = _tree_steps(rnd)
        shape = RoundShape(len(rnd.ids), steps, bool(getattr(timing, "hit", False)))
        if shape.hit and self.rounds and self.rounds[-1].ahead is not None:  # the round sent ahead, exactly
            self.rounds[-1] = replace(self.rounds[-1], ahead=replace(shape, hit=False))
        if getattr(timing, "ahead_sent", None) is not None and self._drafting:
            ahead_steps, kept = self._drafting[0]
            shape = replace(shape, ahead=RoundShape(kept + 1, ahead_steps))
        if not ahead_kept:  # every round still in flight (sent during this one or before) was thrown away
            self._drafting.clear()
        self.rounds.append(shape)
        return self.policy.observe_round(rnd, accepted, extra, timing, ahead_kept, *args, **kwargs)


def _tree_steps(rnd) -> int:
    """Draft-model steps of a tree round: the catch-up step, then depth - 1 steps per first-level node
    the model drafted (nodes from another source, e.g. an n-gram index, cost it none)."""
    sources = rnd.sources or ["model"] * len(rnd.drafts)
    model = [i + 1 for i, source in enumerate(sources) if source != "ngram"]  # node numbers (0: the last token)
    if not model:
        return 0
    width = sum(1 for node in model if rnd.parents[node] == 0)
    return 1 + len(model) - width


def run_mode(model, draft, mode: Mode, prompt: list[int], new_tokens: int, seed: int = 0, policy=None,
             memory: NgramMemory | None = None):
    """One generation in `mode` (plain or speculative), timed by the generation itself. `model` is the
    client configured for the mode's push setting; `policy` a round policy an earlier run left (a
    speculative run always gets a `RoundLog`, so `result.policy.rounds` holds its rounds); `memory`
    the n-grams of the mode's earlier runs (on other prompts)."""
    if mode.spec is None:
        return generate(model, prompt, new_tokens, SamplingParams(mode.temperature), seed=seed, stop_at_eos=False)
    policy = policy if isinstance(policy, RoundLog) else RoundLog(policy or mode.spec.policy())
    return generate(model, prompt, new_tokens, draft=draft, spec=mode.spec, seed=seed, stop_at_eos=False,
                    policy=policy, memory=memory)


def predict_seconds(mode: Mode, result, prompt_tokens: int, timings: ChainTimings,
                    rounds: list[RoundShape] | None = None) -> float:
    """The simulator's time for what this run did: its tokens; for speculation its rounds in order
    (`rounds`, from its `RoundLog`; else rebuilt from the result's counters, without pipelining)."""
    n = len(result.tokens)
    if mode.spec is None:
        return plain_ms_per_token(timings, n, prompt_tokens, mode.push) * n / 1000
    if rounds is None:
        width = mode.spec.tree_width if mode.spec.trees else 1
        rounds = [RoundShape(k * width + 1, 1 + width * (k - 1) if k else 0) for k in result.ks]
    return speculative_timeline_ms(timings, rounds, prompt_tokens, mode.push) / 1000


def _runs(model, draft, prompts, new_tokens, modes, reps, bar, probe_every, links):
    """Probes and runs, interleaved: ([probe, ...], [(mode, result, prompt tokens, rounds or None), ...])."""
    greedy = not any(mode.temperature for mode in modes)  # what the client's head costs depends on it
    policies = {}  # per speculative setting: the round policy as the last run left it
    memories = {}  # ... and the n-grams of its earlier runs (each prompt runs once per mode: never its own)
    probes, done = [], []
    for i, prompt in enumerate(prompts):
        if i % probe_every == 0:
            probes.append(probe(model, draft, prompt, reps, bar, links, greedy))
        for mode in modes:  # interleaved, so background load hits every mode alike
            if mode.spec is not None and draft is None:
                continue
            result = run_mode(model.with_config(push=mode.push), draft, mode, prompt, new_tokens,
                              policy=policies.get(mode.spec),
                              memory=memories.setdefault(mode.spec, NgramMemory()) if mode.spec else None)
            rounds = None
            if mode.spec is not None:
                policies[mode.spec] = result.policy
                rounds = list(getattr(result.policy, "rounds", None) or []) or None
            done.append((mode, result, len(prompt), rounds))
            bar.update(1)
    probes.append(probe(model, draft, prompts[-1], reps, bar, links, greedy))  # and after the last: probes bracket the runs
    return probes, done


def measure(model, draft: LocalModel | None, prompts: list[list[int]], new_tokens: int, modes: list[Mode],
            reps: int = 5, progress=None, label: str = "", probe_every: int = 1,
            links: EmulatedLinks | None = None) -> dict:
    """Everything `swarm measure` reports, as a dict with `entries` (one per measured quantity).

    The route is probed before every `probe_every`-th prompt and after the last, between the runs, and
    the simulator predicts every run from the medians of all probes. Every mode runs on every prompt with the same
    `new_tokens` (a mode on fewer prompts is not comparable: prompts differ in how well they draft);
    to save time, give fewer prompts or tokens. `links`: an emulated WAN's links, pinged between peers."""
    from tqdm import tqdm

    runs = len(prompts) * len(modes)
    n_probes = (len(prompts) + probe_every - 1) // probe_every + 1
    bar = progress or tqdm(total=n_probes * probe_units(len(model.route)) + runs, desc=label or "measuring",
                           file=sys.stderr, leave=False)
    try:
        probes, done = _runs(model, draft, prompts, new_tokens, modes, reps, bar, probe_every, links)
    finally:
        if progress is None:
            bar.close()
    net = merge_probes(probes)
    timings = timings_from(net)
    totals = {mode.name: ModeTotals() for mode in modes}
    for mode, result, prompt_tokens, rounds in done:
        totals[mode.name].add(result, predict_seconds(mode, result, prompt_tokens, timings, rounds),
                              mode.spec is not None)
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
    draft = load_draft(args.draft, getattr(args, "device", "cpu"), args.draft_dtype, args.draft_quant) \
        if args.draft and args.speculative else None
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
