"""The `swarm` command line. Each subcommand parses its flags (`swarm.flags`) and calls into the library;
the ones that produce text (generate, chat, demo) are in `swarm.commands`, the rest here.

Knows argparse and which library call each subcommand makes; no defaults (they live in the objects
the flags build) and no decoding or network policy.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from peer.model import CacheError, CheckpointError, ConfigError
from swarm.argtypes import fraction, non_negative, positive
from swarm.commands import add_chat_parser, add_demo_parser, add_generate_parser
from swarm.flags import (add_client_args, add_dataclass_args, add_draft_flag, add_model_args, add_model_flag,
                         add_nat_args, apply_device_args, client_config, dataclass_from_args, path_settings,
                         resolve_draft_flag, resolve_dtype_flag, resolve_model_flag)


def add_peer_parser(sub) -> None:
    from peer.batching import BatchSettings
    from peer.limits import Limits
    from peer.nat import NatOptions
    from peer.relay import RelayLimits

    p = sub.add_parser("peer", help="serve a range of the model's blocks to the swarm",
                       description="Join the swarm as a volunteer: load blocks START:END of the model and serve "
                                   "inference sessions over libp2p until stopped (Ctrl-C). To be reachable from other "
                                   "machines: --port PORT --identity FILE (and --public-ip IP behind NAT with "
                                   "forwarded ports). At start it logs whether peers can reach it ('reachability: "
                                   "PUBLIC/PRIVATE/UNKNOWN') and what to do about it.")
    add_model_args(p)
    p.add_argument("--blocks", help="START:END, end exclusive (e.g. 0:4) [default: where the swarm is weakest]")
    p.add_argument("--num-blocks", type=positive(), help="how many blocks to take when choosing [default: what fits in "
                   "memory, counted at --quant's size: the 'memory plan' log line says]")
    p.add_argument("--port", type=int, help="listen on /ip4/0.0.0.0/tcp/PORT, direct inference port PORT+1: the same "
                   "addresses (with --identity, multiaddr) after a restart; behind NAT forward both [not with --listen]")
    p.add_argument("--listen", nargs="+", metavar="MULTIADDR",
                   help="where to listen [default: /ip4/127.0.0.1/tcp/0: this machine only]")
    p.add_argument("--announce", nargs="+", default=[], metavar="MULTIADDR", help="the addresses others dial (e.g. "
                   "/ip4/203.0.113.7/tcp/PORT, /dns4/NAME/tcp/PORT), published and printed instead of the bound ones")
    p.add_argument("--public-ip", metavar="IP",
                   help="announce the bound ports (libp2p, direct) on this IP (behind NAT: the public one)")
    p.add_argument("--reachability", choices=["auto", "public", "private"], default="auto",
                   help="auto: ask the --initial-peers to dial this peer back on fresh connections, and announce only "
                        "addresses they reached (checked again every 10 min); public / private: take it as said "
                        "(private: announce no address, DHT as a client) [default: auto]")
    p.add_argument("--identity", metavar="FILE", help="key file; created on first use, same peer id on every restart")
    p.add_argument("--initial-peers", nargs="+", default=[], metavar="MULTIADDR",
                   help="any peers of the swarm (their 'listening on' lines) [default: none, start a new swarm]")
    p.add_argument("--record-ttl", type=float, default=60.0, help="seconds a DHT announcement lives (refreshed at 1/3)")
    p.add_argument("--no-rebalance", dest="rebalance", action="store_false",
                   help="without --blocks: keep the blocks chosen at the start (by default, at each refresh the peer "
                        "moves to blocks that no live peer serves when other peers still serve all of its own)")
    p.add_argument("--no-direct", dest="direct", action="store_false",
                   help="serve inference only over libp2p streams (no direct TCP port)")
    p.add_argument("--data-port", type=int, help="direct TCP port for inference [default: PORT+1 with --port; any]")
    p.add_argument("--no-head", dest="head", action="store_false",
                   help="do not load the final norm and LM head with the model's last block (clients then cannot verify "
                        "rounds at this peer: --verify-at-peer)")
    p.add_argument("--summary-every", type=float, default=60.0, metavar="SECONDS", help="seconds between summary lines "
                   "(sessions, tokens/s, free cache, refusals; also at shutdown; 0: only then) [default: 60]")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug lines too, libp2p's included")
    add_dataclass_args(p.add_argument_group("limits (what this peer grants; docs/security.md)"), Limits,
                       planned={"cache_tokens": "what the memory left after the blocks holds, from one session of "
                                "--max-session-tokens to 32768 on a CPU (all sessions at their longest on a GPU); "
                                "the 'memory plan' log line says"})
    add_dataclass_args(p.add_argument_group("batching (steps of different sessions computed together)"),
                       BatchSettings)
    nat = p.add_argument_group("behind NATs (a private peer is reached through relays and WebRTC; see README)")
    nat.add_argument("--no-relay", dest="relay", action="store_false",
                     help="do not relay for peers behind NATs (a public peer relays by default, within the --relay-* limits)")
    nat.add_argument("--max-relays", type=non_negative(int), default=NatOptions().max_relays,
                     help="relays a private peer reserves a slot on [default: %(default)s]")
    nat.add_argument("--no-stun-server", dest="stun_server", action="store_false",
                     help="do not answer STUN binding requests (a public peer does, for WebRTC hole punching)")
    nat.add_argument("--stun-port", type=int, default=None,
                     help="UDP port of the STUN server [default: the libp2p TCP port's number]")
    add_nat_args(p)
    add_dataclass_args(p.add_argument_group("relay limits (for peers behind NATs)"), RelayLimits, prefix="relay")
    p.set_defaults(func=cmd_peer)


def cmd_peer(args) -> int:
    import asyncio

    from peer.batching import BatchSettings
    from peer.limits import Limits
    from peer.nat import NatOptions
    from peer.p2p import ListenError
    from peer.relay import RelayLimits
    from peer.serve import PeerOptions, parse_blocks, serve

    apply_device_args(args)
    opts = PeerOptions(args.model, parse_blocks(args.blocks) if args.blocks else None, args.num_blocks, args.listen,
                       args.identity, args.initial_peers, args.device, args.dtype, dataclass_from_args(Limits, args),
                       args.threads, args.direct, args.data_port, args.record_ttl, args.announce, args.public_ip,
                       args.port, args.summary_every, args.reachability, relay=args.relay,
                       relay_limits=dataclass_from_args(RelayLimits, args, prefix="relay"),
                       nat=NatOptions(args.max_relays, args.stun_server, args.stun_port), paths=path_settings(args),
                       quant=args.quant, auto_cache_tokens=args.cache_tokens is None,
                       batching=dataclass_from_args(BatchSettings, args), head=args.head,
                       rebalance=args.rebalance)
    opts.model = resolve_model_flag(args)  # once every flag is checked: a named model is fetched on first use
    try:
        asyncio.run(serve(opts))
    except (ListenError, ConnectionError) as e:  # a port in use, no bootstrap peer: exit 1, not 2 (a flag mistake)
        print(f"swarm peer: error: {e}", file=sys.stderr)
        return 1
    return 0


def add_status_parser(sub) -> None:
    p = sub.add_parser("status", help="which peers serve which blocks of a model; gaps in coverage",
                       description="Ask the swarm (through any peer of it) who serves which blocks of a model, how "
                                   "fast and with how much free cache; exit code 1 when some block has no peer.")
    p.add_argument("--initial-peers", nargs="+", required=True, metavar="MULTIADDR",
                   help="any peers of the swarm (their 'listening on' multiaddrs)")
    add_model_flag(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    add_nat_args(p)
    p.set_defaults(func=cmd_status)


def cmd_status(args) -> int:
    import asyncio

    from peer.model import Checkpoint

    from swarm.client.status import format_status, swarm_status

    ckpt = Checkpoint(resolve_model_flag(args))
    settings = path_settings(args)
    status = asyncio.run(swarm_status(ckpt.model_id, ckpt.config.num_hidden_layers, args.initial_peers,
                                      settings=settings))
    print(json.dumps(status) if args.json else format_status(status))
    return 0 if status["complete"] else 1


def add_measure_parser(sub) -> None:
    p = sub.add_parser("measure", help="per-hop RTT, compute per block, ms/token plain vs speculative, with predictions",
                       description="Measure a swarm (or an emulated WAN with --emulate) and print the simulator's "
                                   "prediction beside every end-to-end measurement.")
    from swarm.bench.wan.links import PROFILES

    add_client_args(p)
    p.add_argument("--emulate", choices=list(PROFILES),
                   help="instead of --initial-peers: start --peers peers here behind delay proxies of this profile")
    p.add_argument("--matrix", help="instead of --initial-peers: a JSON one-way latency matrix in ms (client first)")
    p.add_argument("--peers", type=positive(), default=2, help="peers of an emulated WAN [default: 2]")
    add_model_flag(p)
    add_draft_flag(p)
    p.add_argument("--no-speculative", dest="speculative", action="store_false", help="measure plain decoding only")
    p.add_argument("--prompts", type=positive(), default=3, help="first N HumanEval prompts [default: 3]")
    p.add_argument("--max-new-tokens", type=positive(), default=64, help="tokens per prompt and mode [default: 64]")
    p.add_argument("--k", type=positive(), nargs="*", default=[2, 4, 8], help="fixed draft lengths to sweep")
    p.add_argument("--no-adaptive", dest="adaptive", action="store_false", help="leave out adaptive k")
    p.add_argument("--pipeline", action="store_true", help="also adaptive + pipelined")
    p.add_argument("--tree", type=non_negative(int), default=0, metavar="WIDTH",
                   help="also a greedy tree of this width (0: none)")
    p.add_argument("--relaxed", type=fraction(open_high=True), default=None, metavar="TAU",
                   help="also relaxed acceptance (lossy)")
    p.add_argument("--temperature", type=non_negative(), default=0.0, help="0 = greedy (default)")
    p.add_argument("--reps", type=positive(), default=5, help="repetitions of each ping and compute probe")
    p.add_argument("--threads", type=positive(), default=None, help="torch CPU threads (default: half the cores)")
    p.add_argument("--json", action="store_true", help="one JSON object: an entry per measured quantity")
    p.add_argument("--plot", metavar="FILE.png", help="bar chart of measured vs predicted ms/token (matplotlib)")
    p.set_defaults(func=cmd_measure)


def cmd_measure(args) -> int:
    from swarm.bench.measure import run_cli

    config = client_config(args)
    if not (args.emulate or args.matrix or args.initial_peers):  # before a named model is fetched
        raise ValueError("give --initial-peers MULTIADDR (or --emulate PROFILE, or --matrix FILE.json)")
    resolve_model_flag(args)
    if args.speculative:
        resolve_draft_flag(args)
    return run_cli(args, config)


def add_simulate_parser(sub) -> None:
    from swarm.bench.simulate import add_arguments, run

    p = sub.add_parser("simulate", help="predict ms/token from RTTs, compute, draft cost and acceptance",
                       description="The analytic model of swarm.bench.simulate, from `swarm measure --json` output or flags.")
    add_arguments(p)
    p.set_defaults(func=run)


def add_api_parser(sub) -> None:
    from swarm.api.run import add_server_args
    from swarm.flags import add_decode_args

    p = sub.add_parser("api", help="serve the model over an OpenAI-compatible HTTP API, with a web page of the swarm",
                       description="An HTTP server for apps: /v1/models, /v1/completions and /v1/chat/completions "
                                   "(OpenAI's shapes, streaming as server-sent events; every generation runs through "
                                   "the swarm with its own sessions on the peers, speculatively by default), and at / "
                                   "a web page with the swarm's map and a chat. Request parameters a request leaves "
                                   "out take the decoding flags' values.")
    add_model_args(p)
    p.add_argument("--local", action="store_true", help="no swarm: every block in this process")
    add_client_args(p)
    add_decode_args(p, max_new_tokens=256, max_new_help="tokens per request that gives no max_tokens")
    add_server_args(p)
    p.set_defaults(func=cmd_api)


def cmd_api(args) -> int:
    from peer import set_threads
    from swarm.api.run import run
    from swarm.commands import open_draft, open_model
    from swarm.launch import exit_on_signals

    set_threads(args.threads)
    apply_device_args(args)
    if args.local == bool(args.initial_peers):
        raise ValueError("give either --local or --initial-peers MULTIADDR (a peer's 'listening on' line)")
    resolve_model_flag(args)
    with exit_on_signals():  # SIGTERM / SIGHUP stop the server: generations cancelled, sessions closed
        return run(args, lambda: open_model(args), open_draft(args, "api"), args.initial_peers)


EXIT_CODES = """exit codes:
  0  done
  1  a runtime failure: no route through the swarm, a peer or the network failed, a port in use
  2  a usage or input error: a bad flag or value, a missing or broken model directory, a prompt too long
  130  stopped with Ctrl-C"""


class HelpFormatter(argparse.HelpFormatter):
    """Wraps descriptions as usual; text laid out in lines (the exit codes) stays as written."""

    def _fill_text(self, text, width, indent):
        return text if "\n" in text else super()._fill_text(text, width, indent)


class OneLineParser(argparse.ArgumentParser):
    """Flag mistakes get one line (and exit code 2), not the whole usage block: `--help` has that."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The `swarm` parser with every subcommand (tests walk it: every flag has help)."""
    parser = OneLineParser(prog="swarm", description="specswarm: LLM inference over a swarm of peers "
                                                     "with distributed speculative decoding",
                           formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"specswarm {_version()}")
    parser.epilog = EXIT_CODES
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (add_generate_parser, add_peer_parser, add_status_parser, add_chat_parser, add_demo_parser,
                add_api_parser, add_measure_parser, add_simulate_parser):
        add(sub)
    for name in ("generate", "status", "chat", "demo", "api", "measure"):  # `peer` has its own -v
        sub.choices[name].add_argument("-v", "--verbose", action="store_true",
                                       help="also show progress lines (INFO) and py-libp2p's own logs")
    for p in sub.choices.values():
        p.epilog = "\n".join(filter(None, [p.epilog, EXIT_CODES]))
        p.formatter_class = HelpFormatter
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    resolve_dtype_flag(args)
    torch.set_grad_enabled(False)
    from swarm.logs import setup_logging

    setup_logging(getattr(args, "verbose", False), peer=args.command == "peer",
                  libp2p=args.command != "simulate" and not getattr(args, "local", False))
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except (ConfigError, CheckpointError, CacheError, FileNotFoundError, ValueError) as e:  # what the user gave
        print(f"swarm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (RuntimeError, OSError, EOFError) as e:  # the swarm, the network, this machine
        print(f"swarm {args.command}: error: {e}", file=sys.stderr)
        return 1


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("specswarm")
    except PackageNotFoundError:
        return "(not installed)"


if __name__ == "__main__":
    sys.exit(main())
