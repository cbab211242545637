"""`swarm measure` against a swarm started by hand: real `swarm peer` processes on 127.0.0.1, the bundled pair."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from swarm.bundled import TINY_DRAFT, TINY_MODEL
from swarm.launch import even_spans, start_peers

pytestmark = pytest.mark.skipif(not (TINY_MODEL / "config.json").exists() or not (TINY_DRAFT / "config.json").exists(),
                                reason="the bundled models are missing")


@pytest.mark.slow  # ~25 s: a whole measurement run against live peers
def test_measure_json_has_one_entry_per_quantity(tmp_path):
    peers = start_peers(TINY_MODEL, even_spans(4, 2), log_dir=tmp_path)
    try:
        out = subprocess.run([sys.executable, "-m", "swarm.cli", "measure", "--model", "tiny",
                              "--initial-peers", *[p.addr for p in peers],
                              "--json", "--prompts", "1", "--max-new-tokens", "8", "--k", "2", "--reps", "2",
                              "--threads", "1"],
                             capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    finally:
        for p in peers:
            p.stop()
    assert out.returncode == 0, out.stderr[-3000:]
    rep = json.loads(out.stdout)
    entries = rep["entries"]
    by = lambda q: [e for e in entries if e["quantity"] == q]  # noqa: E731
    assert [e["link"] for e in by("rtt_ms")] == ["client<->peer1", "client<->peer2", "peer1<->peer2"]
    assert all(e["measured"] > 0 for e in by("rtt_ms"))
    compute = by("compute_ms_per_block")
    assert {e["peer"] for e in compute} == {"peer1", "peer2"}
    assert len(compute) == len({(e["peer"], e["tokens_per_step"]) for e in compute})  # one per (peer, tokens/step)
    modes = [e["mode"] for e in by("ms_per_token")]
    assert modes == ["plain client-mediated", "plain push", "spec k=2", "spec adaptive"]
    assert all(e["measured"] > 0 and e["predicted"] > 0 for e in by("ms_per_token"))
    assert [e["mode"] for e in by("tokens_per_round")] == ["spec k=2", "spec adaptive"]
    assert all(1.0 <= e["measured"] <= 3.0 for e in by("tokens_per_round") if e["mode"] == "spec k=2")
    assert len(rep["timings"]["push_hops_ms"]) == 3
