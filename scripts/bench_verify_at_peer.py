"""Verification at the last peer against verification at the client: bytes per round, client CPU per token.

For each model, starts 2 peers on this machine (half of the blocks each; the last one loads the head), then
generates every prompt speculatively (greedy, the default adaptive rounds) twice on one client: once with the
client verifying (`--no-verify-at-peer`: the last peer returns the final hidden states, the client runs the
LM head) and once with the last peer verifying (`--verify-at-peer`: it returns the target's argmax per node),
the order alternating per prompt so background load hits both alike. Reports per mode: ms/token (wall), the
client's CPU ms/token (process time of the client process, every thread: draft model, head, codec, I/O),
bytes per round up (client -> peers) and down (peers -> client), every byte of the client's inference
streams, and whether every output equals --local. Peers run in their own processes (not counted as client
CPU); the client runs torch on one thread, as do the peers.

    python scripts/bench_verify_at_peer.py                                  # tiny, then smollm2-135m
    python scripts/bench_verify_at_peer.py --models tiny --prompts 2 --tokens 32 --json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from peer.model import Checkpoint  # noqa: E402
from swarm.client.config import ClientConfig  # noqa: E402
from swarm.client.swarm_model import SwarmModel  # noqa: E402
from swarm.decode.generate import generate  # noqa: E402
from swarm.decode.speculative import SpecConfig  # noqa: E402
from swarm.decode.target import LocalModel  # noqa: E402
from swarm.launch import even_spans, start_peers, stop_peers  # noqa: E402
from swarm.registry import resolve_draft, resolve_model  # noqa: E402
from swarm.text import load_tokenizer  # noqa: E402

PROMPTS = ["def fibonacci(n):", "import numpy as np\n\ndef softmax(x):", "class Stack:\n    def __init__(self):",
           "def is_prime(n):", "def quicksort(xs):", "def read_json(path):"]
MODES = {"client verifies": False, "last peer verifies": True}


class Counted:
    """A stream that counts the bytes of every frame payload it sends and receives into `tally`."""

    def __init__(self, stream, tally: dict):
        self._s, self._tally = stream, tally

    async def send(self, payload: bytes) -> None:
        self._tally["up"] += len(payload)
        await self._s.send(payload)

    async def recv(self) -> bytes:
        data = await self._s.recv()
        self._tally["down"] += len(data)
        return data

    async def close(self) -> None:
        await self._s.close()

    def __getattr__(self, name):
        return getattr(self._s, name)


def counting(model: SwarmModel, tally: dict) -> None:
    dial = model.dial

    async def counted_dial(addr: str):
        return Counted(await dial(addr), tally)
    model.dial = counted_dial  # (views made later by with_config share it)


def bench_model(name: str, prompts_n: int, tokens: int, log_dir: Path) -> dict:
    model_dir, draft_dir = resolve_model(name), resolve_draft(name, None)
    cfg = Checkpoint(model_dir).config
    tokenizer = load_tokenizer(model_dir)
    prompts = [tokenizer.encode(p).ids for p in (PROMPTS * 4)[:prompts_n]]
    local, draft = LocalModel.load(model_dir), LocalModel.load(draft_dir)
    reference = [generate(local, p, tokens, stop_at_eos=False).tokens for p in prompts]
    peers = start_peers(model_dir, even_spans(cfg.num_hidden_layers, 2), log_dir=log_dir)
    tally = {"up": 0, "down": 0}
    model = SwarmModel(model_dir, [p.addr for p in peers], ClientConfig(verify_rate=0, timeout=120))
    try:
        counting(model, tally)
        views = {mode: model.with_config(verify_at_peer=on) for mode, on in MODES.items()}
        generate(views["last peer verifies"], prompts[0], 8, draft=draft, spec=SpecConfig(), stop_at_eos=False)
        rows = {mode: dict(wall=0.0, cpu=0.0, tokens=0, rounds=0, up=0, down=0, same=True) for mode in MODES}
        for i, prompt in enumerate(prompts):
            order = list(MODES) if i % 2 == 0 else list(MODES)[::-1]
            for mode in order:
                tally.update(up=0, down=0)
                w0, c0 = time.perf_counter(), time.process_time()
                res = generate(views[mode], prompt, tokens, draft=draft, spec=SpecConfig(), stop_at_eos=False)
                row = rows[mode]
                row["wall"] += time.perf_counter() - w0
                row["cpu"] += time.process_time() - c0
                row["tokens"] += len(res.tokens)
                row["rounds"] += res.rounds + res.wasted_rounds  # every trip (thrown-away rounds too)
                row["up"] += tally["up"]
                row["down"] += tally["down"]
                row["same"] &= res.tokens == reference[i]
    finally:
        model.close()
        stop_peers(peers)
    out = {"model": name, "vocab": cfg.vocab_size, "hidden": cfg.hidden_size, "blocks": cfg.num_hidden_layers,
           "prompts": len(prompts), "tokens_per_prompt": tokens, "modes": {}}
    for mode, r in rows.items():
        out["modes"][mode] = dict(ms_per_token=round(1000 * r["wall"] / r["tokens"], 2),
                                  client_cpu_ms_per_token=round(1000 * r["cpu"] / r["tokens"], 2),
                                  bytes_up_per_round=round(r["up"] / r["rounds"]),
                                  bytes_down_per_round=round(r["down"] / r["rounds"]),
                                  tokens_per_round=round(r["tokens"] / r["rounds"], 2), trips=r["rounds"],
                                  identical_to_local=r["same"])
    return out


def table(results: list[dict]) -> str:
    lines = ["| model | mode | ms/token | client CPU ms/token | bytes/round up | bytes/round down | tokens/round | "
             "= --local |", "|---|---|---|---|---|---|---|---|"]
    for res in results:
        for mode, r in res["modes"].items():
            lines.append(f"| {res['model']} | {mode} | {r['ms_per_token']} | {r['client_cpu_ms_per_token']} | "
                         f"{r['bytes_up_per_round']} | {r['bytes_down_per_round']} | {r['tokens_per_round']} | "
                         f"{'yes' if r['identical_to_local'] else 'NO'} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["tiny", "smollm2-135m"])
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    import tempfile
    with tempfile.TemporaryDirectory() as logs:
        results = [bench_model(name, args.prompts, args.tokens, Path(logs)) for name in args.models]
    print(json.dumps(results, indent=1) if args.json else table(results))
    if not all(r["identical_to_local"] for res in results for r in res["modes"].values()):
        raise SystemExit("an output differed from --local")


if __name__ == "__main__":
    main()
