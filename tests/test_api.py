"""`swarm api`: the OpenAI-compatible HTTP API, driven with the official `openai` client.

One swarm for the module: two `swarm peer` processes of the tiny code model, and one `swarm api` process
in front of them serving a copy of that model with a chat template (same weights and config, so the same
model id: the tiny peers serve it), speculative with the tiny draft. Greedy text must equal `swarm
generate --local`; `stop` ends the text before the stop string; bad parameters get 400 in OpenAI's error
shape; eight concurrent streams each equal the reference; a client that disconnects mid-stream leaves no
session open on the peers (their free cache, from `Info`, back where it was). Errors the swarm causes
(503, 504) and the API key (401) are checked on servers in this process, over fake models.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")

from conftest import copy_of_tiny  # noqa: E402
from peer.p2p import P2PNode  # noqa: E402
from peer.transport import fetch_info  # noqa: E402
from swarm.bundled import TINY_DRAFT, TINY_MODEL  # noqa: E402
from swarm.launch import start_peers, stop_peers  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "def fibonacci(n):"
NEW = 24
# a ChatML-like template for the tiny code model, whose only special token is <|endoftext|>
TEMPLATE = ("{% if messages[0]['role'] != 'system' %}<|endoftext|>system\nYou are tiny.<|endoftext|>\n{% endif %}"
            "{% for m in messages %}<|endoftext|>{{ m['role'] }}\n{{ m['content'] }}<|endoftext|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|endoftext|>assistant\n{% endif %}")


def chat_model(path: Path) -> Path:
    """A copy of the tiny code model with a chat template (weights linked, not copied)."""
    copy_of_tiny(path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    return path


class ApiProcess:
    """`swarm ARGS...` (api, or demo --web) in its own process; `url` once it prints its address."""

    def __init__(self, *args: str, timeout: float = 120.0):
        self.proc = subprocess.Popen([sys.executable, "-m", "swarm.cli", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                     start_new_session=True)
        self.err: list[str] = []
        threading.Thread(target=lambda: self.err.extend(self.proc.stderr), daemon=True).start()
        self.url = None
        deadline = time.monotonic() + timeout
        for line in self.proc.stdout:
            if "http://" in line:
                self.url = line.split("the OpenAI API at ")[1].split("/v1")[0]
                break
            if time.monotonic() > deadline:
                break
        if self.url is None:
            self.stop()
            raise RuntimeError("the server did not start: " + "".join(self.err))
        threading.Thread(target=lambda: [None for _ in self.proc.stdout], daemon=True).start()
        while not get_json(self.url + "/health")["ready"]:
            assert time.monotonic() < deadline and self.proc.poll() is None, "".join(self.err)
            time.sleep(0.2)

    def stop(self, sig=signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def post_raw(url: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def free_cache(addrs: list[str]) -> list[int]:
    """Each peer's free cache tokens, from its Info reply (an open session holds its max length)."""
    async def ask():
        node = await P2PNode.start()
        try:
            return [(await fetch_info(node, a))[0].free_cache_tokens for a in addrs]
        finally:
            await node.close()
    return asyncio.run(ask())


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    """(client, url, model dir, peers' addresses): two tiny peers and a `swarm api` in front of them."""
    model = chat_model(tmp_path_factory.mktemp("api") / "tiny-chat")
    peers = start_peers(TINY_MODEL, [(0, 2), (2, 4)], log_dir=tmp_path_factory.mktemp("logs"))
    server = None
    try:
        addrs = [p.addr for p in peers]
        server = ApiProcess("api", "--model", str(model), "--served-model-name", "tiny-chat", "--speculative",
                            "--draft", str(TINY_DRAFT), "--initial-peers", *addrs, "--port", "0",
                            "--max-new-tokens", "16", "--dtype", "float32")  # the launcher's peers' dtype: in
        # bfloat16 logits tie now and then, and top-k 1 keeps every tied token (`token_probs`) where greedy takes the first
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        yield client, server.url, model, addrs
    finally:
        if server is not None:
            assert server.stop() == 128 + signal.SIGTERM, "".join(server.err)  # SIGTERM: a clean stop
            Path(os.environ.get("SPECSWARM_API_LOG", os.devnull)).write_text("".join(server.err))
            assert "Traceback" not in "".join(server.err), "".join(server.err)
        stop_peers(peers)


