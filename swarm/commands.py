"""The `swarm` subcommands that produce text: `generate`, `chat` and `demo` (their parsers and what they
run), and the opening of the target and the draft they share.

The model and the draft are resolved (`swarm.flags.resolve_model_flag` / `resolve_draft_flag`: a NAME
fetched and converted on first use) when a command runs, after its flags were checked. Knows argparse,
which library call each subcommand makes and how a chat is set up (template or raw continuation;
`demo --web` hands the demo's swarm to `swarm.api.run` instead); no defaults (they live in the objects
the flags build) and no decoding or network policy.
"""

from __future__ import annotations

import json
import sys
import time

from peer import set_threads
from swarm import bundled
from swarm.argtypes import positive
from swarm.client.integrity import with_rollback
from swarm.decode.drafter import load_draft
from swarm.decode.generate import generate
from swarm.decode.target import LocalModel
from swarm.flags import (add_client_args, add_decode_args, add_model_args, apply_device_args, client_config,
                         resolve_draft_flag, resolve_model_flag, sampling_params, spec_config)
from swarm.text import ChatTemplate, TextStream, load_tokenizer

DEMO_PROMPTS = {True: "Write a Python function that reverses a string.", False: "def fibonacci(n):"}  # chat model?


def add_generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt",
                       description="Generate a continuation of a prompt (raw text, no chat template). --local runs "
                                   "the whole model in this process: the reference every swarm mode is compared with.")
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
    apply_device_args(args)
    if args.local == bool(args.initial_peers):
        raise ValueError("give either --local or --initial-peers MULTIADDR "
                         "(a peer's 'listening on' line)")
    model = resolve_model_flag(args)
    if args.local:
        return LocalModel.load(model, args.dtype, args.device, args.quant)
    from swarm.client.swarm_model import SwarmModel

    if args.insecure:
        print("WARNING: --insecure: hidden states and instructions travel in PLAINTEXT", file=sys.stderr)
    return SwarmModel(model, args.initial_peers, client_config(args), args.dtype, args.device, quant=args.quant)


def open_draft(args, command: str) -> LocalModel | None:
    """The draft model, when speculation is on (explicitly, or by default: see `bundled.speculative_default`)."""
    reference = command == "generate" and args.local  # the local reference run decodes plainly by default
    model_spec = getattr(args, "model_spec", None) or args.model
    draft_spec = args.draft if getattr(args, "draft_spec", None) is None else args.draft_spec
    on = args.speculative if args.speculative is not None else bundled.speculative_default(model_spec, draft_spec,
                                                                                          reference)
    if not on:
        return None
    draft = resolve_draft_flag(args)
    if not draft:
        raise ValueError(f"--speculative needs --draft NAME|DIR|FILE ({model_spec} has no draft of its own)")
    if args.relaxed is not None:
        print(f"WARNING: --relaxed {args.relaxed} is lossy: the output may differ from the target model's own",
              file=sys.stderr)
    return load_draft(draft, args.device, args.draft_dtype, args.draft_quant)


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

    def run(on_tokens):
        return generate(model, prompt, args.max_new_tokens, sampling_params(args), draft=draft, spec=spec,
                        seed=args.seed, stop_at_eos=not args.ignore_eos, on_tokens=on_tokens)

    result = run(stream.add) if args.local else with_rollback(model, run, stream.add, lambda i: _rewind(args, stream, i))
    integrity = None if args.local else model.audit.last
    mode = spec.mode if spec else "plain"
    where = "local" if args.local else model.config.where
    if args.json:
        out = {"mode": mode, "where": where, **result.stats(), "model": str(args.model), "device": args.device,
               "dtype": args.dtype, "quant": args.quant, **result.summary(),
               "text": tokenizer.decode(result.tokens, skip_special_tokens=True),
               "load_seconds": round(load_seconds, 3), "temperature": args.temperature, "top_p": args.top_p,
               "top_k": args.top_k or None, "seed": args.seed}
        if spec:
            out.update(k=args.k if args.k else "adaptive", draft=str(args.draft), lossy=args.relaxed is not None)
        if not args.local:
            cfg = model.config
            out.update(route=[str(h) for h in model.route], push=cfg.push, wire_dtype=cfg.wire_dtype,
                       transport=cfg.transport, paths=[model.paths.path_of(h.peer_id) or "direct" for h in model.route],
                       unverified=integrity["unverified"], integrity=integrity)
        print(json.dumps(out))
    else:
        sys.stdout.write("\n")
        route = "local" if args.local else "route " + " -> ".join(
            f"{h}" + (f" ({p})" if (p := model.paths.path_of(h.peer_id)) not in (None, "direct") else "")
            for h in model.route)
        per_round = f", {result.tokens_per_round:.2f} tokens/round" if spec else ""
        weights = args.dtype if args.quant == "none" else f"{args.dtype}+{args.quant}"
        print(f"[{len(result.tokens)} tokens in {result.seconds:.2f} s, {result.tokens_per_s:.1f} tokens/s{per_round}, "
              f"{mode}, {route}, {args.device}/{weights}]", file=sys.stderr)
    if integrity and integrity["unverified"] and not args.json:  # (--json says it in its `unverified` field)
        print(f"WARNING: output unverified: blocks {', '.join(integrity['unverified_spans'])} had no independent "
              f"replica to check them against" + (" (--verify-rate 0)" if not integrity["verify_rate"] else ""),
              file=sys.stderr)
    return 0


