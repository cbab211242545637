"""The `swarm api` process (and `swarm demo --web`'s): its own flags, and the server run from all the flags.

`add_server_args` declares where it listens and how it serves (host, port, API key, the model's name,
concurrent generations, request timeout); `run` builds the engine from the client and decoding flags
(`swarm.flags`: defaults, sampling, speculation; the draft is opened by the caller, as `swarm chat`
does), opens the model (waiting for the swarm in the background when it does not cover the model
yet), prints the URL and serves until Ctrl-C or SIGTERM. (`--help` imports none of the server: its
imports are in `run`.)

Knows argparse, the flags' objects, tokenizers and chat templates, and the API's parts; nothing of
HTTP details, sampling or peers.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Callable

from typing import TYPE_CHECKING

from swarm.argtypes import positive

if TYPE_CHECKING:
    from swarm.decode.target import LocalModel, Model


def add_server_args(p, web: bool = False) -> None:
    """The HTTP server's flags (`web`: for `swarm demo --web`, whose help says so)."""
    w = " (with --web)" if web else ""
    g = p.add_argument_group("the HTTP server" + w)
    g.add_argument("--host", default="127.0.0.1", help=f"address to listen on{w}; 0.0.0.0 for every interface "
                   "[default: %(default)s: this machine only]")
    g.add_argument("--port", type=int, default=8000, help=f"port to listen on{w} (0: any free port) [default: %(default)s]")
    g.add_argument("--api-key", metavar="KEY", help=f"require 'Authorization: Bearer KEY' on /v1/ routes{w} "
                   "[default: none, anyone who reaches the port may use it]")
    g.add_argument("--served-model-name", metavar="NAME", help=f"the model's name in the API{w} "
                   "[default: --model as given]")
    g.add_argument("--max-concurrent", type=positive(), default=8, help=f"generations at once{w}, each with its own "
                   "sessions on the peers; more requests wait their turn (peers grant one client 16 sessions by "
                   "default: --max-sessions-per-client) [default: %(default)s]")
    g.add_argument("--request-timeout", type=positive(float), default=600.0, metavar="SECONDS",
                   help=f"a request still generating after this long is cut short (504){w} [default: %(default)s]")


def run(args, open_model: Callable[[], Model], draft: LocalModel | None, initial_peers: list[str]) -> int:
    """Serve the API and the page until stopped; the model opened with `open_model` (the swarm's or local)."""
    from peer.model import Checkpoint
    from swarm.api.engine import Engine
    from swarm.api.schemas import Defaults
    from swarm.api.server import Server, serve
    from swarm.api.swarm_map import SwarmMap
    from swarm.flags import path_settings, spec_config
    from swarm.text import ChatTemplate, load_tokenizer

    tokenizer = load_tokenizer(args.model)
    template = ChatTemplate.load(args.model, tokenizer)
    ckpt = Checkpoint(args.model)
    spec = spec_config(args) if draft is not None else None
    name = args.served_model_name or str(getattr(args, "model_spec", None) or args.model)
    names = list(dict.fromkeys([name, str(getattr(args, "model_spec", name)), args.model, ckpt.model_id]))
    info = {"model_id": ckpt.model_id, "num_blocks": ckpt.config.num_hidden_layers,
            "context": ckpt.config.max_position_embeddings, "chat_template": template is not None,
            "mode": spec.mode if spec else "plain", "draft": str(args.draft) if draft is not None else None}
    engine = Engine(open_model, tokenizer, template, draft, spec, seed=args.seed, workers=args.max_concurrent,
                    timeout=args.request_timeout)
    local = getattr(args, "local", False)
    swarm_map = SwarmMap(engine, ckpt.model_id, ckpt.config.num_hidden_layers, initial_peers, path_settings(args),
                         local=local)
    defaults = Defaults(args.max_new_tokens, args.temperature, args.top_p, args.top_k or None)
    server = Server(engine, swarm_map, names, defaults, args.api_key, info)
    print(f"model {name}: {'every block in this process' if local else 'connecting to the swarm…'}", file=sys.stderr)

    def listening(url: str) -> None:
        print(f"serving the web page at {url}/ and the OpenAI API at {url}/v1 (model {name!r}); Ctrl-C stops",
              flush=True)

    try:
        engine.start(on_ready=lambda model: print(f"ready: {_where(model)}", file=sys.stderr, flush=True))
        asyncio.run(serve(server, args.host, args.port, listening))
    except BaseException:
        engine.close()  # (idempotent) a server that never started still has an engine to close
        raise
    return 0


def _where(model: Model) -> str:
    route = getattr(model, "route", None)
    if route is None:
        return "every block in this process"
    return f"route {' -> '.join(f'…{h.peer_id[-6:]}[{h.blocks[0]}:{h.blocks[1]}]' for h in route)}"
