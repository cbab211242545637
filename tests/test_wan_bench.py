"""scripts/wan_bench.py's workload and rows, without a WAN: prompt files, every mode on the same prompts
and tokens, flags that were replaced, the Petals row when its venv is missing (and its config), and
the round log the simulator replays (against real speculative decoding on the tiny pair)."""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from swarm.bench import measure as measure_mod
from swarm.bench.measure import RoundLog
from swarm.bench.petals import find_venv, installed, petals_config, run_petals
from swarm.bench.prompts import PromptFileError, load_prompt_file, load_prompts
from swarm.bench.report import format_report
from swarm.bench.simulate import RoundShape
from swarm.bench.wan.links import PROFILES
from swarm.bundled import TINY_DRAFT, TINY_MODEL

ROOT = Path(__file__).resolve().parents[1]
tiny = pytest.mark.skipif(not (TINY_MODEL / "config.json").exists() or not (TINY_DRAFT / "config.json").exists(),
                          reason="the bundled models are missing")


@pytest.fixture(scope="module")
def wan_bench():
    spec = importlib.util.spec_from_file_location("wan_bench", ROOT / "scripts" / "wan_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- prompt files ----------------------------------------------------------------------------------
def test_prompt_file_reads_a_prompt_field_per_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "def f(x):\\n"}\n\n{"prompt": "class A:\\n", "id": 7}\n')
    assert load_prompt_file(path) == ["def f(x):\n", "class A:\n"]


def test_prompt_file_in_the_humaneval_shape_even_compressed(tmp_path):
    rows = [dict(task_id=f"HumanEval/{i}", prompt=f"def f{i}():\n", canonical_solution="    pass\n",
                 test="def check(c): pass\n", entry_point=f"f{i}") for i in range(3)]
    path = tmp_path / "HumanEval.jsonl.gz"
    path.write_bytes(gzip.compress("\n".join(json.dumps(r) for r in rows).encode()))
    assert load_prompt_file(path) == [f"def f{i}():\n" for i in range(3)]


@pytest.mark.parametrize("text, says", [
    ('{"prompt": "a"}\n{"text": "b"}\n', "p.jsonl:2: each line must be a JSON object with a string \"prompt\""),
    ('{"prompt": "a"}\nnot json\n', "p.jsonl:2: not a JSON object"),
    ('["a"]\n', "p.jsonl:1: each line"),
    ('{"prompt": ""}\n', "p.jsonl:1: the prompt is empty"),
    ("\n\n", "p.jsonl: no prompts"),
])
def test_bad_prompt_files_are_refused_in_one_line(tmp_path, text, says):
    path = tmp_path / "p.jsonl"
    path.write_text(text)
    with pytest.raises(PromptFileError) as err:
        load_prompt_file(path)
    assert says in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(PromptFileError, match="cannot read"):
        load_prompt_file(tmp_path / "missing.jsonl")


def test_prompts_from_texts_are_the_first_n_cut_to_the_context():
    class Tok:
        def encode(self, text, add_special_tokens=True):
            return SimpleNamespace(ids=[ord(c) for c in text])

    texts = ["abcdef", "gh", "ij"]
    assert load_prompts(Tok(), 2, 10, 100, texts=texts) == [[ord(c) for c in "abcdef"], [ord("g"), ord("h")]]
    assert len(load_prompts(Tok(), None, 10, 100, texts=texts)) == 3
    assert load_prompts(Tok(), 1, 10, 53, texts=texts) == [[ord(c) for c in "def"]]  # 53 - 10 - 40: the last 3


