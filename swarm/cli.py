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
from swarm.flags import (add_client_args, add_dataclass_args, add_decode_args, add_model_args, check_device,
                         client_config, dataclass_from_args, positive, sampling_params, spec_config)
from swarm.text import TextStream, load_tokenizer


def add_generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt",
                       description="Generate a continuation of a prompt. --local runs the whole model in this "
                                   "process: the reference every swarm mode is compared with.")
    add_model_args(p)
    p.add_argument("--local", action="store_true", help="run every block in this process")
    add_client_args(p)
    p.add_argument("--prompt", required=True)
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
                                   "inference sessions over libp2p until stopped (Ctrl-C).")
    add_model_args(p, "Hugging Face model directory")
    p.add_argument("--blocks", help="START:END, end exclusive (e.g. 0:4) [default: where the swarm is weakest]")
    p.add_argument("--num-blocks", type=positive(), help="how many blocks to take when choosing [default: what fits in memory]")
    p.add_argument("--listen", nargs="+", default=["/ip4/127.0.0.1/tcp/0"], metavar="MULTIADDR",
                   help="where to listen [default: /ip4/127.0.0.1/tcp/0; use /ip4/0.0.0.0/tcp/PORT to be reachable]")
    p.add_argument("--identity", help="key file; created on first use, same peer id on every restart")
    p.add_argument("--initial-peers", nargs="+", default=[], metavar="MULTIADDR")
    p.add_argument("--record-ttl", type=float, default=60.0, help="seconds a DHT announcement lives (refreshed at 1/3)")
    p.add_argument("--no-direct", dest="direct", action="store_false",
                   help="serve inference only over libp2p streams (no direct TCP port)")
    p.add_argument("--data-port", type=int, default=0, help="direct TCP port for inference streams [default: any]")
    p.add_argument("-v", "--verbose", action="store_true")
    add_dataclass_args(p.add_argument_group("limits (what this peer grants; docs/security.md)"), Limits)
    p.set_defaults(func=cmd_peer)


def cmd_peer(args) -> int:
    import asyncio
    import logging

    from peer.serve import PeerOptions, parse_blocks, serve
    from peer.limits import Limits

    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not args.verbose:  # libp2p logs every failed dial to a departed peer at ERROR
        logging.getLogger("libp2p").setLevel(logging.CRITICAL)
    check_device(args.device)
    opts = PeerOptions(args.model, parse_blocks(args.blocks) if args.blocks else None, args.num_blocks, args.listen,
                       args.identity, args.initial_peers, args.device, args.dtype, dataclass_from_args(Limits, args),
                       args.threads, args.direct, args.data_port, args.record_ttl)
    asyncio.run(serve(opts))
    return 0


def add_status_parser(sub) -> None:
    p = sub.add_parser("status", help="which peers serve which blocks of a model; gaps in coverage")
    p.add_argument("--initial-peers", nargs="+", required=True, metavar="MULTIADDR")
    model = bundled.default_model()
    p.add_argument("--model", default=model, required=model is None,
                   help="model directory (names the model)" + (" [default: the bundled model]" if model else ""))
    p.add_argument("--json", action="store_true")
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
    from swarm.chat import Chat, run_interactive, run_scripted

    draft = open_draft(args, args.command)
    chat = Chat(model, load_tokenizer(args.model), draft, spec_config(args), sampling_params(args), args.max_new_tokens)
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
    p = sub.add_parser("chat", help="chat with the model through the swarm (streaming, live stats)")
    add_model_args(p, "model directory")
    p.add_argument("--local", action="store_true", help="no swarm: every block in this process")
    add_client_args(p)
    _add_chat_args(p)
    p.set_defaults(func=cmd_chat)


def cmd_chat(args) -> int:
    set_threads(args.threads)
    model = open_model(args)
    try:
        return _chat(args, model)
    finally:
        if not args.local:
            model.close()


