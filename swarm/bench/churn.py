"""Churn: a loopback swarm whose peers crash, leave, come back and join at random while clients generate.

`run_churn` starts a bootstrap peer (it stays, as a swarm's bootstrap nodes do) and more peers one by
one, each choosing its blocks where the swarm is thinnest (`swarm peer` without `--blocks`); then,
for `duration` seconds, a seeded schedule of events (exponential gaps of mean `mean_interval`):
`kill` (SIGKILL: no goodbye, its record lingers until it expires), `leave` (SIGTERM: it announces
that it goes), `join` (a new peer), `restart` (a killed or departed peer's blocks come back with a new
process), keeping between `min_peers` and `max_peers` alive; peers that chose their own blocks may also
`move` by themselves to blocks nobody serves any more (peer/rebalance.py; seen in their logs). Meanwhile
`clients` threads generate without pause (half plain, half speculative; greedy), each through its own `SwarmModel`, each output
compared with `--local`; a failover waits up to the client's timeout for a peer to serve blocks that nobody
serves. `verify_rate` and `peer_args` take spot-checks or batching out of a run, to see what they cost.
The report: generations started / completed / identical (and those that failed while some block had
no live peer at all, apart: the rest's completion is the client's own), failovers, the
extra time a failover cost (generations with failovers against those without; the median generation
without one, also per mode), the longest wait for
a token against the client's timeout, how long a joining peer took to serve, and how long blocks
stayed uncovered before a join covered them again.

Knows swarm.launch (peer processes and their logs), SwarmModel / generate and the decoding configs;
nothing of protocols, routes or sockets.
"""

from __future__ import annotations

import random
import re
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from swarm.launch import PeerProcess

SPAN_LINE = re.compile(r"loaded blocks \[(\d+), (\d+)\)")


@dataclass
class ChurnConfig:
    model: str
    draft: str
    prompts: list[list[int]]
    duration: float = 600.0
    seed: int = 0
    peers: int = 6  # at the start, the bootstrap peer included
    min_peers: int = 4
    max_peers: int = 8
    blocks_per_peer: int | None = None  # None: half the model's blocks
    clients: int = 4
    tokens: int = 32
    mean_interval: float = 8.0  # seconds between churn events, on average
    timeout: float = 20.0  # the clients' per-step timeout
    record_ttl: float = 20.0  # peers' DHT records: a crashed peer is forgotten this long after its last refresh
    verify_rate: float | None = None  # the clients' spot-check rate (None: ClientConfig's default)
    peer_args: tuple[str, ...] = ()  # more `swarm peer` flags for every peer (e.g. --no-batching)


@dataclass
class Peer:
    proc: PeerProcess
    log: Path
    spawned: float
    ready: float | None = None
    span: tuple[int, int] | None = None
    gone: bool = False


