"""Continuation windows: how a long stream is cut into windows that each fit a stage's trained context."""
from __future__ import annotations

import bisect
from dataclasses import dataclass


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


def plan_windows(total: int, window: int, stride: int, segment_starts: list[int]) -> list[Window]:
    """The first window generates up to `window` positions, each later one up to `stride` new positions with
    the rest of the window as prefix. No window's new part crosses a segment start, so the condition switches
    exactly at segment boundaries."""
    windows: list[Window] = []
    t = 0
    while t < total:
        segment = bisect.bisect_right(segment_starts, t) - 1
        segment_end = segment_starts[segment + 1] if segment + 1 < len(segment_starts) else total
        new_end = min(t + (window if t == 0 else stride), segment_end, total)
        windows.append(Window(len(windows), max(0, new_end - window), t, new_end, segment))
        t = new_end
    return windows


def plan_chunks(total: int, chunk: int) -> list[Window]:
    """Independent chunks (no prefix), for the fine stage."""
    return [Window(i, start, start, min(start + chunk, total), 0) for i, start in enumerate(range(0, total, chunk))]