@pytest.fixture(scope="module")
def reference(api):
    """`swarm generate --local` on PROMPT, greedy, NEW tokens: the text every greedy answer must equal."""
    _, _, model, _ = api
    out = subprocess.run([sys.executable, "-m", "swarm.cli", "generate", "--local", "--model", str(model), "--prompt",
                          PROMPT, "--max-new-tokens", str(NEW), "--json",
                          "--dtype", "float32"], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["new_tokens"] == NEW, "the reference should run to max tokens (no eos) for these checks"
    return got["text"]


def test_models_and_a_completion_equal_to_swarm_generate(api, reference):
    client, url, _, _ = api
    assert [m.id for m in client.models.list().data] == ["tiny-chat"]
    done = client.completions.create(model="tiny-chat", prompt=PROMPT, max_tokens=NEW, temperature=0)
    assert done.choices[0].text == reference and done.choices[0].finish_reason == "length"
    assert done.usage.completion_tokens == NEW and done.usage.total_tokens == done.usage.prompt_tokens + NEW
    stats = done.model_extra["specswarm"]
    assert stats["mode"].startswith("speculative") and stats["tokens_per_round"] >= 1
    assert [h["blocks"] for h in stats["route"]] == [[0, 2], [2, 4]] and stats["ms_per_token"] > 0
    pieces, usage, finish = [], None, None
    for chunk in client.completions.create(model="tiny-chat", prompt=PROMPT, max_tokens=NEW, stream=True,
                                           stream_options={"include_usage": True}):
        if chunk.choices:
            pieces.append(chunk.choices[0].text)
            finish = chunk.choices[0].finish_reason or finish
        usage = chunk.usage or usage
    assert "".join(pieces) == reference and finish == "length" and usage.completion_tokens == NEW
    assert len([p for p in pieces if p]) > 1, "the text came in one piece: not streamed"
    echo = client.completions.create(model="tiny-chat", prompt=PROMPT, max_tokens=NEW, echo=True)
    assert echo.choices[0].text == PROMPT + reference
    # vLLM's top_k: 1 keeps only the likeliest token, so sampling at any temperature gives the greedy text
    top1 = client.completions.create(model="tiny-chat", prompt=PROMPT, max_tokens=NEW, temperature=1.5,
                                     extra_body={"top_k": 1})
    assert top1.choices[0].text == reference


def test_chat_completions_use_the_models_template(api):
    client, url, model, _ = api
    messages = [{"role": "user", "content": "def add(a, b):"}]
    done = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=NEW)
    # the same as completing the rendered conversation (greedy), cut at the end-of-turn token
    rendered = ("<|endoftext|>system\nYou are tiny.<|endoftext|>\n<|endoftext|>user\ndef add(a, b):<|endoftext|>\n"
                "<|endoftext|>assistant\n")
    raw = client.completions.create(model="tiny-chat", prompt=rendered, max_tokens=NEW)
    assert done.choices[0].message.content == raw.choices[0].text and done.choices[0].message.role == "assistant"
    assert done.choices[0].finish_reason == raw.choices[0].finish_reason
    assert done.usage.prompt_tokens == raw.usage.prompt_tokens
    deltas = list(client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=NEW, stream=True))
    assert deltas[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in deltas) == done.choices[0].message.content
    assert deltas[-1].choices[0].finish_reason == done.choices[0].finish_reason
    assert deltas[-1].model_extra["specswarm"]["tokens"] == done.usage.completion_tokens
    # defaults from the flags: --max-new-tokens 16 when the request gives no max_tokens
    assert client.chat.completions.create(model="tiny-chat", messages=messages).usage.completion_tokens <= 16


