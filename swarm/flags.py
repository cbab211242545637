"""Command-line flags shared by the `swarm` subcommands, and the objects they build.

Each group of flags is declared once and turned into the library's own object: client flags into a
`ClientConfig`, decoding flags into `SamplingParams` + `SpecConfig`, peer limits into `Limits` (the
flags are generated from its fields, with the field comments as help). Defaults come from those
objects; none is restated here. `--model NAME|DIR|FILE` and `--draft` are turned into directories by
`resolve_model_flag` / `resolve_draft_flag` (through `swarm.registry`): the one place every command
resolves them, when it runs, never at parse time (`--help` fetches nothing). Knows argparse and the
library's config objects; no policy.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap

from peer.model.quant import QUANTS
from swarm.argtypes import fraction, non_negative, number, positive
from swarm.client.config import TRANSPORTS, WIRE_DTYPES, ClientConfig
from swarm.decode.drafter import DRAFT_DTYPES, DRAFT_QUANTS
from swarm.decode.sampling import SamplingParams
from swarm.decode.speculative import SpecConfig
from swarm.registry import DEFAULT_MODEL, MODELS, resolve_draft, resolve_model

CLIENT = ClientConfig()
SPEC = SpecConfig()
DTYPES = ["float32", "bfloat16", "float16"]


def check_device(device: str) -> None:
    """A device this torch can use, or one line that says why not and what to do."""
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise ValueError(f"--device {device}: this torch ({torch.__version__}) is {build} and sees no GPU; "
                         "use --device cpu, or install a CUDA build of torch on a machine with an NVIDIA GPU")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"--device wants cpu, cuda or cuda:N, got {device!r}")


def apply_device_args(args) -> None:
    """--device checked (one line when this torch cannot use it) and --cuda-graphs applied to this process."""
    from peer.model import graphs

    check_device(args.device)
    graphs.set_default_mode("cuda" if getattr(args, "cuda_graphs", True) else "off")


def _auto_dtype(device: str = "cpu") -> str:
    from peer.model.checkpoint import auto_dtype

    return auto_dtype(device)


def resolve_dtype_flag(args) -> None:
    """--dtype auto as what it means for --device here (`peer.model.checkpoint.auto_dtype`), once, before anything
    loads or reports it."""
    if getattr(args, "dtype", None) == "auto":
        args.dtype = _auto_dtype(getattr(args, "device", "cpu"))


def add_model_flag(p) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, metavar="NAME|DIR|FILE",
                   help=f"a model name ({', '.join(MODELS)}; one the package does not ship is fetched and converted "
                        "on first use, then cached), a Hugging Face model directory (config.json, *.safetensors, "
                        "tokenizer.json) or a .gguf file (converted once) [default: %(default)s]")


def add_draft_flag(p) -> None:
    p.add_argument("--draft", default=None, metavar="NAME|DIR|FILE",
                   help="draft model for speculative decoding, as --model [default: the model's own draft, when it "
                        "has one]")
    p.add_argument("--draft-dtype", default="auto", choices=DRAFT_DTYPES,
                   help="the draft's weights and activations (it only proposes: the target verifies every token) "
                        "[default: auto, bfloat16]")
    p.add_argument("--draft-quant", default="auto", choices=DRAFT_QUANTS,
                   help="the draft's linear layers [default: auto, int8 on a CPU (faster drafts), none on a GPU]")


def resolve_model_flag(args) -> str:
    """--model as a model directory, resolved once (the spec as given stays in `args.model_spec`)."""
    if getattr(args, "model_spec", None) is None:
        args.model_spec, args.model = args.model, str(resolve_model(args.model))
    return args.model


def resolve_draft_flag(args) -> str | None:
    """--draft as a directory, resolved once: the draft named, else the model's own, else None (plain)."""
    resolve_model_flag(args)
    if getattr(args, "draft_spec", None) is None:
        args.draft_spec = args.draft or ""
        draft = resolve_draft(args.model_spec, args.draft)
        args.draft = str(draft) if draft else None
    return args.draft


