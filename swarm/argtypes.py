"""argparse value types that check numbers, so a mistaken flag gets one line naming the rule it broke.

Knows argparse only: no flags, no defaults, nothing of the library. Shared by the command line
(`swarm.flags`, `swarm.cli`) and the tools that parse their own flags (`swarm.bench.simulate`).
"""

from __future__ import annotations

import argparse
import math


def number(kind=float, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
           hi_open: bool = False):
    """An argparse type: a `kind` (int or float) in [lo, hi] (ends left out with lo_open / hi_open)."""
    def describe() -> str:
        if hi is None:
            return f"{'above' if lo_open else 'at least'} {lo}"
        if lo is None:
            return f"{'below' if hi_open else 'at most'} {hi}"
        return f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        low_bad = lo is not None and (value <= lo if lo_open else value < lo)
        high_bad = hi is not None and (value >= hi if hi_open else value > hi)
        if low_bad or high_bad:
            raise argparse.ArgumentTypeError(f"must be {describe()}, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def positive(kind=int):
    """At least 1 (an int: counts, lengths, threads); a float: above 0 (seconds)."""
    return number(kind, 1) if kind is int else number(kind, 0, lo_open=True)


def non_negative(kind=float):
    return number(kind, 0)


def fraction(*, open_low: bool = True, open_high: bool = False):
    """A number in (0, 1] by default (top-p); `fraction(open_high=True)` is (0, 1) (relaxed acceptance)."""
    return number(float, 0, 1, lo_open=open_low, hi_open=open_high)
