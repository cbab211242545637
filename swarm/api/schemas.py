"""OpenAI's API as JSON: requests read and checked, responses, stream chunks and errors written.

`parse_request` turns the JSON body of `POST /v1/completions` or `/v1/chat/completions` into a
`GenRequest` (what to generate and how), or raises `APIError` (status 400, OpenAI's error shape,
naming the parameter) for what we cannot honour: a bad value, an unknown model, `n` > 1, a feature
we do not have (logprobs, tools, penalties). Parameters a request leaves out take the server's
defaults (`Defaults`: the `--max-new-tokens`, `--temperature`, `--top-p`, `--top-k` flags). `completion`,
`chunk` and `usage` write OpenAI's shapes; our own numbers (speculative rounds, route) go in an
extra `"specswarm"` field that standard clients ignore.

Knows JSON shapes and HTTP status codes; nothing of models, tokenizers, threads or the network.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field

MAX_STOPS = 4  # as OpenAI
ROLES = {"system", "developer", "user", "assistant"}


class APIError(Exception):
    """An error as OpenAI answers it: an HTTP status and {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
                             503: "server_error", 504: "server_error"}.get(status, "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code or ("invalid_value" if param else None))


@dataclass
class Defaults:
    """What a request that leaves a parameter out gets (the server's flags)."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int | None = None  # None: off


@dataclass
class GenRequest:
    chat: bool  # /v1/chat/completions (messages) or /v1/completions (prompt)
    model: str
    prompt: str | list[int] = ""  # completions: text, or token ids
    messages: list[dict] = field(default_factory=list)  # chat: [{"role", "content": str}]
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int | None = None  # (vLLM's extension) the k likeliest tokens only; None: off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    ignore_eos: bool = False  # (vLLM's extension) keep going past the end-of-sequence token
    echo: bool = False  # completions: the prompt's text comes back before the completion


def read_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad(f"We could not parse the JSON body of your request ({e}).", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad("The request body must be a JSON object.", code="invalid_json")
    return body


def _number(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise bad(f"'{name}' must be a number, got {json.dumps(value)}.", name)
    if value < low or (low_open and value == low) or value > high:
        span = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise bad(f"{json.dumps(value)} is not a valid value for '{name}': it must be in {span}.", name)
    return float(value)


def _integer(body: dict, name: str, default: int | None, low: int) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(f"'{name}' must be an integer, got {json.dumps(value)}.", name)
    if value < low:
        raise bad(f"{value} is less than the minimum of {low} - '{name}'.", name)
    return value


def _top_k(body: dict, default: int | None) -> int | None:
    """vLLM's `top_k`: an integer >= 1, or 0 or -1 for off (None)."""
    value = body.get("top_k")
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < -1:
        raise bad(f"{json.dumps(value)} is not a valid value for 'top_k': it must be an integer >= 1, "
                  "or 0 or -1 (off).", "top_k")
    return value if value >= 1 else None


def _flag(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad(f"'{name}' must be true or false, got {json.dumps(value)}.", name)
    return value


def _stops(value) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad("'stop' must be a string or a list of strings.", "stop")
    if len(stops) > MAX_STOPS:
        raise bad(f"'stop' may hold at most {MAX_STOPS} strings, got {len(stops)}.", "stop")
    if any(s == "" for s in stops):
        raise bad("'stop' strings must not be empty.", "stop")
    return stops


def _unsupported(body: dict, chat: bool) -> None:
    """What we cannot do refuses the request, rather than being silently ignored."""
    for name in ("frequency_penalty", "presence_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise bad(f"'{name}' is not supported by this server (only 0).", name, "unsupported_parameter")
    if body.get("logit_bias"):
        raise bad("'logit_bias' is not supported by this server.", "logit_bias", "unsupported_parameter")
    if body.get("logprobs") not in (None, False) or body.get("top_logprobs") not in (None, 0):
        raise bad("'logprobs' is not supported by this server.", "logprobs", "unsupported_parameter")
    if body.get("best_of") not in (None, 1):
        raise bad("'best_of' must be 1 on this server.", "best_of", "unsupported_parameter")
    for name in ("tools", "functions"):
        if chat and body.get(name):
            raise bad(f"'{name}' is not supported by this server.", name, "unsupported_parameter")
    fmt = body.get("response_format")
    if chat and fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") not in (None, "text")):
        raise bad("'response_format' other than text is not supported by this server.", "response_format",
                  "unsupported_parameter")


def _messages(value) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise bad("'messages' must be a non-empty list of {role, content} objects.", "messages")
    out = []
    for i, msg in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(msg, dict) or msg.get("role") not in ROLES:
            raise bad(f"{where} must be an object whose 'role' is one of {sorted(ROLES)}.", where + ".role")
        content = msg.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise bad(f"{where}.content: only text parts are supported.", where + ".content")
            content = "".join(p["text"] for p in content)
        if content is None and msg["role"] == "assistant":
            content = ""
        if not isinstance(content, str):
            raise bad(f"{where}.content must be a string or a list of text parts.", where + ".content")
        out.append({"role": "system" if msg["role"] == "developer" else msg["role"], "content": content})
    return out


def _prompt(value) -> str | list[int]:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]  # a batch of one
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                 for t in value):
        return value
    raise bad("'prompt' must be a string or a list of token ids (one prompt: batches are not supported).", "prompt")


def parse_request(body: dict, chat: bool, names: list[str], defaults: Defaults) -> GenRequest:
    """A checked request, or APIError(400) naming the parameter at fault. `names`: the model's names (the
    first is the one responses give)."""
    model = body.get("model")
    if model is not None and model not in names:
        raise APIError(400, f"The model '{model}' does not exist on this server (it serves "
                            f"{names[0]}).", "model", "model_not_found")
    n = _integer(body, "n", 1, 1)
    if n != 1:
        raise bad("Only n=1 is supported by this server.", "n", "unsupported_parameter")
    _unsupported(body, chat)
    name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    req = GenRequest(chat=chat, model=model or names[0],
                     max_tokens=_integer(body, name, defaults.max_tokens, 1),
                     temperature=_number(body, "temperature", defaults.temperature, 0.0, 2.0),
                     top_p=_number(body, "top_p", defaults.top_p, 0.0, 1.0, low_open=True),
                     top_k=_top_k(body, defaults.top_k),
                     seed=_integer(body, "seed", None, -2**63), stop=_stops(body.get("stop")),
                     stream=_flag(body, "stream"), ignore_eos=_flag(body, "ignore_eos"))
    options = body.get("stream_options")
    if options is not None:
        if not req.stream:
            raise bad("'stream_options' is only allowed when 'stream' is true.", "stream_options")
        if not isinstance(options, dict):
            raise bad("'stream_options' must be an object.", "stream_options")
        req.include_usage = _flag(options, "include_usage")
    if chat:
        req.messages = _messages(body.get("messages"))
    else:
        if "prompt" not in body:
            raise bad("'prompt' is required.", "prompt", "missing_required_parameter")
        req.prompt, req.echo = _prompt(body["prompt"]), _flag(body, "echo")
    return req


# --- responses ----------------------------------------------------------------------------------------
def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _choice(chat: bool, text: str, finish: str | None, delta: bool, first: bool = False) -> dict:
    if not chat:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    if not delta:
        return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": finish}
    part = ({"role": "assistant", "content": text} if first else {"content": text}) if text or first else {}
    return {"index": 0, "delta": part, "logprobs": None, "finish_reason": finish}


def completion(req: GenRequest, rid: str, created: int, text: str, finish: str, use: dict, extra: dict) -> dict:
    """A whole (non-streamed) response."""
    return {"id": rid, "object": "chat.completion" if req.chat else "text_completion", "created": created,
            "model": req.model, "choices": [_choice(req.chat, text, finish, delta=False)], "usage": use,
            "system_fingerprint": None, "specswarm": extra}


def chunk(req: GenRequest, rid: str, created: int, text: str = "", finish: str | None = None, *,
          first: bool = False, use: dict | None = None, extra: dict | None = None, choices: bool = True) -> dict:
    """One streamed chunk; `choices=False` is the usage-only chunk that ends a stream with include_usage."""
    out = {"id": rid, "object": "chat.completion.chunk" if req.chat else "text_completion", "created": created,
           "model": req.model, "choices": [_choice(req.chat, text, finish, delta=True, first=first)] if choices else [],
           "system_fingerprint": None}
    if req.include_usage:
        out["usage"] = use
    if extra is not None:
        out["specswarm"] = extra
    return out


def sse(data: dict | str) -> bytes:
    """One server-sent event: `data: {json}` and a blank line (`data: [DONE]` ends a stream)."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


def model_list(names: list[str], extra: dict) -> dict:
    created = int(time.time())
    return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "specswarm",
                                        "specswarm": extra} for name in names]}
