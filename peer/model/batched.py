"""Calls of one function from several threads, whose overlapping calls run as one (flat combining): a client's
LM head shared by the threads of an API server or the load benchmark (`blocks.ModelHead.logits`).

Knows threads and tensors of rows; nothing of models, heads or sessions.
"""

from __future__ import annotations

import threading
from typing import Callable

import torch


class BatchedCalls:
    """`fn` (rows in, rows out) for several threads, whose overlapping calls run as one call (flat combining).

    A call when none runs is computed at once, alone: `fn(x)`, exactly. Calls that arrive while one
    runs queue their rows; when it ends, the first of them runs every queued call's rows as one
    batch (`torch.cat`, then split), the others wait for their part. Nobody waits for a batch to
    fill, and a leader computes one batch only, so no caller serves others for long. In a batch a
    row may round differently in the last bits than alone (the BLAS picks its kernel by rows), unless
    `fn` computes rows as if alone (`invariant.RowPolicy`: a half-precision head's)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        self.fn = fn
        self._lock = threading.Lock()
        self._queue: list[_Call] = []
        self._busy = False
        self.calls = self.batches = 0  # counters: calls made, batches (fn runs) they took

    def __getstate__(self):  # (a copied or pickled head gets a fresh, idle one)
        return {"fn": self.fn}

    def __setstate__(self, state):
        self.__init__(state["fn"])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        me = _Call(x)
        with self._lock:
            self.calls += 1
            if self._busy:
                self._queue.append(me)
            else:
                self._busy = me.lead = True
        if not me.lead:
            me.ready.wait()  # our part is done, or we lead the next batch
            if not me.lead:
                return me.answer()
        with self._lock:
            batch, self._queue = (self._queue, []) if self._queue and self._queue[0] is me else ([me], self._queue)
        try:
            self._run(batch, me)
        finally:
            with self._lock:
                self.batches += 1
                if self._queue:
                    self._queue[0].lead = True
                    self._queue[0].ready.set()
                else:
                    self._busy = False
        return me.answer()

    def _run(self, batch: list["_Call"], me: "_Call") -> None:
        try:
            if len(batch) == 1:
                outs = [self.fn(batch[0].x)]
            else:
                rows = [c.x.reshape(-1, c.x.shape[-1]) for c in batch]
                joined = self.fn(torch.cat(rows))
                outs = [y.reshape(*c.x.shape[:-1], y.shape[-1])
                        for c, y in zip(batch, joined.split([len(r) for r in rows]))]
        except BaseException as e:  # noqa: BLE001 - every caller of the batch gets it
            outs = [e] * len(batch)
        for c, out in zip(batch, outs):
            c.out = out
            if c is not me:
                c.ready.set()


class _Call:
    __slots__ = ("x", "out", "lead", "ready")

    def __init__(self, x: torch.Tensor):
        self.x, self.out, self.lead, self.ready = x, None, False, threading.Event()

    def answer(self) -> torch.Tensor:
        if isinstance(self.out, BaseException):
            raise self.out
        return self.out
