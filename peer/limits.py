"""What one peer grants its clients, the token bucket that paces each connection, and what the peer
tells its operator about what it served, how it batched it and what it refused (`ServeStats`).

Every field of `Limits` is a `swarm peer` flag (generated from this class; the comment after each
field is its help text). Knows numbers, time and log lines; nothing of streams, messages or models.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from protocol.framing import DEFAULT_MAX_FRAME


@dataclass
class Limits:
    """What one peer grants (docs/security.md explains each)."""

    cache_tokens: int = 32768  # KV cache budget: total tokens (max_length) over all open sessions
    max_sessions: int = 64  # sessions open at once, over all clients
    max_step_tokens: int = 4096  # new positions one step may bring
    session_timeout: float = 600.0  # seconds before an idle session is dropped
    max_sessions_per_client: int = 16  # sessions one client (libp2p peer id, or IP on the direct port) may hold
    max_session_tokens: int = 8192  # cache tokens (max length) of one session
    max_frame: int = DEFAULT_MAX_FRAME  # largest frame accepted, in bytes (checked from the header, before allocating)
    frame_timeout: float = 30.0  # seconds a started frame may take to arrive in full (slow senders are dropped)
    rate: float = 1000.0  # frames per second per connection, sustained (above it reading slows down; 0: unlimited)
    burst: int = 2000  # frames a connection may send at once above the rate
    max_connections: int = 512  # open inference streams in total
    require_encryption: bool = False  # refuse plaintext sessions (clients seal by default; see docs/security.md)

    def __post_init__(self):
        for name in ("cache_tokens", "max_sessions", "max_step_tokens", "max_sessions_per_client",
                     "max_session_tokens", "max_frame", "max_connections"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("session_timeout", "frame_timeout", "rate", "burst"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")


class RateLimit:
    """A token bucket: `delay()` says how long to wait before serving one more frame."""

    def __init__(self, rate: float, burst: int):
        self.rate, self.burst = rate, max(1, burst)
        self.tokens, self.at = float(self.burst), time.monotonic()

    def delay(self) -> float:
        if self.rate <= 0:
            return 0.0
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        self.tokens -= 1.0
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


class ServeStats:
    """Cheap counters of what a peer served and refused, a one-line `summary()` of them, and one log line
    per refused request: at most `lines` per reason every `window` seconds, the rest counted and reported
    in one line when their window is over (so a hostile client cannot flood the log)."""

    def __init__(self, log: logging.Logger, lines: int = 5, window: float = 60.0):
        self.log, self.lines, self.window = log, lines, window
        self.sessions_served = self.tokens_served = 0  # since start: sessions opened, positions computed
        self.batches = self.batched_steps = self.batched_tokens = 0  # since start: engine runs, their steps, positions
        self.largest_batch = 0  # most steps one batch held
        self.refused: dict[str, int] = {}  # reason code -> requests refused since start
        self._quiet: dict[str, list] = {}  # reason code -> [its window's start, lines logged, lines held back]
        self._period = (time.monotonic(), 0)  # when the summary period began, tokens_served then

    def batch(self, steps: int, tokens: int) -> None:
        """Count one engine run of `steps` sessions' steps holding `tokens` new positions."""
        self.batches += 1
        self.batched_steps += steps
        self.batched_tokens += tokens
        self.largest_batch = max(self.largest_batch, steps)

    @property
    def mean_batch(self) -> float:
        """Steps per engine run, on average since start (0 before the first)."""
        return self.batched_steps / self.batches if self.batches else 0.0

    def refuse(self, code: str, client: str, message: str) -> None:
        """Count a refused request, and log it unless this reason already had its lines in this window."""
        self.refused[code] = self.refused.get(code, 0) + 1
        now = time.monotonic()
        self._flush(now, only=code)
        quiet = self._quiet.setdefault(code, [now, 0, 0])
        quiet[1 if quiet[1] < self.lines else 2] += 1
        if not quiet[2]:
            self.log.info("refused a request from %s [%s]: %s", client, code, " ".join(str(message).split())[:300])

    def _flush(self, now: float, only: str | None = None, final: bool = False) -> None:
        """Report the refusals held back in windows that are over (all of them if `final`)."""
        for code, (start, _, held) in list(self._quiet.items()):
            if (only is None or code == only) and (final or now - start >= self.window):
                del self._quiet[code]
                if held:
                    self.log.info("(%d more requests refused [%s] in the last %.0f s, not logged one by one)",
                                  held, code, now - start)

    def summary(self, sessions_open: int, free_tokens: int, cache_tokens: int, final: bool = False) -> str:
        """One line about the period since the last summary (and since start); starts a new period."""
        now = time.monotonic()
        self._flush(now, final=final)
        (since, tokens_then), self._period = self._period, (now, self.tokens_served)
        rate = (self.tokens_served - tokens_then) / max(now - since, 1e-6)
        refused = ", ".join(f"{code} {n}" for code, n in sorted(self.refused.items()))
        return (f"sessions: {sessions_open} open, {self.sessions_served} served; tokens: {self.tokens_served} served, "
                f"{rate:.1f}/s over the last {now - since:.0f} s; cache: {free_tokens} of {cache_tokens} tokens free; "
                f"batches: {self.batches} for {self.batched_steps} steps (mean {self.mean_batch:.1f}, largest "
                f"{self.largest_batch}); "
                f"refused: {sum(self.refused.values())} requests" + (f" ({refused})" if refused else ""))
