"""Petals 2.2 beside the emulated-WAN benchmark, in the same invocation. Optional, and never imported
by the library: only `scripts/wan_bench.py` uses it, and only when a Petals venv is there.

`find_venv` says where to look: `--petals-venv PATH`, else `$PETALS_ANCHOR/venv` when that variable is
set, else `../shared/anchors/petals/venv` next to the repository (the anchor's RECIPE.md and
scripts/install.sh say how it is built; `installed` checks it has a Python). Without one the Petals
row says "not installed" and has no number: stored results are never quoted as if measured here.

With one, `run_petals` serves the benchmark's own model to Petals and measures it the way ours is:
  - the model: our directory (an HF Llama checkpoint) seen through a temporary copy whose config.json
    transformers 4.33 reads (`petals_config`: rope_theta instead of rope_parameters, float32, no
    rope_scaling), the weights linked, not copied, no tokenizer (Petals' tokenizers cannot read ours;
    prompts go in as our token ids);
  - the swarm: a bootstrap DHT and one Petals server per span of ours (the same block split), on
    127.0.0.1, each behind a delay proxy of ours (`swarm.bench.wan.proxy`) with the client's link to
    that peer, up and down, which every server announces instead of its own port. Stock Petals 2.2
    decodes client-mediated (its server-to-server push never fires), so a step crosses client <-> peer j
    for every j, the links our client-mediated mode crosses. (A server announces one address, so with a
    matrix whose peer-to-peer links differ from the client's, those differ here; stock Petals does not
    use them per step.) The DHT traffic is not delayed, as ours is not;
  - the client: a script run by the venv's Python: one warm-up generation (routes and connections,
    not counted), then greedy `generate` of max-new-tokens on every prompt inside an
    `inference_session`, EOS not stopping it (as ours run); ms/token = the generations' seconds / tokens.

Knows Petals' command lines and client API (in the script it writes), processes, and our delay
proxies; must not know our client, decoding or peers.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from swarm.bench.wan.proxy import Link, ProxyProcess
from swarm.launch import _die_with_parent

ROW = "Petals 2.2 (client-mediated)"
PREFIX = "specswarm-bench"
ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "PYTHONUNBUFFERED": "1"}
SERVER = "import petals.cli.run_server as rs; rs.validate_version = lambda: None; rs.main()"  # no PyPI check

CLIENT = r'''
import json, sys, time
import torch
from petals import AutoDistributedModelForCausalLM
from transformers import GenerationConfig

job = json.load(open(sys.argv[1]))
torch.set_num_threads(1)
model = AutoDistributedModelForCausalLM.from_pretrained(job["model"], initial_peers=job["initial_peers"],
                                                        dht_prefix=job["dht_prefix"],
                                                        torch_dtype=getattr(torch, job.get("dtype", "float32")))
model.eval()
model.config.eos_token_id, model.config.pad_token_id = None, 0  # run to max_new_tokens, as our modes do
model.generation_config = GenerationConfig.from_model_config(model.config)  # (generate re-reads the config)


def run(ids, n):
    x = torch.tensor([ids])
    t0 = time.perf_counter()
    with torch.inference_mode(), model.inference_session(max_length=len(ids) + n):
        out = model.generate(x, max_new_tokens=n, do_sample=False)
    return time.perf_counter() - t0, out[0, -n:].tolist()


run(job["prompts"][0], job["warmup_tokens"])
for ids in job["prompts"]:
    seconds, tokens = run(ids, job["max_new_tokens"])
    print(json.dumps(dict(seconds=seconds, tokens=tokens)), flush=True)
'''


def find_venv(given: str | None, root: Path) -> Path:
    """Where the Petals venv should be: `given` (--petals-venv), else $PETALS_ANCHOR/venv when that is
    set, else ../shared/anchors/petals/venv next to the repository `root` (`installed` says if it is)."""
    if given:
        return Path(given)
    if os.environ.get("PETALS_ANCHOR"):
        return Path(os.environ["PETALS_ANCHOR"]) / "venv"
    return root.parent / "shared" / "anchors" / "petals" / "venv"


def installed(venv: Path | None) -> bool:
    return venv is not None and (Path(venv) / "bin" / "python").exists()


def not_run(why: str) -> dict:
    """The Petals row when nothing was measured: no number, the reason."""
    return dict(quantity="ms_per_token", mode=ROW, measured=None, predicted=None, error=None, note=why)


def petals_config(config: dict, dtype: str = "float32") -> dict:
    """Our config.json as transformers 4.33 (Petals 2.2) reads it: rope_theta at the top, `dtype`,
    no rope_scaling (a scaled RoPE, e.g. Llama 3's, is refused: 4.33 cannot compute it)."""
    cfg = dict(config)
    rope = cfg.pop("rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default" or cfg.get("rope_scaling"):
        raise ValueError(f"the model's RoPE is scaled ({rope or cfg['rope_scaling']}); Petals 2.2 cannot serve it")
    cfg["rope_theta"] = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    cfg["rope_scaling"] = None
    cfg["torch_dtype"] = dtype
    cfg.pop("dtype", None)
    return cfg


def model_copy(model_dir: Path, out: Path, dtype: str = "float32") -> Path:
    """`out`: links to the model's weights and a config.json Petals reads (in `dtype`); no tokenizer."""
    out.mkdir(parents=True, exist_ok=True)
    for f in model_dir.iterdir():
        if f.name != "config.json" and not f.name.startswith("tokenizer") and f.is_file():
            (out / f.name).unlink(missing_ok=True)
            (out / f.name).symlink_to(f.resolve())
    config = json.loads((model_dir / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(petals_config(config, dtype), indent=1))
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(log: Path, proc: subprocess.Popen, found, timeout: float, what: str):
    """Poll `log` until `found(text)` is truthy; a RuntimeError naming `what` if the process dies first
    or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        if result := found(text):
            return result
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}: {_last_line(text)}")
        time.sleep(0.5)
    raise RuntimeError(f"{what} did not start within {timeout:.0f} s (log: {log})")


def _stop_group(proc: subprocess.Popen) -> None:
    """Stop a process started in its own session and every helper it forked (hivemind forks a DHT
    process, p2pd and handlers): SIGINT to the group, then SIGTERM, then SIGKILL."""
    for sig, wait in ((signal.SIGINT, 10), (signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            break
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue
        if sig is not signal.SIGKILL:  # the leader is gone; its helpers get a moment, then the rest goes
            time.sleep(0.2)
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        break


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1][-300:] if lines else "(no output)"


class PetalsSwarm:
    """A bootstrap DHT and one Petals server per span, each server behind a delay proxy with the
    client's link to it (`links[0][j]` up, `links[j][0]` down). Use as a context manager."""

    def __init__(self, venv: Path, model_dir: Path, spans: list[tuple[int, int]], links: list[list[Link]],
                 work: Path, timeout: float = 300.0, dtype: str = "float32"):
        self.python, self.work, self.dtype = str(venv / "bin" / "python"), work, dtype
        self.env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")} | ENV
        self.procs: list[subprocess.Popen] = []
        self.proxies = None
        self.model = model_copy(Path(model_dir), work / "model", dtype)
        try:
            self._start(spans, links, timeout)
        except BaseException:
            self.close()
            raise

    def _spawn(self, name: str, args: list[str]) -> tuple[subprocess.Popen, Path]:
        log = self.work / f"{name}.log"
        with open(log, "wb") as out:  # its own session: stopping it reaches every helper it forks
            proc = subprocess.Popen([self.python, *args], stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, env=self.env, cwd=self.work, start_new_session=True,
                                    preexec_fn=_die_with_parent())
        self.procs.append(proc)
        return proc, log

    def _start(self, spans, links, timeout: float) -> None:
        boot_port, ports = _free_port(), [_free_port() for _ in spans]
        proc, log = self._spawn("dht", ["-m", "petals.cli.run_dht", "--host_maddrs", f"/ip4/127.0.0.1/tcp/{boot_port}",
                                        "--identity_path", str(self.work / "dht.id"), "--no_relay"])
        marker = re.compile(rf"/ip4/127\.0\.0\.1/tcp/{boot_port}/p2p/[A-Za-z0-9]+")

        def boot_addr(text: str):
            found = marker.search(text)
            return found.group(0) if found else None

        self.initial_peer = _wait_for(log, proc, boot_addr, 120.0, "the Petals bootstrap DHT")
        spec = [dict(target=f"tcp://127.0.0.1:{port}", up=asdict(links[0][j + 1]), down=asdict(links[j + 1][0]))
                for j, port in enumerate(ports)]
        self.proxies = ProxyProcess(spec)
        servers = []
        for j, ((a, b), port, announce) in enumerate(zip(spans, ports, self.proxies.ports)):
            servers.append(self._spawn(f"server{j + 1}", [
                "-c", SERVER, str(self.model), "--dht_prefix", PREFIX, "--initial_peers", self.initial_peer,
                "--block_indices", f"{a}:{b}", "--device", "cpu", "--torch_dtype", self.dtype, "--quant_type", "none",
                "--throughput", "1.0", "--no_auto_relay", "--skip_reachability_check",
                "--host_maddrs", f"/ip4/127.0.0.1/tcp/{port}", "--announce_maddrs", f"/ip4/127.0.0.1/tcp/{announce}",
                "--identity_path", str(self.work / f"server{j + 1}.id")]))
        for j, (proc, log) in enumerate(servers):
            _wait_for(log, proc, lambda text: "Started" in text, timeout, f"Petals server {j + 1}")

    def generate(self, prompts: list[list[int]], max_new_tokens: int, timeout: float) -> list[dict]:
        """[{seconds, tokens}] per prompt, from the Petals client (after one warm-up generation)."""
        job = self.work / "job.json"
        job.write_text(json.dumps(dict(model=str(self.model), initial_peers=[self.initial_peer], dht_prefix=PREFIX,
                                       prompts=prompts, max_new_tokens=max_new_tokens, dtype=self.dtype,
                                       warmup_tokens=min(8, max_new_tokens))))
        script = self.work / "petals_client.py"
        script.write_text(CLIENT)
        log = self.work / "client.log"
        with open(log, "wb") as err:
            client = subprocess.Popen([self.python, str(script), str(job)], stdin=subprocess.DEVNULL,
                                      stdout=subprocess.PIPE, stderr=err, env=self.env, cwd=self.work,
                                      start_new_session=True, preexec_fn=_die_with_parent())
            try:
                out, _ = client.communicate(timeout=timeout)
            finally:  # a timeout or Ctrl-C: the client and the daemon it forked go too
                _stop_group(client)
        runs = [json.loads(line) for line in out.decode().splitlines() if line.startswith("{")]
        if client.returncode != 0 or len(runs) != len(prompts):
            raise RuntimeError(f"the Petals client exited with {client.returncode}: "
                               f"{_last_line(log.read_text(errors='replace'))}")
        return runs

    def close(self) -> None:
        if self.proxies is not None:
            self.proxies.stop()
        for proc in reversed(self.procs):
            _stop_group(proc)
        self.procs.clear()

    def __enter__(self) -> "PetalsSwarm":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run_petals(venv: Path | None, model_dir: str | Path, spans: list[tuple[int, int]], links: list[list[Link]],
               prompts: list[list[int]], max_new_tokens: int, reference: list[list[int]] | None = None,
               keep_logs: str | Path | None = None, dtype: str = "float32") -> dict:
    """The Petals row of one configuration: measured (ms/token over the same prompts and tokens as
    ours, and how many greedy outputs differ from `reference`, our --local tokens), or `not_run`."""
    if not installed(venv):
        return not_run(f"not installed (no Petals venv at {venv}; give one with --petals-venv PATH)")
    venv = Path(venv)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="petals-bench-") as tmp:
        work = Path(keep_logs) if keep_logs else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        try:
            with PetalsSwarm(venv, Path(model_dir), spans, links, work, dtype=dtype) as swarm:
                started = time.perf_counter() - t0
                runs = swarm.generate(prompts, max_new_tokens, timeout=300 + 2.0 * len(prompts) * max_new_tokens)
        except (RuntimeError, ValueError, OSError, subprocess.TimeoutExpired) as e:
            print(f"Petals: not measured: {e}", file=sys.stderr)
            return not_run(f"failed: {str(e).splitlines()[0][:200]}")
    seconds, tokens = sum(r["seconds"] for r in runs), sum(len(r["tokens"]) for r in runs)
    row = dict(quantity="ms_per_token", mode=ROW, measured=round(1000 * seconds / tokens, 3), predicted=None,
               error=None, prompts=len(runs), tokens=tokens, venv=str(venv), startup_seconds=round(started, 1))
    if reference is not None:
        row["outputs_differing_from_local"] = sum(r["tokens"] != ref for r, ref in zip(runs, reference))
    return row
