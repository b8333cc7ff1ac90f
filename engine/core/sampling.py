"""How a sequence draws its tokens: the per-stage sampling parameters a request carries."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

from vivace.errors import VivaceError


def is_real(value: Any) -> bool:
    """A real number (Python's or numpy's) that is not a bool: True is an int to Python, but never a temperature, a
    duration or a seed anyone meant."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_finite(value: Any) -> bool:
    """math.isfinite without its OverflowError on integers too large for a float."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


@dataclass(frozen=True)
class SamplingParams:
    """How one stage draws its tokens. temperature 0 means greedy; top_k 0 and top_p 1.0 disable those filters."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def validate(self, where: str = "") -> None:
        """where: where the values came from, put in front of each message (e.g. "stage_sampling['fine'] ")."""
        t, k, p = self.temperature, self.top_k, self.top_p
        if not is_real(t) or not is_finite(t) or t < 0:
            raise VivaceError(f"{where}temperature must be a finite number >= 0, got {t!r}")
        # an integral float (40.0, as some JSON writers store 40) is an integer number of tokens
        if not is_real(k) or not is_finite(k) or int(k) != k or k < 0:
            raise VivaceError(f"{where}top_k must be an integer >= 0, got {k!r}")
        if not is_real(p) or not is_finite(p) or not 0 < p <= 1:
            raise VivaceError(f"{where}top_p must be in (0, 1], got {p!r}")

    def plain(self) -> SamplingParams:
        """The same values as Python float / int / float (numpy scalars and integral floats converted); validate first."""
        return SamplingParams(float(self.temperature), int(self.top_k), float(self.top_p))