# --- every mode, the same prompts and tokens -------------------------------------------------------
def test_every_mode_runs_on_every_prompt_with_the_same_tokens(wan_bench, monkeypatch):
    ran = []

    memories = {}

    def fake_run_mode(model, draft, mode, prompt, new_tokens, seed=0, policy=None, memory=None):
        ran.append((mode.name, tuple(prompt), new_tokens))
        if mode.spec is not None:  # each speculative mode's own memory, holding only the prompts before
            assert memories.setdefault(mode.name, memory) is memory and memory.documents == len(
                [1 for m, _, _ in ran if m == mode.name]) - 1
            assert all(memory is not other for name, other in memories.items() if name != mode.name)
            memory.remember(list(prompt))
        else:
            assert memory is None
        return SimpleNamespace(tokens=[0] * new_tokens, policy=None)

    monkeypatch.setattr(measure_mod, "probe", lambda *a, **k: {})
    monkeypatch.setattr(measure_mod, "run_mode", fake_run_mode)
    model = SimpleNamespace(with_config=lambda **k: None)
    modes = wan_bench.bench_modes(8, 0.5, 0.7)
    prompts = [[1, 2], [3], [4, 5, 6], [7]]
    measure_mod._runs(model, object(), prompts, 16, modes, 1, SimpleNamespace(update=lambda n=1: None), 1, None)
    plan = {name: [(p, n) for m, p, n in ran if m == name] for name in dict.fromkeys(m for m, _, _ in ran)}
    assert set(plan) == {m.name for m in modes}
    assert all(runs == [(tuple(p), 16) for p in prompts] for runs in plan.values()), plan


class FakeWan:
    spans, layout = [(0, 2), (2, 4)], None
    dtypes = []

    def __init__(self, *args, dtype="float32", **kwargs):
        FakeWan.dtypes.append(dtype)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def model(self, **kwargs):
        return SimpleNamespace(close=lambda: None)


def test_run_config_gives_every_mode_and_petals_the_same_workload(wan_bench, monkeypatch, tmp_path):
    calls = []

    def fake_measure(model, draft, prompts, new_tokens, modes, reps, **kwargs):
        calls.append((prompts, new_tokens, [m.name for m in modes], kwargs))
        rows = [dict(quantity="ms_per_token", mode=m.name, measured=50.0, predicted=50.0, error=0.0,
                     prompts=len(prompts), tokens=len(prompts) * new_tokens, speedup_vs_plain_push=1.0) for m in modes]
        probes = [dict(quantity="rtt_ms", link="client<->peer1", measured=50.0, source="ping")]  # rows of no mode
        return dict(entries=probes + rows, outputs={m.name: [[0] * new_tokens] * len(prompts) for m in modes})

    monkeypatch.setattr(wan_bench, "WanSwarm", FakeWan)
    monkeypatch.setattr(wan_bench, "measure", fake_measure)
    monkeypatch.setattr(wan_bench, "generate", lambda model, prompt, n, **k: SimpleNamespace(tokens=[0] * n, seconds=0.01))
    args = SimpleNamespace(k_max=8, relaxed=0.5, temperature=0.7, model=str(TINY_MODEL), max_new_tokens=16, reps=1,
                           probe_every=1, no_petals=False, petals_venv=tmp_path / "no-venv", modes=None,
                           verify_at_peer=None, dtype="bfloat16")
    prompts = [[1, 2], [3], [4, 5, 6]]
    bar = SimpleNamespace(update=lambda n=1: None, set_description=lambda d: None)
    rep = wan_bench.run_config(args, None, None, prompts, PROFILES["continental"].matrix(2), 2, "continental", bar)
    (got_prompts, new_tokens, names, kwargs), = calls
    assert got_prompts == prompts and new_tokens == 16 and set(kwargs) <= {"progress", "probe_every", "links"}
    assert names == [m.name for m in wan_bench.bench_modes(8, 0.5, 0.7)]
    runs = [e for e in rep["entries"] if e["quantity"] == "ms_per_token" and e["measured"]]
    assert rep["same_workload"] and {(e["prompts"], e["tokens"]) for e in runs} == {(3, 48)}
    petals = [e for e in rep["entries"] if "Petals" in e.get("mode", "")]
    assert len(petals) == 1 and petals[0]["measured"] is None and petals[0]["note"].startswith("not installed")
    modes = [e.get("mode") for e in rep["entries"]]
    assert modes.index(petals[0]["mode"]) == modes.index("plain client-mediated") + 1
    assert rep["links"][0][1] == dict(delay_ms=25.0, jitter_ms=2.0, mbit_s=100.0)
    assert rep["links_trip_ms"]["push"] == pytest.approx(75.0, abs=0.01)  # the links' own, beside the probed trip
    assert FakeWan.dtypes[-1] == "bfloat16"  # the peers run --dtype (the client's head follows them)


