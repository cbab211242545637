"""An asyncio loop in its own thread, so synchronous generation code can call the async client stack.

Knows asyncio and threads; nothing of peers, protocols or models.
"""

from __future__ import annotations

import asyncio
import threading

from peer.trio_thread import block_stop_signals


class BackgroundLoop:
    """An asyncio loop in its own thread, so synchronous generation code can call async network code."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._main, name="specswarm-client", daemon=True)
        self.thread.start()

    def _main(self) -> None:
        block_stop_signals()  # Ctrl-C and SIGTERM are the caller's (main thread's) business
        self.loop.run_forever()

    def run(self, coro, timeout: float | None = None):
        """Run `coro` on the loop and wait for its result. If the wait ends early (the timeout, or Ctrl-C
        in the calling thread), the coroutine is cancelled rather than left running unseen."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except BaseException:
            future.cancel()
            raise

    def close(self, timeout: float = 5.0) -> None:
        """Cancel whatever still runs on the loop and let it finish, as asyncio.run does (a task still
        pending when the loop goes away is reported at exit: "Task was destroyed but it is pending!"),
        then stop and close the loop. Idempotent."""
        if self.loop.is_closed():
            return
        if self.thread.is_alive():
            try:
                self.run(_cancel_all(), timeout)
            except Exception:  # noqa: BLE001 - a task that will not end: stop the loop regardless
                pass
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout)
        if not self.thread.is_alive():
            self.loop.close()


async def _cancel_all() -> None:
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.get_running_loop().shutdown_asyncgens()
