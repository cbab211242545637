"""What sealing sessions costs: ms per token through real peers, sealed vs plaintext (--insecure).

Starts peers on this machine (one block span each), then alternates sealed and plaintext
generations on the same peers and the same client so background load hits both alike. Reports
the median ms/token of greedy decoding and the median time of one prefill, in push and
client-mediated mode, plus the raw seal+open speed of ChaCha20-Poly1305 on this machine.

    python scripts/bench_security.py                       # the bundled model, 3 peers, direct TCP
    python scripts/bench_security.py --model DIR --peers 2 --tokens 64 --rounds 5 --json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from peer.model import Checkpoint  # noqa: E402
from protocol import crypto  # noqa: E402
from swarm.client.config import ClientConfig  # noqa: E402
from swarm.client.swarm_model import SwarmModel  # noqa: E402
from swarm.decode.generate import generate  # noqa: E402
from swarm.launch import even_spans, start_peers  # noqa: E402


def aead_mb_per_s(size: int = 1 << 20, reps: int = 50) -> float:
    return size * reps / (seal_open_us(size, reps) * reps / 1e6) / 2**20


def seal_open_us(size: int, reps: int = 2000) -> float:
    """Microseconds to seal and open one frame of `size` bytes (both ends' CPU, one hop)."""
    static = crypto.StaticKey()
    keys, first = crypto.client_handshake(static.public, bytes(16), b"")
    peer, _ = static.accept(crypto.parse_envelope(first))
    data = os.urandom(size)
    t0 = time.perf_counter()
    for _ in range(reps):
        peer.c2p.open(crypto.parse_envelope(keys.c2p.seal(data)))
    return (time.perf_counter() - t0) / reps * 1e6


def handshake_us(reps: int = 200) -> float:
    """Microseconds of one hop's handshake (client: ephemeral key + agreement; peer: agreement)."""
    static = crypto.StaticKey()
    t0 = time.perf_counter()
    for _ in range(reps):
        _, first = crypto.client_handshake(static.public, bytes(16), b"open")
        static.accept(crypto.parse_envelope(first))
    return (time.perf_counter() - t0) / reps * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(Path(__file__).resolve().parents[1] / "swarm" / "models" / "code-target"))
    ap.add_argument("--peers", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--transport", default="tcp", choices=["tcp", "libp2p"])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    ckpt = Checkpoint(args.model)
    spans = even_spans(ckpt.config.num_hidden_layers, args.peers)
    prompt = [(7 * i + 3) % ckpt.config.vocab_size for i in range(args.prompt_tokens)]
    results: dict = {}
    with tempfile.TemporaryDirectory() as logs:
        peers = start_peers(args.model, spans, log_dir=logs)
        try:
            for push in (True, False):
                config = ClientConfig(push=push, transport=args.transport, discovery=False)
                model = SwarmModel(args.model, [p.addr for p in peers], config)
                views = {"sealed": model, "insecure": model.with_config(sealed=False)}  # one node, peers and route
                try:
                    times: dict[str, dict[str, list[float]]] = {"sealed": {"decode": [], "prefill": []},
                                                                 "insecure": {"decode": [], "prefill": []}}
                    for r in range(args.rounds + 1):  # round 0 warms up
                        for mode in (("sealed", "insecure") if r % 2 else ("insecure", "sealed")):
                            out = generate(views[mode], prompt[:8], args.tokens, stop_at_eos=False)
                            t1 = time.perf_counter()
                            generate(views[mode], prompt, 1, stop_at_eos=False)  # one long prefill
                            prefill = time.perf_counter() - t1
                            if r:
                                times[mode]["decode"].append(1000 * out.seconds / len(out.tokens))
                                times[mode]["prefill"].append(1000 * prefill)
                    where = "push" if push else "client-mediated"
                    results[where] = {mode: {k: round(statistics.median(v), 3) for k, v in t.items()}
                                      for mode, t in times.items()}
                finally:
                    model.close()
        finally:
            for p in peers:
                p.stop()
    results["aead_seal_open_mb_per_s"] = round(aead_mb_per_s(), 1)
    d = ckpt.config.hidden_size
    results["seal_open_us_decode_frame"] = round(seal_open_us(4 * d + 200), 1)
    results["seal_open_us_prefill_frame"] = round(seal_open_us(4 * d * args.prompt_tokens + 200, 200), 1)
    results["handshake_us"] = round(handshake_us(), 1)
    results["setup"] = {"model": args.model, "hidden_size": ckpt.config.hidden_size, "spans": spans,
                        "transport": args.transport, "tokens": args.tokens, "prompt_tokens": args.prompt_tokens,
                        "rounds": args.rounds}
    if args.json:
        print(json.dumps(results))
        return 0
    print(f"{args.peers} peers {spans}, hidden size {ckpt.config.hidden_size}, {args.transport}; medians of "
          f"{args.rounds} rounds")
    for where in ("push", "client-mediated"):
        s, p = results[where]["sealed"], results[where]["insecure"]
        print(f"  {where:16s} decode {s['decode']:.2f} ms/token sealed vs {p['decode']:.2f} plaintext "
              f"({s['decode'] - p['decode']:+.2f});  prefill of {args.prompt_tokens}: {s['prefill']:.1f} ms vs "
              f"{p['prefill']:.1f} ({s['prefill'] - p['prefill']:+.1f})")
    print(f"  ChaCha20-Poly1305 seal+open: {results['aead_seal_open_mb_per_s']:.0f} MiB/s; one hop's frame: "
          f"{results['seal_open_us_decode_frame']:.1f} us (decode step), {results['seal_open_us_prefill_frame']:.0f} us "
          f"(prefill); handshake {results['handshake_us']:.0f} us per hop")
    return 0


if __name__ == "__main__":
    sys.exit(main())