def add_model_args(p) -> None:
    add_model_flag(p)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="weights and activations. auto: bfloat16 on a CPU with bfloat16 instructions (AMX, "
                        "AVX512-BF16), where every row is computed as if alone so that speculation stays exact, "
                        "float32 elsewhere (this machine: %s); bfloat16/float16 halve memory [default: auto]"
                        % _auto_dtype())
    p.add_argument("--quant", default="none", choices=QUANTS,
                   help="int8: weight-only int8 linear layers (one scale per output channel), half the memory of "
                        "bfloat16 for the blocks (and an untied LM head); activations stay in --dtype; on a CPU "
                        "fastest with --dtype bfloat16. nf4: 4-bit NormalFloat codes, one scale per 64 inputs, "
                        "~0.27 of bfloat16's memory, a little less accurate, dequantized per layer and call "
                        "(slower than bfloat16 on a CPU) [default: none]")
    p.add_argument("--threads", type=positive(), default=None, help="torch CPU threads (default: half the cores)")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                   help="on a CUDA device, run each session's steps of up to 32 tokens as CUDA graphs (captured per "
                        "session and step size on first use; prefill and batches of sessions run eagerly) "
                        "[default: on; no effect on a CPU]")


def add_client_args(p) -> None:
    """How the client reaches the swarm: every field of `ClientConfig` a user may set."""
    p.add_argument("--initial-peers", nargs="+", default=[], metavar="MULTIADDR",
                   help="peers to start from (their 'listening on' multiaddrs, with /p2p/<peer id>)")
    p.add_argument("--route", default=CLIENT.route,
                   help="explicit chain PEER:A:B,PEER:B:C,... (PEER: a peer id or its unique end)")
    p.add_argument("--no-dht", dest="discovery", action="store_false",
                   help="use only the --initial-peers, do not look for more peers in the DHT")
    p.add_argument("--push", action=argparse.BooleanOptionalAction, default=CLIENT.push,
                   help="--push: peers hand hidden states to the next peer (n + 1 hops); --no-push: client-mediated, "
                        "the client carries every hop (2n) [default: per route, whichever the measured RTTs predict "
                        "is faster]")
    p.add_argument("--wire-dtype", default=CLIENT.wire_dtype, choices=WIRE_DTYPES,
                   help="dtype of hidden states on the wire (float32 keeps outputs identical to --local)")
    p.add_argument("--timeout", type=positive(float), default=CLIENT.timeout,
                   help="seconds to wait for a peer's answer [default: %(default)s]")
    p.add_argument("--transport", default=CLIENT.transport, choices=TRANSPORTS,
                   help="carry inference traffic on peers' direct TCP ports (default, fastest) or on libp2p streams")
    p.add_argument("--ban-seconds", type=non_negative(), default=CLIENT.ban_seconds,
                   help="how long a peer that failed a step is left out of routes")
    p.add_argument("--max-failovers", type=non_negative(int), default=CLIENT.max_failovers,
                   help="re-routes one step may try before giving up")
    p.add_argument("--route-wait", type=non_negative(), default=CLIENT.route_wait, metavar="SECONDS",
                   help="how long the client waits, at the start and on a failover (looking again every second), "
                        "for a peer to serve blocks that no peer serves, before it gives up [default: %(default)s; "
                        "the chat then waits with a countdown of its own]")
    p.add_argument("--verify-rate", type=fraction(open_low=False), default=CLIENT.verify_rate, metavar="R",
                   help="spot-checks: the fraction of steps an independent replica of a span recomputes, compared "
                        "within the dtypes' honest error (besides every step of a new or suspect peer); a peer caught "
                        "lying is banned and the generation rolled back; 0 turns checks off [default: %(default)s]")
    p.add_argument("--verify-at-peer", action=argparse.BooleanOptionalAction, default=CLIENT.verify_at_peer,
                   help="--verify-at-peer: the route's last peer also runs the LM head, verifies each speculative round "
                        "and sends back only the verdict (never hidden states; it then sees the drafted and generated "
                        "token ids: docs/security.md); --no-verify-at-peer: this client verifies [default: on when the "
                        "last peer offers it and the vocabulary is >= 64 x the hidden size, or the client is on a CPU "
                        "and the head costs >= 64 M multiply-adds a token]")
    add_nat_args(p)
    p.add_argument("--insecure", action="store_true",
                   help="INSECURE, for benchmarks only: send hidden states and instructions in plaintext "
                        "(sessions are sealed end to end by default)")


