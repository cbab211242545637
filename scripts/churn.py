"""Peers crash, leave, return and join at random (seeded) while clients generate without pause: what do
clients pay, and is every output still right?

A loopback swarm of the bundled tiny model (or --model DIR with --draft DIR): a bootstrap peer that
stays and peers that choose their blocks where the swarm is thinnest; events every --interval seconds
on average (SIGKILL, SIGTERM, a returning peer, a new one), between --min-peers and --max-peers up;
--clients threads (half plain, half speculative, greedy) compare every generation with --local.

    python scripts/churn.py --duration 600 --json docs/churn.json     # the 10-minute run in the README
    python scripts/churn.py --duration 60 --clients 2                  # a quick look
    python scripts/churn.py --duration 45 --interval 1000 --verify-rate 0 --peer-args=--no-batching
                                                # no churn: what spot-checks and batching cost the clients
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from swarm.argtypes import fraction  # noqa: E402
from swarm.bench.churn import ChurnConfig, run_churn  # noqa: E402
from swarm.bundled import TINY_DRAFT, TINY_MODEL  # noqa: E402
from swarm.logs import setup_logging  # noqa: E402
from swarm.text import load_tokenizer  # noqa: E402

PROMPTS = ["def fibonacci(n):", "class Stack:", "import os\n\ndef walk(path):", "def parse_args(argv):",
           "for i in range(10):", "def read_config(path):", "while True:", "def merge(a, b):"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(TINY_MODEL))
    ap.add_argument("--draft", default=str(TINY_DRAFT))
    ap.add_argument("--duration", type=float, default=600.0, help="seconds of churn [default: 600]")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--peers", type=int, default=6, help="peers at the start, the bootstrap included [default: 6]")
    ap.add_argument("--min-peers", type=int, default=4)
    ap.add_argument("--max-peers", type=int, default=8)
    ap.add_argument("--blocks-per-peer", type=int, default=None, help="[default: half the model's blocks]")
    ap.add_argument("--clients", type=int, default=4, help="generating threads, half of them speculative [default: 4]")
    ap.add_argument("--tokens", type=int, default=32, help="tokens per generation [default: 32]")
    ap.add_argument("--interval", type=float, default=8.0, help="mean seconds between churn events [default: 8]")
    ap.add_argument("--timeout", type=float, default=20.0, help="the clients' per-step timeout [default: 20]")
    ap.add_argument("--verify-rate", type=fraction(open_low=False), default=None, metavar="R",
                    help="the clients' spot-check rate (0: no checks at all) [default: the client's own]")
    ap.add_argument("--peer-args", default="", metavar="'FLAGS'",
                    help="more `swarm peer` flags for every peer, e.g. --peer-args=--no-batching [default: none]")
    ap.add_argument("--json", metavar="PATH", help="write the report (with the event timeline) here")
    ap.add_argument("-v", "--verbose", action="store_true", help="the clients' failovers and libp2p's warnings too")
    args = ap.parse_args()
    setup_logging(args.verbose)
    if not args.verbose:  # every failover would print a warning: the report counts them
        logging.getLogger("specswarm").setLevel(logging.ERROR)
    if not 1 <= args.min_peers <= args.peers <= args.max_peers:
        ap.error("--min-peers <= --peers <= --max-peers, all at least 1")
    try:
        peer_args = tuple(shlex.split(args.peer_args))
    except ValueError as e:
        ap.error(f"--peer-args: {e}")
    tok = load_tokenizer(args.model)
    cfg = ChurnConfig(args.model, args.draft, [tok.encode(p).ids for p in PROMPTS], args.duration, args.seed, args.peers,
                      args.min_peers, args.max_peers, args.blocks_per_peer, args.clients, args.tokens, args.interval,
                      args.timeout, verify_rate=args.verify_rate, peer_args=peer_args)
    with tqdm(total=round(args.duration), desc="churn", unit="s", file=sys.stderr) as bar:
        def progress(t: float, runs: int) -> None:
            bar.n = min(round(t), bar.total)
            bar.set_postfix(generations=runs)
            bar.refresh()

        rep = run_churn(cfg, progress)
    if args.json:
        Path(args.json).write_text(json.dumps(rep, indent=1))
    ev = rep["events"]
    print(f"{rep['duration_s']:.0f} s of churn (seed {rep['seed']}): {ev['kill']} kills, {ev['leave']} leaves, "
          f"{ev['restart']} restarts, {ev['join']} joins; {ev['move']} peers moved to blocks nobody served; "
          f"{rep['clients']} clients")
    print(f"generations: {rep['generations']} started, {rep['completed']} completed ({rep['completed_pct']} %), "
          f"{rep['identical']} identical to --local ({rep['identical_pct']} % of completed); "
          f"{rep['failed_uncovered']} failed while no peer served some blocks ({rep['completed_pct_covered']} % of "
          f"the others completed)")
    print(f"failovers: {rep['failovers']}, each costing {rep['extra_s_per_failover']} s extra "
          f"(a generation without one: {rep['median_s_without_failover']} s: plain {rep['median_s_by_mode']['plain']}, "
          f"speculative {rep['median_s_by_mode']['speculative']}); longest wait for a token "
          f"{rep['max_stall_s']} s (timeout {rep['timeout_s']} s); clients hung: {rep['hung_clients']}")
    print(f"a joining peer served after {rep['join_ready_s']} s; blocks went uncovered {rep['coverage_gaps']} times, "
          f"covered again after {rep['time_to_full_coverage_s']} s")
    for e in rep["errors"]:
        print(f"  error: {e}")
    ok = rep["completed_pct_covered"] is not None and rep["completed_pct_covered"] >= 99 \
        and rep["identical"] == rep["completed"] \
        and not rep["hung_clients"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
