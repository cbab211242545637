"""The command line's shape: shared flag groups, generated peer limits, defaults from the library's objects."""

import argparse
import dataclasses

from peer.limits import Limits
from swarm import cli
from swarm.client.config import ClientConfig
from swarm.flags import client_config, dataclass_from_args


def parsers() -> dict[str, argparse.ArgumentParser]:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    for add in (cli.add_generate_parser, cli.add_peer_parser, cli.add_chat_parser, cli.add_demo_parser,
                cli.add_measure_parser):
        add(sub)
    return sub.choices


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
