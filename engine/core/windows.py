"""Continuation windows: how a long stream is cut into windows that each fit a stage's trained context."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vivace import _C


@dataclass(frozen=True)
class Window:
    """Generate [new_start, new_end) given [prefix_start, new_start) of earlier output as prompt."""

    index: int
    prefix_start: int
    new_start: int
    new_end: int
    segment: int  # story segment whose condition applies

    @property
    def num_new(self) -> int:
        return self.new_end - self.new_start


def _windows(spans: np.ndarray) -> list[Window]:
    return [Window(*row) for row in spans.tolist()]


def plan_windows(total: int, window: int, stride: int, segment_starts: list[int]) -> list[Window]:
    """The first window generates up to `window` positions, each later one up to `stride` new positions with
    the rest of the window as prefix. No window's new part crosses a segment start, so the condition switches
    exactly at segment boundaries. Planned by vivace._C.plan_windows."""
    return _windows(_C.plan_windows(total, window, stride, list(segment_starts)))


def plan_chunks(total: int, chunk: int) -> list[Window]:
    """Independent chunks (no prefix), for the fine stage."""
    return _windows(_C.plan_chunks(total, chunk))
