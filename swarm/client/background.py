"""An asyncio loop in its own thread, so synchronous generation code can call the async client stack.

Knows asyncio and threads; nothing of peers, protocols or models.
"""

from __future__ import annotations

import asyncio
import threading


class BackgroundLoop:
    """An asyncio loop in its own thread, so synchronous generation code can call async network code."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="specswarm-client", daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float | None = None):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
