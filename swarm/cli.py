"""The `swarm` command line. Each subcommand parses its flags and calls into the library; no logic lives here."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from peer import set_threads
from peer.model import CacheError, CheckpointError, ConfigError

from swarm.decode.generate import LocalModel, generate, load_tokenizer
from swarm.decode.sampling import SamplingParams

from swarm.bundled import DEFAULT_DRAFT, DEFAULT_MODEL  # noqa: F401 - re-exported for scripts
from swarm.bundled import default_draft as _default_draft
from swarm.bundled import default_model as _default_model


def add_generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt",
                       description="Generate a continuation of a prompt. --local runs the whole model in this "
                                   "process: the reference every swarm mode is compared with.")
    p.add_argument("--model", default=_default_model(), required=_default_model() is None,
                   help="Hugging Face model directory (config.json, *.safetensors, tokenizer.json)"
                        + (" [default: the bundled model]" if _default_model() else ""))
    p.add_argument("--local", action="store_true", help="run every block in this process")
    p.add_argument("--initial-peers", nargs="+", default=[], metavar="MULTIADDR",
                   help="peers to start from (their 'listening on' multiaddrs, with /p2p/<peer id>)")
    p.add_argument("--route", help="explicit chain PEER:A:B,PEER:B:C,... (PEER: a peer id or its unique end)")
    p.add_argument("--no-dht", dest="discovery", action="store_false",
                   help="use only the --initial-peers, do not look for more peers in the DHT")
    p.add_argument("--no-push", dest="push", action="store_false",
                   help="client-mediated: carry hidden states between peers through the client (2n hops)")
    p.add_argument("--wire-dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of hidden states on the wire (float32 keeps outputs identical to --local)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for a peer's answer")
    p.add_argument("--transport", default="tcp", choices=["tcp", "libp2p"],
                   help="carry inference traffic on peers' direct TCP ports (default, fastest) or on libp2p streams")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: half the cores)")
    p.add_argument("--insecure", action="store_true",
                   help="INSECURE, for benchmarks only: send hidden states and instructions in plaintext "
                        "(sessions are sealed end to end by default)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")
    p.add_argument("--draft", default=_default_draft(),
                   help="draft model directory for speculative decoding" + (" [default: the bundled draft]" if _default_draft() else ""))
    p.add_argument("--speculative", action=argparse.BooleanOptionalAction, default=None,
                   help="draft locally, verify through the target [default: on through the swarm, off with --local]")
    p.add_argument("--k", type=int, default=None, help="fixed draft length [default: adaptive]")
    p.add_argument("--k-max", type=int, default=8, help="longest draft the adaptive choice may pick")
    p.add_argument("--tree", type=int, default=1, metavar="WIDTH",
                   help="allow draft trees up to WIDTH candidates for the next token (greedy only: sampling falls back "
                        "to chains); with adaptive k the cost model picks chain or tree, width and depth [default: 1, chains]")
    p.add_argument("--pipeline", action=argparse.BooleanOptionalAction, default=None,
                   help="send the next round before this one's verdict, assuming full acceptance [default: the cost "
                        "model decides per round from what pipelined rounds saved and cost: on over slow links, off on loopback]")
    p.add_argument("--relaxed", type=float, default=None, metavar="TAU",
                   help="LOSSY: also accept drafts close to the target's best (0 < TAU < 1); output may differ from the target's")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    p.set_defaults(func=cmd_generate)


def cmd_generate(args) -> int:
    if args.local == bool(args.initial_peers):
        raise SystemExit("swarm generate: give either --local or --initial-peers")
    if args.max_new_tokens < 1:
        raise SystemExit("swarm generate: --max-new-tokens must be at least 1")
    set_threads(args.threads)
    params = SamplingParams(args.temperature, args.top_p)
    t0 = time.perf_counter()
    if args.local:
        model = LocalModel.load(args.model, args.dtype, args.device)
    else:
        from swarm.client import chain as client
        from swarm.client.swarm_model import SwarmModel

        if args.insecure:
            print("WARNING: --insecure: hidden states and instructions travel in PLAINTEXT", file=sys.stderr)
            client.SEALED_BY_DEFAULT = False
        model = SwarmModel(args.model, args.initial_peers, args.route, args.push, args.dtype, args.device,
                           args.wire_dtype, args.timeout, args.transport, discovery=args.discovery)
    try:
        return _generate(args, model, params, time.perf_counter() - t0)
    finally:
        if not args.local:
            model.close()


def _generate(args, model, params: SamplingParams, load_seconds: float) -> int:
    tokenizer = model.tokenizer or load_tokenizer(args.model)
    prompt = tokenizer.encode(args.prompt).ids
    if not prompt and model.head.cfg.bos_token_id is not None:
        prompt = [model.head.cfg.bos_token_id]
    if not prompt:
        raise SystemExit("swarm generate: the prompt is empty after tokenization")

    if not args.json:
        sys.stdout.write(args.prompt)
    shown, new_tokens = "", []

    def on_token(token: int) -> None:
        nonlocal shown
        new_tokens.append(token)
        if not args.json:  # stream: print what the new token added to the decoded text
            text = tokenizer.decode(new_tokens, skip_special_tokens=True)
            sys.stdout.write(text[len(shown):])
            sys.stdout.flush()
            shown = text

    # on by default through the swarm, with the bundled draft only for the bundled model (same tokenizer)
    paired = args.draft != _default_draft() or args.model == _default_model()
    speculative = args.speculative if args.speculative is not None else (not args.local and bool(args.draft) and paired)
    spec_fields = {}
    if speculative:
        from swarm.decode.speculative import SpecConfig, generate_speculative

        if not args.draft:
            raise SystemExit("swarm generate: --speculative needs --draft DIR")
        if args.relaxed is not None:
            print(f"WARNING: --relaxed {args.relaxed} is lossy: the output may differ from the target model's own",
                  file=sys.stderr)
        cfg = SpecConfig(k=args.k, k_max=args.k_max, tree_width=args.tree, pipeline=args.pipeline,
                         relaxed=args.relaxed, params=params)
        draft = LocalModel.load(args.draft, args.dtype, args.device)
        result = generate_speculative(model, draft, prompt, args.max_new_tokens, cfg, args.seed, not args.ignore_eos,
                                      lambda tokens: [on_token(t) for t in tokens])
        spec_fields = {"rounds": result.rounds, "tokens_per_round": round(result.tokens_per_round, 3),
                       "wasted_rounds": result.wasted_rounds,
                       "acceptance_rate": round(result.acceptance_rate, 4), "k": args.k if args.k else "adaptive",
                       "draft": str(args.draft), "lossy": args.relaxed is not None}
        mode = cfg.mode
    else:
        result = generate(model, prompt, args.max_new_tokens, params, args.seed, not args.ignore_eos, on_token)
        mode = "plain"
    text = tokenizer.decode(result.tokens, skip_special_tokens=True)
    if args.json:
        extra = {} if args.local else {"route": [str(h) for h in model.route], "push": args.push,
                                       "wire_dtype": args.wire_dtype, "transport": args.transport}
        print(json.dumps({
            "mode": mode, "where": "local" if args.local else ("push" if args.push else "client-mediated"), **spec_fields,
            "model": str(args.model), "device": args.device, "dtype": args.dtype, **extra,
            "prompt_tokens": result.prompt_tokens, "tokens": result.tokens, "new_tokens": len(result.tokens),
            "text": text, "stopped_by": result.stopped_by, "seconds": round(result.seconds, 6),
            "tokens_per_s": round(result.tokens_per_s, 3), "load_seconds": round(load_seconds, 3),
            "temperature": args.temperature, "top_p": args.top_p, "seed": args.seed,
        }))
    else:
        sys.stdout.write("\n")
        where = "local" if args.local else "route " + " -> ".join(str(h) for h in model.route)
        per_round = f", {result.tokens_per_round:.2f} tokens/round" if speculative else ""
        print(f"[{len(result.tokens)} tokens in {result.seconds:.2f} s, {result.tokens_per_s:.1f} tokens/s{per_round}, "
              f"{mode}, {where}, {args.device}/{args.dtype}]", file=sys.stderr)
    return 0


def add_peer_parser(sub) -> None:
    p = sub.add_parser("peer", help="serve a range of the model's blocks to the swarm",
                       description="Join the swarm as a volunteer: load blocks START:END of the model and serve "
                                   "inference sessions over libp2p until stopped (Ctrl-C).")
    p.add_argument("--model", default=_default_model(), required=_default_model() is None,
                   help="Hugging Face model directory" + (" [default: the bundled model]" if _default_model() else ""))
    p.add_argument("--blocks", help="START:END, end exclusive (e.g. 0:4) [default: where the swarm is weakest]")
    p.add_argument("--num-blocks", type=int, help="how many blocks to take when choosing [default: what fits in memory]")
    p.add_argument("--listen", nargs="+", default=["/ip4/127.0.0.1/tcp/0"], metavar="MULTIADDR",
                   help="where to listen [default: /ip4/127.0.0.1/tcp/0; use /ip4/0.0.0.0/tcp/PORT to be reachable]")
    p.add_argument("--identity", help="key file; created on first use, same peer id on every restart")
    p.add_argument("--initial-peers", nargs="+", default=[], metavar="MULTIADDR")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--cache-tokens", type=int, default=32768, help="KV cache budget: total tokens over all sessions")
    p.add_argument("--max-sessions", type=int, default=64)
    p.add_argument("--record-ttl", type=float, default=60.0, help="seconds a DHT announcement lives (refreshed at 1/3)")
    p.add_argument("--session-timeout", type=float, default=600.0, help="seconds before an idle session is dropped")
    p.add_argument("--max-sessions-per-client", type=int, default=16,
                   help="sessions one client (libp2p peer id, or IP on the direct port) may hold")
    p.add_argument("--max-session-tokens", type=int, default=8192, help="cache tokens (max length) of one session")
    p.add_argument("--max-frame", type=int, default=64 * 1024 * 1024, help="largest frame accepted, in bytes")
    p.add_argument("--frame-timeout", type=float, default=30.0,
                   help="seconds a started frame may take to arrive in full (slow senders are dropped; 0: no limit)")
    p.add_argument("--max-rate", type=float, default=1000.0,
                   help="frames per second per connection, sustained (above it reading slows down; 0: unlimited)")
    p.add_argument("--burst", type=int, default=2000, help="frames a connection may send at once above --max-rate")
    p.add_argument("--max-connections", type=int, default=512, help="open inference streams in total")
    p.add_argument("--require-encryption", action="store_true",
                   help="refuse plaintext sessions (clients seal by default; see docs/security.md)")
    p.add_argument("--no-direct", dest="direct", action="store_false",
                   help="serve inference only over libp2p streams (no direct TCP port)")
    p.add_argument("--data-port", type=int, default=0, help="direct TCP port for inference streams [default: any]")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: half the cores)")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=cmd_peer)


def cmd_peer(args) -> int:
    import asyncio
    import logging

    from peer.serve import PeerOptions, parse_blocks, serve
    from peer.server import Limits

    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not args.verbose:  # libp2p logs every failed dial to a departed peer at ERROR
        logging.getLogger("libp2p").setLevel(logging.CRITICAL)
    limits = Limits(cache_tokens=args.cache_tokens, max_sessions=args.max_sessions,
                    session_timeout=args.session_timeout, max_sessions_per_client=args.max_sessions_per_client,
                    max_session_tokens=args.max_session_tokens, max_frame=args.max_frame,
                    frame_timeout=args.frame_timeout, rate=args.max_rate, burst=args.burst,
                    max_connections=args.max_connections, require_encryption=args.require_encryption)
    opts = PeerOptions(args.model, parse_blocks(args.blocks) if args.blocks else None, args.num_blocks, args.listen,
                       args.identity, args.initial_peers, args.device, args.dtype, limits, args.threads, args.direct,
                       args.data_port, args.record_ttl)
    asyncio.run(serve(opts))
    return 0


def add_status_parser(sub) -> None:
    p = sub.add_parser("status", help="which peers serve which blocks of a model; gaps in coverage")
    p.add_argument("--initial-peers", nargs="+", required=True, metavar="MULTIADDR")
    p.add_argument("--model", default=_default_model(), required=_default_model() is None,
                   help="model directory (names the model)" + (" [default: the bundled model]" if _default_model() else ""))
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


def _add_chat_args(p) -> None:
    p.add_argument("--model", default=_default_model(), required=_default_model() is None,
                   help="model directory" + (" [default: the bundled model]" if _default_model() else ""))
    p.add_argument("--draft", default=_default_draft(), help="draft model directory [default: the bundled draft]")
    p.add_argument("--no-speculative", dest="speculative", action="store_false")
    p.add_argument("--k", type=int, default=None, help="fixed draft length [default: adaptive]")
    p.add_argument("--tree", type=int, default=1, metavar="WIDTH")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=96, help="per reply")
    p.add_argument("--prompt", nargs="+", help="answer these prompts and exit (no interaction)")
    p.add_argument("--threads", type=int, default=None)


def _chat(args, model) -> int:
    from swarm.chat import Chat, run_interactive, run_scripted
    from swarm.decode.speculative import SpecConfig

    paired = args.draft != _default_draft() or args.model == _default_model()  # the bundled draft fits the bundled model
    draft = LocalModel.load(args.draft) if args.speculative and args.draft and paired else None
    cfg = SpecConfig(k=args.k, tree_width=args.tree, params=SamplingParams(args.temperature, args.top_p))
    chat = Chat(model, draft, cfg, args.max_new_tokens)
    if args.prompt or not sys.stdin.isatty():
        run_scripted(chat, args.prompt or [line.rstrip("\n") for line in sys.stdin if line.strip()])
    else:
        run_interactive(chat)
    return 0


def add_chat_parser(sub) -> None:
    p = sub.add_parser("chat", help="chat with the model through the swarm (streaming, live stats)")
    p.add_argument("--initial-peers", nargs="+", default=[], metavar="MULTIADDR")
    p.add_argument("--local", action="store_true", help="no swarm: every block in this process")
    _add_chat_args(p)
    p.set_defaults(func=cmd_chat)


def cmd_chat(args) -> int:
    set_threads(args.threads)
    if not args.local and not args.initial_peers:
        raise SystemExit("swarm chat: give --initial-peers MULTIADDR (a peer's 'listening on' line) or --local")
    if args.local:
        return _chat(args, LocalModel.load(args.model))
    from swarm.client.swarm_model import SwarmModel

    model = SwarmModel(args.model, args.initial_peers)
    try:
        return _chat(args, model)
    finally:
        model.close()


def add_demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="start a local swarm of three peers on the bundled model, then chat",
                       description="Starts three `swarm peer` processes on 127.0.0.1 (each a third of the model's "
                                   "blocks, stopped on exit), then a chat through them.")
    p.add_argument("--peers", type=int, default=3)
    _add_chat_args(p)
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    import tempfile

    from swarm.launch import even_spans, start_peers
    from swarm.client.swarm_model import SwarmModel

    set_threads(args.threads or 1)
    from peer.model import Checkpoint

    spans = even_spans(Checkpoint(args.model).config.num_hidden_layers, args.peers)
    logs = tempfile.mkdtemp(prefix="specswarm-demo-")
    print(f"starting {args.peers} peers on 127.0.0.1 (logs in {logs}) ...", file=sys.stderr)
    peers = start_peers(args.model, spans, log_dir=logs)
    try:
        for p, span in zip(peers, spans):
            print(f"  peer …{p.peer_id[-8:]} serves blocks {span[0]}:{span[1]} at {p.addr}", file=sys.stderr)
        model = SwarmModel(args.model, [peers[0].addr])
        try:
            if not args.prompt and not sys.stdin.isatty():
                args.prompt = ["def fibonacci(n):"]
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
    p.add_argument("--initial-peers", nargs="+", default=[], metavar="MULTIADDR")
    p.add_argument("--emulate", choices=["loopback", "lan", "metro", "continental", "intercontinental", "heterogeneous"],
                   help="instead of --initial-peers: start --peers peers here behind delay proxies of this profile")
    p.add_argument("--matrix", help="instead of --initial-peers: a JSON one-way latency matrix in ms (client first)")
    p.add_argument("--peers", type=int, default=2, help="peers of an emulated WAN")
    p.add_argument("--model", default=_default_model(), required=_default_model() is None)
    p.add_argument("--draft", default=_default_draft())
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
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true", help="one JSON object: an entry per measured quantity")
    p.add_argument("--plot", metavar="FILE.png", help="bar chart of measured vs predicted ms/token (matplotlib)")
    p.set_defaults(func=cmd_measure)


def cmd_measure(args) -> int:
    from swarm.bench.measure import run_cli

    return run_cli(args)


def add_simulate_parser(sub) -> None:
    from swarm.bench.simulate import add_arguments, run

    p = sub.add_parser("simulate", help="predict ms/token from RTTs, compute, draft cost and acceptance",
                       description="The analytic model of swarm.bench.simulate, from `swarm measure --json` output or flags.")
    add_arguments(p)
    p.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="swarm", description="specswarm: LLM inference over a swarm of peers "
                                                               "with distributed speculative decoding")
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


if __name__ == "__main__":
    sys.exit(main())
