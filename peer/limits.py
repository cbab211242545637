"""What one peer grants its clients, and the token bucket that paces each connection.

Every field of `Limits` is a `swarm peer` flag (generated from this class; the comment after each
field is its help text). Knows numbers and time; nothing of streams, messages or models.
"""

from __future__ import annotations

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
