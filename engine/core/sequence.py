"""A sequence: one autoregressive stream inside a stage (a window or a chunk of one request).

Each position holds one input row of num_codebooks ids (one id for single-stream stages). Each step the stage
draws one token per output head; the sequence's schedule says which vocabulary window each head may draw from,
what the drawn tokens become as the next input row, and what is recorded as output. The schedules, the token rows
and the cache bookkeeping live in vivace._C (TokenSchedule, SequenceState); this module describes them.
"""
from __future__ import annotations

import enum
from collections.abc import Hashable
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vivace import _C
from vivace.core.sampling import SamplingParams


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
    num_heads: int = 1

    def native(self) -> _C.TokenSchedule:
        return _C.TokenSchedule.time_major(self.num_levels, self.codebook_size, self.input_offset, self.first_level)


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

    def native(self) -> _C.TokenSchedule:
        return _C.TokenSchedule.delay(np.ascontiguousarray(self.grid, dtype=np.int64), self.first, self.vocab_size)


Schedule = TimeMajorSchedule | DelaySchedule


@dataclass(frozen=True)
class CrossCondition:
    """A sequence's cross-attention keys and values per layer [enc_len, H, D], computed once per request."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    mask: torch.Tensor  # [enc_len] bool, True = attend


class Sequence:
    """A stage's view of one stream: scheduling and conditioning in Python, tokens and cache bookkeeping in
    vivace._C.SequenceState (`state`), which the decode batch advances without Python work per step."""

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
        rows = np.asarray(prompt, dtype=np.int64).reshape(len(prompt), -1)
        self.prefix = prefix
        self.prefix_len = 0 if prefix is None else prefix.shape[0]
        rows = np.concatenate([np.zeros((self.prefix_len, rows.shape[1]), dtype=np.int64), rows])
        self.state = _C.SequenceState(schedule.native(), rows, len(rows) + max_new_tokens)
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
        return self.state.length

    @property
    def max_len(self) -> int:
        return self.state.max_len

    @property
    def num_new(self) -> int:
        return self.state.num_new

    @property
    def num_cached(self) -> int:
        """Leading positions whose keys/values are in the cache."""
        return self.state.num_cached

    @num_cached.setter
    def num_cached(self, value: int) -> None:
        self.state.num_cached = value

    @property
    def block_table(self) -> list[int]:
        """The cache blocks holding the sequence's positions (a copy; assign to change it)."""
        return self.state.block_table

    @block_table.setter
    def block_table(self, blocks: list[int]) -> None:
        self.state.block_table = blocks

    def token_array(self, begin: int = 0) -> np.ndarray:
        """Input rows [begin, length) as int64 [n, num_codebooks]."""
        return self.state.rows(begin)

    @property
    def rows(self) -> list[tuple[int, ...]]:
        return [tuple(row) for row in self.state.rows().tolist()]

    def output_array(self) -> np.ndarray:
        """What the generated steps recorded: output ids [num_new] (one-head schedules) or rows [num_new, K]."""
        return self.state.outputs()

    @property
    def output_ids(self) -> list[Any]:
        outputs = self.output_array().tolist()
        return outputs if outputs and isinstance(outputs[0], int) else [tuple(row) for row in outputs]