def test_stop_strings_end_the_text_before_them(api, reference):
    client, _, _, _ = api
    cut = len(reference) // 2
    stop = reference[cut:cut + 3]
    expected = reference[:reference.index(stop)]
    done = client.completions.create(model="tiny-chat", prompt=PROMPT, max_tokens=NEW, stop=[stop, "never-seen"])
    assert done.choices[0].text == expected and done.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model="tiny-chat", prompt=PROMPT, max_tokens=NEW, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected and chunks[-1].choices[0].finish_reason == "stop"


@pytest.mark.parametrize("params,param", [
    ({"max_tokens": -1}, "max_tokens"), ({"temperature": -0.5}, "temperature"), ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"), ({"model": "no-such-model"}, "model"), ({"n": 2}, "n"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"), ({"logprobs": 2}, "logprobs"),
    ({"extra_body": {"top_k": -2}}, "top_k"), ({"extra_body": {"top_k": 2.5}}, "top_k")])
def test_bad_parameters_get_400_in_openais_shape(api, params, param):
    client, _, _, _ = api
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(**{"model": "tiny-chat", "prompt": PROMPT, "max_tokens": 4, **params})
    error = raised.value.body
    assert raised.value.status_code == 400 and error["param"] == param and error["type"] == "invalid_request_error"
    assert set(error) == {"message", "type", "param", "code"} and error["message"]


def test_malformed_requests_get_400_in_openais_shape(api):
    _, url, _, _ = api
    status, body = post_raw(url + "/v1/chat/completions", b"{not json")
    assert status == 400 and body["error"]["code"] == "invalid_json"
    status, body = post_raw(url + "/v1/chat/completions", json.dumps({"messages": [{"role": "wizard"}]}).encode())
    assert status == 400 and body["error"]["param"] == "messages[0].role"
    status, body = post_raw(url + "/v1/completions", json.dumps({"prompt": "x" * 5000}).encode())  # past the context
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"
    status, body = post_raw(url + "/v1/nothing", b"{}")
    assert status == 404 and body["error"]["code"] == "not_found"