def test_a_report_whose_modes_differ_in_workload_is_flagged(wan_bench, capsys):
    row = dict(quantity="ms_per_token", measured=1.0, prompts=5, tokens=320)
    same = dict(entries=[dict(row, mode="a"), dict(row, mode="b"), dict(row, mode="Petals", measured=None)])
    assert wan_bench.same_workload(same) and capsys.readouterr().err == ""
    fewer = dict(entries=[dict(row, mode="a"), dict(row, mode="b", prompts=2, tokens=128)])
    assert not wan_bench.same_workload(fewer)
    assert "b 2x128" in capsys.readouterr().err


def test_replaced_flags_say_what_replaced_them(wan_bench):
    for argv in (["--sweep-prompts", "5"], ["--sweep-prompts=5"]):
        with pytest.raises(SystemExit) as stop:
            wan_bench.parse_args(argv)
        assert isinstance(stop.value.code, str) and "--max-new-tokens" in stop.value.code
        assert "\n" not in stop.value.code


def test_the_replaced_flag_exits_nonzero_in_one_line():
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "wan_bench.py"), "--sweep-prompts", "2"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode != 0 and "Traceback" not in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and "same prompts" in run.stderr, run.stderr


# --- Petals --------------------------------------------------------------------------------------
def test_petals_row_says_not_installed_without_its_venv(tmp_path, wan_bench):
    row = run_petals(tmp_path / "no-venv", TINY_MODEL, [(0, 2), (2, 4)], PROFILES["continental"].matrix(2),
                     [[1, 2, 3]], 4)
    assert row["measured"] is None and row["note"].startswith("not installed") and str(tmp_path) in row["note"]
    rep = dict(route=["p1", "p2"], push_trip_ms=75.0, client_mediated_trip_ms=100.0, entries=[
        dict(quantity="ms_per_token", mode="plain push", measured=80.0, predicted=79.0, error=-0.0125,
             speedup_vs_plain_push=1.0), row])
    line = next(line for line in format_report(rep).splitlines() if "Petals" in line)
    assert line.split("|")[1].strip().startswith("not installed")  # a note where a number would be


def test_petals_venv_is_looked_for_where_the_flag_the_variable_or_the_anchor_say(tmp_path, monkeypatch):
    monkeypatch.delenv("PETALS_ANCHOR", raising=False)
    assert find_venv(None, tmp_path / "repo") == tmp_path / "shared" / "anchors" / "petals" / "venv"
    monkeypatch.setenv("PETALS_ANCHOR", str(tmp_path / "anchor"))
    assert find_venv(None, tmp_path / "repo") == tmp_path / "anchor" / "venv"
    assert find_venv(str(tmp_path / "mine"), tmp_path / "repo") == tmp_path / "mine"
    assert not installed(tmp_path / "mine") and not installed(None)
    (tmp_path / "mine" / "bin").mkdir(parents=True)
    (tmp_path / "mine" / "bin" / "python").touch()
    assert installed(tmp_path / "mine")


def test_petals_gets_a_config_transformers_4_33_reads():
    ours = json.loads((TINY_MODEL / "config.json").read_text()) if (TINY_MODEL / "config.json").exists() else {
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}, "dtype": "float32"}
    cfg = petals_config(dict(ours, rope_parameters={"rope_theta": 500000.0, "rope_type": "default"}))
    assert cfg["rope_theta"] == 500000.0 and cfg["rope_scaling"] is None and cfg["torch_dtype"] == "float32"
    assert "rope_parameters" not in cfg
    assert petals_config(ours, "bfloat16")["torch_dtype"] == "bfloat16"  # wan_bench --dtype: Petals' rows alike
    with pytest.raises(ValueError, match="scaled"):
        petals_config(dict(ours, rope_parameters={"rope_theta": 1.0, "rope_type": "llama3", "factor": 8.0}))