def client_config(args) -> ClientConfig:
    return ClientConfig(push=args.push, wire_dtype=args.wire_dtype, transport=args.transport, sealed=not args.insecure,
                        timeout=args.timeout, ban_seconds=args.ban_seconds, max_failovers=args.max_failovers,
                        route_wait=args.route_wait, discovery=args.discovery, route=args.route,
                        paths=path_settings(args), verify_rate=args.verify_rate, verify_at_peer=args.verify_at_peer)


def add_nat_args(p) -> None:
    """How to reach peers behind NATs (peer/paths.py): WebRTC hole punching, STUN, TURN."""
    g = p.add_argument_group("peers behind NATs")
    g.add_argument("--no-webrtc", dest="webrtc", action="store_false",
                   help="reach peers behind NATs through their relay only (no WebRTC hole punching)")
    g.add_argument("--stun", metavar="stun:HOST:PORT",
                   help="STUN server for WebRTC [default: a public peer's own, learnt from the swarm]")
    g.add_argument("--turn", metavar="turn:HOST:PORT",
                   help="TURN server: WebRTC through it when NATs defeat hole punching (needs --turn-user/--turn-password)")
    g.add_argument("--turn-user", metavar="NAME", help="TURN user name")
    g.add_argument("--turn-password", metavar="SECRET", help="TURN password (long-term credential)")


def path_settings(args):
    from peer.paths import PathSettings

    return PathSettings(args.webrtc, args.stun, args.turn, args.turn_user, args.turn_password)


def add_decode_args(p, max_new_tokens: int, max_new_help: str = "") -> None:
    """Sampling and speculation: every field of `SamplingParams` and `SpecConfig` a user may set."""
    p.add_argument("--max-new-tokens", type=positive(), default=max_new_tokens,
                   help=(max_new_help or "tokens to generate") + " [default: %(default)s]")
    p.add_argument("--temperature", type=non_negative(), default=SamplingParams().temperature,
                   help="0 = greedy (default); higher samples more freely")
    p.add_argument("--top-p", type=fraction(), default=SamplingParams().top_p,
                   help="sample from the smallest set of tokens whose probabilities add up to P [default: %(default)s]")
    p.add_argument("--top-k", type=non_negative(int), default=0, metavar="K",
                   help="sample from the K likeliest tokens only (before --top-p; tokens tied with the K-th stay "
                        "too); 0: off [default: 0]")
    p.add_argument("--seed", type=int, default=0, help="random seed of sampling (same seed, same text) [default: 0]")
    add_draft_flag(p)
    p.add_argument("--speculative", action=argparse.BooleanOptionalAction, default=None,
                   help="draft locally, verify through the target [default: on through the swarm with a draft "
                        "that fits the model, off with --local]")
    p.add_argument("--k", type=positive(), default=SPEC.k, help="fixed draft length [default: adaptive]")
    p.add_argument("--k-max", type=positive(), default=SPEC.k_max, help="longest draft the adaptive choice may pick")
    p.add_argument("--tree", type=positive(), default=SPEC.tree_width, metavar="WIDTH",
                   help="allow draft trees up to WIDTH candidates for the next token (greedy: the draft's likeliest; "
                        "sampling: drawn without replacement, verified losslessly); with adaptive k the cost model "
                        "picks chain or tree, width and depth (under sampling it tries a tree now and then to measure it) "
                        "[default: 1, chains]")
    p.add_argument("--pipeline", action=argparse.BooleanOptionalAction, default=SPEC.pipeline,
                   help="send the next round before this one's verdict, assuming full acceptance [default: the cost "
                        "model decides per round from what pipelined rounds saved and cost: on over slow links, off on loopback]")
    p.add_argument("--draft-vocab", type=non_negative(int), default=SPEC.draft_vocab, metavar="N",
                   help="the draft model's LM head covers only the first N token ids (BPE's likeliest) and the "
                        "context's: a much cheaper draft token for a large vocabulary, the output unchanged; 0: the "
                        "whole vocabulary [default: %(default)s]")
    p.add_argument("--pipeline-depth", type=number(int, 2), default=SPEC.pipeline_depth, metavar="N",
                   help="when pipelining, at most N rounds in flight: the one awaited and N-1 sent ahead, each "
                        "assuming the ones before it are fully accepted (2: one ahead) [default: %(default)s]")
    p.add_argument("--relaxed", type=fraction(open_high=True), default=SPEC.relaxed, metavar="TAU",
                   help="LOSSY: also accept drafts close to the target's best (0 < TAU < 1); output may differ from the target's")
    p.add_argument("--ngram", action=argparse.BooleanOptionalAction, default=SPEC.ngram,
                   help="also draft from the text itself (prompt and output so far: the continuation of its longest "
                        "repeated suffix); the cost model picks the draft model, the n-gram draft, both in one tree, "
                        "or a plain step [default: on with adaptive k, off with a fixed --k]")
    p.add_argument("--ngram-max", type=positive(), default=SPEC.ngram_max, metavar="N",
                   help="longest n-gram the n-gram draft matches [default: %(default)s]")
    p.add_argument("--ngram-drafts", type=positive(), default=SPEC.ngram_drafts, metavar="N",
                   help="the most n-gram drafts in one round (the cost model sends fewer where they are unsure) "
                        "[default: %(default)s]")
    p.add_argument("--ngram-memory", action=argparse.BooleanOptionalAction, default=SPEC.ngram_memory,
                   help="the n-gram draft also recalls earlier replies of this process (a chat's, an API server's "
                        "requests'): similar requests repeat each other's phrases [default: on]")


