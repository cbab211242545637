"""Churn (scripts/churn.py): peers crash, leave, return and join while clients generate; every completed
generation is identical to --local and no client hangs (slow, a minute: `bash scripts/test.sh -m slow`); bad flags.
Run as a subprocess: its many threads stay out of pytest's process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_short_churn_keeps_every_output_exact(tmp_path):
    out = tmp_path / "churn.json"
    done = subprocess.run([sys.executable, "scripts/churn.py", "--duration", "30", "--seed", "3", "--peers", "4",
                           "--min-peers", "3", "--max-peers", "5", "--clients", "2", "--tokens", "16", "--interval", "4",
                           "--timeout", "15", "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=400)
    rep = json.loads(out.read_text())
    assert sum(rep["events"].values()) >= 3, rep["timeline"]
    assert rep["events"]["kill"] + rep["events"]["leave"] >= 1, rep["timeline"]
    assert rep["generations"] >= 10 and rep["hung_clients"] == 0, done.stdout
    assert rep["identical"] == rep["completed"], rep["errors"]
    assert rep["completed_pct_covered"] >= 90, rep["errors"]  # (those while a block had no peer at all apart)
    assert rep["max_stall_s"] < 45
    assert "identical to --local" in done.stdout


@pytest.mark.parametrize("flags", [["--verify-rate", "2"], ["--peer-args", "'unclosed"]])
def test_bad_churn_flags_get_one_line_and_a_non_zero_exit(flags):
    done = subprocess.run([sys.executable, "scripts/churn.py", *flags], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr and done.stderr.strip().splitlines()[-1].startswith(
        "churn.py: error: ")
