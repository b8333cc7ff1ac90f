"""How a sequence draws its tokens: the per-stage sampling parameters a request carries."""
from __future__ import annotations

import math
from dataclasses import dataclass

from vivace.errors import VivaceError


@dataclass(frozen=True)
class SamplingParams:
    """How one stage draws its tokens. temperature 0 means greedy; top_k 0 and top_p 1.0 disable those filters."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def validate(self) -> None:
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise VivaceError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if isinstance(self.top_k, bool) or int(self.top_k) != self.top_k or self.top_k < 0:
            raise VivaceError(f"top_k must be an integer >= 0, got {self.top_k}")
        if not math.isfinite(self.top_p) or not 0 < self.top_p <= 1:
            raise VivaceError(f"top_p must be in (0, 1], got {self.top_p}")
