"""What does an idle swarm cost its volunteers? CPU per peer with no client, for one or more record TTLs.

A loopback swarm of the bundled tiny model (or --model DIR): --peers peers, each choosing half the blocks;
nothing generates. Each TTL gets a fresh swarm, measured over --window seconds after --warmup.

    python scripts/idle_peers.py                           # 6 peers, TTL 20 s (churn's) and 60 s (the default)
    python scripts/idle_peers.py --peers 10 --ttl 60 --json idle.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from swarm.bench.idle import idle_cpu  # noqa: E402
from swarm.bundled import TINY_MODEL  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(TINY_MODEL))
    ap.add_argument("--peers", type=int, default=6, help="[default: 6]")
    ap.add_argument("--ttl", type=float, nargs="+", default=[20.0, 60.0], metavar="S",
                    help="record TTLs to measure, one swarm each [default: 20 60]")
    ap.add_argument("--warmup", type=float, default=15.0, help="seconds before measuring [default: 15]")
    ap.add_argument("--window", type=float, default=40.0, help="seconds measured [default: 40]")
    ap.add_argument("--peer-args", default="", metavar="'FLAGS'", help="more `swarm peer` flags (use --peer-args=...)")
    ap.add_argument("--json", metavar="PATH", help="write the report here")
    args = ap.parse_args()
    if args.peers < 2 or min(args.ttl) <= 0 or args.window <= 0 or args.warmup < 0:
        ap.error("--peers at least 2; --ttl and --window above 0; --warmup not below 0")
    try:
        peer_args = tuple(shlex.split(args.peer_args))
    except ValueError as e:
        ap.error(f"--peer-args: {e}")
    if not Path(args.model, "config.json").exists():
        ap.error(f"--model {args.model}: no config.json there")
    num_blocks = json.loads(Path(args.model, "config.json").read_text())["num_hidden_layers"]
    rows = []
    for ttl in tqdm(args.ttl, desc="idle swarms", unit="swarm", file=sys.stderr):
        rows.append(idle_cpu(args.model, num_blocks, args.peers, ttl, args.warmup, args.window, peer_args))
    print(f"{args.peers} idle peers of {Path(args.model).name} ({num_blocks} blocks, half each), {args.window:.0f} s each:")
    print(f"{'record TTL':>10}  {'CPU % per peer (median)':>23}  {'all peers':>9}  per peer")
    for r in rows:
        print(f"{r['ttl_s']:>8.0f} s  {r['cpu_pct_median']:>23.1f}  {r['cpu_pct_total']:>9.1f}  {r['cpu_pct_per_peer']}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(model=str(args.model), rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
