"""What `swarm measure` reports: one entry per measured quantity, as a dict, a table or a bar chart.

`ModeTotals` adds up one mode's runs; `report` puts them beside the probes (`swarm.bench.probe`) and
the simulator's timings; `format_report` prints it (a row with no number, such as a Petals baseline
that is not installed, prints its note instead); `plot_report` draws measured vs predicted.

Knows the report's shape, the simulator's `ChainTimings` and the fields of generation results. Must
not know how anything was measured (no client, no peers, no decoding) beyond the route's hops.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from swarm.bench.simulate import ChainTimings, relative_error


@dataclass
class ModeTotals:
    """One mode's runs, added up (speculative counters stay 0 for plain decoding)."""

    tokens: int = 0
    seconds: float = 0.0
    predicted_seconds: float = 0.0
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    hits: int = 0
    wasted: int = 0
    recalled: int = 0  # accepted drafts recalled from the mode's earlier runs (n-gram memory)
    ngram: int = 0  # accepted n-gram drafts (this text's or recalled) the model did not draft too
    ks: list[int] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)  # seconds by phase of a round (speculative results')
    rounds_by: dict[str, int] = field(default_factory=dict)  # rounds by who drafted them
    drafting_by: dict[str, float] = field(default_factory=dict)  # seconds drafting before the step left, by who drafted
    outputs: list[list[int]] = field(default_factory=list)

    def add(self, result, predicted_seconds: float, speculative: bool) -> None:
        self.tokens += len(result.tokens)
        self.seconds += result.seconds
        self.predicted_seconds += predicted_seconds
        self.outputs.append(result.tokens)
        if speculative:
            self.rounds += result.rounds
            self.drafted += result.drafted
            self.accepted += result.accepted
            self.hits += result.pipelined_hits
            self.wasted += result.wasted_rounds
            self.recalled += getattr(result, "recalled", 0)
            self.ngram += getattr(result, "accepted_by", {}).get("ngram", 0)
            self.ks += result.ks
            for phase, seconds in getattr(result, "phases", {}).items():
                self.phases[phase] = self.phases.get(phase, 0.0) + seconds
            for choice, n in getattr(result, "rounds_by", {}).items():
                self.rounds_by[choice] = self.rounds_by.get(choice, 0) + n
            for choice, seconds in getattr(result, "drafting_by", {}).items():
                self.drafting_by[choice] = self.drafting_by.get(choice, 0.0) + seconds


def _probe_entries(route, timings: ChainTimings, net: dict) -> list[dict]:
    names = ["client"] + [f"peer{j + 1}" for j in range(len(route))]
    entries = []
    paths = net.get("paths") or [None] * len(net["client_rtt"])
    for j, (rtt, path) in enumerate(zip(net["client_rtt"], paths)):
        entries.append(dict(quantity="rtt_ms", link=f"client<->{names[j + 1]}", measured=round(rtt, 3),
                            source=f"data-plane ping ({path or 'direct'} path)"))
    for j, (rtt, source) in enumerate(net["links"]):
        entries.append(dict(quantity="rtt_ms", link=f"{names[j + 1]}<->{names[j + 2]}",
                            measured=round(rtt, 3), source=source))
    for j, (hop, table) in enumerate(zip(route, net["compute"])):
        blocks = hop.blocks[1] - hop.blocks[0]
        for n, ms in table.items():
            entries.append(dict(quantity="compute_ms_per_block", peer=names[j + 1], blocks=list(hop.blocks),
                                tokens_per_step=n, measured=round(ms / blocks, 4)))
    for mode, table in timings.chain_compute.items():
        for n, ms in table.points.items():
            entries.append(dict(quantity="chain_compute_ms", mode=mode, tokens_per_step=n, measured=round(ms, 3)))
    for n, ms in timings.head.points.items():
        entries.append(dict(quantity="client_head_ms", tokens_per_step=n, measured=round(ms, 3)))
    entries.append(dict(quantity="draft_ms_per_token", measured=round(timings.draft_ms_per_token, 3)))
    entries.append(dict(quantity="draft_ms_per_round", measured=round(timings.draft_ms_per_round, 3)))
    return entries


def _run_entries(totals: dict[str, ModeTotals], modes) -> list[dict]:
    entries = []
    plain = totals.get("plain push")
    plain_ms = 1000 * plain.seconds / plain.tokens if plain and plain.tokens else None
    for mode in modes:
        t = totals[mode.name]
        if not t.tokens:
            continue
        ms, pred = 1000 * t.seconds / t.tokens, 1000 * t.predicted_seconds / t.tokens
        entries.append(dict(quantity="ms_per_token", mode=mode.name, measured=round(ms, 3), predicted=round(pred, 3),
                            error=round(relative_error(pred, ms), 4), prompts=len(t.outputs), tokens=t.tokens,
                            speedup_vs_plain_push=round(plain_ms / ms, 3) if plain_ms else None))
        if mode.spec is not None:
            entries.append(dict(quantity="tokens_per_round", mode=mode.name, measured=round(t.tokens / t.rounds, 3),
                                mean_k=round(sum(t.ks) / len(t.ks), 2) if t.ks else None,
                                acceptance_rate=round(t.accepted / t.drafted, 4) if t.drafted else None,
                                pipelined_hits=t.hits, wasted_rounds=t.wasted, ngram_accepted=t.ngram,
                                recalled_accepted=t.recalled,
                                rounds_by_source=dict(t.rounds_by),
                                drafting_ms_by_source={k: round(1000 * v / max(1, t.rounds_by.get(k, 0)), 2)
                                                       for k, v in t.drafting_by.items()},
                                round_ms={k: round(1000 * v / t.rounds, 2) for k, v in t.phases.items()}))
    return entries


