"""One stage of the engine core: its scheduler, block manager and model runner on one KV pool.

A step: the scheduler reserves every running sequence's next cache slot (preempting when the pool is dry) and admits
waiting sequences whose prompts fit; the model runner prefills the admitted ones in one forward and decodes the
others in a second (several steps per host sync on a device, when DecodeOptions ask for it); the finished
sequences hand their blocks back.
"""
from __future__ import annotations

import time

import torch

from vivace.core.block_manager import BlockAllocator, BlockManager
from vivace.core.device_decode import DeviceLoops
from vivace.core.kv_cache import KVCachePool
from vivace.core.model_runner import DecodeOptions, DecodePlan, ModelRunner, StepStats
from vivace.core.scheduler import Scheduler
from vivace.core.sequence import Sequence
from vivace.errors import VivaceError
from vivace.model.transformer import StageTransformer


class StageRunner:
    def __init__(
        self,
        name: str,
        model: StageTransformer,
        pool: KVCachePool,
        device: torch.device,
        options: DecodeOptions = DecodeOptions(),
        device_loops: DeviceLoops | None = None,
    ) -> None:
        """device_loops: the device decode loops already built on this pool (kept across generations); new ones
        otherwise."""
        self.name = name
        self.options = options
        self.pool = pool
        self.stats = StepStats()
        self.blocks = BlockManager(pool.num_blocks, pool.block_size)
        self.scheduler = Scheduler(name, self.blocks)
        loops = device_loops or DeviceLoops(model, pool.layers(), pool.block_size, device, options.cuda_graphs)
        self.runner = ModelRunner(model, pool.layers(), pool.block_size, device, loops, self.stats)

    @property
    def model(self) -> StageTransformer:
        return self.runner.model

    @property
    def device_loops(self) -> DeviceLoops:
        return self.runner.device_loops

    @property
    def allocator(self) -> BlockAllocator:
        return self.blocks.allocator

    @property
    def waiting(self) -> list[Sequence]:
        return self.scheduler.waiting

    @property
    def running(self) -> list[Sequence]:
        return self.scheduler.running

    @property
    def kv_bytes_read(self) -> int:
        """KV cache bytes the decode steps read so far: every key a row attended to, every layer."""
        return self.stats.context_tokens * self.pool.bytes_per_token

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def add(self, seq: Sequence) -> None:
        self.scheduler.add(seq)

    def cancel(self, seq: Sequence) -> None:
        self.scheduler.cancel(seq)

    def cancel_all(self) -> None:
        for seq in self.running + self.waiting:
            self.cancel(seq)

    @torch.inference_mode()
    def step(self) -> list[Sequence]:
        """Runs one step; returns the sequences that finished in it."""
        scheduler, runner = self.scheduler, self.runner
        preempted = scheduler.preemptions
        decode = scheduler.reserve_decode_slots(lambda: runner.plan.batch.missing_blocks())
        plan = runner.decode_plan(decode) if decode else None  # before admission changes the running set
        prefill = scheduler.admit()
        self.stats.preemptions += scheduler.preemptions - preempted
        if not decode and not prefill and scheduler.waiting:
            raise VivaceError(f"stage {self.name!r}: the KV pool cannot hold the next sequence; raise kv_cache_gb")
        finished: list[Sequence] = []
        started = time.perf_counter()
        if prefill:
            finished += runner.prefill(prefill)
        prefilled = time.perf_counter()
        if plan is not None:
            steps = self._steps_per_sync(plan)
            finished += runner.decode(plan) if steps == 1 else runner.decode_on_device(plan, steps)
        self.stats.prefill_s += prefilled - started
        self.stats.decode_s += time.perf_counter() - prefilled
        scheduler.finish(finished)
        if scheduler.batch is None:
            runner.plan = None  # holds no finished or preempted sequence
        return finished

    def _steps_per_sync(self, plan: DecodePlan) -> int:
        """How many steps the plan runs before the next host sync: up to options.steps_per_sync, as long as no group
        finishes earlier, halved until the blocks of all of them can be reserved now (block tables are fixed inside
        a run)."""
        blocks = self.blocks
        steps = min(self.options.steps_per_sync, plan.batch.steps_left)
        while steps > 1 and sum(blocks.missing(seq, steps - 1) for seq in plan.seqs) > blocks.num_free:
            steps //= 2
        if steps <= 1:
            return 1
        for seq in plan.seqs:
            blocks.extend(seq, steps - 1)
        return steps
