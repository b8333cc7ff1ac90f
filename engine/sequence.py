"""A sequence: one autoregressive stream inside a stage (a window or a chunk of one request).

Each position holds one input row of num_codebooks ids (one id for single-stream stages). Each step the stage
draws one token per output head; the sequence's schedule says which vocabulary window each head may draw from,
what the drawn tokens become as the next input row, and what is recorded as output.
"""
from __future__ import annotations

import enum
from collections.abc import Hashable, Sequence as Seq
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from vivace.config import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # not in the cache: new, or preempted and to be recomputed
    RUNNING = "running"
    FINISHED = "finished"


class Schedule(Protocol):
    num_heads: int

    def windows(self, new_index: int) -> list[tuple[int, int]]:
        """Allowed output window [lo, hi) of each head for the new_index-th generated step."""
        ...

    def input_row(self, new_index: int, drawn: tuple[int, ...]) -> tuple[int, ...]:
        """The input row that the drawn tokens (one per head) become."""
        ...

    def output(self, new_index: int, drawn: tuple[int, ...]) -> Any:
        """What the sequence records in output_ids for this step."""
        ...


@dataclass(frozen=True)
class TimeMajorSchedule:
    """Which output window each generated token draws from: level t % num_levels of a time-major RVQ stream.

    Output id o (level * codebook_size + code) becomes input id input_offset + o.
    """

    num_levels: int
    codebook_size: int
    input_offset: int
    first_level: int = 0  # level of the first generated token
    num_heads: int = 1

    def window(self, new_index: int) -> tuple[int, int]:
        level = (self.first_level + new_index) % self.num_levels
        return level * self.codebook_size, (level + 1) * self.codebook_size

    def windows(self, new_index: int) -> list[tuple[int, int]]:
        return [self.window(new_index)]

    def input_row(self, new_index: int, drawn: tuple[int, ...]) -> tuple[int, ...]:
        return (self.input_offset + drawn[0],)

    def output(self, new_index: int, drawn: tuple[int, ...]) -> int:
        return drawn[0]


@dataclass(frozen=True)
class DelaySchedule:
    """All codebooks per step, each from its own head, under a fixed grid of forced ids (MusicGen's delay pattern).

    grid [num_codebooks, length] holds the id every position must take (pad/BOS, or a prompt code in the
    staircase after the prompt) or -1 where the drawn token is kept. The new_index-th step fills position
    first + new_index; its row, after forcing, is both the next input row and the recorded output.
    """

    grid: np.ndarray
    first: int
    vocab_size: int  # ids a head may draw: [0, vocab_size)

    @property
    def num_heads(self) -> int:
        return self.grid.shape[0]

    def windows(self, new_index: int) -> list[tuple[int, int]]:
        return [(0, self.vocab_size)] * self.num_heads

    def input_row(self, new_index: int, drawn: tuple[int, ...]) -> tuple[int, ...]:
        forced = self.grid[:, self.first + new_index]
        return tuple(int(f) if f >= 0 else int(d) for f, d in zip(forced, drawn))

    def output(self, new_index: int, drawn: tuple[int, ...]) -> tuple[int, ...]:
        return self.input_row(new_index, drawn)


@dataclass(frozen=True)
class CrossCondition:
    """A sequence's cross-attention keys and values per layer [enc_len, H, D], computed once per request."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    mask: torch.Tensor  # [enc_len] bool, True = attend


class Sequence:
    def __init__(
        self,
        seq_id: int,
        prompt: Seq[int] | Seq[tuple[int, ...]],
        max_new_tokens: int,
        schedule: Schedule,
        sampling: SamplingParams,
        seed: int,
        stream: int,
        priority: tuple[int, ...],
        cross: CrossCondition | None = None,
        cache_salt: Hashable = None,
        prefix: torch.Tensor | None = None,
    ) -> None:
        """cache_salt names what the keys and values depend on besides the tokens (the cross-attention condition, a
        prefix's embeddings): cached prefix blocks are only shared between sequences with equal salts.

        prefix [P, d_model]: input embeddings of P leading positions, read by the model instead of token embeddings
        (MusicGen-Melody's condition). They occupy cache slots like prompt tokens; their rows hold zeros."""
        self.seq_id = seq_id
        rows = [row if isinstance(row, tuple) else (row,) for row in prompt]
        self.prefix = prefix
        self.prefix_len = 0 if prefix is None else prefix.shape[0]
        self.rows: list[tuple[int, ...]] = [(0,) * len(rows[0])] * self.prefix_len + rows
        self.prompt_len = len(self.rows)
        self.max_len = self.prompt_len + max_new_tokens
        self.schedule = schedule
        self.sampling = sampling
        self.seed = seed
        self.stream = stream
        self.priority = priority
        self.cross = cross
        self.cache_salt = cache_salt
        self.null: Sequence | None = None  # classifier-free guidance: the null-condition twin, stepped in lockstep
        self.guidance_scale = 1.0
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.num_cached = 0  # leading tokens whose keys/values are in the cache
        self.output_ids: list[Any] = []  # what the schedule records per step (an output id for single-head stages)

    def guide(self, null: Sequence, guidance_scale: float) -> None:
        """Pairs this (conditional) sequence with its null-condition twin: each step both rows run, their logits
        are mixed as null + (cond - null) * guidance_scale, and the token drawn once is fed to both."""
        self.null = null
        self.guidance_scale = guidance_scale

    @property
    def members(self) -> list[Sequence]:
        """The rows this sequence runs as: itself and, when guided, its null twin."""
        return [self] if self.null is None else [self, self.null]

    @property
    def length(self) -> int:
        return len(self.rows)

    @property
    def num_new(self) -> int:
        return len(self.output_ids)

    @property
    def is_finished(self) -> bool:
        return self.length >= self.max_len

    def append(self, drawn: int | tuple[int, ...]) -> None:
        drawn = drawn if isinstance(drawn, tuple) else (drawn,)
        index = self.num_new
        self.output_ids.append(self.schedule.output(index, drawn))
        self.rows.append(self.schedule.input_row(index, drawn))

    def next_windows(self) -> list[tuple[int, int]]:
        return self.schedule.windows(self.num_new)

    def next_window(self) -> tuple[int, int]:
        return self.next_windows()[0]