def sampling_params(args) -> SamplingParams:
    return SamplingParams(args.temperature, args.top_p, args.top_k)


def spec_config(args) -> SpecConfig:
    return SpecConfig(k=args.k, k_max=args.k_max, tree_width=args.tree, pipeline=args.pipeline, relaxed=args.relaxed,
                      params=sampling_params(args), ngram=args.ngram, ngram_max=args.ngram_max,
                      ngram_memory=args.ngram_memory, ngram_drafts=args.ngram_drafts,
                      pipeline_depth=args.pipeline_depth, draft_vocab=args.draft_vocab or None)


# --- peer limits, generated from the dataclass ----------------------------------------------------
LIMIT_FLAGS = {"rate": "--max-rate"}  # fields whose flag is not simply --field-name


def field_comments(cls) -> dict[str, str]:
    """The `# comment` after each field of a dataclass, read from its source: the flags' help."""
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    out = {}
    for node in ast.parse(source).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            line = lines[node.lineno - 1]
            if "#" in line:
                out[node.target.id] = line.split("#", 1)[1].strip()
    return out


def add_dataclass_args(p, cls, prefix: str = "", planned: dict[str, str] | None = None) -> None:
    """A flag per field of `cls` (--PREFIX-FIELD-NAME), its comment as help; dest is the field name (with
    `prefix`_ before it when given). `planned` {field: what decides it}: flags whose default is chosen when the
    command runs (they parse to None when not given; `dataclass_from_args` then keeps the field's default)."""
    helps, planned = field_comments(cls), planned or {}
    for f in dataclasses.fields(cls):
        flag = ("--" + prefix + "-" + f.name.replace("_", "-")) if prefix else \
            LIMIT_FLAGS.get(f.name, "--" + f.name.replace("_", "-"))
        dest = f"{prefix}_{f.name}" if prefix else f.name
        text = helps.get(f.name, "")
        if f.type in (bool, "bool"):
            p.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=f.default, help=text)
        elif f.name in planned:
            kind = int if f.type in (int, "int") else float
            p.add_argument(flag, dest=dest, type=kind, default=None, help=f"{text} [default: {planned[f.name]}]")
        else:
            kind = int if f.type in (int, "int") else float
            p.add_argument(flag, dest=dest, type=kind, default=f.default, help=text + " [default: %(default)s]")


def dataclass_from_args(cls, args, prefix: str = ""):
    """`cls` from the flags `add_dataclass_args` made; a flag that parsed to None (a `planned` one not given) leaves
    the field at its default."""
    values = {f.name: getattr(args, f"{prefix}_{f.name}" if prefix else f.name) for f in dataclasses.fields(cls)}
    return cls(**{name: value for name, value in values.items() if value is not None})
