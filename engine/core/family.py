"""What the engine core asks of a model family (the registry of families by pack family: vivace.packs.registry).

A family (MusicLM, MusicGen) turns a call's arguments into validated request specs, names its stages, and starts one
`RequestPipeline` per admitted request: a per-request state machine that hands the core new sequences when their
inputs exist and turns finished sequences into tokens, events and audio. The core never looks inside a family.
"""
from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from vivace.core.sequence import Sequence
from vivace.events import Event
from vivace.model.transformer import StageTransformer


@dataclass(frozen=True)
class StageSpec:
    """A stage as the core sizes it: its model, the most positions one of its sequences holds, and the rows a
    sequence runs as (2 for a guided pair)."""

    model: StageTransformer
    longest_sequence: int
    rows_per_sequence: int = 1


@dataclass(frozen=True)
class RequestContext:
    """What the core gives a request's pipeline: its id (its arrival order, so its priority against others) and
    the stage-wide sequence ids."""

    request_id: int
    seq_ids: Iterator[int]

    def next_seq_id(self) -> int:
        return next(self.seq_ids)


class RequestPipeline(Protocol):
    """One request's state machine. Each core step: schedule() -> the stages step -> collect()."""

    def schedule(self) -> tuple[list[tuple[str, Sequence]], list[Event]]:
        """The (stage, sequence) pairs whose inputs now exist, and the events that say so."""
        ...

    def collect(self, finished: Mapping[str, list[Sequence]], stepped: list[str]) -> list[Event]:
        """After a step: copies tokens from this request's sequences (finished: those that ended in the step;
        stepped: the stages that ran one of this request's sequences) and returns its events and audio."""
        ...

    @property
    def done(self) -> bool:
        ...


class Family(Protocol):
    """The per-engine object of a family, made from its loaded pack and codec backend."""

    # the codec backend "auto" picks on the CPU when the pack has codec.onnx ("torch" or "onnxruntime")
    cpu_codec_backend: str

    @staticmethod
    def load_pack(path: Any, dtype: Any, device: Any) -> Any:
        """The family's pack from disk, validated."""
        ...

    @staticmethod
    def load_codec(path: Any) -> Any:
        """Only the codec module of the family's pack (CPU, float32), without the stages."""
        ...

    def stages(self) -> dict[str, StageSpec]:
        ...

    def requests(self, prompt: Any, duration_s: Any, seed: Any, options: dict[str, Any]) -> list[Any]:
        """Validated request specs, one per row (raises VivaceError with one line)."""
        ...

    def stream_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """The options of a streamed call (defaults filled in)."""
        ...

    def whole_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """The options of a call that returns whole clips."""
        ...

    def start(self, spec: Any, context: RequestContext) -> RequestPipeline:
        ...

    def info(self) -> dict[str, Any]:
        ...


def sequence_ids() -> Iterator[int]:
    return itertools.count(1)