def add_demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="start a local swarm of three peers on the bundled model, then chat",
                       description="Starts three `swarm peer` processes on 127.0.0.1 (each a third of the model's "
                                   "blocks, stopped on exit), then a chat through them.")
    p.add_argument("--peers", type=positive(), default=3, help="how many local peers to start [default: 3]")
    add_model_args(p, "model directory")
    add_client_args(p)
    _add_chat_args(p)
    p.set_defaults(func=cmd_demo, local=False)


def cmd_demo(args) -> int:
    import tempfile

    from peer.model import Checkpoint
    from swarm.client.swarm_model import SwarmModel
    from swarm.launch import even_spans, start_peers

    set_threads(args.threads or 1)
    spans = even_spans(Checkpoint(args.model).config.num_hidden_layers, args.peers)
    logs = tempfile.mkdtemp(prefix="specswarm-demo-")
    print(f"starting {args.peers} peers on 127.0.0.1 (logs in {logs}) ...", file=sys.stderr)
    peers = start_peers(args.model, spans, log_dir=logs)
    try:
        for p, span in zip(peers, spans):
            print(f"  peer …{p.peer_id[-8:]} serves blocks {span[0]}:{span[1]} at {p.addr}", file=sys.stderr)
        model = SwarmModel(args.model, [peers[0].addr] + args.initial_peers, client_config(args), args.dtype,
                           args.device)
        try:
            return _chat(args, model)
        finally:
            model.close()
    finally:
        for p in peers:
            p.stop()
        print("stopped the demo peers", file=sys.stderr)


def add_measure_parser(sub) -> None:
    p = sub.add_parser("measure", help="per-hop RTT, compute per block, ms/token plain vs speculative, with predictions",
                       description="Measure a swarm (or an emulated WAN with --emulate) and print the simulator's "
                                   "prediction beside every end-to-end measurement.")
    from swarm.bench.wan.links import PROFILES

    add_client_args(p)
    p.add_argument("--emulate", choices=list(PROFILES),
                   help="instead of --initial-peers: start --peers peers here behind delay proxies of this profile")
    p.add_argument("--matrix", help="instead of --initial-peers: a JSON one-way latency matrix in ms (client first)")
    p.add_argument("--peers", type=int, default=2, help="peers of an emulated WAN")
    p.add_argument("--model", default=bundled.default_model(), required=bundled.default_model() is None)
    p.add_argument("--draft", default=bundled.default_draft())
    p.add_argument("--no-speculative", dest="speculative", action="store_false")
    p.add_argument("--prompts", type=int, default=3, help="first N HumanEval prompts")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--k", type=int, nargs="*", default=[2, 4, 8], help="fixed draft lengths to sweep")
    p.add_argument("--no-adaptive", dest="adaptive", action="store_false")
    p.add_argument("--pipeline", action="store_true", help="also adaptive + pipelined")
    p.add_argument("--tree", type=int, default=0, metavar="WIDTH", help="also a greedy tree of this width")
    p.add_argument("--relaxed", type=float, default=None, metavar="TAU", help="also relaxed acceptance (lossy)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--reps", type=int, default=5, help="repetitions of each ping and compute probe")
    p.add_argument("--threads", type=int, default=None)
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


class OneLineParser(argparse.ArgumentParser):
    """Flag mistakes get one line (and exit code 2), not the whole usage block: `--help` has that."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="swarm", description="specswarm: LLM inference over a swarm of peers "
                                                               "with distributed speculative decoding")
    parser.add_argument("--version", action="version", version=f"specswarm {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    add_generate_parser(sub)
    add_peer_parser(sub)
    add_status_parser(sub)
    add_chat_parser(sub)
    add_demo_parser(sub)
    add_measure_parser(sub)
    add_simulate_parser(sub)
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    if args.command != "peer":  # peers configure their own, more talkative logging
        import logging

        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        logging.getLogger("libp2p").setLevel(logging.CRITICAL)  # its dial retries are not the user's business
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except (ConfigError, CheckpointError, CacheError, FileNotFoundError, ValueError, RuntimeError, OSError) as e:
        print(f"swarm {args.command}: error: {e}", file=sys.stderr)
        return 2


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("specswarm")
    except PackageNotFoundError:
        return "(not installed)"


if __name__ == "__main__":
    sys.exit(main())
