"""Validation of a call's arguments shared by every family: prompts, stories, durations, seeds and sampling.

Every check raises VivaceError with one line naming the argument and the bad value; a family's `requests` runs them
all before any work (no text is encoded, no request is added) so a bad call costs nothing.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from vivace.core.sampling import SamplingParams, is_finite, is_integer, is_real
from vivace.errors import VivaceError

SAMPLING_KEYS = ("temperature", "top_k", "top_p")
MAX_SEED = 2**63 - 1  # seeds are drawn into a uint64 stream id with the top bit free


@dataclass(frozen=True)
class Story:
    """A clip whose text condition changes over time: (prompt, seconds) segments played in order."""

    segments: tuple[tuple[str, float], ...]


PromptLike = str | Story | Sequence[str] | Sequence[Story] | Sequence[tuple[str, float]]


def is_story_list(value: Any) -> bool:
    """A list of (prompt, seconds) pairs: one story, not a batch of prompts."""
    return (
        isinstance(value, (list, tuple)) and len(value) > 0
        and all(isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], str) for item in value)
    )


def check_prompt(prompt: Any, what: str = "prompt") -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise VivaceError(f"{what} must be a non-empty string, got {prompt!r}")
    return prompt


def check_seconds(value: Any, what: str, limit: float) -> float:
    """A positive, finite number of seconds within limit. Strings are refused: "2" is text, not a duration."""
    if not is_real(value):
        raise VivaceError(f"{what} must be a number of seconds, got {value!r}")
    if not value > 0:  # NaN too
        raise VivaceError(f"{what} must be > 0 seconds, got {value!r}")
    if not is_finite(value) or value > limit:
        raise VivaceError(f"{what} of {value!r} s exceeds this pack's limit of {limit} s")
    return float(value)


def codec_frames(seconds: float, frame_rate: float) -> int:
    """Codec frames of a duration: every family rounds a duration to the nearest whole frame."""
    return round(seconds * frame_rate)


def check_duration(value: Any, what: str, limit: float, frame_rate: float) -> float:
    """check_seconds, and at least one codec frame once rounded to whole frames (a clip of no frames has no audio)."""
    seconds = check_seconds(value, what, limit)
    if codec_frames(seconds, frame_rate) < 1:
        raise VivaceError(
            f"{what} of {seconds} s is shorter than one codec frame ({1 / frame_rate:.4g} s at this pack's "
            f"{frame_rate:g} frames/s; durations round to whole frames)"
        )
    return seconds


def check_bool(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise VivaceError(f"{what} must be True or False, got {value!r}")
    return value


def check_seed(value: Any, what: str = "seed") -> int:
    if not is_integer(value) or not 0 <= value <= MAX_SEED:
        raise VivaceError(f"{what} must be an integer in [0, 2**63), got {value!r}")
    return int(value)


def seeds(seed: int | Sequence[int], rows: int) -> list[int]:
    """An integer seed s gives row i the seed s + i; a list or tuple gives each row its own."""
    if isinstance(seed, (list, tuple)):
        if len(seed) != rows:
            raise VivaceError(f"got {len(seed)} seeds for {rows} prompts")
        return [check_seed(value, f"seed[{row}]") for row, value in enumerate(seed)]
    base = check_seed(seed)
    if base + rows - 1 > MAX_SEED:
        raise VivaceError(
            f"seed {base} + row {rows - 1} exceeds 2**63-1 (row i is seeded seed + i; give a smaller seed or one per row)"
        )
    return [base + row for row in range(rows)]


def unknown_arguments(given: Mapping[str, Any], expected: Sequence[str], where: str = "") -> None:
    unknown = sorted(set(given) - set(expected), key=repr)
    if unknown:
        raise VivaceError(f"unknown sampling argument {unknown[0]!r}{where} (expected {', '.join(expected)})")


def _given(values: Mapping[str, Any]) -> dict[str, Any]:
    """None means "not given" (the pack's default stays), as for the call's own keyword arguments."""
    return {key: value for key, value in values.items() if value is not None}


def _stage_entry(stage: str, entry: Any) -> dict[str, Any]:
    where = f"stage_sampling[{stage!r}]"
    if isinstance(entry, SamplingParams):
        return vars(entry)
    if not isinstance(entry, Mapping):
        raise VivaceError(f"{where} must be a dict of {', '.join(SAMPLING_KEYS)} or a SamplingParams, got {entry!r}")
    unknown_arguments(entry, SAMPLING_KEYS, f" in {where}")
    return _given(entry)


def stage_sampling(defaults: Mapping[str, SamplingParams], overrides: Mapping[str, Any], per_stage: Any) -> dict[str, SamplingParams]:
    """Each stage's sampling: the pack's default, then the call's temperature / top_k / top_p (overrides; None: not
    given), then the stage's own entry of per_stage (the call's stage_sampling: {stage: {key: value}} or
    {stage: SamplingParams}, which replaces all three), validated and as plain Python numbers.
    unknown_arguments(overrides, ...) is the caller's: which other keys a call takes is the family's."""
    if per_stage is None:
        per_stage = {}
    if not isinstance(per_stage, Mapping):
        raise VivaceError(f"stage_sampling must be a dict of {{stage: {{{', '.join(SAMPLING_KEYS)}}}}}, got {per_stage!r}")
    unknown = sorted(set(per_stage) - set(defaults), key=repr)
    if unknown:
        raise VivaceError(f"stage_sampling names unknown stage {unknown[0]!r} (this pack's stages: {', '.join(defaults)})")
    common = _given(overrides)
    result = {}
    for stage, params in defaults.items():
        # the call's own values are checked before the stage's entry, so each message names where its value came from
        params = replace(params, **common)
        params.validate()
        if stage in per_stage:
            params = replace(params, **_stage_entry(stage, per_stage[stage]))
            params.validate(f"stage_sampling[{stage!r}] ")
        result[stage] = params.plain()
    return result


def per_row(value: Any, rows: int, what: str, load: Callable[[Any], Any]) -> list[Any]:
    """A call's per-row input: one value for every row, or a list or tuple with one per row (None: none for that row).
    Each distinct object is loaded once."""
    items = list(value) if isinstance(value, (list, tuple)) else [value] * rows
    if len(items) != rows:
        raise VivaceError(f"got {len(items)} {what} for {rows} prompts")
    loaded: dict[int, Any] = {}
    for item in items:
        if item is not None and id(item) not in loaded:
            loaded[id(item)] = load(item)
    return [None if item is None else loaded[id(item)] for item in items]


def check_guidance_scale(value: Any, default: float) -> float:
    """A call's guidance_scale (None: the pack's default)."""
    scale = default if value is None else value
    if not is_real(scale) or not is_finite(scale) or scale < 1:
        raise VivaceError(f"guidance_scale must be a finite number >= 1 (1 turns guidance off), got {value!r}")
    return float(scale)


def negative_prompts(negative: Any, rows: int, scales: Sequence[float]) -> list[str | None]:
    """Each row's negative prompt (one for every row, or a list with one per row; None: the null condition). A row
    without guidance has no null row for it to condition."""
    negatives = per_row(negative, rows, "negative prompts", lambda text: check_prompt(text, "negative_prompt"))
    for row, (text, scale) in enumerate(zip(negatives, scales)):
        if text is not None and scale <= 1:
            where = "" if rows == 1 else f" (row {row})"
            raise VivaceError(f"negative_prompt{where} conditions guidance's null row: it needs guidance_scale > 1 and a condition to guide (a prompt, or a melody)")
    return negatives