def report(route, timings: ChainTimings, net: dict, totals: dict[str, ModeTotals], modes, new_tokens: int,
           n_prompts: int) -> dict:
    """The report of one measured route: `route` its hops, `net` the merged probes, `totals` by mode name
    (`modes`: objects with `.name` and `.spec`, None for plain decoding)."""
    return dict(route=[str(h) for h in route], probes=net["probes"], push_trip_ms=round(timings.trip(True), 3),
                client_mediated_trip_ms=round(timings.trip(False), 3), prompts=n_prompts, new_tokens=new_tokens,
                entries=_probe_entries(route, timings, net) + _run_entries(totals, modes), timings=timings.to_json(),
                outputs={name: t.outputs for name, t in totals.items()})  # token ids, for equality checks


def format_report(rep: dict) -> str:
    trips = f"trip per step: push {rep['push_trip_ms']:.1f} ms, client-mediated {rep['client_mediated_trip_ms']:.1f} ms"
    if rep.get("links_trip_ms"):  # an emulated WAN: what its links' delays and jitter add up to
        trips += (f" (the links' one-way delays: {rep['links_trip_ms']['push']:.1f} / "
                  f"{rep['links_trip_ms']['client_mediated']:.1f} ms)")
    lines = [f"route: {' -> '.join(rep['route'])}", trips, ""]
    for e in rep["entries"]:
        if e["quantity"] == "rtt_ms":
            lines.append(f"  RTT {e['link']:<18} {e['measured']:8.2f} ms  ({e['source']})")
    comp = [e for e in rep["entries"] if e["quantity"] == "compute_ms_per_block"]
    for peer in dict.fromkeys(e["peer"] for e in comp):
        row = [e for e in comp if e["peer"] == peer]
        lines.append(f"  compute {peer} ms/block by tokens/step: "
                     + ", ".join(f"{e['tokens_per_step']}: {e['measured']:.2f}" for e in row))
    chain = [e for e in rep["entries"] if e["quantity"] == "chain_compute_ms"]
    for mode in dict.fromkeys(e["mode"] for e in chain):
        lines.append(f"  chain compute ({mode}) ms by tokens/step: "
                     + ", ".join(f"{e['tokens_per_step']}: {e['measured']:.2f}" for e in chain if e["mode"] == mode))
    draft = {e["quantity"]: e["measured"] for e in rep["entries"] if e["quantity"].startswith("draft_ms")}
    if draft:
        lines.append(f"  draft model: {draft['draft_ms_per_token']:.2f} ms per token + "
                     f"{draft['draft_ms_per_round']:.2f} ms per round")
    tpr = {e["mode"]: e for e in rep["entries"] if e["quantity"] == "tokens_per_round"}
    lines += ["", f"{'mode':>34} | ms/token | predicted | error  | tokens/round | x plain push"]
    for e in rep["entries"]:
        if e["quantity"] == "ms_per_token" and e["measured"] is None:  # a row with no number (e.g. Petals)
            lines.append(f"{e['mode']:>34} | {e.get('note') or 'not measured'}")
        elif e["quantity"] == "ms_per_token":
            r = tpr.get(e["mode"])
            per_round = f"{r['measured']:.2f}" if r else "1"
            speed = f"{e['speedup_vs_plain_push']:.2f}" if e["speedup_vs_plain_push"] else "-"
            pred = f"{e['predicted']:9.2f} | {100 * e['error']:+5.1f}%" if e["predicted"] is not None else f"{'-':>9} | {'-':>6}"
            lines.append(f"{e['mode']:>34} | {e['measured']:8.2f} | {pred} | {per_round:>12} | {speed}")
    phased = [e for e in tpr.values() if e.get("round_ms")]
    if phased:
        lines += ["", "ms per round by phase (drafting until it left | overlapped: sending ahead, prefeeding | "
                  "waiting | verifying):"]
        lines += [f"{e['mode']:>34} | " + " | ".join(f"{k} {v:.1f}" for k, v in e["round_ms"].items()) for e in phased]
    return "\n".join(lines)


def plot_report(rep: dict, path: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [e for e in rep["entries"] if e["quantity"] == "ms_per_token" and e["predicted"] is not None]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.5))
    y = range(len(rows))
    ax.barh([i + 0.2 for i in y], [e["measured"] for e in rows], 0.4, label="measured")
    ax.barh([i - 0.2 for i in y], [e["predicted"] for e in rows], 0.4, label="simulator")
    ax.set_yticks(list(y), [e["mode"] for e in rows])
    ax.invert_yaxis()
    ax.set_xlabel("ms per token")
    ax.set_title(title or f"route {len(rep['route'])} peers, push trip {rep['push_trip_ms']:.0f} ms")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
