"""The bridge from HTTP requests to `generate()`: worker threads, one generation each, text back through a queue.

Generation is blocking torch work, so it never runs on the server's event loop: `Engine.submit` queues a
`Job` for one of `workers` daemon threads (more requests wait their turn) and returns at once; the
thread runs `swarm.decode.generate` and hands each piece of text to the job's asyncio queue
(`loop.call_soon_threadsafe`), then a `Finish` or an `APIError`. Every generation opens its own
session (`model.session()`: on a `SwarmModel` its own chain of sessions on the peers) and closes it
when it ends, however it ends; `Job.cancel()` (the client went away, the server stops, the request
timed out) stops it at its next batch of tokens, which closes its sessions on the peers.

Concurrent generations share the model (read-only weights; the `SwarmModel`'s network work runs on its
one background loop, every step on its own session) and the draft (each generation has its own
draft cache); what they learn, the round policy, is copied in and kept under a lock, and every
reply's n-grams join one `NgramMemory` later requests draft from (SuffixDecoding's global tree: requests
for similar things repeat each other's phrases; the target verifies every draft, so one request's
output never enters another's, but how fast a reply comes may hint that a similar one was asked
before: docs/security.md).

The model is opened by `start`; while the swarm does not cover it, requests get 503 with the reason,
and a thread looks again every `retry_seconds`.

`TextOut` turns a reply's tokens into text: stop strings end it (the stop string not included) and a
tail that may be the start of one, or half a UTF-8 character, is held back until it is known.

Knows decoding (`swarm.decode`), tokenizers and chat templates (`swarm.text`), which errors mean the
swarm lacks peers (`swarm.chat`) and the API's request and error shapes (`swarm.api.schemas`);
nothing of HTTP, sockets, routes' planning or peers.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import queue
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from peer.model import ContextTooLong
from swarm.api.schemas import APIError, GenRequest
from swarm.chat import swarm_lacks_peers, why
from swarm.decode.generate import generate
from swarm.decode.ngram import NgramMemory
from swarm.decode.sampling import SamplingParams
from swarm.decode.speculative import SpecConfig
from swarm.decode.target import LocalModel, Model
from swarm.text import ChatTemplate, TemplateError

log = logging.getLogger("specswarm.api")


class Cancelled(Exception):
    """The job was cancelled: its client went away, or the server is stopping."""


class TimedOut(Exception):
    """The job ran past its deadline (`--request-timeout`)."""


class EndOfReply(Exception):
    """A stop string or an end-of-turn token that generate() does not stop at: the reply ends here."""


class TextOut:
    """The text of a reply so far: `add` returns what may be sent now; a stop string cuts the reply
    (`stopped`); `flush` returns what was held back once the reply is over."""

    def __init__(self, tokenizer, stops: list[str]):
        self.tokenizer, self.stops = tokenizer, stops
        self.longest = max(map(len, stops), default=0)
        self.tokens: list[int] = []
        self.text, self.sent, self.stopped = "", 0, False

    def add(self, tokens: list[int]) -> str:
        self.tokens += tokens
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        start = max(0, self.sent - self.longest)
        hits = [i for s in self.stops if (i := text.find(s, start)) >= 0]
        if hits:
            self.text, self.stopped = text[:min(hits)], True
            return self.flush()
        self.text = text
        safe = len(text) - self._held(text)
        piece = text[self.sent:safe] if safe > self.sent else ""
        self.sent = max(self.sent, safe)
        return piece

    def _held(self, text: str) -> int:
        """Characters at the end that must wait: the start of a stop string, or an unfinished character."""
        held = len(text) - len(text.rstrip("\ufffd"))
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    held = max(held, k)
                    break
        return held

    def flush(self) -> str:
        piece = self.text[self.sent:]
        self.sent = max(self.sent, len(self.text))
        return piece


@dataclass
class Finish:
    """How a generation ended, for the response's last chunk or whole body."""

    text: str  # the whole reply (what was streamed, stop string excluded)
    finish_reason: str  # "stop" (end of turn, eos, a stop string) or "length"
    prompt_tokens: int
    completion_tokens: int
    prompt_text: str  # for echo
    stats: dict  # the "specswarm" field


