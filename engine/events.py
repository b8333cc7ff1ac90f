"""What a running generation reports: window starts and ends, per-stage progress, and audio chunks."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class WindowStarted:
    stage: str
    row: int
    index: int
    prefix_start: int  # semantic tokens (semantic stage) or acoustic frames (coarse, fine, MusicGen's decoder)
    new_start: int
    new_end: int
    condition: tuple[int, ...]  # the conditioning (MT) codes the window reads; empty for the fine stage; MusicGen: text token ids


@dataclass(frozen=True)
class WindowFinished:
    stage: str
    row: int
    index: int
    tokens: tuple[int, ...]  # the window's generated output ids; MusicGen: the new codes, frame by frame (all codebooks)


@dataclass(frozen=True)
class StageProgress:
    stage: str
    done: int  # tokens generated so far, all rows
    total: int


@dataclass(frozen=True)
class AudioChunk:
    row: int
    index: int
    start_sample: int
    pcm: np.ndarray  # float32 [samples]
    codes: np.ndarray  # int64 [levels, frames]: the codec codes these samples were decoded from (Engine.decode's input)


Event = WindowStarted | WindowFinished | StageProgress | AudioChunk
