"""Steps of different sessions computed together: the peer's batch scheduler and its engine thread.

`Batcher.submit(session, hidden, layout)` queues one step and returns a future of its output. One
scheduler task takes batches off the queue; whatever queued while the last batch computed forms the
next one (continuous batching: no wait when the peer is idle). Before it forms a batch the scheduler
yields the event loop until `CATCH_UP` turns in a row queue nothing new, so frames that arrived
meanwhile are read and queued first (a frame read in one turn is queued in the next).
Then a gathering window: the step at the head of the queue waits for other sessions' steps as long as
recent batches took to compute (an average), at most `BatchSettings.batch_wait_ms` (the latency
budget), less once every session that stepped in the last `ACTIVE` seconds has a step queued (so one
session alone, or a chat waiting for its user, never waits) or the batch is full; and while recent
windows gathered little (sessions out of step, e.g. two in different stages of a pipeline of peers)
only every `PROBE`-th window waits. Bounded by the compute time, the window costs a step at most one
more batch's time at this peer, and is as short as the engine is fast (a millisecond for a small model,
or on a GPU); where steps of many sessions pass through a pipeline of peers sharing a CPU, it gathers
them into a few large batches instead of many small ones (measured: README, Performance; SmolLM2-135M,
2 peers and the client on 2 cores, 16 sessions: 13 steps a batch against 4 without it, and about half
the CPU per token).

Where a batch runs: a batch expected to take more than `INLINE_BELOW` (from the seconds per position
of recent batches) runs on one engine thread, so the loop keeps reading, opening and sending while it
computes; a shorter one runs on the event loop itself, because handing it to a thread and back costs
more than it saves (measured on the tiny model: ~0.2 ms of CPU per step, most of it in the two thread
wake-ups and GIL hand-offs, against 0.3 ms for the step itself).

A batch is formed in arrival order (FIFO across sessions): at most one step per session (a session's
later steps wait for its earlier ones, and never overtake them), at most `max_batch_tokens` new
positions in all; a step that does not fit is passed over for this batch only (it heads the queue of
the next), and a step bigger than the cap runs alone. So a long prefill delays the others by at most
one batch, and decode steps behind it never starve. Steps of sessions that have gone (closed, expired)
are dropped when the batch is formed. With `batching` off every batch is one step, run as above.

Steps of a batch are grouped by block span (a session may use part of the peer's span); a group of one
runs `BlockRange.forward`, exactly as an unbatched step; a larger group runs `BlockRange.forward_batch`
(its rows may round differently in the last bits: peer/model/blocks.py). A step its cache refuses
(`CacheError`) fails alone; an unexpected failure fails its group. `Backlog` is the per-stream bound
on queued work (its reader waits).

Knows asyncio, one worker thread and the engine's `forward` / `forward_batch`; nothing of messages,
codecs, streams or who owns a session (a job's session is anything with `blocks` and `cache`).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import torch

from peer.limits import ServeStats
from peer.model import StepLayout
from peer.trio_thread import block_stop_signals

ACTIVE = 0.5  # seconds since its last step for which a session counts as stepping (the window waits for it)
INLINE_BELOW = 0.002  # a batch expected to take less (seconds) runs on the event loop, not the engine thread
GAIN = 0.5  # steps a gathering window must have gathered lately (an average) for the next one to wait
PROBE = 8  # while windows gather less, every PROBE-th still waits (to notice when waiting pays again)
CATCH_UP = 3  # quiet event-loop turns the scheduler waits for before it forms a batch (readers queue what arrived)


@dataclass
class BatchSettings:
    """How a peer batches steps of different sessions; each field is a `swarm peer` flag (its comment the help)."""

    batching: bool = True  # run steps of different sessions that wait at the same time as one batch (weights read once)
    batch_wait_ms: float = 100.0  # latency budget: ms a step may wait for others to join its batch, at most as long as recent batches took (0: no window)
    max_batch_tokens: int = 256  # new positions in one batch over all its steps (a bigger step runs alone)

    def __post_init__(self):
        if self.batch_wait_ms < 0 or self.batch_wait_ms > 1000:
            raise ValueError(f"batch-wait-ms wants 0..1000 milliseconds, got {self.batch_wait_ms}")
        if self.max_batch_tokens < 1:
            raise ValueError(f"max-batch-tokens must be at least 1, got {self.max_batch_tokens}")


@dataclass(eq=False)
class Job:
    session: object  # has .blocks (a BlockRange) and .cache (its KVCache)
    hidden: torch.Tensor
    layout: StepLayout
    future: asyncio.Future
    arrived: float

    @property
    def n(self) -> int:
        return self.layout.n


class Batcher:
    """The queue of steps, the scheduler task that batches them, and the engine thread that runs them."""

    def __init__(self, settings: BatchSettings, stats: ServeStats | None = None,
                 live: Callable[[object], bool] = lambda session: True, sessions: Callable[[], int] = lambda: 0):
        self.settings, self.stats = settings, stats
        self.live, self.sessions = live, sessions  # is a session still open; how many are open
        self.queue: deque[Job] = deque()
        self.queued_tokens = 0
        self._more = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._running: list[Job] = []  # the batch in the engine thread now
        self._active: dict[int, float] = {}  # id(session) -> when it last queued a step
        self.per_token = INLINE_BELOW  # seconds a batch took per position, lately (an average over batches)
        self.batch_seconds = 0.0  # seconds a batch took, lately (an average): the gathering window's bound
        self.gained, self._windows = 1.0, 0  # steps recent windows gathered (an average); windows opened
        self._engine = ThreadPoolExecutor(1, "specswarm-engine", initializer=block_stop_signals)

    @property
    def cap(self) -> int:
        return self.settings.max_batch_tokens if self.settings.batching else 1

    def submit(self, session, hidden: torch.Tensor, layout: StepLayout) -> asyncio.Future:
        """Queue one step of `session`; the future gets its output (or the exception that failed it)."""
        loop = asyncio.get_running_loop()
        job = Job(session, hidden, layout, loop.create_future(), time.monotonic())
        self.queue.append(job)
        self.queued_tokens += job.n
        self._active[id(session)] = job.arrived
        self._more.set()
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._schedule())
        return job.future

    async def _schedule(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self.queue:
                self._more.clear()
                await self._more.wait()
            if self.settings.batching:
                await self._catch_up()
            await self._gather()
            batch = self._running = self.take()
            if not batch:
                continue
            tokens = sum(job.n for job in batch)
            t0 = time.perf_counter()
            try:
                if self.per_token * tokens < INLINE_BELOW:  # short: handing it to the thread would cost more
                    results = run_steps(batch)
                else:
                    results = await loop.run_in_executor(self._engine, run_steps, batch)
            except Exception as e:  # noqa: BLE001 - (run_steps answers per step; this is a broken thread pool)
                results = [e] * len(batch)
            took = time.perf_counter() - t0
            self.per_token += 0.2 * (took / tokens - self.per_token)
            self.batch_seconds += 0.2 * (took - self.batch_seconds)
            if self.stats is not None:
                self.stats.batch(len(batch), tokens)
            for job, result in zip(batch, results):
                if not job.future.done():
                    if isinstance(result, BaseException):
                        job.future.set_exception(result)
                    else:
                        job.future.set_result(result)

    async def _catch_up(self) -> None:
        """Yield the event loop until the readers have queued what arrived (frames read in one turn are
        queued in the next): at least CATCH_UP turns, more while the last one brought steps, at most 4x."""
        quiet = 0
        for _ in range(4 * CATCH_UP):
            before = len(self.queue)
            await asyncio.sleep(0)
            quiet = quiet + 1 if len(self.queue) == before else 0
            if quiet >= CATCH_UP:
                return

    def _expected(self, now: float) -> int:
        """How many sessions a batch could hold now: those that queued a step within ACTIVE seconds (an open
        session that has been quiet longer, e.g. a chat waiting for its user, is not waited for)."""
        for key, at in list(self._active.items()):
            if now - at > ACTIVE:
                del self._active[key]
        return min(len(self._active), self.sessions() or len(self._active))

    async def _gather(self) -> None:
        """The gathering window: wait until the head of the queue has waited `batch_wait_ms` or as long
        as recent batches took to compute (whichever is shorter), the batch is full, or every session
        that stepped lately has a step queued. While recent windows gathered less than `GAIN` steps
        each (sessions out of step, e.g. two sessions in different stages of a pipeline), only every
        `PROBE`-th window waits: waiting that gathers nothing is only latency."""
        wait = min(self.settings.batch_wait_ms / 1000, self.batch_seconds)
        if wait <= 0 or not self.settings.batching or not self._waiting():
            return
        self._windows += 1
        if self.gained < GAIN and self._windows % PROBE:
            return
        before = self._waiting()
        deadline = self.queue[0].arrived + wait
        while self.queue and self.queued_tokens < self.cap and self._waiting():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._more.clear()
            try:
                await asyncio.wait_for(self._more.wait(), remaining)
            except asyncio.TimeoutError:
                break
        self.gained += 0.2 * (before - self._waiting() - self.gained)

    def _waiting(self) -> int:
        """How many sessions that stepped lately have no step queued (the window would wait for them)."""
        return max(0, self._expected(time.monotonic()) - len({id(job.session) for job in self.queue}))

    def take(self) -> list[Job]:
        """The next batch, in arrival order: one step per session, at most `cap` positions (the first step
        always, alone if it is bigger); steps of sessions that are gone are cancelled."""
        batch: list[Job] = []
        passed: list[Job] = []
        seen: set[int] = set()
        tokens = 0
        while self.queue and tokens < self.cap:
            job = self.queue.popleft()
            if not self.live(job.session):
                self.queued_tokens -= job.n
                job.future.cancel()
                continue
            if id(job.session) in seen or (batch and tokens + job.n > self.cap):
                seen.add(id(job.session))  # (its later steps must not overtake it)
                passed.append(job)
                continue
            seen.add(id(job.session))
            batch.append(job)
            tokens += job.n
            self.queued_tokens -= job.n
        self.queue.extendleft(reversed(passed))
        return batch

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for job in [*self._running, *self.queue]:
            job.future.cancel()
        self.queue.clear()
        self._engine.shutdown(wait=False, cancel_futures=True)


def run_steps(jobs: list[Job]) -> list:
    """In the engine thread: each job's output or the exception that failed it, in order. Jobs are grouped
    by block span; a group of one runs `forward` (exactly an unbatched step), a larger one `forward_batch`."""
    results: list = [None] * len(jobs)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, job in enumerate(jobs):
        groups.setdefault((job.session.blocks.start, job.session.blocks.end), []).append(i)
    with torch.inference_mode():
        for members in groups.values():
            blocks = jobs[members[0]].session.blocks
            steps = [(jobs[i].hidden.to(blocks.device), jobs[i].session.cache, jobs[i].layout) for i in members]
            try:
                if len(steps) == 1:
                    outs = [blocks(*steps[0])]
                else:
                    outs = blocks.forward_batch(steps)
            except Exception as e:  # noqa: BLE001 - forward's CacheError, or an engine failure: this group's steps fail
                outs = [e] * len(members)
            for i, out in zip(members, outs):
                results[i] = out
    return results


class Backlog:
    """Positions one stream has queued and not yet seen answered: its reader waits while they reach `limit`
    (backpressure, as when steps were served one at a time), so queued hidden states stay bounded."""

    def __init__(self, limit: int):
        self.limit, self.tokens = limit, 0
        self._room = asyncio.Event()
        self._room.set()

    def take(self, n: int) -> None:
        self.tokens += n
        if self.tokens >= self.limit:
            self._room.clear()

    def give(self, n: int) -> None:
        self.tokens -= n
        if self.tokens < self.limit:
            self._room.set()

    async def room(self) -> None:
        await self._room.wait()
