"""What an idle swarm costs (scripts/idle_peers.py): a real two-peer swarm's CPU is read per peer and reported
(slow: `bash scripts/test.sh -m slow`); bad flags get one line. Run as a subprocess, like the benchmark."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # ~30 s: two swarms of two peers start, idle a few seconds and stop
def test_idle_peers_reports_each_peers_cpu(tmp_path):
    out = tmp_path / "idle.json"
    done = subprocess.run([sys.executable, "scripts/idle_peers.py", "--peers", "2", "--ttl", "3", "600",
                           "--warmup", "1", "--window", "4", "--json", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [r["ttl_s"] for r in rows] == [3.0, 600.0] and all(len(r["cpu_pct_per_peer"]) == 2 for r in rows)
    assert all(0 <= p < 200 for r in rows for p in r["cpu_pct_per_peer"])
    assert rows[0]["cpu_pct_total"] > rows[1]["cpu_pct_total"]  # refreshing every second costs more than never
    assert "record TTL" in done.stdout


@pytest.mark.parametrize("flags", [["--peers", "1"], ["--ttl", "0"], ["--peer-args", "'unclosed"],
                                   ["--model", "/nonexistent"]])
def test_bad_idle_flags_get_one_line_and_a_non_zero_exit(flags):
    done = subprocess.run([sys.executable, "scripts/idle_peers.py", *flags], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("idle_peers.py: error: ")