def test_eight_concurrent_streams_each_equal_the_reference(api, reference):
    client, url, _, _ = api

    def one(_):
        pieces, times = [], []
        for c in client.completions.create(model="tiny-chat", prompt=PROMPT, max_tokens=NEW, stream=True):
            pieces.append(c.choices[0].text)
            times.append(time.monotonic())
        return "".join(pieces), (times[0], times[-1])

    with ThreadPoolExecutor(8) as pool:
        texts, spans = zip(*pool.map(one, range(8)))
    assert list(texts) == [reference] * 8
    overlap = max(sum(a <= t <= b for a, b in spans) for t, _ in spans)
    assert overlap >= 2, "the streams ran one after another, not at once"
    # a worker counts its job finished just after the last chunk went out: wait a moment for the last one
    deadline = time.monotonic() + 5
    while get_json(url + "/health")["active"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert get_json(url + "/health")["active"] == 0


def test_a_client_that_disconnects_mid_stream_frees_its_sessions(api):
    client, url, _, addrs = api
    before = free_cache(addrs)
    stream = client.completions.create(model="tiny-chat", prompt=PROMPT, max_tokens=900, stream=True,
                                       extra_body={"ignore_eos": True})
    got = 0
    for chunk in stream:
        got += bool(chunk.choices and chunk.choices[0].text)
        if got == 3:
            break
    during = free_cache(addrs)
    assert all(d < b for d, b in zip(during, before)), "no session open on the peers during the stream"
    stream.close()  # the client goes away mid-stream
    deadline = time.monotonic() + 20
    while free_cache(addrs) != before:
        assert time.monotonic() < deadline, f"sessions still open on the peers: {free_cache(addrs)} != {before}"
        time.sleep(0.3)
    assert get_json(url + "/health")["active"] == 0
    # a whole (not streamed) request whose client gives up waiting: 0.2 s, well short of 900 tokens even when the
    # n-gram memory recalls the stream above (1 s was not, now and then, on the Intel build machine)
    with pytest.raises(openai.APITimeoutError):
        client.with_options(timeout=0.2).completions.create(model="tiny-chat", prompt=PROMPT, max_tokens=900,
                                                            extra_body={"ignore_eos": True})
    while free_cache(addrs) != before or get_json(url + "/health")["active"]:
        assert time.monotonic() < deadline + 20, f"sessions still open on the peers: {free_cache(addrs)} != {before}"
        time.sleep(0.3)


def test_api_swarm_is_swarm_status_json(api):
    _, url, model, addrs = api
    data = get_json(url + "/api/swarm")
    out = subprocess.run([sys.executable, "-m", "swarm.cli", "status", "--model", str(model), "--initial-peers",
                          addrs[0], "--json"], capture_output=True, text=True, timeout=120)
    status = json.loads(out.stdout)
    assert set(status) <= set(data) and data["complete"] and data["num_blocks"] == 4
    assert sorted(p["peer_id"] for p in data["peers"]) == sorted(p["peer_id"] for p in status["peers"])
    assert all(p["reachable"] and p["rtt_ms"] is not None for p in data["peers"])
    assert data["api"]["ready"] and [h["blocks"] for h in data["api"]["route"]] == [[0, 2], [2, 4]]
    page = urllib.request.urlopen(url + "/", timeout=30).read().decode()
    assert "/api/swarm" in page and "/v1/chat/completions" in page
    assert "http://" not in page and "https://" not in page  # nothing fetched from outside this server


# --- servers in this process, over fake models: 401, 503, 504 ----------------------------------------------
class InProcess:
    """`swarm.api.server.serve` on a thread of its own, over an engine of `open_model`."""

    def __init__(self, open_model, api_key=None, timeout=None):
        from swarm.api.engine import Engine
        from swarm.api.schemas import Defaults
        from swarm.api.server import Server, serve
        from swarm.api.swarm_map import SwarmMap
        from swarm.text import load_tokenizer

        self.engine = Engine(open_model, load_tokenizer(TINY_MODEL), None, None, None, workers=2, timeout=timeout,
                             retry_seconds=60)
        self.engine.start()
        server = Server(self.engine, SwarmMap(self.engine, "m", 4, [], local=True), ["tiny"], Defaults(8), api_key)
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        ready = threading.Event()
        self.url = None

        def listening(url):
            self.url = url
            ready.set()

        self.future = asyncio.run_coroutine_threadsafe(serve(server, "127.0.0.1", 0, listening), self.loop)
        assert ready.wait(30)
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key=api_key or "none", max_retries=0, timeout=60)

    def close(self):
        self.loop.call_soon_threadsafe(self.future.cancel)
        time.sleep(0.2)
        self.loop.call_soon_threadsafe(self.loop.stop)


class FakeModel:
    """The tiny model's head; its sessions fail with `error`, or run slowly (`delay` s a step)."""

    def __init__(self, error=None, delay=0.0):
        from swarm.decode.target import LocalModel

        self.local = LocalModel.load(TINY_MODEL)
        self.head, self.error, self.delay = self.local.head, error, delay

    def session(self, max_length, sampling=None):
        if self.error is not None:
            raise self.error
        session, delay = self.local.session(max_length), self.delay

        class Slow:
            overlaps, verdicts = False, False

            def submit(self, hidden, layout, check=None):
                time.sleep(delay)
                return session.submit(hidden, layout)

            def close(self):
                pass
        return Slow()


