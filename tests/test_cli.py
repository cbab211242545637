"""The command line's shape: shared flag groups, generated peer limits, defaults from the library's objects."""

import argparse
import dataclasses
import subprocess
import sys

import pytest

from peer.limits import Limits
from swarm import cli
from swarm.client.config import ClientConfig
from swarm.flags import client_config, dataclass_from_args


def parsers() -> dict[str, argparse.ArgumentParser]:
    """Every `swarm` subcommand's parser, by name."""
    top = cli.build_parser()
    return next(a for a in top._actions if isinstance(a, argparse._SubParsersAction)).choices


def options(p: argparse.ArgumentParser) -> set[str]:
    return {s for a in p._actions for s in a.option_strings}


def test_chat_demo_and_measure_accept_every_client_flag_generate_does():
    ps = parsers()
    client = options(ps["generate"]) - {"--prompt", "--ignore-eos", "--json", "--local", "-h", "--help"}
    for name in ("chat", "demo"):
        assert client <= options(ps[name]), f"swarm {name} lacks {sorted(client - options(ps[name]))}"
    network = {"--initial-peers", "--route", "--no-dht", "--no-push", "--wire-dtype", "--timeout", "--transport",
               "--insecure", "--ban-seconds", "--max-failovers"}
    assert network <= options(ps["measure"])


def test_client_flags_default_to_the_client_config():
    args = parsers()["chat"].parse_args([])
    assert client_config(args) == ClientConfig()
    args = parsers()["chat"].parse_args(["--no-push", "--insecure", "--transport", "libp2p", "--timeout", "5"])
    assert client_config(args) == ClientConfig(push=False, sealed=False, transport="libp2p", timeout=5.0)


def test_peer_flags_are_generated_from_limits():
    p = parsers()["peer"]
    assert dataclass_from_args(Limits, p.parse_args([])) == Limits()
    args = p.parse_args(["--max-rate", "5", "--cache-tokens", "100", "--require-encryption"])
    assert dataclass_from_args(Limits, args) == dataclasses.replace(Limits(), rate=5.0, cache_tokens=100,
                                                                     require_encryption=True)
    assert len([a for a in p._actions if a.dest in {f.name for f in dataclasses.fields(Limits)}]) == \
        len(dataclasses.fields(Limits))


BAD = [  # (arguments, what the one line must mention): whole runs of the CLI, checks past the parser
    (["generate", "--local", "--prompt", "x", "--k", "0"], "--k"),
    (["generate", "--prompt", "x"], "--initial-peers"),
    (["peer", "--blocks", "3:2"], "--blocks"),
    (["peer", "--max-sessions", "0"], "max-sessions"),
    (["peer", "--device", "tpu"], "--device"),
]


@pytest.mark.parametrize("argv,mentions", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_flags_get_one_line_and_exit_2(argv, mentions):
    out = subprocess.run([sys.executable, "-m", "swarm.cli", *argv], capture_output=True, text=True, timeout=120,
                         stdin=subprocess.DEVNULL)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and mentions in lines[0] and "error" in lines[0], out.stderr


@pytest.mark.parametrize("argv", [["generate", "--local", "--prompt", "x"], ["peer", "--model", "tiny"]],
                         ids=["generate", "peer"])
def test_cuda_without_cuda_is_one_line(argv):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = subprocess.run([sys.executable, "-m", "swarm.cli", *argv, "--device", "cuda"],
                         capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1 and "CUDA" in out.stderr, out.stderr


def test_every_flag_has_help_and_help_names_the_exit_codes():
    missing = [f"{name} {a.option_strings[0]}" for name, p in parsers().items() for a in p._actions
               if a.option_strings and not a.help and a.dest != "help"]
    assert not missing, f"flags without help text: {missing}"
    for name, p in parsers().items():
        text = p.format_help()
        assert "exit codes:" in text and "2  a usage or input error" in text, name


PARSE_ERRORS = [  # (subcommand and flags, what the one line must mention): argparse-level checks, in process
    (["generate", "--local", "--prompt", "x", "--k", "-1"], "--k"),
    (["generate", "--local", "--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["generate", "--local", "--prompt", "x", "--top-p", "2"], "--top-p"),
    (["generate", "--local", "--prompt", "x", "--threads", "0"], "--threads"),
    (["chat", "--local", "--max-new-tokens", "-5"], "--max-new-tokens"),
    (["demo", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["demo", "--peers", "0"], "--peers"),
    (["peer", "--num-blocks", "0"], "--num-blocks"),
    (["measure", "--peers", "0"], "--peers"),
    (["measure", "--k", "2", "0"], "--k"),
    (["measure", "--reps", "-1"], "--reps"),
    (["measure", "--prompts", "x"], "--prompts"),
    (["measure", "--relaxed", "1.5"], "--relaxed"),
    (["simulate", "--acceptance", "2"], "--acceptance"),
    (["simulate", "--new-tokens", "0"], "--new-tokens"),
    (["generate", "--local", "--prompt", "x", "--temperature", "-1"], "--temperature"),
    (["generate", "--local", "--prompt", "x", "--top-p", "0"], "--top-p"),
    (["generate", "--local", "--prompt", "x", "--timeout", "0"], "--timeout"),
    (["generate", "--local", "--prompt", "x", "--timeout", "nan"], "--timeout"),
    (["chat", "--local", "--max-failovers", "-1"], "--max-failovers"),
    (["chat", "--local", "--relaxed", "1"], "--relaxed"),
    (["demo", "--k-max", "0"], "--k-max"),
    (["peer", "--num-blocks", "-2"], "--num-blocks"),
]


@pytest.mark.parametrize("argv,mentions", PARSE_ERRORS, ids=[" ".join(a) for a, _ in PARSE_ERRORS])
def test_bad_numbers_are_refused_by_the_parser(argv, mentions, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.build_parser().parse_args(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(lines) == 1 and mentions in lines[0], lines


def test_version():
    out = subprocess.run([sys.executable, "-m", "swarm.cli", "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("specswarm ")
