"""The GPU volunteer's check: one run that says whether this machine's CUDA path is right and fast.

`scripts/gpu_check.sh` runs it on a machine with CUDA; the tests run the same code on CPU, smaller
(`--device cpu --quick`), so every line of it is exercised where CI runs. Four parts, each a list of
rows with `ok`:
  1. packages: the project's own dependencies importable here (one line naming the missing ones);
  2. exactness: the whole model on the device against the same dtype on CPU (logits within a dtype's
     tolerance, greedy tokens equal) for float32, bfloat16 and int8 weights;
  3. swarm: peers started with `--device DEVICE` (spans 1/3, 2/3 twice, 3/3) and a client on the
     device: plain and speculative greedy output identical to `--local` on the device, then a
     speculative generation during which the middle peer in use is killed (failover), identical too;
  4. engine: `scripts/bench_engine.py` for the Llama-3-8B block shape and the default model's shape,
     ms per step for 1..32 new tokens beside the memory floor measured in the same run, bf16 and int8,
     CUDA graphs (what a peer runs; judged) beside eager launches,
     with the issue's bars (<= 2x floor for 1-16 tokens; 16 tokens <= 1.1x one token) as pass/fail.

Knows the model engine, LocalModel/SwarmModel/generate, swarm.launch and bench_engine.py's JSON;
nothing of protocols or sockets. Imports torch and the project only when a check runs, so that a
machine missing a package is told which one.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REQUIRED = ("torch", "numpy", "safetensors", "tokenizers", "tqdm", "jinja2", "gguf", "cryptography", "libp2p",
            "trio", "multiaddr")
ROOT = Path(__file__).resolve().parents[2]
TOLERANCE = {"float32": 1e-3, "bfloat16": 5e-2}  # max |logit difference| / max |logit|, device vs CPU
BARS = dict(floor_x=2.0, verify16_x=1.1)  # the issue's bars on one Llama-3-8B block, cache 512


def missing_packages() -> list[str]:
    return [name for name in REQUIRED if importlib.util.find_spec(name) is None]


def _prefill_logits(model, ids: list[int]):
    from peer.model import StepLayout
    from swarm.decode.target import embed_step

    run = model.session(len(ids))
    try:
        hidden = run.submit(embed_step(model.head, ids), StepLayout(0, len(ids))).result()
        return model.head.logits(hidden).cpu()
    finally:
        run.close()


def exactness(model_dir: str, device: str, prompt: list[int], tokens: int, quants=(None, "int8")) -> list[dict]:
    """Each dtype (and int8 weights) on `device` against the same on CPU: logits and greedy tokens."""
    from swarm.decode.generate import generate
    from swarm.decode.target import LocalModel

    rows = []
    for dtype in ("float32", "bfloat16"):
        for quant in quants:
            kw = {"quant": quant} if quant else {}
            cpu, dev = LocalModel.load(model_dir, dtype, "cpu", **kw), LocalModel.load(model_dir, dtype, device, **kw)
            a, b = _prefill_logits(cpu, prompt), _prefill_logits(dev, prompt)
            rel = float((a - b).abs().max() / a.abs().max().clamp_min(1e-6))
            ta = generate(cpu, prompt, tokens, stop_at_eos=False).tokens
            tb = generate(dev, prompt, tokens, stop_at_eos=False).tokens
            same = next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), len(ta))
            tol = TOLERANCE[dtype] * (2 if quant else 1)
            static = dev.blocks._static  # on CUDA the decode steps ran as CUDA graphs (peer/model/graphs.py)
            replays = static.replays if static is not None else 0
            graphed = replays > 0 or not device.startswith("cuda")
            rows.append(dict(part="exactness", dtype=dtype, quant=quant or "none", rel_logit_diff=rel, tolerance=tol,
                             tokens=len(ta), identical_prefix=same, graph_replays=replays,
                             ok=rel <= tol and same == len(ta) and graphed))
            del cpu, dev
    return rows


def swarm_check(model_dir: str, draft_dir: str, device: str, prompt: list[int], tokens: int) -> list[dict]:
    """Peers on `device` and a client on `device`: plain, speculative and a failover, each vs --local."""
    from peer.paths import PathSettings
    from swarm.client.config import ClientConfig
    from swarm.client.swarm_model import SwarmModel
    from swarm.decode.generate import generate
    from swarm.decode.speculative import SpecConfig
    from swarm.decode.target import LocalModel
    from swarm.launch import even_spans, start_peers, stop_peers

    local, draft = LocalModel.load(model_dir, "float32", device), LocalModel.load(draft_dir, "float32", device)
    reference = generate(local, prompt, tokens, stop_at_eos=False).tokens
    first, middle, last = even_spans(local.head.cfg.num_hidden_layers, 3)
    rows, model = [], None
    with tempfile.TemporaryDirectory() as logs:
        peers = start_peers(model_dir, [first, middle, middle, last], "--device", device, "--no-webrtc", log_dir=logs)
        try:
            cfg = ClientConfig(timeout=60, paths=PathSettings(webrtc=False))
            model = SwarmModel(model_dir, [p.addr for p in peers], cfg, "float32", device)
            for mode, kw in (("plain", {}), ("speculative", dict(draft=draft, spec=SpecConfig()))):
                out = generate(model, prompt, tokens, stop_at_eos=False, **kw).tokens
                rows.append(dict(part="swarm", mode=mode, tokens=len(out), ok=out == reference))
            by_id = {p.peer_id: p for p in peers}
            victim = next(h.peer_id for h in model.route if h.blocks == middle)
            seen, before = [0], model.failovers

            def kill(new: list[int]) -> None:
                seen[0] += len(new)
                if seen[0] >= tokens // 2 and by_id[victim].proc.poll() is None:
                    by_id[victim].kill()

            out = generate(model, prompt, tokens, draft=draft, spec=SpecConfig(), stop_at_eos=False,
                           on_tokens=kill).tokens
            rows.append(dict(part="swarm", mode="speculative + failover", tokens=len(out),
                             failovers=model.failovers - before, ok=out == reference and model.failovers > before))
        finally:
            if model is not None:
                model.close()
            stop_peers(peers)
    return rows


def engine(device: str, shape: str, blocks: int, quant: str | None, reps: int, tokens: str) -> dict:
    """scripts/bench_engine.py's JSON for one shape: ms per step at cache 512 beside the memory floor."""
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_engine.py"), "--shape", shape, "--blocks", str(blocks),
           "--device", device, "--dtype", "bfloat16" if device.startswith("cuda") else "float32",
           "--cache-lengths", "512", "--tokens", tokens, "--reps", str(reps), "--json"]
    if quant:
        cmd += ["--quant", quant]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"bench_engine failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def judge_engine(report: dict) -> dict:
    """The issue's bars on one engine report: every step of 1-16 tokens within 2x the floor, and a
    16-token verify step within 1.1x a 1-token step."""
    engines = report.get("engines", ["eager"])
    engine = "graphs" if "graphs" in engines else engines[0]  # what a peer runs on this device
    at512 = [r for r in report["rows"] if r["cache_length"] == 512]
    rows = {r["new_tokens"]: r for r in at512 if r.get("engine", engine) == engine}
    ms = {n: r["ms"] for n, r in rows.items()}
    eager = {r["new_tokens"]: r["ms"] for r in at512 if r.get("engine") == "eager" and engine != "eager"}
    floors = {n: r.get("floor_ms", report.get("floor_ms")) for n, r in rows.items()}  # weights + the KV cache read
    floor = floors.get(1)
    within = None not in floors.values() and all(ms[n] <= BARS["floor_x"] * floors[n] for n in ms if n <= 16)
    flat = 16 in ms and 1 in ms and ms[16] <= BARS["verify16_x"] * ms[1]
    return dict(part="engine", shape=report["model"], blocks=report["blocks"], quant=report.get("quant", "none"),
                engine=engine, ms=ms, eager_ms=eager, floor_ms=floor, within_floor=within, flat_verify=flat, ok=within and flat)


