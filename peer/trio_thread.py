"""Driving trio code from asyncio: a trio loop in a thread of its own, one crossing per call.

py-libp2p runs on trio, the rest of the peer and the client on asyncio. A `TrioThread` runs a trio
loop in a dedicated thread; `_submit`/`_call` start a coroutine function there and hand its
outcome back to the asyncio loop that started the thread. Work goes to trio with
`TrioToken.run_sync_soon`, results come back with `loop.call_soon_threadsafe` (about half the cost
of an executor + `trio.from_thread.run`).

A subclass supplies `_trio_main(*args, on_started)`: it runs in the trio thread, sets
`self._nursery` (where calls run), calls `on_started()` once it is ready (or sets
`self._start_error` and returns), and returns once `self._stop_event` is set. Calls still pending
then fail with ConnectionError, as do calls after `_stop_thread()`.

Knows asyncio, trio and threads; nothing about libp2p, peers or what the calls do.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from typing import Any, Awaitable, Callable

import trio

log = logging.getLogger("specswarm.p2p")


def block_stop_signals() -> None:
    """Call first thing in a helper thread: Ctrl-C, SIGTERM and SIGHUP then reach the main thread only.
    (A signal the kernel hands to a helper thread sets Python's flag but does not interrupt the main
    thread's blocking call, e.g. input(), so its handler would run only once that call returns.)"""
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP})


def settle(loop: asyncio.AbstractEventLoop, fut: asyncio.Future, ok: bool, value: Any) -> None:
    """From any thread: complete `fut` on `loop`; the first outcome wins; a closed loop has no waiters."""
    def done() -> None:
        if not fut.done():
            fut.set_result(value) if ok else fut.set_exception(value)
    try:
        loop.call_soon_threadsafe(done)
    except RuntimeError:
        pass


def unwrap(exc: BaseException) -> BaseException:
    """trio nurseries wrap errors in exception groups; callers want the one real error."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


class TrioThread:
    """A trio loop in its own thread, started from (and answering to) one asyncio loop."""

    _closed = False
    _started_ok = False  # set in the trio thread once `on_started` ran
    _nursery: trio.Nursery
    _start_error: BaseException | None = None

    def _name(self) -> str:
        """Who this is, for messages ("p2p node <id>")."""
        return type(self).__name__

    async def _start_thread(self, thread_name: str, *args: Any) -> None:
        """Run `_trio_main(*args, on_started)` in a new thread; return once it has started (or raise why not)."""
        self._loop = loop = asyncio.get_running_loop()
        started, self._stopped = loop.create_future(), loop.create_future()
        self._thread = threading.Thread(target=self._thread_main, args=(args, started), name=thread_name, daemon=True)
        self._thread.start()
        await started

    async def _stop_thread(self) -> None:
        """Stop the trio loop (calls in flight fail) and wait for its thread to end. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._token.run_sync_soon(self._stop_event.set)
        except (AttributeError, trio.RunFinishedError):  # trio has not started yet, or has finished
            pass
        await asyncio.shield(self._stopped)
        self._thread.join()

    async def _trio_main(self, *args: Any) -> None:
        raise NotImplementedError

    # the asyncio -> trio crossing

    def _submit(self, async_fn: Callable[..., Awaitable[Any]], *args: Any, cancel: bool = True) -> asyncio.Future:
        """Start `async_fn(*args)` in the trio thread; the future gets its outcome. `cancel`: cancelling
        the future cancels the trio side too (else that runs on and its outcome is dropped)."""
        loop = asyncio.get_running_loop()
        fut, scope = loop.create_future(), trio.CancelScope()
        closed = ConnectionError(f"{self._name()} is closed")

        async def runner() -> None:  # trio thread
            try:
                with scope:
                    settle(loop, fut, True, await async_fn(*args))
            except trio.Cancelled:
                settle(loop, fut, False, closed)
                raise
            except BaseException as exc:  # reaches the caller, never the nursery
                settle(loop, fut, False, unwrap(exc))

        def spawn() -> None:  # trio thread
            try:
                self._nursery.start_soon(runner)
            except RuntimeError:  # the nursery is closing
                settle(loop, fut, False, closed)

        try:
            if self._closed:
                raise trio.RunFinishedError
            self._token.run_sync_soon(spawn)
        except trio.RunFinishedError:
            fut.set_exception(closed)
        if cancel:
            fut.add_done_callback(lambda f: f.cancelled() and self._run_sync_soon(scope.cancel))
        return fut

    async def _call(self, async_fn: Callable[..., Awaitable[Any]], *args: Any, cancel: bool = True) -> Any:
        fut = self._submit(async_fn, *args, cancel=cancel)
        return await (fut if cancel else asyncio.shield(fut))

    def _run_sync_soon(self, fn: Callable[[], Any]) -> None:
        try:
            self._token.run_sync_soon(fn)
        except trio.RunFinishedError:
            pass

    # the trio thread

    def _thread_main(self, args: tuple, started: asyncio.Future) -> None:
        block_stop_signals()
        def on_started() -> None:
            self._started_ok = True
            settle(self._loop, started, True, None)

        try:
            trio.run(self._trio_entry, args, on_started)
            settle(self._loop, started, False, self._start_error or ConnectionError(f"{self._name()} closed while "
                                                                                    "starting"))
        except BaseException as exc:
            if self._started_ok:  # it was running, so nobody awaits this error: say it here
                log.error("%s stopped unexpectedly: %r", self._name(), unwrap(exc), exc_info=exc)
            settle(self._loop, started, False, unwrap(exc))
        finally:
            settle(self._loop, self._stopped, True, None)

    async def _trio_entry(self, args: tuple, on_started: Callable[[], None]) -> None:
        self._stop_event = trio.Event()
        self._token = trio.lowlevel.current_trio_token()  # after _stop_event: _stop_thread relies on the order
        await self._trio_main(*args, on_started)