@dataclass
class Swarm:
    """The churning peers: who is up, what they serve, and the timeline of coverage."""

    cfg: ChurnConfig
    num_blocks: int
    logs: Path
    peers: list[Peer] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)
    uncovered_since: float | None = None
    coverage_gaps: list[float] = field(default_factory=list)  # seconds from losing a block to serving it again
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def bootstrap(self) -> Peer:
        return self.peers[0]

    def alive(self) -> list[Peer]:
        return [p for p in self.peers if not p.gone]

    def spawn(self, span: tuple[int, int] | None = None) -> Peer:
        n = self.cfg.blocks_per_peer or max(1, self.num_blocks // 2)
        log = self.logs / f"peer{len(self.peers)}.log"
        extra = ["--record-ttl", str(self.cfg.record_ttl), "--no-webrtc", "--summary-every", "0", *self.cfg.peer_args]
        extra += ["--num-blocks", str(n)] if span is None else []
        if self.peers:
            extra += ["--initial-peers", self.bootstrap.proc.addr]
        peer = Peer(PeerProcess(self.cfg.model, span, *extra, log_file=log, wait=False), log, time.monotonic())
        with self.lock:
            self.peers.append(peer)
        return peer

    def wait_ready(self, peer: Peer, timeout: float = 120.0) -> None:
        peer.proc.wait_ready(timeout)
        peer.ready = time.monotonic()
        peer.span = self._span_now(peer)
        self.look()

    @staticmethod
    def _span_now(peer: Peer) -> tuple[int, int] | None:
        """The blocks its log says it loaded last (a peer that chose its own blocks may move: peer/rebalance.py)."""
        found = SPAN_LINE.findall(peer.log.read_text()) if peer.log.exists() else []
        return (int(found[-1][0]), int(found[-1][1])) if found else peer.span

    def look(self, t: float | None = None) -> None:
        """Note peers that moved (a "move" event at time `t`) and whether every block is served."""
        covered = set()
        with self.lock:
            for p in self.alive():
                if p.ready is not None and p.span is not None:
                    if t is not None and (span := self._span_now(p)) != p.span:
                        self.events.append(dict(t=round(t, 2), kind="move", span=span, before=p.span))
                        p.span = span
                    covered.update(range(*p.span))
        now = time.monotonic()
        if len(covered) < self.num_blocks and self.uncovered_since is None:
            self.uncovered_since = now
        elif len(covered) == self.num_blocks and self.uncovered_since is not None:
            self.coverage_gaps.append(now - self.uncovered_since)
            self.uncovered_since = None

    def end(self, peer: Peer, how: str) -> None:
        if how == "kill":
            peer.proc.kill()
        else:
            peer.proc.stop()
        peer.gone = True
        self.look()

    def event(self, rng: random.Random, t: float) -> None:
        """One churn event, chosen so that between min_peers and max_peers stay up."""
        victims = [p for p in self.alive()[1:] if p.ready is not None]
        n = len(self.alive())
        if n < self.cfg.min_peers or not victims:
            kind = rng.choice(["join", "restart"])
        elif n >= self.cfg.max_peers:
            kind = rng.choice(["kill", "leave"])
        else:
            kind = rng.choices(["kill", "leave", "join", "restart"], weights=[3, 2, 2, 2])[0]
        gone = [p for p in self.peers if p.gone and p.span is not None]
        if kind == "restart" and not gone:
            kind = "join"
        if kind in ("kill", "leave"):
            victim = rng.choice(victims)
            self.end(victim, kind)
            self.events.append(dict(t=round(t, 2), kind=kind, span=victim.span))
            return
        span = rng.choice(gone).span if kind == "restart" else None
        peer = self.spawn(span)
        self.events.append(dict(t=round(t, 2), kind=kind, span=span))

        def ready() -> None:
            try:
                self.wait_ready(peer)
                self.events.append(dict(t=round(time.monotonic() - peer.spawned + t, 2), kind="ready",
                                        span=peer.span, after_s=round(peer.ready - peer.spawned, 2)))
            except RuntimeError:
                peer.gone = True

        threading.Thread(target=ready, daemon=True).start()


@dataclass
class ClientStats:
    runs: list[dict] = field(default_factory=list)


def client_loop(cfg: ChurnConfig, addr: str, speculative: bool, references: list[list[int]], stop: threading.Event,
                stats: ClientStats, seed: int, covered=lambda: True) -> None:
    """Generate without pause until `stop`; every generation is recorded, failed or not (and whether the swarm's
    peers covered every block when it failed: `covered()`). The client's start and its failovers wait up to `timeout`
    for a peer to serve blocks nobody serves (`route_wait`): a volunteer's restart or a join takes seconds."""
    from swarm.client.config import ClientConfig
    from swarm.client.swarm_model import SwarmModel
    from swarm.decode.generate import generate
    from swarm.decode.speculative import SpecConfig
    from swarm.decode.target import LocalModel

    rng = random.Random(seed)
    draft = LocalModel.load(cfg.draft) if speculative else None
    model = None
    try:
        while not stop.is_set():
            if model is None:  # (again after a start that found no route: a failed generation)
                try:
                    checks = {} if cfg.verify_rate is None else {"verify_rate": cfg.verify_rate}
                    model = SwarmModel(cfg.model, [addr], ClientConfig(
                        timeout=cfg.timeout, ban_seconds=cfg.record_ttl * 2, max_failovers=10, route_wait=cfg.timeout,
                        **checks))
                except Exception as e:  # noqa: BLE001 - a client that cannot start is a failed generation
                    stats.runs.append(dict(speculative=speculative, completed=False, identical=False, seconds=0.0,
                                           error=f"{type(e).__name__}: {e}"[:300], uncovered=not covered(),
                                           failovers=0, max_stall_s=0.0))
                    continue
            i = rng.randrange(len(cfg.prompts))
            last, stall = [time.monotonic()], [0.0]

            def tick(_tokens: list[int]) -> None:
                now = time.monotonic()
                stall[0], last[0] = max(stall[0], now - last[0]), now

            before, t0 = model.failovers, time.monotonic()
            run = dict(speculative=speculative, prompt=i)
            try:
                res = generate(model, cfg.prompts[i], cfg.tokens, draft=draft, spec=SpecConfig() if draft else None,
                               stop_at_eos=False, on_tokens=tick)
                run.update(completed=True, identical=res.tokens == references[i])
            except Exception as e:  # noqa: BLE001 - a failed generation is a result
                run.update(completed=False, identical=False, error=f"{type(e).__name__}: {e}"[:300],
                           uncovered=not covered())
            run.update(seconds=round(time.monotonic() - t0, 3), failovers=model.failovers - before,
                       max_stall_s=round(max(stall[0], time.monotonic() - last[0]), 3))
            stats.runs.append(run)
    finally:
        if model is not None:
            model.close()


def run_churn(cfg: ChurnConfig, progress=None) -> dict:
    """The whole experiment; returns the report (see the module docstring)."""
    from peer.model import Checkpoint
    from swarm.decode.generate import generate
    from swarm.decode.target import LocalModel

    local = LocalModel.load(cfg.model)
    references = [generate(local, p, cfg.tokens, stop_at_eos=False).tokens for p in cfg.prompts]
    num_blocks = Checkpoint(cfg.model).config.num_hidden_layers
    rng = random.Random(cfg.seed)
    with tempfile.TemporaryDirectory(prefix="specswarm-churn-") as logs:
        swarm = Swarm(cfg, num_blocks, Path(logs))
        stop, stats, threads = threading.Event(), ClientStats(), []
        try:
            for _ in range(cfg.peers):  # one by one: each chooses where the swarm is thinnest so far
                swarm.wait_ready(swarm.spawn())
            for c in range(cfg.clients):
                t = threading.Thread(target=client_loop, daemon=True,
                                     args=(cfg, swarm.bootstrap.proc.addr, c % 2 == 1, references, stop, stats,
                                           cfg.seed * 100 + c, lambda: swarm.uncovered_since is None))
                t.start()
                threads.append(t)
            t0 = time.monotonic()
            while (t := time.monotonic() - t0) < cfg.duration:
                until = t0 + t + min(rng.expovariate(1 / cfg.mean_interval), max(0.0, cfg.duration - t))
                while (now := time.monotonic()) < until:  # looking at the swarm twice a second meanwhile
                    time.sleep(min(0.5, until - now))
                    swarm.look(time.monotonic() - t0)
                if time.monotonic() - t0 < cfg.duration:
                    swarm.event(rng, time.monotonic() - t0)
                if progress:
                    progress(time.monotonic() - t0, len(stats.runs))
        finally:
            stop.set()
            for t in threads:
                t.join(cfg.timeout * 12)
            for p in swarm.alive():
                p.proc.terminate()
            for p in swarm.alive():
                p.proc.wait(10)
        return report(cfg, swarm, stats, hung=sum(t.is_alive() for t in threads))


def report(cfg: ChurnConfig, swarm: Swarm, stats: ClientStats, hung: int) -> dict:
    runs = stats.runs
    done = [r for r in runs if r["completed"]]
    gapped = [r for r in runs if r.get("uncovered")]
    clean_runs = [r for r in done if r["failovers"] == 0]
    clean = [r["seconds"] for r in clean_runs]
    rough = [r for r in done if r["failovers"] > 0]
    extra = None
    if clean and rough:
        extra = statistics.mean(r["seconds"] - statistics.median(clean) for r in rough) / \
            statistics.mean(r["failovers"] for r in rough)
    ready = [e["after_s"] for e in swarm.events if e["kind"] == "ready"]
    kinds = {k: sum(e["kind"] == k for e in swarm.events) for k in ("kill", "leave", "join", "restart", "move")}
    return dict(
        duration_s=cfg.duration, seed=cfg.seed, clients=cfg.clients, tokens=cfg.tokens, timeout_s=cfg.timeout,
        events=kinds, generations=len(runs), completed=len(done),
        completed_pct=round(100 * len(done) / len(runs), 2) if runs else None,
        failed_uncovered=len(gapped),  # failed while no live peer served some block (after waiting for one)
        completed_pct_covered=round(100 * len(done) / (len(runs) - len(gapped)), 2) if len(runs) > len(gapped) else None,
        identical=sum(r["identical"] for r in done),
        identical_pct=round(100 * sum(r["identical"] for r in done) / len(done), 2) if done else None,
        failovers=sum(r["failovers"] for r in runs),
        extra_s_per_failover=round(extra, 3) if extra is not None else None,
        median_s_without_failover=round(statistics.median(clean), 3) if clean else None,
        median_s_by_mode={mode: round(statistics.median(s), 3) if s else None for mode, s in (
            (mode, [r["seconds"] for r in clean_runs if r["speculative"] == spec])
            for mode, spec in (("plain", False), ("speculative", True)))},
        max_stall_s=max((r["max_stall_s"] for r in runs), default=None), hung_clients=hung,
        join_ready_s=dict(median=round(statistics.median(ready), 2), max=round(max(ready), 2)) if ready else None,
        coverage_gaps=len(swarm.coverage_gaps), time_to_full_coverage_s=[round(g, 2) for g in swarm.coverage_gaps],
        still_uncovered=swarm.uncovered_since is not None,
        errors=sorted({r["error"] for r in runs if "error" in r})[:10], timeline=swarm.events)