def format_rows(rows: list[dict]) -> str:
    """One line per row, the failing ones marked."""
    lines = []
    for r in rows:
        mark = "ok  " if r["ok"] else "FAIL"
        if r["part"] == "exactness":
            text = (f"{r['dtype']}{'' if r['quant'] == 'none' else ' + ' + r['quant']}: logits differ by "
                    f"{r['rel_logit_diff']:.2e} of their range (tolerance {r['tolerance']:.0e}); greedy "
                    f"{r['identical_prefix']}/{r['tokens']} tokens identical; {r.get('graph_replays', 0)} CUDA graph "
                    f"replays")
        elif r["part"] == "swarm":
            text = f"{r['mode']}: {r['tokens']} tokens {'identical to' if r['ok'] else 'DIFFERENT from'} --local" + \
                   (f" ({r['failovers']} failover(s))" if "failovers" in r else "")
        else:
            floor = f"{r['floor_ms']:.3f}" if r["floor_ms"] is not None else "?"
            steps = " ".join(f"{n}:{v:.3f}" for n, v in sorted(r["ms"].items()))
            eager = " ".join(f"{n}:{v:.3f}" for n, v in sorted(r.get("eager_ms", {}).items()))
            text = (f"{r['shape']} x{r['blocks']} {r['quant']} {r.get('engine', 'eager')}: ms per step {steps}"
                    f"{f' (eager {eager})' if eager else ''}; floor {floor} ms "
                    f"(<= {BARS['floor_x']}x floor: {r['within_floor']}, 16 vs 1 token <= {BARS['verify16_x']}x: "
                    f"{r['flat_verify']})")
        lines.append(f"{mark} {r['part']:<9} {text}")
    return "\n".join(lines)
