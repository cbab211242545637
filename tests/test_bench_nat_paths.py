"""scripts/bench_nat_paths.py (issue 15's transport benchmark) and its roles (swarm/bench/nat_paths.py).

The arithmetic and the decode-step frame run anywhere; the benchmark itself runs in the NAT lab with tiny reps:
every path (direct TCP through a port forward, libp2p relay, hole-punched WebRTC, WebRTC through TURN) gives
numbers, each took the path it is named for (host/srflx pair; relay pair), relaying costs more than direct
TCP on a 1 MB frame, and the lab is gone afterwards. Needs root, `ip netns`, iptables and coturn; skipped
otherwise.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from swarm.bench import nat_paths

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import nat_lab  # noqa: E402

WHY_NOT = None if sys.platform.startswith("linux") else "network namespaces are Linux only"
WHY_NOT = WHY_NOT or nat_lab.lab_supported(install=False)
WHY_NOT = WHY_NOT or (None if shutil.which("turnserver") else "no turnserver (apt-get install coturn)")
lab_only = pytest.mark.skipif(WHY_NOT is not None, reason=f"NAT lab unavailable: {WHY_NOT}")


def load_script():
    spec = importlib.util.spec_from_file_location("bench_nat_paths", ROOT / "scripts" / "bench_nat_paths.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- (a) anywhere ----------------------------------------------------------------------------------------

def test_step_frame_is_a_sealed_one_token_step():
    from protocol import messages as m
    from protocol.crypto import is_envelope

    frame = nat_paths.step_frame()
    assert is_envelope(frame)
    assert 576 * 4 < len(frame) < 576 * 4 + 400  # the hidden state, its header, the AEAD envelope
    assert len(nat_paths.step_frame(64)) < len(frame)
    assert m.SESSION_ID_LEN == 32


def test_summary_median_and_nearest_rank_p90():
    s = nat_paths.summary([float(x) for x in range(10, 0, -1)])  # 10 .. 1
    assert (s["n"], s["median"], s["p90"], s["min"], s["mean"]) == (10, 5.5, 9.0, 1.0, 5.5)
    assert s["samples"][0] == 10.0  # in measuring order
    assert nat_paths.summary([3.0])["p90"] == 3.0
    assert nat_paths.summary([]) == {"n": 0}


def test_goal_verdict():
    bench = load_script()

    def client(tcp: float, rtc: float, path: str = "webrtc", error: str | None = None) -> dict:
        def row(ms, kind, err=None):
            return {"ok": err is None, "error": err, "path": kind, "pair": None, "rtt_ms": {"step": {"median": ms}}}
        return {"paths": {"tcp": row(tcp, "direct"), "webrtc": row(rtc, path, error)}}

    assert bench.goal(client(0.3, 2.2))["met"] is True
    assert bench.goal(client(0.3, 2.4))["met"] is False
    assert bench.goal(client(0.3, 1.0, path="webrtc-turn"))["met"] is None  # not a hole-punched pair
    verdict = bench.goal(client(0.3, 0.0, path=None, error="set-up failed: timed out"), hard_nat=True)
    assert verdict["met"] is None and "hard NAT" in verdict["why"]


# --- (b) the benchmark in the lab ------------------------------------------------------------------------

@lab_only
@pytest.mark.timeout(120)
def test_benchmark_runs_every_path_in_the_lab(tmp_path):
    out = tmp_path / "result.json"
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "bench_nat_paths.py"), "--reps", "3",
                             "--warmup", "1", "--json", str(out), "--plot", str(tmp_path / "plot.png"),
                             "--timeout", "90"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        stdout, stderr = proc.communicate(timeout=110)
    finally:
        if proc.poll() is None:
            proc.terminate()  # the script's lab tears itself down on SIGTERM
            proc.communicate(timeout=10)
    assert not [n for n in nat_lab.list_namespaces() if n.startswith(f"{nat_lab.PREFIX}{proc.pid}-")]
    assert proc.returncode == 0, f"{stdout}\n{stderr[-3000:]}"
    result = json.loads(out.read_text())
    paths = result["client"]["paths"]
    assert set(paths) == set(nat_paths.PATHS)
    for name, p in paths.items():
        assert p["ok"], f"{name}: {p['error']}"
        for size in nat_paths.SIZES:
            assert p["rtt_ms"][size]["n"] == 3 and p["rtt_ms"][size]["median"] > 0, (name, size, p["rtt_ms"])
    assert (paths["tcp"]["path"], paths["relay"]["path"]) == ("direct", "relay")
    rtc, turn = paths["webrtc"], paths["turn"]
    assert rtc["path"] == "webrtc" and not {"relay"} & set(rtc["pair"][:2]), rtc["pair"]  # host/srflx (prflx)
    assert turn["path"] == "webrtc-turn" and turn["pair"][0] == "relay", turn["pair"]  # our side: relay only
    assert turn["gathered"] == "relay"
    assert rtc["setup_ms"]["ice"] > 0 and turn["setup_ms"]["gather"] > 0
    mb = {name: p["rtt_ms"]["1m"]["median"] for name, p in paths.items()}
    assert mb["relay"] > mb["tcp"] and mb["turn"] > mb["tcp"], mb  # relaying a megabyte is not free
    assert result["goal"]["met"] in (True, False), result["goal"]
    assert "decode step (2472 B)" in stdout and "goal (hole-punched" in stdout, stdout
    if importlib.util.find_spec("matplotlib") is not None:  # (a dev extra: CI's test venv has none)
        assert (tmp_path / "plot.png").stat().st_size > 0
    else:
        assert "no matplotlib: no plot" in stdout + stderr and not (tmp_path / "plot.png").exists()
