"""The `swarm` command line. Each subcommand parses its flags and calls into the library; no logic lives here."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from peer.model import CacheError, CheckpointError, ConfigError

from .generate import LocalModel, generate, load_tokenizer
from .sampling import SamplingParams

BUNDLED_MODELS = Path(__file__).parent / "models"
DEFAULT_MODEL = BUNDLED_MODELS / "code-target"
DEFAULT_DRAFT = BUNDLED_MODELS / "code-draft"


def _default_model() -> str | None:
    return str(DEFAULT_MODEL) if (DEFAULT_MODEL / "config.json").exists() else None


def add_generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt",
                       description="Generate a continuation of a prompt. --local runs the whole model in this "
                                   "process: the reference every swarm mode is compared with.")
    p.add_argument("--model", default=_default_model(), required=_default_model() is None,
                   help="Hugging Face model directory (config.json, *.safetensors, tokenizer.json)"
                        + (" [default: the bundled model]" if _default_model() else ""))
    p.add_argument("--local", action="store_true", help="run every block in this process")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    p.set_defaults(func=cmd_generate)


def cmd_generate(args) -> int:
    if not args.local:
        raise SystemExit("swarm generate: only --local is available in this version "
                         "(running through peers arrives with `swarm peer`)")
    if args.max_new_tokens < 1:
        raise SystemExit("swarm generate: --max-new-tokens must be at least 1")
    params = SamplingParams(args.temperature, args.top_p)
    t0 = time.perf_counter()
    model = LocalModel.load(args.model, args.dtype, args.device)
    tokenizer = model.tokenizer or load_tokenizer(args.model)
    load_seconds = time.perf_counter() - t0
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

    result = generate(model, prompt, args.max_new_tokens, params, args.seed, not args.ignore_eos, on_token)
    text = tokenizer.decode(result.tokens, skip_special_tokens=True)
    if args.json:
        print(json.dumps({
            "mode": "local", "model": str(args.model), "device": args.device, "dtype": args.dtype,
            "prompt_tokens": result.prompt_tokens, "tokens": result.tokens, "new_tokens": len(result.tokens),
            "text": text, "stopped_by": result.stopped_by, "seconds": round(result.seconds, 6),
            "tokens_per_s": round(result.tokens_per_s, 3), "load_seconds": round(load_seconds, 3),
            "temperature": args.temperature, "top_p": args.top_p, "seed": args.seed,
        }))
    else:
        sys.stdout.write("\n")
        print(f"[{len(result.tokens)} tokens in {result.seconds:.2f} s, {result.tokens_per_s:.1f} tokens/s, "
              f"local, {args.device}/{args.dtype}]", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="swarm", description="specswarm: LLM inference over a swarm of peers "
                                                               "with distributed speculative decoding")
    sub = parser.add_subparsers(dest="command", required=True)
    add_generate_parser(sub)
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    try:
        return args.func(args)
    except (ConfigError, CheckpointError, CacheError, FileNotFoundError, ValueError) as e:
        print(f"swarm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
