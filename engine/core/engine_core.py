"""EngineCore: one long-lived core shared by every request of an engine.

It owns one StageRunner (scheduler, block manager and model runner of a stage) per stage, each on one KV pool for the
engine's life, and one RequestPipeline per running request. A step admits waiting requests up to the running cap,
lets every running request hand over the sequences whose inputs now exist, runs one batched step of every stage with
work, and routes the finished sequences back to their requests: requests join and leave the running batch of every
stage at any step (continuous batching across requests and stages).

A sequence's priority starts with its request's id (arrival order), so when a pool is full the newest request's
sequences are preempted first and the oldest request always makes progress. Tokens never depend on the batch: each
is drawn from a counter-based stream of (seed, window, step), and a preempted sequence is recomputed exactly.
"""
from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from vivace.core.device_decode import DeviceLoops
from vivace.core.family import Family, RequestContext, RequestPipeline, StageSpec, sequence_ids
from vivace.core.kv_cache import KVCachePool
from vivace.core.model_runner import DecodeOptions
from vivace.core.sequence import Sequence
from vivace.core.stage_runner import StageRunner
from vivace.errors import EngineBusy, VivaceError
from vivace.events import Event

POOL_WINDOWS = 64  # a stage's pool holds at most this many of its longest sequences (the budget may allow fewer)


@dataclass(frozen=True)
class CoreLimits:
    """Admission: at most max_running requests run at once and max_waiting wait; past that add_request raises
    EngineBusy."""

    max_running: int = 16
    max_waiting: int = 64

    def validate(self) -> None:
        for name in ("max_running", "max_waiting"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "max_running" else 0):
                raise VivaceError(f"{name} must be an integer >= {1 if name == 'max_running' else 0}, got {value!r}")


@dataclass
class RequestOutput:
    """What one step produced for one request: its events in order, and whether it ended (error: why it failed)."""

    request_id: int
    events: list[Event] = field(default_factory=list)
    finished: bool = False
    error: str | None = None


@dataclass
class _Running:
    pipeline: RequestPipeline
    sequences: dict[Sequence, str] = field(default_factory=dict)  # live sequence -> its stage


