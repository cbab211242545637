"""The HTTP face of `swarm api`: an aiohttp application with OpenAI's routes, server-sent events and the page.

Routes: `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions` (whole responses, or
streamed as `data: {chunk}` events ending with `data: [DONE]`), `GET /api/swarm` (the swarm map's
data), `GET /health`, and `GET /` (page.html: the swarm map and a chat, one file). With an API key,
every `/v1/` route wants `Authorization: Bearer KEY` (401 otherwise); the page and the map are open.

A request's generation runs in the engine's threads; the handler waits for its events without
blocking the loop and, while it waits, watches the connection: a client that goes away (mid-stream or
not) cancels the generation, which closes its sessions on the peers. A stream's HTTP status is sent
with its first event, so a request refused before any text (no route: 503, prompt too long: 400,
timeout: 504) gets its status as a whole request does; a failure after the first text ends the stream
with an error event (OpenAI's error shape), then `[DONE]`.

Knows aiohttp, HTTP and SSE, the API's shapes (`schemas`) and the engine's job events; nothing of
models, tokenizers, sampling or peers.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from importlib.resources import files

from aiohttp import web

from swarm.api.engine import Engine, Job, route_info
from swarm.api.schemas import APIError, Defaults, GenRequest, chunk, completion, model_list, new_id, parse_request, \
    read_json, sse, usage
from swarm.api.swarm_map import SwarmMap

WATCH_SECONDS = 0.25  # how often a waiting handler looks whether its client is still there


class ClientGone(Exception):
    """The client closed the connection."""


def json_response(data: dict, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(data), status=status, content_type="application/json")


def error_response(error: APIError) -> web.Response:
    return json_response(error.body(), error.status)


class Server:
    """The routes over one engine; `app()` is the aiohttp application."""

    def __init__(self, engine: Engine, swarm_map: SwarmMap, names: list[str], defaults: Defaults,
                 api_key: str | None = None, info: dict | None = None):
        self.engine, self.swarm_map, self.names, self.defaults = engine, swarm_map, names, defaults
        self.api_key, self.info = api_key, info or {}
        self.page = files("swarm.api").joinpath("page.html").read_text(encoding="utf-8")

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._guard], client_max_size=8 * 2**20)
        app.router.add_get("/", self.index)
        app.router.add_get("/health", self.health)
        app.router.add_get("/api/swarm", self.swarm)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        return app

    @web.middleware
    async def _guard(self, request: web.Request, handler):
        """The API key on /v1/ routes; every error as OpenAI's JSON error."""
        if self.api_key and request.path.startswith("/v1/"):
            header = request.headers.get("Authorization", "")
            token = header[7:].strip() if header[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(token.encode(), self.api_key.encode()):
                return error_response(APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer KEY'.",
                                               None, "invalid_api_key"))
        try:
            return await handler(request)
        except APIError as e:
            return error_response(e)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            return error_response(APIError(e.status, f"{e.reason}: {request.method} {request.path}", None,
                                           "not_found" if e.status == 404 else None))

    async def index(self, request: web.Request) -> web.Response:
        return web.Response(text=self.page, content_type="text/html", headers={"Cache-Control": "no-cache"})

    async def health(self, request: web.Request) -> web.Response:
        e = self.engine
        return json_response({"ready": e.model is not None, "not_ready": None if e.model else e.not_ready,
                              "active": e.active, "served": e.served})

    async def swarm(self, request: web.Request) -> web.Response:
        e = self.engine
        data = dict(await self.swarm_map.get())
        data["api"] = {"model": self.names[0], "ready": e.model is not None,
                       "not_ready": None if e.model else e.not_ready, "active": e.active, "served": e.served,
                       **self.info, **route_info(e.model)}
        return json_response(data)

    async def models(self, request: web.Request) -> web.Response:
        return json_response(model_list(self.names[:1], self.info))

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        req = parse_request(read_json(await request.read()), chat, self.names, self.defaults)
        job = self.engine.submit(req)
        try:
            if req.stream:
                return await self._stream(request, job)
            return await self._whole(request, job)
        except (ClientGone, ConnectionResetError):
            return web.Response(status=499)  # nobody reads it: the generation is cancelled below
        finally:
            job.cancel()

    async def _events(self, request: web.Request, job: Job):
        """The job's events, in order; ClientGone when the client closes the connection meanwhile."""
        get = None
        try:
            while True:
                get = get or asyncio.ensure_future(job.events.get())
                done, _ = await asyncio.wait({get}, timeout=WATCH_SECONDS)
                if done:
                    event, get = get.result(), None
                    yield event
                    if event[0] != "text":
                        return
                elif request.transport is None or request.transport.is_closing():
                    raise ClientGone
                elif job.deadline is not None and time.monotonic() > job.deadline + 1.0:
                    job.cancel()  # stuck past the deadline (a peer not answering): give up on it here
                    yield ("error", APIError(504, "The request timed out (the server's --request-timeout).", None,
                                             "timeout"))
                    return
        finally:
            if get is not None:
                get.cancel()

    async def _whole(self, request: web.Request, job: Job) -> web.Response:
        req, rid, created = job.req, new_id(job.req.chat), int(time.time())
        async for event in self._events(request, job):
            if event[0] == "error":
                return error_response(event[1])
            if event[0] == "done":
                fin = event[1]
                text = (fin.prompt_text + fin.text) if req.echo else fin.text  # (a stream sends the echo first)
                return json_response(completion(req, rid, created, text, fin.finish_reason,
                                                usage(fin.prompt_tokens, fin.completion_tokens), fin.stats))
        raise ClientGone

    async def _stream(self, request: web.Request, job: Job) -> web.StreamResponse:
        req, rid, created = job.req, new_id(job.req.chat), int(time.time())
        events = self._events(request, job)
        first = await anext(events, None)
        if first is None:
            raise ClientGone
        if first[0] == "error":  # refused before any text: a status of its own, as a whole request
            return error_response(first[1])
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
        await resp.prepare(request)
        try:
            if req.chat:
                await resp.write(sse(chunk(req, rid, created, "", first=True)))
            event = first
            while event is not None:
                await self._send(resp, req, rid, created, event)
                event = await anext(events, None) if event[0] == "text" else None
            await resp.write(sse("[DONE]"))
            await resp.write_eof()
        except (ClientGone, ConnectionResetError):
            pass  # the client went away mid-stream: the generation is cancelled (the caller's `finally`)
        return resp

    async def _send(self, resp: web.StreamResponse, req: GenRequest, rid: str, created: int, event: tuple) -> None:
        if event[0] == "text":
            await resp.write(sse(chunk(req, rid, created, event[1], extra=event[2])))
        elif event[0] == "error":
            await resp.write(sse(event[1].body()))
        else:
            fin = event[1]
            await resp.write(sse(chunk(req, rid, created, "", fin.finish_reason, extra=fin.stats)))
            if req.include_usage:
                await resp.write(sse(chunk(req, rid, created, use=usage(fin.prompt_tokens, fin.completion_tokens),
                                           choices=False)))


async def serve(server: Server, host: str, port: int, on_listening=None) -> None:
    """Serve until cancelled (Ctrl-C, SIGTERM); then stop listening and close the engine (every
    generation cancelled, its sessions closed). `on_listening(url)` once the port is open."""
    runner = web.AppRunner(server.app(), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = runner.addresses[0]
        url_host = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
        if on_listening is not None:
            on_listening(f"http://{url_host}:{bound[1]}")
        await asyncio.Event().wait()
    finally:
        await asyncio.to_thread(server.engine.close)  # first: streams still open end with an error event
        await runner.cleanup()
        await server.swarm_map.close()
