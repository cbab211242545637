"""What the network costs us: frame round trips, and ms/token through a chain of peers vs --local.

Part 1 (`scripts/bench_p2p.py`): one frame's round trip over our libp2p stream vs a plain asyncio
TCP socket with the same framing, for 1 KB, 64 KB and 1 MB.
Part 2: the model split over N peer processes on 127.0.0.1, plain greedy decoding on HumanEval
prompts: --local, push and client-mediated, interleaved prompt by prompt so background load hits all
modes alike; push and client-mediated, each over direct TCP and over libp2p streams; ms/token and the
overhead above --local.

    python scripts/bench_transport.py                        # bundled model, 2 peers, 10 prompts
    python scripts/bench_transport.py --model DIR --peers 3 --prompts 20 --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from swarm.bench.prompts import humaneval_prompts  # noqa: E402
from swarm.bundled import TINY_MODEL  # noqa: E402
from swarm.client.config import ClientConfig  # noqa: E402
from swarm.client.swarm_model import SwarmModel  # noqa: E402
from swarm.decode.generate import generate  # noqa: E402
from swarm.decode.target import LocalModel  # noqa: E402
from swarm.launch import even_spans, start_peers  # noqa: E402
from swarm.text import load_tokenizer  # noqa: E402


def chain_bench(model_dir: str, n_peers: int, n_prompts: int, new_tokens: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    local, tokenizer = LocalModel.load(model_dir), load_tokenizer(model_dir)
    cfg = local.head.cfg
    spans = even_spans(cfg.num_hidden_layers, n_peers)
    context = cfg.max_position_embeddings - new_tokens
    with tempfile.TemporaryDirectory() as logs:
        peers = start_peers(model_dir, spans, threads=threads, log_dir=logs)
        try:
            addrs = [p.addr for p in peers]
            modes = {"local": local}
            for transport in ("tcp", "libp2p"):
                for push in (True, False):
                    name = f"{'push' if push else 'client-mediated'} ({transport})"
                    modes[name] = SwarmModel(model_dir, addrs, ClientConfig(push=push, transport=transport))
            ms = {name: [] for name in modes}
            mismatches = 0
            for text in tqdm(humaneval_prompts(n_prompts), desc=f"{n_peers} peers", file=sys.stderr):
                prompt = tokenizer.encode(text).ids[-context:]
                tokens = {}
                for name, model in modes.items():
                    res = generate(model, prompt, new_tokens, stop_at_eos=False)
                    ms[name].append(1000 * res.seconds / len(res.tokens))
                    tokens[name] = res.tokens
                mismatches += any(t != tokens["local"] for t in tokens.values())
            for name, model in modes.items():
                if name != "local":
                    model.close()
        finally:
            for p in peers:
                p.stop()
    med = {name: statistics.median(v) for name, v in ms.items()}
    return dict(model=Path(model_dir).name, peers=n_peers, spans=spans, prompts=n_prompts, new_tokens=new_tokens,
                ms_per_token=med, overhead_ms_per_token={k: v - med["local"] for k, v in med.items() if k != "local"},
                outputs_differing_from_local=mismatches)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(TINY_MODEL))
    ap.add_argument("--peers", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=10, help="first N HumanEval prompts")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (client and each peer)")
    ap.add_argument("--skip-rtt", action="store_true", help="only the chain part")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rtt = None
    if not args.skip_rtt:
        out = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_p2p.py"), "--json"],
                             capture_output=True, text=True, check=True)
        rtt = json.loads(out.stdout)
    chain = chain_bench(args.model, args.peers, args.prompts, args.new_tokens, args.threads)
    if args.json:
        print(json.dumps({"rtt": rtt, "chain": chain}))
        return
    if rtt:
        print("frame round trip, median ms (libp2p stream from asyncio vs plain asyncio TCP):")
        for row in rtt["rows"]:
            print(f"  {row['label']:>6}: libp2p {row['p2p_ms']:7.2f} | tcp {row['tcp_ms']:6.2f} | "
                  f"x{row['p2p_ms'] / row['tcp_ms']:.1f}")
    m = chain["ms_per_token"]
    print(f"{chain['model']} over {chain['peers']} peers {chain['spans']}, {chain['prompts']} HumanEval prompts, "
          f"{chain['new_tokens']} greedy tokens, median ms/token:")
    for name, value in m.items():
        extra = "" if name == "local" else f"  (+{value - m['local']:.2f} ms/token over local)"
        print(f"  {name:>26}: {value:6.2f}{extra}")
    print(f"  outputs differing from --local: {chain['outputs_differing_from_local']}")


if __name__ == "__main__":
    main()
