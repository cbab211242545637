"""Where a chat writes: on a terminal a dim status line fenced off at the bottom row and countdowns redrawn
in place; anywhere else (a pipe, a file) plain text, one line per note, no escape codes.

Knows terminals (ANSI escape codes, the terminal's size); nothing of models, decoding or the swarm.
"""

from __future__ import annotations

import math
import os
import sys
import time

DIM, PLAIN = "\033[2m", "\033[0m"


class Console:
    """Where a chat writes. On a terminal (`live`): a status line fenced off at the bottom row (a
    scroll region keeps the streamed text above it) and countdowns redrawn in place, dim. Elsewhere:
    plain text, one line per note, no escape codes."""

    def __init__(self, out=None, live: bool | None = None):
        self.out = out if out is not None else sys.stdout
        self.live = _isatty(self.out) if live is None else live
        self.at_line_start = True
        self._rows = 0  # the terminal's height while the status line is shown

    def write(self, text: str) -> None:
        if text:
            self._raw(text)
            self.at_line_start = text.endswith("\n")

    def _raw(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def line(self, text: str) -> None:
        """`text` on a line of its own (dim on a terminal)."""
        self.write(("" if self.at_line_start else "\n") + (f"{DIM}{text}{PLAIN}" if self.live else text) + "\n")

    def status_on(self) -> None:
        """Show a status line at the bottom row until `status_off` (terminals only)."""
        rows = _size(self.out)[0] if self.live else 0
        if rows < 4 or self._rows:
            return
        if not self.at_line_start:
            self.write("\n")
        self._rows = rows  # a newline and back up (scrolls if at the bottom), then fence the last row off
        self._raw(f"\n\033[1A\0337\033[1;{rows - 1}r\0338")

    def status(self, text: str) -> None:
        if not self._rows:
            return
        rows, cols = _size(self.out)
        if rows != self._rows and rows >= 4:  # the terminal was resized: fence the new last row off
            self._raw(f"\0337\033[1;{rows - 1}r\0338")
            self._rows = rows
        self._raw(f"\0337\033[{self._rows};1H\033[2K{DIM}{text[:max(cols - 1, 1)]}{PLAIN}\0338")

    def status_off(self) -> None:
        if self._rows:
            self._raw(f"\0337\033[{self._rows};1H\033[2K\033[r\0338")
            self._rows = 0

    def countdown(self, reason: str, seconds: float, give_up: str) -> None:
        """Wait `seconds`, saying why and how long (redrawn each second on a terminal); Ctrl-C ends it."""
        end = time.monotonic() + seconds
        if not self.live:
            self.line(f"{reason}; retrying in {seconds:.0f} s… (Ctrl-C to {give_up})")
            time.sleep(seconds)
            return
        if not self.at_line_start:
            self.write("\n")
        try:
            while (left := end - time.monotonic()) > 0:
                text = f"{reason}; retrying in {math.ceil(left)} s… (Ctrl-C to {give_up})"
                self._raw(f"\r\033[K{DIM}{text[:max(_size(self.out)[1] - 1, 1)]}{PLAIN}")
                time.sleep(left - math.ceil(left) + 1)  # wake as the shown number changes
        finally:
            self._raw("\r\033[K")


def _isatty(out) -> bool:
    try:
        return out.isatty()
    except (AttributeError, ValueError):
        return False


def _size(out) -> tuple[int, int]:
    try:
        size = os.get_terminal_size(out.fileno())
        return size.lines, size.columns
    except (AttributeError, ValueError, OSError):
        return 0, 80
