"""What an idle swarm costs its volunteers: the CPU its peers burn with no client at all.

`idle_cpu` starts `peers` loopback peers of a model, each choosing its own blocks (half the model's, so
every block has replicas and peers look at each other to rebalance), with record TTL `ttl`; after `warmup`
seconds it reads each peer process's CPU time (`PeerProcess.cpu_seconds`) over `window` seconds. An
idle peer's work is its record: refreshed every TTL/3 (the DHT lookups that find the swarm, the Info
probes of other peers, the announcement), so the cost grows with the swarm and shrinks with the TTL.
Several TTLs run one after another in one call, each with a fresh swarm.

Knows swarm.launch (peer processes and their CPU time); nothing of protocols, DHTs or sessions.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from swarm.launch import PeerProcess, stop_peers


def idle_cpu(model: str | Path, num_blocks: int, peers: int, ttl: float, warmup: float, window: float,
             peer_args: tuple[str, ...] = ()) -> dict:
    """One idle swarm: CPU % (of one core) per peer over `window` seconds, after `warmup`."""
    extra = ("--record-ttl", str(ttl), "--num-blocks", str(max(1, num_blocks // 2)), "--no-webrtc",
             "--summary-every", "0", *peer_args)
    logs = Path(tempfile.mkdtemp(prefix="specswarm-idle-"))
    procs: list[PeerProcess] = []
    try:
        procs.append(PeerProcess(model, None, *extra, log_file=logs / "peer0.log"))
        procs += [PeerProcess(model, None, *extra, "--initial-peers", procs[0].addr, log_file=logs / f"peer{i}.log",
                              wait=False) for i in range(1, peers)]
        for p in procs[1:]:
            p.wait_ready()
        time.sleep(warmup)
        before, t0 = [p.cpu_seconds() for p in procs], time.monotonic()
        time.sleep(window)
        after, dt = [p.cpu_seconds() for p in procs], time.monotonic() - t0
    finally:
        stop_peers(procs)
    pct = [round(100 * (b - a) / dt, 1) for a, b in zip(before, after)]
    return dict(ttl_s=ttl, peers=peers, window_s=round(dt, 1), cpu_pct_per_peer=pct,
                cpu_pct_median=round(statistics.median(pct), 1), cpu_pct_total=round(sum(pct), 1))
