"""Validation of a call's arguments shared by every family: prompts, stories, durations, seeds and sampling."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from vivace.core.sampling import SamplingParams
from vivace.errors import VivaceError

SAMPLING_KEYS = ("temperature", "top_k", "top_p")


@dataclass(frozen=True)
class Story:
    """A clip whose text condition changes over time: (prompt, seconds) segments played in order."""

    segments: tuple[tuple[str, float], ...]


PromptLike = str | Story | Sequence[str] | Sequence[Story] | Sequence[tuple[str, float]]


def is_story_list(value: Any) -> bool:
    return (
        isinstance(value, (list, tuple)) and len(value) > 0
        and all(isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], str) for item in value)
    )


def check_prompt(prompt: Any) -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise VivaceError(f"prompt must be a non-empty string, got {prompt!r}")
    return prompt


def check_seconds(value: Any, what: str, limit: float) -> float:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise VivaceError(f"{what} must be a number of seconds, got {value!r}") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise VivaceError(f"{what} must be > 0 seconds, got {value!r}")
    if seconds > limit:
        raise VivaceError(f"{what} of {seconds} s exceeds this pack's limit of {limit} s")
    return seconds


def seeds(seed: int | Sequence[int], rows: int) -> list[int]:
    """An integer seed s gives row i the seed s + i; a list gives each row its own."""
    values = list(seed) if isinstance(seed, (list, tuple)) else [seed + i if isinstance(seed, int) else seed for i in range(rows)]
    if len(values) != rows:
        raise VivaceError(f"got {len(values)} seeds for {rows} prompts")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value < 2**63:
            raise VivaceError(f"seed must be an integer in [0, 2**63), got {value!r}")
    return [int(v) for v in values]


def sampling_params(defaults: SamplingParams, overrides: dict[str, Any]) -> SamplingParams:
    """defaults with the non-None overrides (temperature, top_k, top_p) applied, validated."""
    params = replace(defaults, **{k: v for k, v in overrides.items() if v is not None})
    params.validate()
    return params


def unknown_arguments(given: dict[str, Any], expected: Sequence[str]) -> None:
    unknown = sorted(set(given) - set(expected))
    if unknown:
        raise VivaceError(f"unknown sampling argument {unknown[0]!r} (expected {', '.join(expected)})")