def test_an_api_key_is_required_when_set():
    server = InProcess(lambda: FakeModel(), api_key="s3cret")
    try:
        assert server.client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2).usage.completion_tokens == 2
        for key in ("wrong", None):
            status, body = post_raw(server.url + "/v1/completions", json.dumps({"prompt": "x"}).encode(),
                                    {"Authorization": f"Bearer {key}"} if key else {})
            assert status == 401 and body["error"]["code"] == "invalid_api_key"
        wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        assert get_json(server.url + "/api/swarm")["complete"]  # the map and the page are open
    finally:
        server.close()


def test_a_swarm_that_cannot_serve_gets_503_and_a_timeout_504():
    from swarm.client.chain import RemoteError
    from swarm.client.route import NoRoute

    gap = NoRoute("no peer serves blocks [2, 4)", [(2, 4)])
    for error, status, exc in [(gap, 503, openai.InternalServerError),
                               (RemoteError("timeout", "no answer within 60 s", "peer"), 504, openai.APIStatusError)]:
        server = InProcess(lambda error=error: FakeModel(error))
        try:
            for stream in (False, True):
                with pytest.raises(exc) as raised:
                    out = server.client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, stream=stream)
                    list(out) if stream else None
                assert raised.value.status_code == status, raised.value
                if status == 503:
                    assert "no peer serves blocks [2, 4)" in raised.value.body["message"]
        finally:
            server.close()
    not_ready = InProcess(lambda: (_ for _ in ()).throw(gap))  # the swarm never covered the model
    try:
        with pytest.raises(openai.InternalServerError) as raised:
            not_ready.client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4)
        assert raised.value.status_code == 503 and raised.value.body["code"] == "model_not_ready"
    finally:
        not_ready.close()
    slow = InProcess(lambda: FakeModel(delay=0.1), timeout=0.5)
    try:
        with pytest.raises(openai.APIStatusError) as raised:
            slow.client.completions.create(model="tiny", prompt=PROMPT, max_tokens=50)
        assert raised.value.status_code == 504 and raised.value.body["code"] == "timeout"
    finally:
        slow.close()


def test_top_k_as_vllm_reads_it():
    from swarm.api.schemas import APIError, Defaults, parse_request

    def top_k(body, default=None):
        return parse_request({"prompt": "x", **body}, False, ["m"], Defaults(top_k=default)).top_k

    assert top_k({}) is None and top_k({}, 40) == 40 and top_k({"top_k": None}, 40) == 40
    assert top_k({"top_k": 5}) == 5 and top_k({"top_k": 0}, 40) is None and top_k({"top_k": -1}, 40) is None
    for bad in (-2, 1.0, True, "5", [5]):
        with pytest.raises(APIError) as e:
            top_k({"top_k": bad})
        assert e.value.status == 400 and e.value.param == "top_k"


def test_text_out_holds_back_what_may_be_a_stop_string():
    from swarm.api.engine import TextOut

    class Chars:  # a "tokenizer" whose token i is chr(i)
        def decode(self, ids, skip_special_tokens=True):
            return "".join(map(chr, ids))

    out = TextOut(Chars(), ["END", "xy"])
    sent = [out.add([ord(c)]) for c in "abcEN"]
    assert "".join(sent) == "abc" and not out.stopped  # "EN" may start "END": held back
    assert out.add([ord("d")]) == "ENd"
    assert out.add([ord(c) for c in "zzEND!"]) == "zz" and out.stopped and out.text == "abcENdzz"


def test_api_takes_every_client_and_decoding_flag_and_needs_peers_or_local():
    from test_cli import options, parsers

    ps = parsers()
    missing = options(ps["generate"]) - {"--prompt", "--ignore-eos", "--json", "-h", "--help"} - options(ps["api"])
    assert not missing, f"swarm api lacks {sorted(missing)}"
    assert {"--web", "--host", "--port", "--api-key"} <= options(ps["demo"])
    out = subprocess.run([sys.executable, "-m", "swarm.cli", "api", "--model", "tiny"], capture_output=True, text=True,
                         timeout=120, stdin=subprocess.DEVNULL)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1 and "--initial-peers" in out.stderr