@dataclass(eq=False)
class Job:
    """One request's generation: the worker puts ("text", piece, live stats), then ("done", Finish) or
    ("error", APIError) on `events`; `cancel()` stops it."""

    req: GenRequest
    loop: asyncio.AbstractEventLoop
    deadline: float | None = None  # time.monotonic() after which it is cut short (504)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def put(self, *event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the server's loop is gone: nobody reads this job any more
            self.cancelled.set()

    def cancel(self) -> None:
        self.cancelled.set()


def api_error(error: BaseException, param: str) -> APIError:
    """A generation's failure as the HTTP answer it deserves."""
    if isinstance(error, APIError):
        return error
    if isinstance(error, ContextTooLong):
        return APIError(400, f"This model's maximum context length is exceeded: {error}", param,
                        "context_length_exceeded")
    if isinstance(error, TemplateError):
        return APIError(400, str(error), "messages", "invalid_value")
    if isinstance(error, TimedOut):
        return APIError(504, "The request timed out (the server's --request-timeout).", None, "timeout")
    if swarm_lacks_peers(error):
        timeout = isinstance(error, (asyncio.TimeoutError, TimeoutError)) or getattr(error, "code", None) == "timeout"
        if timeout:
            return APIError(504, f"A peer of the swarm did not answer in time: {error}", None, "timeout")
        return APIError(503, f"The swarm cannot serve this model right now: {why(error)}", None, "swarm_unavailable")
    log.exception("generation failed", exc_info=error)
    return APIError(500, f"The generation failed: {type(error).__name__}: {error}", None, "internal_error")


