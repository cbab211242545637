"""Kill -9 the peer serving the middle span during a 200-token generation, N times; count identical outputs.

Starts peers for spans 1/3, 2/3 (twice: one is the spare) and 3/3 of the model; before each run a new
spare for the middle span joins, so a replica is always there when the victim dies. Each run must
finish and match `--local` token for token.

    python scripts/failover_drill.py                  # bundled model, 10 runs, push
    python scripts/failover_drill.py --runs 3 --no-push --model DIR
    python scripts/failover_drill.py --speculative    # adaptive greedy speculative decoding with the bundled draft
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from swarm.bundled import TINY_DRAFT, TINY_MODEL  # noqa: E402
from swarm.client.config import ClientConfig  # noqa: E402
from swarm.client.swarm_model import SwarmModel  # noqa: E402
from swarm.decode.generate import generate  # noqa: E402
from swarm.decode.speculative import SpecConfig  # noqa: E402
from swarm.decode.target import LocalModel  # noqa: E402
from swarm.launch import PeerProcess, even_spans, start_peers  # noqa: E402
from swarm.text import load_tokenizer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(TINY_MODEL))
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--kill-at", type=int, default=100, help="kill after this many tokens")
    ap.add_argument("--prompt", default="def fibonacci(n):")
    ap.add_argument("--push", action=argparse.BooleanOptionalAction, default=None,
                    help="force push / client-mediated [default: chosen per route]")
    ap.add_argument("--speculative", action="store_true", help="speculative decoding (adaptive k, pipelining auto)")
    ap.add_argument("--draft", default=str(TINY_DRAFT))
    ap.add_argument("--pipeline", action=argparse.BooleanOptionalAction, default=None,
                    help="with --speculative: force pipelining on/off [default: the cost model decides]")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    local = LocalModel.load(args.model)
    draft = LocalModel.load(args.draft) if args.speculative else None
    prompt = load_tokenizer(args.model).encode(args.prompt).ids
    reference = generate(local, prompt, args.tokens, stop_at_eos=False).tokens
    first, middle, last = even_spans(local.head.cfg.num_hidden_layers, 3)
    results = []
    with tempfile.TemporaryDirectory() as logs:
        peers = start_peers(args.model, [first, middle, middle, last], log_dir=logs)
        model = None
        try:
            model = SwarmModel(args.model, [p.addr for p in peers], ClientConfig(push=args.push, timeout=20))
            spec = SpecConfig(pipeline=args.pipeline) if draft is not None else None
            policy = None  # the round policy carries over from run to run, as between a chat's turns
            for run in tqdm(range(args.runs), desc="failover runs", file=sys.stderr):
                spare = PeerProcess(args.model, middle, "--initial-peers", peers[0].addr,
                                    log_file=Path(logs) / f"spare{run}.log")
                by_id = {p.peer_id: p for p in peers}
                victim = next(h.peer_id for h in model.route if h.blocks == middle)
                count = [0]

                def kill(tokens: list[int]):
                    before = count[0]
                    count[0] += len(tokens)
                    if before < args.kill_at <= count[0]:
                        by_id[victim].kill()

                before, t0 = model.failovers, time.perf_counter()
                try:
                    res = generate(model, prompt, args.tokens, draft=draft, spec=spec, stop_at_eos=False,
                                   on_tokens=kill, policy=policy)
                    policy = res.policy if spec is not None else None
                    out = res.tokens
                    ok = out == reference
                except Exception as e:  # noqa: BLE001 - a failed run is a result, not a crash
                    ok, out = False, repr(e)
                results.append(dict(run=run, identical=ok, failovers=model.failovers - before,
                                    seconds=round(time.perf_counter() - t0, 2)))
                peers = [p for p in peers if p.peer_id != victim] + [spare]
                model.initial_peers.append(spare.addr)
        finally:
            if model is not None:
                model.close()
            for p in peers:
                p.stop()
    passed = sum(r["identical"] for r in results)
    if args.json:
        print(json.dumps(dict(model=args.model, push=args.push, speculative=args.speculative, runs=results, passed=passed)))
    else:
        for r in results:
            print(f"run {r['run']}: {'identical' if r['identical'] else 'DIFFERENT'}, {r['failovers']} failover(s), "
                  f"{r['seconds']} s")
        print(f"{passed}/{len(results)} runs finished identical to --local")
    sys.exit(0 if passed == len(results) else 1)


if __name__ == "__main__":
    main()
