"""scripts/gpu_check.py, the GPU volunteer's check, run small on CPU: every part of it runs here, so a
CUDA machine only has to run it (the bars on engine speed are judged from the same code)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from swarm.bench import gpu_check

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # ~35 s: every part of the GPU check, on the CPU
def test_quick_check_on_cpu_runs_every_part(tmp_path):
    report = tmp_path / "gpu.json"
    out = subprocess.run([sys.executable, "scripts/gpu_check.py", "--device", "cpu", "--quick", "--json", str(report)],
                         cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert out.returncode in (0, 1), out.stderr[-2000:]
    rows = json.loads(report.read_text())["rows"]
    exact = [r for r in rows if r["part"] == "exactness"]
    assert {(r["dtype"], r["quant"]) for r in exact} == {(d, q) for d in ("float32", "bfloat16") for q in ("none", "int8")}
    assert all(r["ok"] for r in exact), exact  # CPU against CPU: identical
    swarm = {r["mode"]: r for r in rows if r["part"] == "swarm"}
    assert set(swarm) == {"plain", "speculative", "speculative + failover"} and all(r["ok"] for r in swarm.values()), swarm
    assert swarm["speculative + failover"]["failovers"] >= 1
    engine = [r for r in rows if r["part"] == "engine"]
    assert {r["quant"] for r in engine} == {"none", "int8"}
    assert all(r["floor_ms"] and r["floor_ms"] > 0 and set(map(int, r["ms"])) == {1, 2, 16} for r in engine), engine
    assert "checks passed" in out.stdout and ("FAIL" in out.stdout) == (out.returncode == 1)


def _report(ms: dict, floor: float) -> dict:
    return dict(model="llama3-8b", blocks=1, quant="none", floor_ms=floor,
                rows=[dict(cache_length=512, new_tokens=n, ms=v) for n, v in ms.items()])


def test_engine_bars():
    good = gpu_check.judge_engine(_report({1: 0.15, 2: 0.15, 16: 0.16, 32: 0.5}, 0.1))
    assert good["ok"] and good["within_floor"] and good["flat_verify"]
    slow = gpu_check.judge_engine(_report({1: 0.7, 2: 0.8, 16: 0.8}, 0.1))  # eager today: ~7x the floor
    assert not slow["ok"] and not slow["within_floor"]
    steep = gpu_check.judge_engine(_report({1: 0.15, 2: 0.16, 16: 0.19}, 0.1))  # within 2x, but 16 tokens cost 1.27x
    assert not steep["ok"] and steep["within_floor"] and not steep["flat_verify"]
    assert "FAIL" in gpu_check.format_rows([slow]) and "ok" in gpu_check.format_rows([good])


def test_missing_packages_named_in_one_line(monkeypatch):
    monkeypatch.setattr(gpu_check, "REQUIRED", ("torch", "surely_not_a_package_xyz"))
    assert gpu_check.missing_packages() == ["surely_not_a_package_xyz"]
