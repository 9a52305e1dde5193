"""Command-line value types that refuse out-of-range numbers with one line naming the flag.

argparse calls a flag's ``type`` on the text given; raising ``ArgumentTypeError`` there makes it
report ``argument --flag: <message>``, which :class:`OneLineParser` prints as one line with
exit status 2, like every other input error of the ``deepdem`` command.
"""

from __future__ import annotations

import argparse
import math
import sys


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line ``deepdem: error: ...`` and exit status 2."""

    def error(self, message: str):
        command = self.prog.split(" ", 1)[1] + ": " if " " in self.prog else ""
        print(f"deepdem: error: {command}{message} (see '{self.prog} --help')", file=sys.stderr)
        raise SystemExit(2)


def number(kind: type = float, low: float = -math.inf, high: float = math.inf,
           low_open: bool = False, high_open: bool = False):
    """A ``type=`` for a number of ``kind`` in the interval from ``low`` to ``high``."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        below = value <= low if low_open else value < low
        above = value >= high if high_open else value > high
        if below or above:
            raise argparse.ArgumentTypeError(f"must be in {interval(low, high, low_open, high_open)}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its own messages
    return parse


def interval(low: float, high: float, low_open: bool = False, high_open: bool = False) -> str:
    left = "(" if low_open or low == -math.inf else "["
    right = ")" if high_open or high == math.inf else "]"
    show = lambda v: "inf" if v == math.inf else "-inf" if v == -math.inf else f"{v:g}"  # noqa: E731
    return f"{left}{show(low)}, {show(high)}{right}"


positive_int = number(int, 1)
non_negative_int = number(int, 0)
positive = number(float, 0, low_open=True)
fraction = number(float, 0, 1, high_open=True)  # [0, 1): an overlap, a share held out
share = number(float, 0, 1)  # [0, 1]: a share of chips
