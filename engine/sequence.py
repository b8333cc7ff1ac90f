"""A sequence: one autoregressive stream inside a stage (a window or a chunk of one request)."""
from __future__ import annotations

import enum
from dataclasses import dataclass

from vivace.config import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # not in the cache: new, or preempted and to be recomputed
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True)
class TimeMajorSchedule:
    """Which output window each generated token draws from: level t % num_levels of a time-major RVQ stream.

    Output id o (level * codebook_size + code) becomes input id input_offset + o.
    """

    num_levels: int
    codebook_size: int
    input_offset: int
    first_level: int = 0  # level of the first generated token

    def window(self, new_index: int) -> tuple[int, int]:
        level = (self.first_level + new_index) % self.num_levels
        return level * self.codebook_size, (level + 1) * self.codebook_size


class Sequence:
    def __init__(
        self,
        seq_id: int,
        prompt: list[int],
        max_new_tokens: int,
        schedule: TimeMajorSchedule,
        sampling: SamplingParams,
        seed: int,
        stream: int,
        priority: tuple[int, ...],
    ) -> None:
        self.seq_id = seq_id
        self.rows: list[tuple[int, ...]] = [(token,) for token in prompt]
        self.prompt_len = len(prompt)
        self.max_len = len(prompt) + max_new_tokens
        self.schedule = schedule
        self.sampling = sampling
        self.seed = seed
        self.stream = stream
        self.priority = priority
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.num_cached = 0  # leading tokens whose keys/values are in the cache
        self.output_ids: list[int] = []  # generated tokens as output ids

    @property
    def length(self) -> int:
        return len(self.rows)

    @property
    def num_new(self) -> int:
        return len(self.output_ids)

    @property
    def is_finished(self) -> bool:
        return self.length >= self.max_len

    def append(self, output_id: int) -> None:
        self.output_ids.append(output_id)
        self.rows.append((self.schedule.input_offset + output_id,))

    def next_window(self) -> tuple[int, int]:
        return self.schedule.window(self.num_new)