def pool_blocks(stage: str, spec: StageSpec, block_size: int, dtype: torch.dtype, budget_bytes: float) -> int:
    """The blocks of a stage's pool: what its share of kv_cache_gb holds, at most POOL_WINDOWS longest sequences;
    a budget that cannot hold one longest sequence is refused."""
    cfg = spec.model.config
    per_block = KVCachePool.bytes_per_block(cfg.num_layers, block_size, cfg.num_heads, cfg.head_dim, dtype)
    one = spec.rows_per_sequence * -(-spec.longest_sequence // block_size)
    budget = int(budget_bytes // per_block)
    if budget < one:
        raise VivaceError(
            f"kv_cache_gb leaves stage {stage!r} room for {budget} KV blocks; its longest sequence needs {one}"
        )
    return min(budget, POOL_WINDOWS * one)


def stage_runners(
    stages: dict[str, StageSpec], num_blocks: dict[str, int], block_size: int, dtype: torch.dtype,
    device: torch.device, decode: DecodeOptions,
) -> dict[str, StageRunner]:
    runners = {}
    for name, spec in stages.items():
        cfg = spec.model.config
        pool = KVCachePool(cfg.num_layers, num_blocks[name], block_size, cfg.num_heads, cfg.head_dim, dtype, device)
        loops = DeviceLoops(spec.model, pool.layers(), block_size, device, decode.cuda_graphs)
        runners[name] = StageRunner(name, spec.model, pool, device, decode, loops)
    return runners


class EngineCore:
    def __init__(self, family: Family, runners: dict[str, StageRunner], limits: CoreLimits = CoreLimits()) -> None:
        limits.validate()
        self.family = family
        self.runners = runners
        self.limits = limits
        self._request_ids = itertools.count(1)
        self._seq_ids = sequence_ids()
        self._waiting: deque[tuple[int, Any]] = deque()
        self._running: dict[int, _Running] = {}
        self._owners: dict[Sequence, int] = {}  # every live sequence -> its request
        self.steps = 0
        # host seconds in the requests' pipelines (schedule and collect: token bookkeeping, events, codec decode):
        # per-request work that running requests side by side does not share
        self.request_s = 0.0

    # -- admission ---------------------------------------------------------------------------------------------
    def check_capacity(self, count: int) -> None:
        """Raises EngineBusy unless `count` more requests fit in the running set and the waiting queue."""
        limits = self.limits
        room = limits.max_running + limits.max_waiting - len(self._running) - len(self._waiting)
        if count > room:
            raise EngineBusy(
                f"engine busy: {len(self._running)} requests running and {len(self._waiting)} waiting "
                f"(limits {limits.max_running} and {limits.max_waiting}); try again later"
            )

    def add_request(self, spec: Any) -> int:
        """Queues a validated request spec (from family.requests); it joins the running batch at a coming step."""
        self.check_capacity(1)
        request_id = next(self._request_ids)
        self._waiting.append((request_id, spec))
        return request_id

    def abort(self, request_id: int) -> None:
        """Drops a request wherever it is and frees its blocks at once; unknown or ended ids are ignored."""
        for item in self._waiting:
            if item[0] == request_id:
                self._waiting.remove(item)
                return
        running = self._running.pop(request_id, None)
        if running is not None:
            for seq, stage in running.sequences.items():
                self.runners[stage].cancel(seq)
                del self._owners[seq]

    def has_unfinished(self) -> bool:
        return bool(self._waiting or self._running)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def _admit(self, outputs: dict[int, RequestOutput]) -> None:
        while self._waiting and len(self._running) < self.limits.max_running:
            request_id, spec = self._waiting.popleft()
            try:
                pipeline = self.family.start(spec, RequestContext(request_id, self._seq_ids))
            except VivaceError as error:
                outputs[request_id] = RequestOutput(request_id, finished=True, error=str(error))
                continue
            self._running[request_id] = _Running(pipeline)

    # -- the step ----------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Admit -> schedule every request's ready sequences -> one step of every stage with work -> collect."""
        outputs: dict[int, RequestOutput] = {}
        self._admit(outputs)
        started = time.perf_counter()
        self._schedule(outputs)
        scheduled = time.perf_counter()
        working = {request_id: set(run.sequences.values()) for request_id, run in self._running.items()}
        stepped = [stage for stage, runner in self.runners.items() if runner.has_work]
        finished = {stage: self.runners[stage].step() for stage in stepped}
        self.steps += 1
        collecting = time.perf_counter()
        mine: dict[int, dict[str, list[Sequence]]] = {}
        for stage, seqs in finished.items():
            for seq in seqs:
                request_id = self._owners.pop(seq)
                mine.setdefault(request_id, {}).setdefault(stage, []).append(seq)
                self._running[request_id].sequences.pop(seq)
        for request_id, run in list(self._running.items()):
            ended = mine.get(request_id, {})
            stages = [stage for stage in stepped if stage in working[request_id]]
            output = outputs.setdefault(request_id, RequestOutput(request_id))
            try:
                output.events += run.pipeline.collect(ended, stages)
            except VivaceError as error:
                self._fail(request_id, str(error), output)
                continue
            if run.pipeline.done:
                output.finished = True
                del self._running[request_id]
        self.request_s += scheduled - started + time.perf_counter() - collecting
        if not self.has_unfinished():
            for runner in self.runners.values():  # idle: the device loops let go of the last batch's encoder states
                runner.device_loops.unbind()
        return [output for output in outputs.values() if output.events or output.finished]

    def _schedule(self, outputs: dict[int, RequestOutput]) -> None:
        for request_id, run in list(self._running.items()):
            output = outputs.setdefault(request_id, RequestOutput(request_id))
            try:
                ready, events = run.pipeline.schedule()
                for stage, seq in ready:
                    self.runners[stage].add(seq)
                    run.sequences[seq] = stage
                    self._owners[seq] = request_id
            except VivaceError as error:
                self._fail(request_id, str(error), output)
                continue
            output.events += events
            if not run.sequences and not run.pipeline.done:  # a family bug, not bad input: say so for this request
                self._fail(request_id, "internal error: the request stalled (no sequence to run, audio missing)", output)

    def _fail(self, request_id: int, error: str, output: RequestOutput) -> None:
        self.abort(request_id)
        output.finished, output.error = True, error

    def fail_all(self, error: str) -> list[RequestOutput]:
        """Ends every request with `error` (after a step raised: the engine's state is not to be trusted for them)."""
        ids = [request_id for request_id, _ in self._waiting] + list(self._running)
        outputs = []
        for request_id in ids:
            output = RequestOutput(request_id)
            self._fail(request_id, error, output)
            outputs.append(output)
        return outputs