# --- the round log the simulator replays ----------------------------------------------------------
class FakePolicy:
    def __init__(self):
        self.calls = []

    def begin(self):
        self.calls.append("begin")

    def plan(self, room, tree_width=1):
        return ("plan", room)

    def keep_drafting(self, confidences, plan):
        return len(confidences) < 3, len(confidences) < 3  # keeps two drafts, drops the third

    def observe_round(self, rnd, accepted, extra, timing, ahead_kept, eos):
        self.calls.append(("observe", len(rnd.ids)))

    def send_ahead(self, confidences, room, overlaps):
        return True


def _draft(log):
    log.plan(8)
    for n in (1, 2, 3):
        if not log.keep_drafting([0.9] * n, None)[1]:
            break


def test_round_log_records_each_round_and_changes_no_decision():
    inner = FakePolicy()
    log = RoundLog(inner)
    log.begin()
    assert log.send_ahead([0.5], 3, True) is True and log.plan(4) == ("plan", 4)  # decisions pass through
    log._drafting.clear()
    chain = SimpleNamespace(ids=[9, 1, 2], drafts=[1, 2], parents=None)
    _draft(log)  # round 1: 3 draft steps (the third dropped), 2 drafts sent
    _draft(log)  # round 2, sent ahead during round 1 and used
    log.observe_round(chain, 2, 5, SimpleNamespace(hit=False, ahead_sent=1.0), True, False)
    _draft(log)  # round 3, sent ahead during round 2, thrown away
    log.observe_round(chain, 1, 5, SimpleNamespace(hit=True, ahead_sent=2.0), False, False)
    assert log.rounds == [RoundShape(3, 3, False, RoundShape(3, 3)), RoundShape(3, 3, True, RoundShape(3, 3))]
    assert inner.calls == ["begin", ("observe", 3), ("observe", 3)]
    log.begin()
    assert log.rounds == [] and not log._drafting


@tiny
@pytest.mark.parametrize("pipeline,depth", [(False, 2), (True, 2), (True, 3)])
def test_round_log_matches_what_real_speculative_decoding_did(pipeline, depth):
    import torch

    from swarm.decode.generate import generate
    from swarm.decode.speculative import SpecConfig
    from swarm.decode.target import LocalModel

    torch.set_grad_enabled(False)
    target, draft = LocalModel.load(TINY_MODEL), LocalModel.load(TINY_DRAFT)
    model_only = {"ngram": False} if "ngram" in {f.name for f in dataclasses.fields(SpecConfig)} else {}
    spec = SpecConfig(k_max=6, pipeline=pipeline, pipeline_depth=depth, **model_only)  # every draft the model's
    log = RoundLog(spec.policy())
    result = generate(target, [5, 17, 300, 42, 9], 40, draft=draft, spec=spec, stop_at_eos=False, policy=log)
    rounds = result.policy.rounds
    assert result.policy is log and len(rounds) == result.rounds
    assert [r.sent - 1 for r in rounds] == result.ks  # a chain sends its drafts after the last token
    assert all(r.sent - 1 <= r.drafted <= r.sent for r in rounds)  # a dropped last draft cost a step too
    assert sum(r.hit for r in rounds) == result.pipelined_hits
    if depth == 2:  # one round ahead at most: each is the one sent during the round before it
        assert sum(r.ahead is not None for r in rounds) == result.pipelined_hits + result.wasted_rounds
    assert all(r.ahead == RoundShape(nxt.sent, nxt.drafted) for r, nxt in zip(rounds, rounds[1:]) if nxt.hit)
    if pipeline:
        assert result.pipelined_hits + result.wasted_rounds > 0


def test_modes_picks_the_named_modes_in_order_and_refuses_unknown_ones(wan_bench):
    every = [m.name for m in wan_bench.bench_modes(8, 0.5, 0.7)]
    picked = [m.name for m in wan_bench.bench_modes(8, 0.5, 0.7, ["auto", "push", "mediated", "relaxed", "spec-hot"])]
    assert picked == [n for n in every if n in {"plain client-mediated", "plain push", "spec adaptive (auto pipeline)",
                                                "spec relaxed(0.5, lossy)", "spec adaptive T=0.7"}]
    assert len(picked) == 5
    assert wan_bench.parse_args(["--modes", "push,auto"]).modes == ["push", "auto"]
    with pytest.raises(SystemExit):
        wan_bench.parse_args(["--modes", "push,fastest"])
