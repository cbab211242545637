"""Issue 15's transport benchmark: one run, side by side, in the NAT lab (scripts/nat_lab.py).

Per-step round trip of a 1-token decode step (a sealed Step of SmolLM2-135M's hidden size: 576 float32,
2472 B), of a 64 KB and of a 1 MB frame, echoed by a volunteer behind NAT A to a client behind NAT B,
over four paths:
    direct TCP           router A forwards a port to the volunteer (the baseline: same NATs, same links)
    libp2p relay         Circuit Relay v2 through a public peer (every byte through its Python)
    WebRTC hole-punched  ICE with the public peer's STUN server: host/srflx pair, a UDP hole in both NATs
    WebRTC via TURN      ICE with relay candidates only: every byte through coturn on the public segment
Goal: the hole-punched path adds at most 2 ms per decode step over direct TCP on the same link.

    sudo .venv/bin/python scripts/bench_nat_paths.py                      # 50 / 20 / 5 reps
    sudo .venv/bin/python scripts/bench_nat_paths.py --reps 3 --json out.json --plot out.png
    sudo .venv/bin/python scripts/bench_nat_paths.py --hard-nat           # hole punching fails at A

The lab's links are veth pairs (sub-millisecond, no emulated delay: netem is not available here), so what
each path adds shows plainly; on a real WAN every path pays the same propagation delay on top. The roles
(relay, server, client) are `python -m swarm.bench.nat_paths ROLE`, one process per namespace; the paths
are measured round-robin within each round so that background load hits them alike. Needs root, `ip`,
iptables and coturn's `turnserver` (without it the TURN row is left out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
import nat_lab  # noqa: E402
from swarm.bench.nat_paths import DIRECT_PORT, PATHS, RELAY_PORT, SIZE_LABELS, SIZES, add_reps_args  # noqa: E402

GOAL_MS = 2.0  # the hole-punched path may add this much per decode step over direct TCP
ROLE = [sys.executable, "-m", "swarm.bench.nat_paths"]


class Role:
    """A role's process in the lab: its JSON lines (stdout) on a queue, its stderr in a log file."""

    def __init__(self, lab: nat_lab.Lab, node: nat_lab.Node, name: str, args: list[str], log_dir: Path):
        self.name, self.log = name, log_dir / f"{name}.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        with open(self.log, "w") as log:  # the child keeps its own copy
            self.proc = lab.popen(node, [*ROLE, name, *args], stdout=subprocess.PIPE, stderr=log, text=True,
                                  env=env)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)  # EOF

    def next(self, timeout: float, on_progress=None) -> dict:
        """The next JSON line that is not progress (progress lines go to `on_progress`); RuntimeError with
        the log's tail if the process ends or `timeout` s pass first."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(f"{self.name}: nothing after {timeout:.0f} s; log:\n{self.tail()}") from None
            if line is None:
                self.proc.wait(5)
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}); log:\n{self.tail()}")
            try:
                msg = json.loads(line)
            except ValueError:
                continue  # a stray print
            if "progress" in msg:
                if on_progress:
                    on_progress(f"{self.name}: {msg['progress']}")
                continue
            return msg

    def tail(self, n: int = 25) -> str:
        try:
            return "\n".join(self.log.read_text().splitlines()[-n:]) or "(empty)"
        except OSError:
            return "(no log)"


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "?") if Path("/proc/cpuinfo").exists() \
        else platform.processor()
    return f"{os.cpu_count()}-core {cpu}, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def run(args: argparse.Namespace, say) -> dict:
    t0 = time.monotonic()

    def phase(text: str) -> None:
        say(f"[{time.monotonic() - t0:5.1f}s] {text}")

    turn_ok = shutil.which("turnserver") is not None
    paths = [p for p in args.paths.split(",") if p]
    if "turn" in paths and not turn_ok:
        phase("no turnserver (apt-get install coturn): the TURN row is left out")
        paths.remove("turn")
    log_dir = Path(args.logs) if args.logs else Path(tempfile.mkdtemp(prefix="bench-nat-paths-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    result: dict = {"machine": machine(), "hard_nat": args.hard_nat, "goal_ms": GOAL_MS, "logs": str(log_dir)}
    with nat_lab.Lab(hard_nat=args.hard_nat) as lab:
        phase(f"lab {lab.tag}*: relay {lab.pub.ip}; volunteer {lab.vol.ip} behind router A {lab.rtra.wan_ip}"
              f"{' (hard NAT)' if args.hard_nat else ''}; client {lab.cli.ip} behind router B {lab.rtrb.wan_ip}")
        lab.forward_ports(f"{DIRECT_PORT}:{DIRECT_PORT}")
        turn_flags = lab.turn() if "turn" in paths else []
        phase(f"router A forwards TCP {DIRECT_PORT} to the volunteer"
              + (f"; coturn listening at {turn_flags[1]}" if turn_flags else ""))
        relay = Role(lab, lab.pub, "relay", ["--ip", lab.pub.ip, "--port", str(RELAY_PORT)], log_dir).next(60)
        phase(f"relay + STUN server up: {relay['addr']}, {relay['stun']}")
        server = Role(lab, lab.vol, "server", ["--relay", relay["addr"], "--stun", relay["stun"],
                                               "--direct-port", str(DIRECT_PORT)], log_dir).next(60)
        phase(f"volunteer up: slot on the relay in {server['reserve_ms']} ms, circuit {server['circuit']}")
        reps = [f"--{k}={v}" for k, v in
                (("reps", args.reps), ("reps-step", args.reps_step), ("reps-64k", args.reps_64k),
                 ("reps-1m", args.reps_1m), ("warmup", args.warmup)) if v is not None]
        client = Role(lab, lab.cli, "client", [
            "--circuit", server["circuit"], "--direct", f"tcp://{lab.rtra.wan_ip}:{DIRECT_PORT}",
            "--stun", relay["stun"], "--paths", ",".join(paths), "--ice-timeout", str(args.ice_timeout),
            *turn_flags, *reps], log_dir)
        out = client.next(args.timeout, on_progress=phase)
        phase("done; tearing the lab down")
        result.update(relay=relay, server=server, client=out)
    result["goal"] = goal(out, args.hard_nat)
    if not args.logs:
        shutil.rmtree(log_dir, ignore_errors=True)
        result.pop("logs")
    return result


def goal(client: dict, hard_nat: bool = False) -> dict:
    """Whether the hole-punched path adds at most GOAL_MS per decode step over direct TCP."""
    paths = client["paths"]
    tcp, rtc = paths.get("tcp", {}), paths.get("webrtc", {})
    if not (tcp.get("ok") and rtc.get("ok")):
        why = tcp.get("error") or rtc.get("error") or "direct TCP or WebRTC was not measured"
        if hard_nat and rtc.get("error"):
            why = "hole punching failed, as it must behind the hard NAT (the TURN row is the way through)"
        return {"met": None, "why": f"not measured: {why}"}
    if rtc.get("path") != "webrtc":
        return {"met": None, "why": f"not measured: the WebRTC link took path {rtc.get('path')} (pair "
                                    f"{rtc.get('pair')}), not a hole-punched one"}
    d, w = tcp["rtt_ms"]["step"]["median"], rtc["rtt_ms"]["step"]["median"]
    met = w <= d + GOAL_MS
    return {"met": met, "direct_ms": d, "webrtc_ms": w, "added_ms": round(w - d, 3),
            "why": f"WebRTC hole-punched {w:.2f} ms vs direct TCP {d:.2f} ms per decode step: "
                   f"{w - d:+.2f} ms ({'within' if met else 'OVER'} the {GOAL_MS:g} ms budget)"}


def table(result: dict) -> str:
    client = result["client"]
    sizes = client["sizes"]
    head1 = f"{'path':20} {'pair':13} {'set-up':>8} "
    head2 = f"{'':20} {'':13} {'ms':>8} "
    for s in SIZES:
        title = f"{SIZE_LABELS[s]} ({sizes[s]} B)" if s == "step" else SIZE_LABELS[s]
        head1 += f"| {title:^26} "
        head2 += f"| {'median':>8} {'p90':>7} {'vs TCP':>8} "
    lines = [head1.rstrip(), head2.rstrip(), "-" * len(head2.rstrip())]
    for name in PATHS:
        p = client["paths"].get(name)
        if p is None:
            continue
        pair = "/".join(p["pair"][:2]) if p.get("pair") else "-"
        setup = p["setup_ms"].get("total", p["setup_ms"].get("connect"))
        row = f"{p['label']:20} {pair:13} {setup if setup is not None else '-':>8} "
        for s in SIZES:
            r = p["rtt_ms"][s]
            if not r.get("n"):
                row += f"| {'-':>8} {'-':>7} {'-':>8} "
                continue
            over = p["overhead_ms"].get(s)
            over_s = "-" if name == "tcp" else (f"{over:+.2f}" if over is not None else "?")
            row += f"| {r['median']:8.2f} {r['p90']:7.2f} {over_s:>8} "
        lines.append(row.rstrip())
        if p.get("error"):
            lines.append(f"{'':20} ! {p['error']}")
    return "\n".join(lines)


def setup_lines(result: dict) -> list[str]:
    out = []
    for name in PATHS:
        p = result["client"]["paths"].get(name)
        if p and p["setup_ms"]:
            parts = ", ".join(f"{k} {v} ms" for k, v in p["setup_ms"].items())
            gathered = f"; candidates gathered: {p['gathered']}" if p.get("gathered") else ""
            where = f"; path {p['path'] or 'none (failed)'}"
            if p.get("pair"):
                (lt, rt, (lh, lp), (rh, rp)) = p["pair"]
                where += f", pair {lt}/{rt} {lh}:{lp} <-> {rh}:{rp}"
            out.append(f"  {p['label']:20} {parts}{gathered}{where}")
    return out


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    client = result["client"]
    names = [n for n in PATHS if n in client["paths"]]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        p = client["paths"][name]
        xs, ys, errs = [], [], []
        for j, s in enumerate(SIZES):
            r = p["rtt_ms"][s]
            if r.get("n"):
                xs.append(j + (i - (len(names) - 1) / 2) * width)
                ys.append(r["median"])
                errs.append(r["p90"] - r["median"])
        ax.bar(xs, ys, width, yerr=[[0] * len(errs), errs], capsize=3,
               label=p["label"] + (f" ({p['path']})" if p.get("path") and name in ("webrtc", "turn") else ""))
    ax.set_yscale("log")
    ax.set_xticks(range(len(SIZES)))
    ax.set_xticklabels([f"{SIZE_LABELS[s]}\n({client['sizes'][s]} B)" for s in SIZES])
    ax.set_ylabel("round trip, ms (median; whisker: p90)")
    ax.set_title(f"Echo round trip per path, NAT lab{' (hard NAT)' if result['hard_nat'] else ''}")
    ax.legend(fontsize=8)
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hard-nat", action="store_true", help="router A maps every connection to a new port "
                   "(hole punching fails there; the WebRTC row reports it)")
    p.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated subset of {','.join(PATHS)}")
    add_reps_args(p)
    p.add_argument("--warmup", type=int, help="unmeasured rounds per size first [3]")
    p.add_argument("--ice-timeout", type=float, default=15.0, help="s for each WebRTC link to connect [15]")
    p.add_argument("--timeout", type=float, default=600.0, help="s for the client's whole run [600]")
    p.add_argument("--json", metavar="FILE", help="write the full result (every sample) here")
    p.add_argument("--plot", metavar="FILE.png", help="bars per path and size, log scale (matplotlib)")
    p.add_argument("--logs", metavar="DIR", help="keep the roles' logs here (default: a temporary dir, removed)")
    args = p.parse_args(argv)
    unknown = [x for x in args.paths.split(",") if x and x not in PATHS]
    if unknown:
        p.error(f"unknown path(s) {unknown}; choose from {','.join(PATHS)}")
    why = nat_lab.lab_supported(install=True)
    if why:
        print(f"bench_nat_paths: cannot build the NAT lab: {why}", file=sys.stderr)
        return 1

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    try:
        result = run(args, say)
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    except SystemExit as exc:  # SIGTERM / SIGHUP (the lab was torn down)
        return exc.code if isinstance(exc.code, int) else 1
    except (RuntimeError, OSError, subprocess.SubprocessError, KeyError) as exc:
        say(f"bench_nat_paths: error: {exc}")
        return 1
    print(f"\nNAT paths benchmark ({result['machine']}{'; hard NAT at A' if result['hard_nat'] else ''}); "
          f"reps {result['client']['reps']}, warm-up {result['client']['warmup']} rounds; "
          f"{result['client']['step_frame']}")
    print(table(result))
    print("set-up (the libp2p relay's dial includes connecting to the relay; WebRTC's 'gather' is a separate "
          "gathering alone, 'ice' includes another one, the offer/answer over the relay, checks and DTLS):")
    print("\n".join(setup_lines(result)))
    g = result["goal"]
    print(f"goal (hole-punched <= direct TCP + {GOAL_MS:g} ms per decode step): "
          + {True: "MET", False: "NOT MET", None: "UNDECIDED"}[g["met"]] + f" - {g['why']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}")
    if args.plot:
        try:
            plot(result, args.plot)
            print(f"wrote {args.plot}")
        except ImportError:
            say("no matplotlib: no plot (pip install matplotlib)")
    return 0 if all(p.get("ok") for p in result["client"]["paths"].values()) or args.hard_nat else 1


if __name__ == "__main__":
    sys.exit(main())
