"""The web page in a real browser: `swarm demo --web` (three peers, the API and the page), headless Chromium.

Chromium is driven over the DevTools protocol (its WebSocket, with aiohttp's client): no WebDriver.
The page must show every peer of the three-peer swarm on the map (and the API's route through them),
and a chat message must come back streamed, with its tokens/s. A screenshot is saved to
$SPECSWARM_SCREENSHOT (e.g. docs/web.png) when set, else to the test's temporary folder.
$SPECSWARM_WEB_MODEL runs the demo on another model (e.g. smollm2-135m, for the README's screenshot);
by default it is the tiny code model with a chat template. Skipped where no Chromium is installed
(`scripts/test.sh` installs Debian's `chromium` as root).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from swarm.bundled import TINY_DRAFT
from test_api import ApiProcess, chat_model

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine (scripts/test.sh installs "
                                                          "Debian's chromium when run as root)")


class Browser:
    """Headless Chromium and one page of it, over the DevTools protocol."""

    async def start(self, width: int = 1440, height: int = 900) -> "Browser":
        import aiohttp

        self.profile = tempfile.mkdtemp(prefix="specswarm-chromium-")
        self.proc = subprocess.Popen([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                                      "--no-default-browser-check", "--disable-extensions", "--remote-debugging-port=0",
                                      f"--user-data-dir={self.profile}", f"--window-size={width},{height}",
                                      "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        active = Path(self.profile) / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (active.exists() and active.read_text().strip()):
            assert time.monotonic() < deadline and self.proc.poll() is None, "Chromium did not start"
            await asyncio.sleep(0.1)
        port = int(active.read_text().split()[0])
        self.http = aiohttp.ClientSession()
        async with self.http.get(f"http://127.0.0.1:{port}/json/list") as r:
            targets = await r.json()
        page = next(t for t in targets if t["type"] == "page")
        self.ws = await self.http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
        self.calls, self.next_id = {}, 0
        self.reader = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        async for msg in self.ws:
            data = json.loads(msg.data)
            future = self.calls.pop(data.get("id"), None)
            if future is not None and not future.done():
                future.set_result(data)

    async def call(self, method: str, **params) -> dict:
        self.next_id += 1
        future = self.calls[self.next_id] = asyncio.get_running_loop().create_future()
        await self.ws.send_json({"id": self.next_id, "method": method, "params": params})
        reply = await asyncio.wait_for(future, 60)
        assert "error" not in reply, reply
        return reply["result"]

    async def eval(self, expression: str):
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while not (value := await self.eval(expression)):
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            await asyncio.sleep(0.1)
        return value

    async def close(self) -> None:
        self.reader.cancel()
        await self.ws.close()
        await self.http.close()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture
def demo(tmp_path):
    """`swarm demo --web` on three peers; (its process, the peers' ids)."""
    model = os.environ.get("SPECSWARM_WEB_MODEL")
    flags = ["--model", model] if model else ["--model", str(chat_model(tmp_path / "tiny-chat")), "--speculative",
                                              "--draft", str(TINY_DRAFT)]
    server = ApiProcess("demo", "--web", "--port", "0", *flags, timeout=300)
    try:
        peers = re.findall(r"serves blocks \d+:\d+ at \S+/p2p/(\w+)", "".join(server.err))
        assert len(peers) == 3, server.err
        yield server, peers
    finally:
        code = server.stop()
        assert code == 128 + signal.SIGTERM, "".join(server.err)
        assert "stopped the local peers" in "".join(server.err)


async def scenario(url: str, peers: list[str], message: str, screenshot: Path) -> dict:
    browser = await Browser().start()
    try:
        await browser.call("Page.enable")
        await browser.call("Emulation.setDeviceMetricsOverride", width=1440, height=820, deviceScaleFactor=1,
                           mobile=False)
        await browser.call("Page.navigate", url=url + "/")
        await browser.wait_for(f"document.querySelectorAll('.peer-row').length === {len(peers)}", 60, "the peers")
        shown = await browser.eval("[...document.querySelectorAll('.peer-row')].map((e) => e.dataset.peer)")
        on_route = await browser.wait_for("document.querySelectorAll('.span.in-route').length", 30, "the route")
        ready = await browser.wait_for("document.getElementById('ready').textContent === 'ready'", 30, "ready")
        await browser.eval("window.mutations = 0; new MutationObserver(() => window.mutations++).observe("
                           "document.getElementById('messages'), {subtree: true, childList: true, characterData: true})")
        await browser.eval(f"document.getElementById('chat-input').value = {json.dumps(message)}; "
                           "document.getElementById('send').click(); true")
        await browser.wait_for("document.querySelector('.msg.assistant')?.dataset.done === '1'", 240, "the reply")
        reply = await browser.eval("document.querySelector('.msg.assistant .text').textContent")
        stats = await browser.eval("document.querySelector('.msg.assistant .stats').textContent")
        error = await browser.eval("document.querySelector('.msg.assistant').classList.contains('error')")
        mutations = await browser.eval("window.mutations")
        await asyncio.sleep(0.3)
        shot = await browser.call("Page.captureScreenshot", format="png")
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        screenshot.write_bytes(base64.b64decode(shot["data"]))
        return dict(shown=shown, on_route=on_route, ready=ready, reply=reply, stats=stats, error=error,
                    mutations=mutations)
    finally:
        await browser.close()


def test_the_page_shows_the_swarm_and_streams_a_chat(demo, tmp_path):
    server, peers = demo
    message = os.environ.get("SPECSWARM_WEB_PROMPT", "Write a Python function that reverses a string."
                             if os.environ.get("SPECSWARM_WEB_MODEL") else "def reverse(s):")
    screenshot = Path(os.environ.get("SPECSWARM_SCREENSHOT") or tmp_path / "web.png")
    got = asyncio.run(scenario(server.url, peers, message, screenshot))
    assert sorted(got["shown"]) == sorted(peers), "the map does not show every peer of the swarm"
    assert got["on_route"] == 3 and got["ready"]
    assert not got["error"] and got["reply"].strip(), got["reply"]
    assert got["mutations"] > 3, "the reply did not stream (it came in one piece)"
    assert "tokens/s" in got["stats"] and "tokens/round" in got["stats"], got["stats"]
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