class Engine:
    """Worker threads running generations for requests, over a model `start` opens (in the background
    while the swarm lacks peers for it)."""

    def __init__(self, open_model: Callable[[], Model], tokenizer, template: ChatTemplate | None,
                 draft: LocalModel | None, spec: SpecConfig | None, *, seed: int = 0, workers: int = 8,
                 timeout: float | None = None, retry_seconds: float = 5.0):
        self.open_model, self.tokenizer, self.template = open_model, tokenizer, template
        self.draft, self.spec = draft, spec if draft is not None else None
        self.seed, self.timeout, self.retry_seconds = seed, timeout, retry_seconds
        self.model: Model | None = None
        self.not_ready = "connecting to the swarm"
        self.active = self.served = 0
        self._lock = threading.Lock()
        self._policy = None  # the round policy the last finished speculative generation left
        self._memory = NgramMemory()  # every request's output, drafted from in later ones (thread-safe)
        self._count = 0  # requests given a seed of their own
        self._closed = threading.Event()
        self.on_ready: Callable[[Model], None] | None = None
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._live: set[Job] = set()
        self._threads = [threading.Thread(target=self._work, name=f"specswarm-api-{i}", daemon=True)
                         for i in range(workers)]

    def start(self, on_ready: Callable[[Model], None] | None = None) -> None:
        """Start the workers and open the model: a first try here (an error other than the swarm lacking
        peers goes up: a broken model, a wrong one), then, while the swarm does not cover the model, in
        a thread that looks again every `retry_seconds`."""
        self.on_ready = on_ready
        for t in self._threads:
            t.start()
        if not self._try_open():
            threading.Thread(target=self._keep_opening, name="specswarm-api-open", daemon=True).start()

    def _try_open(self) -> bool:
        try:
            model = self.open_model()
        except Exception as e:
            if not swarm_lacks_peers(e):
                raise
            if why(e) != self.not_ready:  # one line per new reason, not one per look
                log.warning("waiting for the swarm: %s; looking again every %.0f s", why(e), self.retry_seconds)
            self.not_ready = why(e)
            return False
        if self._closed.is_set():
            _close_model(model)
        else:
            self.model = model
            if self.on_ready is not None:
                self.on_ready(model)
        return True

    def _keep_opening(self) -> None:
        while not self._closed.wait(self.retry_seconds):
            try:
                if self._try_open():
                    return
            except Exception as e:  # noqa: BLE001 - one line; requests get it as the reason of their 503
                self.not_ready = f"the model could not be opened: {e}"
                log.error("%s", self.not_ready)
                return

    def submit(self, req: GenRequest) -> Job:
        """Queue a generation; its events arrive on the returned job's queue (call from the event loop)."""
        deadline = time.monotonic() + self.timeout if self.timeout else None
        job = Job(req, asyncio.get_running_loop(), deadline)
        if self._closed.is_set():
            job.put("error", APIError(503, "The server is stopping.", None, "shutting_down"))
            return job
        self._jobs.put(job)
        return job

    def _work(self) -> None:
        torch.set_grad_enabled(False)  # (per thread: the command line's own setting is the main thread's)
        while (job := self._jobs.get()) is not None:
            if job.cancelled.is_set():
                continue
            if self._closed.is_set():
                job.put("error", APIError(503, "The server is stopping.", None, "shutting_down"))
                continue
            with self._lock:
                self.active += 1
                self._live.add(job)
            try:
                self._serve(job)
            finally:
                with self._lock:
                    self.active -= 1
                    self.served += 1
                    self._live.discard(job)

    def _serve(self, job: Job) -> None:
        model = self.model
        if model is None:
            job.put("error", APIError(503, f"The swarm cannot serve the model yet: {self.not_ready}", None,
                                      "model_not_ready"))
            return
        try:
            job.put("done", self._generate(model, job))
        except Cancelled:
            pass  # nobody is waiting for the answer; the session is closed
        except Exception as e:  # noqa: BLE001 - every failure becomes an HTTP answer
            job.put("error", api_error(e, "messages" if job.req.chat else "prompt"))

    def _prompt(self, model: Model, req: GenRequest) -> tuple[list[int], str]:
        """(token ids, text) of the prompt: a chat rendered in the model's template (without one, the
        conversation as raw text to continue, as `swarm chat` does), or the completion's prompt."""
        if req.chat and self.template is not None:
            text = self.template.render(req.messages, add_generation_prompt=True)
            return self.tokenizer.encode(text, add_special_tokens=False).ids, text
        if req.chat:
            text = "".join(m["content"] + ("" if m["role"] == "assistant" or m["content"].endswith("\n") else "\n")
                           for m in req.messages)
        elif isinstance(req.prompt, list):
            vocab = model.head.cfg.vocab_size
            if max(req.prompt) >= vocab:
                raise APIError(400, f"Token id {max(req.prompt)} is out of the vocabulary (size {vocab}).", "prompt",
                               "invalid_value")
            return list(req.prompt), self.tokenizer.decode(req.prompt, skip_special_tokens=False)
        else:
            text = req.prompt
        ids = self.tokenizer.encode(text).ids
        if not ids and model.head.cfg.bos_token_id is not None:
            ids = [model.head.cfg.bos_token_id]
        if not ids:
            raise APIError(400, "The prompt is empty after tokenization.", "prompt", "invalid_value")
        return ids, text

    def _generate(self, model: Model, job: Job) -> Finish:
        req = job.req
        prompt, prompt_text = self._prompt(model, req)
        out = TextOut(self.tokenizer, req.stop)
        stop_ids = set(self.template.stop_ids) if req.chat and self.template and not req.ignore_eos else set()
        beyond = stop_ids - set(model.head.cfg.eos_token_ids)  # end-of-turn tokens generate() does not stop at
        params = SamplingParams(req.temperature, req.top_p, req.top_k)
        with self._lock:
            seed = req.seed if req.seed is not None else self.seed + self._count
            self._count += req.seed is None
            policy = copy.deepcopy(self._policy)
        t0, batches, ended = time.perf_counter(), [0], []
        if req.echo and req.stream and prompt_text:
            job.put("text", prompt_text, {"tokens": 0, "rounds": 0, "seconds": 0.0})

        def on_tokens(tokens: list[int]) -> None:
            if job.cancelled.is_set():
                raise Cancelled
            if job.deadline is not None and time.monotonic() > job.deadline:
                raise TimedOut
            cut = next((i for i, t in enumerate(tokens) if t in stop_ids), None)
            batches[0] += 1
            piece = out.add(tokens if cut is None else tokens[:cut])
            if cut is not None:
                ended.append(tokens[cut])
            if piece:
                job.put("text", piece, {"tokens": len(out.tokens) + len(ended), "rounds": batches[0],
                                        "seconds": round(time.perf_counter() - t0, 4)})
            if out.stopped or (cut is not None and tokens[cut] in beyond):
                raise EndOfReply

        result = None
        try:
            result = generate(model, prompt, req.max_tokens, params, draft=self.draft,
                              spec=replace(self.spec, params=params) if self.spec else None, seed=seed,
                              stop_at_eos=not req.ignore_eos, on_tokens=on_tokens, policy=policy,
                              memory=self._memory)
        except EndOfReply:
            pass
        seconds = time.perf_counter() - t0
        if getattr(result, "policy", None) is not None:
            with self._lock:
                self._policy = result.policy
        rest = out.flush()
        if rest:
            job.put("text", rest, {"tokens": len(out.tokens) + len(ended), "rounds": batches[0],
                                   "seconds": round(seconds, 4)})
        stopped = out.stopped or bool(ended) or getattr(result, "stopped_by", "") == "eos"
        tokens = len(out.tokens) + len(ended)
        return Finish(out.text, "stop" if stopped else "length", len(prompt), tokens, prompt_text,
                      self._stats(model, result, tokens, batches[0], seconds, seed))

    def _stats(self, model: Model, result, tokens: int, batches: int, seconds: float, seed: int) -> dict:
        """The "specswarm" field: speculative numbers, the route, speed."""
        rounds = getattr(result, "rounds", None) if result is not None else None
        rounds = rounds if rounds else (batches if self.draft is not None else tokens)
        stats = {"mode": self.spec.mode if self.spec else "plain", "tokens": tokens, "seconds": round(seconds, 4),
                 "tokens_per_s": round(tokens / seconds, 3) if seconds > 0 else 0.0,
                 "ms_per_token": round(1000 * seconds / tokens, 3) if tokens else None,
                 "rounds": rounds, "tokens_per_round": round(tokens / rounds, 3) if rounds else None, "seed": seed}
        if result is not None and hasattr(result, "acceptance_rate"):
            stats.update(acceptance_rate=round(result.acceptance_rate, 4), wasted_rounds=result.wasted_rounds,
                         drafted=result.drafted, accepted=result.accepted)
        stats.update(route_info(model))
        return stats

    def close(self) -> None:
        """Cancel every job (their sessions close), stop the workers, close the model. Idempotent."""
        if self._closed.is_set():
            return
        self._closed.set()
        with self._lock:
            live = list(self._live)
        for job in live:  # their clients hear why (a stream ends with the error event), then they stop
            job.put("error", APIError(503, "The server is stopping.", None, "shutting_down"))
            job.cancel()
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.put("error", APIError(503, "The server is stopping.", None, "shutting_down"))
        for _ in self._threads:
            self._jobs.put(None)
        deadline = time.monotonic() + 10
        for t in self._threads:
            if t.is_alive():
                t.join(max(0.0, deadline - time.monotonic()))
        model, self.model = self.model, None
        if model is not None:
            _close_model(model)


def route_info(model: Model | None) -> dict:
    """Where generations run: "local", or the chain's shape and its hops (peer, blocks, path)."""
    route = getattr(model, "route", None)
    if model is None or route is None:
        return {"where": "local" if model is not None else None, "route": []}
    paths = getattr(model, "paths", None)
    return {"where": model.config.where, "failovers": model.failovers,
            "route": [{"peer_id": h.peer_id, "blocks": list(h.blocks),
                       "path": (paths.path_of(h.peer_id) if paths else None) or "direct"} for h in route]}


def _close_model(model: Model) -> None:
    close = getattr(model, "close", None)
    if close is not None:
        close()
