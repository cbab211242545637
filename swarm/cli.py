"""The `swarm` command line. Each subcommand parses its flags (`swarm.flags`) and calls into the library.

Knows argparse and which library call each subcommand makes; no defaults (they live in the objects
the flags build) and no decoding or network policy.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from peer import set_threads
from peer.model import CacheError, CheckpointError, ConfigError
from swarm import bundled
from swarm.bundled import DEFAULT_DRAFT, DEFAULT_MODEL  # noqa: F401 - re-exported for scripts
from swarm.decode.generate import generate
from swarm.decode.target import LocalModel
from swarm.argtypes import fraction, non_negative, positive
from swarm.flags import (add_client_args, add_dataclass_args, add_decode_args, add_model_args, check_device,
                         client_config, dataclass_from_args, sampling_params, spec_config)
from swarm.text import TextStream, load_tokenizer


def add_generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt",
                       description="Generate a continuation of a prompt. --local runs the whole model in this "
                                   "process: the reference every swarm mode is compared with.")
    add_model_args(p)
    p.add_argument("--local", action="store_true", help="run every block in this process")
    add_client_args(p)
    p.add_argument("--prompt", required=True, help="the text to continue")
    add_decode_args(p, max_new_tokens=32)
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    p.set_defaults(func=cmd_generate)


def open_model(args):
    """The target: every block in this process (--local), or a client of the swarm."""
    check_device(args.device)
    if args.local == bool(args.initial_peers):
        raise ValueError("give either --local or --initial-peers MULTIADDR "
                         "(a peer's 'listening on' line)")
    if args.local:
        return LocalModel.load(args.model, args.dtype, args.device)
    from swarm.client.swarm_model import SwarmModel

    if args.insecure:
        print("WARNING: --insecure: hidden states and instructions travel in PLAINTEXT", file=sys.stderr)
    return SwarmModel(args.model, args.initial_peers, client_config(args), args.dtype, args.device)


def open_draft(args, command: str) -> LocalModel | None:
    """The draft model, when speculation is on (explicitly, or by default: see `bundled.speculative_default`)."""
    reference = command == "generate" and args.local  # the local reference run decodes plainly by default
    on = args.speculative if args.speculative is not None else bundled.speculative_default(args.model, args.draft,
                                                                                          reference)
    if not on:
        return None
    if not args.draft:
        raise ValueError("--speculative needs --draft DIR")
    if args.relaxed is not None:
        print(f"WARNING: --relaxed {args.relaxed} is lossy: the output may differ from the target model's own",
              file=sys.stderr)
    return LocalModel.load(args.draft, args.dtype, args.device)


def cmd_generate(args) -> int:
    set_threads(args.threads)
    t0 = time.perf_counter()
    model = open_model(args)
    try:
        return _generate(args, model, time.perf_counter() - t0)
    finally:
        if not args.local:
            model.close()


def _generate(args, model, load_seconds: float) -> int:
    tokenizer = load_tokenizer(args.model)
    prompt = tokenizer.encode(args.prompt).ids
    if not prompt and model.head.cfg.bos_token_id is not None:
        prompt = [model.head.cfg.bos_token_id]
    if not prompt:
        raise ValueError("the prompt is empty after tokenization")
    draft = open_draft(args, "generate")
    spec = spec_config(args) if draft is not None else None
    if not args.json:
        sys.stdout.write(args.prompt)
    stream = TextStream(tokenizer, None if args.json else lambda piece: (sys.stdout.write(piece), sys.stdout.flush()))
    result = generate(model, prompt, args.max_new_tokens, sampling_params(args), draft=draft, spec=spec,
                      seed=args.seed, stop_at_eos=not args.ignore_eos, on_tokens=stream.add)
    mode = spec.mode if spec else "plain"
    where = "local" if args.local else model.config.where
    if args.json:
        out = {"mode": mode, "where": where, **result.stats(), "model": str(args.model), "device": args.device,
               "dtype": args.dtype, **result.summary(), "text": tokenizer.decode(result.tokens, skip_special_tokens=True),
               "load_seconds": round(load_seconds, 3), "temperature": args.temperature, "top_p": args.top_p,
               "seed": args.seed}
        if spec:
            out.update(k=args.k if args.k else "adaptive", draft=str(args.draft), lossy=args.relaxed is not None)
        if not args.local:
            cfg = model.config
            out.update(route=[str(h) for h in model.route], push=cfg.push, wire_dtype=cfg.wire_dtype,
                       transport=cfg.transport)
        print(json.dumps(out))
    else:
        sys.stdout.write("\n")
        route = "local" if args.local else "route " + " -> ".join(str(h) for h in model.route)
        per_round = f", {result.tokens_per_round:.2f} tokens/round" if spec else ""
        print(f"[{len(result.tokens)} tokens in {result.seconds:.2f} s, {result.tokens_per_s:.1f} tokens/s{per_round}, "
              f"{mode}, {route}, {args.device}/{args.dtype}]", file=sys.stderr)
    return 0


def add_peer_parser(sub) -> None:
    from peer.limits import Limits

    p = sub.add_parser("peer", help="serve a range of the model's blocks to the swarm",
                       description="Join the swarm as a volunteer: load blocks START:END of the model and serve "
                                   "inference sessions over libp2p until stopped (Ctrl-C). To be reachable from other "
                                   "machines: --port PORT --identity FILE (and --public-ip IP behind NAT).")
    add_model_args(p, "Hugging Face model directory")
    p.add_argument("--blocks", help="START:END, end exclusive (e.g. 0:4) [default: where the swarm is weakest]")
    p.add_argument("--num-blocks", type=positive(), help="how many blocks to take when choosing [default: what fits in memory]")
    p.add_argument("--port", type=int, help="listen on /ip4/0.0.0.0/tcp/PORT, direct inference port PORT+1: the same "
                   "addresses (with --identity, multiaddr) after a restart; behind NAT forward both [not with --listen]")
    p.add_argument("--listen", nargs="+", metavar="MULTIADDR",
                   help="where to listen [default: /ip4/127.0.0.1/tcp/0: this machine only]")
    p.add_argument("--announce", nargs="+", default=[], metavar="MULTIADDR", help="the addresses others dial (e.g. "
                   "/ip4/203.0.113.7/tcp/PORT, /dns4/NAME/tcp/PORT), published and printed instead of the bound ones")
    p.add_argument("--public-ip", metavar="IP",
                   help="announce the bound ports (libp2p, direct) on this IP (behind NAT: the public one)")
    p.add_argument("--identity", metavar="FILE", help="key file; created on first use, same peer id on every restart")
    p.add_argument("--initial-peers", nargs="+", default=[], metavar="MULTIADDR",
                   help="any peers of the swarm (their 'listening on' lines) [default: none, start a new swarm]")
    p.add_argument("--record-ttl", type=float, default=60.0, help="seconds a DHT announcement lives (refreshed at 1/3)")
    p.add_argument("--no-direct", dest="direct", action="store_false",
                   help="serve inference only over libp2p streams (no direct TCP port)")
    p.add_argument("--data-port", type=int, help="direct TCP port for inference [default: PORT+1 with --port; any]")
    p.add_argument("--summary-every", type=float, default=60.0, metavar="SECONDS", help="seconds between summary lines "
                   "(sessions, tokens/s, free cache, refusals; also at shutdown; 0: only then) [default: 60]")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug lines too, libp2p's included")
    add_dataclass_args(p.add_argument_group("limits (what this peer grants; docs/security.md)"), Limits)
    p.set_defaults(func=cmd_peer)


def cmd_peer(args) -> int:
    import asyncio

    from peer.limits import Limits
    from peer.p2p import ListenError
    from peer.serve import PeerOptions, parse_blocks, serve

    check_device(args.device)
    opts = PeerOptions(args.model, parse_blocks(args.blocks) if args.blocks else None, args.num_blocks, args.listen,
                       args.identity, args.initial_peers, args.device, args.dtype, dataclass_from_args(Limits, args),
                       args.threads, args.direct, args.data_port, args.record_ttl, args.announce, args.public_ip,
                       args.port, args.summary_every)
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
    model = bundled.default_model()
    p.add_argument("--model", default=model, required=model is None,
                   help="model directory (names the model)" + (" [default: the bundled model]" if model else ""))
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=cmd_status)


def cmd_status(args) -> int:
    import asyncio

    from peer.model import Checkpoint

    from swarm.client.status import format_status, swarm_status

    ckpt = Checkpoint(args.model)
    status = asyncio.run(swarm_status(ckpt.model_id, ckpt.config.num_hidden_layers, args.initial_peers))
    print(json.dumps(status) if args.json else format_status(status))
    return 0 if status["complete"] else 1


def _chat(args, model) -> int:
    from swarm.chat import Chat, Console, run_interactive, run_scripted

    draft = open_draft(args, args.command)
    chat = Chat(model, load_tokenizer(args.model), draft, spec_config(args), sampling_params(args), args.max_new_tokens,
                seed=args.seed, console=Console())
    if args.prompt or not sys.stdin.isatty():  # prompts given, or piped in (a demo with no input answers one)
        prompts = args.prompt or [line.rstrip("\n") for line in sys.stdin if line.strip()]
        run_scripted(chat, prompts or (["def fibonacci(n):"] if args.command == "demo" else []))
    else:
        run_interactive(chat)
    return 0


def _add_chat_args(p) -> None:
    add_decode_args(p, max_new_tokens=96, max_new_help="per reply")
    p.add_argument("--prompt", nargs="+", help="answer these prompts and exit (no interaction)")


def add_chat_parser(sub) -> None:
    p = sub.add_parser("chat", help="chat with the model through the swarm (streaming, live stats)",
                       description="Chat through the swarm: replies stream, with a live status line on a terminal. "
                                   "Ctrl-C stops a reply, not the chat; /reset /stats /quit. While no peer serves "
                                   "some blocks the chat waits (a countdown) and goes on once one does. Prompts "
                                   "piped in (one a line) or given with --prompt are answered without interaction.")
    add_model_args(p, "model directory")
    p.add_argument("--local", action="store_true", help="no swarm: every block in this process")
    add_client_args(p)
    _add_chat_args(p)
    p.set_defaults(func=cmd_chat)


def cmd_chat(args) -> int:
    from swarm.chat import Console, wait_for_swarm
    from swarm.launch import exit_on_signals

    set_threads(args.threads)
    with exit_on_signals():  # SIGTERM / SIGHUP close the client; a swarm short of some blocks is waited for
        model = open_model(args) if args.local else wait_for_swarm(lambda: open_model(args), Console(sys.stderr))
        try:
            return _chat(args, model)
        finally:
            if not args.local:
                model.close()


def add_demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="start a local swarm of three peers on the bundled model, then chat",
                       description="Starts three `swarm peer` processes on 127.0.0.1 (each a third of the model's "
                                   "blocks), then a chat through them (as `swarm chat`: Ctrl-C stops a reply, /quit "
                                   "leaves). The peers stop when the demo ends, however it ends.")
    p.add_argument("--peers", type=positive(), default=3, help="how many local peers to start [default: 3]")
    add_model_args(p, "model directory")
    add_client_args(p)
    _add_chat_args(p)
    p.set_defaults(func=cmd_demo, local=False)


def cmd_demo(args) -> int:
    """Peers in their own sessions (Ctrl-C reaches the chat only), stopped however the demo ends (local_swarm)."""
    from peer.model import Checkpoint
    from swarm.client.swarm_model import SwarmModel
    from swarm.launch import even_spans, local_swarm

    set_threads(args.threads or 1)
    spans = even_spans(Checkpoint(args.model).config.num_hidden_layers, args.peers)
    print(f"starting {args.peers} peers on 127.0.0.1 ...", file=sys.stderr)
    with local_swarm(args.model, spans) as peers:
        for p, span in zip(peers, spans):
            print(f"  peer …{p.peer_id[-8:]} serves blocks {span[0]}:{span[1]} at {p.addr}", file=sys.stderr)
        model = SwarmModel(args.model, [peers[0].addr] + args.initial_peers, client_config(args), args.dtype,
                           args.device)
        try:
            return _chat(args, model)
        finally:
            model.close()


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
    p.add_argument("--model", default=bundled.default_model(), required=bundled.default_model() is None,
                   help="model directory" + (" [default: the bundled model]" if bundled.default_model() else ""))
    p.add_argument("--draft", default=bundled.default_draft(), help="draft model directory for the speculative modes")
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

    return run_cli(args, client_config(args))


def add_simulate_parser(sub) -> None:
    from swarm.bench.simulate import add_arguments, run

    p = sub.add_parser("simulate", help="predict ms/token from RTTs, compute, draft cost and acceptance",
                       description="The analytic model of swarm.bench.simulate, from `swarm measure --json` output or flags.")
    add_arguments(p)
    p.set_defaults(func=run)


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
                add_measure_parser, add_simulate_parser):
        add(sub)
    for name in ("generate", "status", "chat", "demo", "measure"):  # `peer` has its own -v
        sub.choices[name].add_argument("-v", "--verbose", action="store_true",
                                       help="also show progress lines (INFO) and py-libp2p's own logs")
    for p in sub.choices.values():
        p.epilog = "\n".join(filter(None, [p.epilog, EXIT_CODES]))
        p.formatter_class = HelpFormatter
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