def _rewind(args, stream: TextStream, i: int) -> None:
    """A peer was caught lying after its tokens were shown: say so, and show the text again up to token i."""
    del stream.tokens[i:]
    stream.text = stream.tokenizer.decode(stream.tokens, skip_special_tokens=True)
    print("\nWARNING: a peer returned wrong hidden states; it is banned and the text is regenerated from here:",
          file=sys.stderr)
    if not args.json:
        sys.stdout.write(args.prompt + stream.text)
        sys.stdout.flush()


def _chat(args, model) -> int:
    from swarm.chat import Chat, Console, run_interactive, run_scripted

    draft = open_draft(args, args.command)
    tokenizer = load_tokenizer(args.model)
    template = ChatTemplate.load(args.model, tokenizer)
    chat = Chat(model, tokenizer, draft, spec_config(args), sampling_params(args), args.max_new_tokens,
                seed=args.seed, console=Console(), template=template, system=args.system)
    if args.prompt or not sys.stdin.isatty():  # prompts given, or piped in (a demo with no input answers one)
        prompts = args.prompt or [line.rstrip("\n") for line in sys.stdin if line.strip()]
        run_scripted(chat, prompts or ([DEMO_PROMPTS[template is not None]] if args.command == "demo" else []))
    else:
        run_interactive(chat)
    return 0


def _add_chat_args(p) -> None:
    add_decode_args(p, max_new_tokens=256, max_new_help="per reply")
    p.add_argument("--prompt", nargs="+", help="answer these prompts and exit (no interaction)")
    p.add_argument("--system", metavar="TEXT", help="the system prompt (a model with a chat template; /system TEXT "
                   "in the chat) [default: the template's own, if any]")


def add_chat_parser(sub) -> None:
    p = sub.add_parser("chat", help="chat with the model through the swarm (streaming, live stats)",
                       description="Chat through the swarm: replies stream, with a live status line on a terminal. "
                                   "A model with a chat template gets turns in its template and stops at its "
                                   "end-of-turn token; one without continues the text. Ctrl-C stops a reply, not "
                                   "the chat; /system TEXT /reset /stats /quit. While no peer serves some blocks the "
                                   "chat waits (a countdown) and goes on once one does. Prompts piped in (one a "
                                   "line) or given with --prompt are answered without interaction.")
    add_model_args(p)
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
    p = sub.add_parser("demo", help="start a local swarm of three peers on the default model, then chat",
                       description="Starts three `swarm peer` processes on 127.0.0.1 (each a third of the model's "
                                   "blocks), then a chat through them (as `swarm chat`: Ctrl-C stops a reply, /quit "
                                   "leaves). The peers stop when the demo ends, however it ends.")
    p.add_argument("--peers", type=positive(), default=3, help="how many local peers to start [default: 3]")
    add_model_args(p)
    add_client_args(p)
    _add_chat_args(p)
    p.add_argument("--web", action="store_true", help="instead of the terminal chat: serve the web page (the swarm's "
                   "map and a chat) and the OpenAI-compatible API (as `swarm api`), and print its URL")
    from swarm.api.run import add_server_args

    add_server_args(p, web=True)
    p.set_defaults(func=cmd_demo, local=False)


def cmd_demo(args) -> int:
    """Peers in their own sessions (Ctrl-C reaches the chat only), stopped however the demo ends (local_swarm)."""
    from peer.model import Checkpoint
    from swarm.client.swarm_model import SwarmModel
    from swarm.launch import even_spans, local_swarm

    set_threads(args.threads or 1)
    apply_device_args(args)
    model_dir = resolve_model_flag(args)
    spans = even_spans(Checkpoint(model_dir).config.num_hidden_layers, args.peers)
    print(f"starting {args.peers} peers on 127.0.0.1 ...", file=sys.stderr)
    weights = ("--device", args.device, "--dtype", args.dtype, "--quant", args.quant,  # the peers' as the client's
               *(() if args.cuda_graphs else ("--no-cuda-graphs",)))
    with local_swarm(model_dir, spans, *weights) as peers:
        for p, span in zip(peers, spans):
            print(f"  peer …{p.peer_id[-8:]} serves blocks {span[0]}:{span[1]} at {p.addr}", file=sys.stderr)
        if args.web:
            from swarm.api.run import run

            addrs = [peers[0].addr] + args.initial_peers
            return run(args, lambda: SwarmModel(model_dir, addrs, client_config(args), args.dtype, args.device,
                                                quant=args.quant), open_draft(args, "demo"), addrs)
        model = SwarmModel(model_dir, [peers[0].addr] + args.initial_peers, client_config(args), args.dtype,
                           args.device, quant=args.quant)
        try:
            return _chat(args, model)
        finally:
            model.close()
