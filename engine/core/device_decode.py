"""Several decode steps of a batch on the device, with no host work between them, optionally as one CUDA graph.

vivace._C.DecodeBatch.plan_steps(n) says ahead of time what the n steps need: each step's vocabulary windows and
draw counters, and the forced ids of its next input rows. On the device each step is forward -> guidance mix ->
Triton sampler (vivace.kernels.triton_sampling.sample_on_device) -> next rows where(forced >= 0, forced,
offset + drawn) -> positions, context lengths and slots + 1. The host syncs once per run: it reads the drawn
tokens back and the decode batch appends them (its state stays the reference). The runner reserves the blocks of
all n steps first, so block tables do not change inside a run. A run is cut into pieces of at most GRAPH_STEPS
steps: before each piece the device copies that piece's rows of the plan into the step buffers, so a run of any
length (a whole window) replays the same few graphs with no host sync between them.

A loop's buffers have the shape of a batch-size bucket (groups and rows rounded up to powers of two; the block-table
width as the batch's, which a stage's windows share), so one loop, and the CUDA graphs it captured, serves every
batch of its bucket: bind() loads a new batch's sampling settings and guidance into the same buffers. Rows past the
batch read a window of one token greedily, keep an empty context (no cache reads), store nothing (slot -1) and are
never read back. With capture=True (CUDA only) a piece of k unrolled steps is captured once per k, after a first
eager run of that k, and replayed afterwards: one launch per k steps. A batch with cross-attention brings its own
encoder keys and values, so binding one drops the captured graphs.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from vivace import _C
from vivace.kernels.sampling import GuidanceRows
from vivace.model.transformer import AttentionBatch, CrossBatch, StageTransformer

GRAPH_STEPS = 16  # unrolled decode steps per captured graph; longer runs replay it several times


def _bucket(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@dataclass(frozen=True)
class Bucket:
    """The padded shape a loop's buffers take."""

    groups: int
    members: int
    table_width: int
    heads: int

    @classmethod
    def of(cls, batch: _C.DecodeBatch) -> Bucket:
        # the width stays exact: a stage's windows share it, and padding it would only add attention partitions
        return cls(_bucket(batch.num_groups), _bucket(batch.num_members), batch.table_width, batch.num_heads)


class DeviceDecodeLoop:
    """Static device buffers for one bucket of decode batches; pieces of up to GRAPH_STEPS steps."""

    def __init__(
        self,
        model: StageTransformer,
        kv_caches: Sequence[tuple[torch.Tensor, torch.Tensor]],
        bucket: Bucket,
        block_size: int,
        device: torch.device,
        capture: bool = False,
        graph_pool: tuple | None = None,
    ) -> None:
        """graph_pool: a torch.cuda.graph_pool_handle() the loop's graphs allocate from (shared by the loops of one
        KV pool: every graph's results are copied into static buffers before another graph runs)."""
        from vivace.kernels.triton_sampling import sample_on_device  # triton is optional

        self.sample = sample_on_device
        if capture and device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.model, self.kv_caches, self.bucket = model, kv_caches, bucket
        self.block_size, self.device, self.capture, self.graph_pool = block_size, device, capture, graph_pool
        groups, members, rows = bucket.groups, bucket.members, bucket.groups * bucket.heads

        def zeros(*shape: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)

        self.guidance = GuidanceRows.of((np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)), device, groups)
        self.member_group = zeros(members)
        self.live = zeros(members, dtype=torch.bool)
        self.temperature = zeros(rows, dtype=torch.float64)
        self.top_k = zeros(rows)
        self.top_p = zeros(rows, dtype=torch.float64)
        self.seed = zeros(rows)
        self.stream = zeros(rows)
        self.input_ids = zeros(members, bucket.heads)
        self.positions = zeros(members)
        self.slot_mapping = zeros(members)
        self.block_tables = zeros(members, bucket.table_width, dtype=torch.int32)
        self.context_lens = zeros(members, dtype=torch.int32)
        self.token_seq = zeros(members)
        self.vocab_lo = zeros(GRAPH_STEPS, rows)  # the current piece's rows of the run's plan
        self.vocab_hi = zeros(GRAPH_STEPS, rows)
        self.step = zeros(GRAPH_STEPS, rows)
        self.forced = zeros(GRAPH_STEPS, groups, bucket.heads)
        self.offset = zeros(groups, bucket.heads)
        self.drawn = zeros(GRAPH_STEPS, groups, bucket.heads)
        self.host = _HostInputs(bucket)
        self.attention = self._attention(None)
        self.batch: _C.DecodeBatch | None = None
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.runs: dict[int, int] = {}

    def _attention(self, cross: CrossBatch | None) -> AttentionBatch:
        if cross is not None:  # rows past the batch read the first sequence's encoder states
            cross = CrossBatch(cross.keys, cross.values, cross.enc_mask, self.token_seq)
        return AttentionBatch(
            slot_mapping=self.slot_mapping, block_tables=self.block_tables, context_lens=self.context_lens,
            query_start_loc=torch.arange(self.bucket.members + 1, dtype=torch.int32, device=self.device),
            is_decode=True, cross=cross,
        )

    @torch.inference_mode()
    def bind(self, batch: _C.DecodeBatch, cross: CrossBatch | None) -> None:
        """Makes batch (which must fit the bucket) the one the next runs decode."""
        if not self.fits(batch):
            raise ValueError(f"a batch of bucket {Bucket.of(batch)} does not fit {self.bucket}")
        self._set_cross(cross)
        groups, members, heads = batch.num_groups, batch.num_members, self.bucket.heads
        guidance = batch.guidance()
        self.guidance.load(guidance)
        lead, null, _ = guidance
        member_group = np.zeros(self.bucket.members, dtype=np.int64)
        member_group[lead] = np.arange(groups)  # a guided pair's null row takes its group's row too
        guided = np.flatnonzero(null >= 0)
        member_group[null[guided]] = guided
        self.member_group.copy_(torch.from_numpy(member_group))
        padding = torch.arange(self.bucket.members) >= members
        self.live.copy_(~padding)
        self.token_seq.copy_(torch.arange(self.bucket.members).masked_fill(padding, 0))
        rows = batch.sampling_rows()  # the sampling settings do not change between steps
        fills = {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "seed": 0, "stream": 0}  # padding groups' settings
        for name, fill in fills.items():
            values = np.full(self.bucket.groups * heads, fill, dtype=np.asarray(rows[name]).dtype)
            values[:groups * heads] = rows[name]
            if values.dtype == np.uint64:
                values = values.view(np.int64)
            getattr(self, name).copy_(torch.from_numpy(values))
        self.batch = batch

    def unbind(self) -> None:
        """Lets go of the bound batch and of its encoder states (and of the graphs that read them)."""
        self.batch = None
        self._set_cross(None)

    def _set_cross(self, cross: CrossBatch | None) -> None:
        if cross is not None or self.attention.cross is not None:
            self.graphs.clear()  # captured graphs read the previous batch's encoder keys and values
            self.runs.clear()
            self.attention = self._attention(cross)

    def fits(self, batch: _C.DecodeBatch) -> bool:
        b = self.bucket
        return (batch.num_groups <= b.groups and batch.num_members <= b.members and batch.table_width <= b.table_width
                and batch.num_heads == b.heads)

    def _load(self, steps: int) -> _Plan:
        """Copies the batch's current inputs to the static buffers; returns the plan of the next `steps` steps."""
        host = self.host
        host.fill(self.batch)
        for static, array in ((self.input_ids, host.input_ids), (self.positions, host.positions),
                              (self.slot_mapping, host.slot_mapping), (self.block_tables, host.block_tables),
                              (self.context_lens, host.context_lens)):
            static.copy_(torch.from_numpy(array))
        plan = _Plan.of(self.batch, steps, self.bucket, self.device)
        self.offset.copy_(plan.offset)
        return plan

    def _steps(self, steps: int) -> None:
        groups, heads = self.bucket.groups, self.bucket.heads
        last_block = self.bucket.table_width - 1
        for i in range(steps):
            hidden = self.model(self.input_ids, self.positions, self.kv_caches, self.attention)
            mixed = self.guidance.mix(self.model.compute_logits(hidden).float())
            tokens = self.sample(
                mixed.flatten(0, 1), self.temperature, self.top_k, self.top_p, self.vocab_lo[i], self.vocab_hi[i],
                self.seed, self.stream, self.step[i],
            ).view(groups, heads)
            self.drawn[i].copy_(tokens)
            rows = torch.where(self.forced[i] >= 0, self.forced[i], self.offset + tokens)
            self.input_ids.copy_(rows.index_select(0, self.member_group))
            self.positions.add_(self.live)
            self.context_lens.add_(self.live)  # padding rows keep an empty context: they read no cache
            column = (self.positions // self.block_size).clamp(max=last_block)  # padding rows run past their table
            block = self.block_tables.gather(1, column.unsqueeze(1)).squeeze(1)
            slots = block.long() * self.block_size + self.positions % self.block_size
            self.slot_mapping.copy_(torch.where(self.live, slots, -1))

    def _piece(self, steps: int) -> None:
        """`steps` steps from the step buffers: a captured graph's replay, or eagerly (capturing on the second time)."""
        graph = self.graphs.get(steps)
        if graph is not None:
            graph.replay()
        elif self.capture and self.runs.get(steps, 0) >= 1:  # the eager piece before warmed up every kernel
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.graph_pool):
                self._steps(steps)
            self.graphs[steps] = graph
            graph.replay()
        elif self.capture:  # the warm-up before a capture runs off the default stream, as capture expects
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self._steps(steps)
            torch.cuda.current_stream(self.device).wait_stream(side)
        else:
            self._steps(steps)
        self.runs[steps] = self.runs.get(steps, 0) + 1

    @torch.inference_mode()
    def run(self, steps: int) -> np.ndarray:
        """Runs `steps` steps of the bound batch; returns the drawn tokens [steps, groups, heads]. The caller
        appends them."""
        batch = self.batch
        if batch is None:
            raise ValueError("no batch is bound")
        if not 0 < steps <= batch.steps_left:
            raise ValueError(f"steps must be in [1, {batch.steps_left}], got {steps}")
        plan = self._load(steps)
        drawn = torch.empty(steps, self.bucket.groups, self.bucket.heads, dtype=torch.int64, device=self.device)
        for first in range(0, steps, GRAPH_STEPS):
            piece = min(GRAPH_STEPS, steps - first)
            for static, planned in ((self.vocab_lo, plan.vocab_lo), (self.vocab_hi, plan.vocab_hi),
                                    (self.step, plan.step), (self.forced, plan.forced)):
                static[:piece].copy_(planned[first:first + piece])
            self._piece(piece)
            drawn[first:first + piece].copy_(self.drawn[:piece])
        return drawn[:, :batch.num_groups].cpu().numpy()


class DeviceLoops:
    """The device decode loops built on one KV pool, one per bucket; kept with the pool across generations, so their
    CUDA graphs (which hold the pool's addresses) are captured once."""

    def __init__(
        self,
        model: StageTransformer,
        kv_caches: Sequence[tuple[torch.Tensor, torch.Tensor]],
        block_size: int,
        device: torch.device,
        capture: bool,
    ) -> None:
        self.model, self.kv_caches, self.block_size, self.device, self.capture = model, kv_caches, block_size, device, capture
        self.graph_pool = torch.cuda.graph_pool_handle() if capture else None
        self.loops: dict[Bucket, DeviceDecodeLoop] = {}

    def bound_to(self, batch: _C.DecodeBatch, cross: CrossBatch | None) -> DeviceDecodeLoop:
        """The loop of batch's bucket, with batch bound to it."""
        bucket = Bucket.of(batch)
        loop = self.loops.get(bucket)
        if loop is None:
            loop = self.loops[bucket] = DeviceDecodeLoop(
                self.model, self.kv_caches, bucket, self.block_size, self.device, self.capture, self.graph_pool,
            )
        if loop.batch is not batch:
            loop.bind(batch, cross)
        return loop

    def unbind(self) -> None:
        for loop in self.loops.values():
            loop.unbind()


@dataclass(frozen=True)
class _Plan:
    """A run's plan on the device, padded to the bucket: rows [steps, groups * heads], forced [steps, groups, heads]."""

    vocab_lo: torch.Tensor
    vocab_hi: torch.Tensor
    step: torch.Tensor
    forced: torch.Tensor
    offset: torch.Tensor  # [groups, heads]

    @classmethod
    def of(cls, batch: _C.DecodeBatch, steps: int, bucket: Bucket, device: torch.device) -> _Plan:
        plan = batch.plan_steps(steps)
        padded_rows, heads = bucket.groups * bucket.heads, bucket.heads

        def padded(values: np.ndarray, shape: tuple[int, ...], fill: int) -> torch.Tensor:
            out = np.full(shape, fill, dtype=np.int64)  # padding groups draw token 0 from a one-token window
            out[tuple(slice(0, n) for n in values.shape)] = values
            return torch.from_numpy(out).to(device)

        return cls(
            vocab_lo=padded(plan["vocab_lo"], (steps, padded_rows), 0),
            vocab_hi=padded(plan["vocab_hi"], (steps, padded_rows), 1),
            step=padded(np.ascontiguousarray(plan["step"]).view(np.int64), (steps, padded_rows), 0),
            forced=padded(plan["forced"], (steps, bucket.groups, heads), 0),
            offset=padded(plan["offset"], (bucket.groups, heads), 0),
        )


class _HostInputs:
    """Host arrays of a bucket's step inputs; rows past the batch keep their padding values."""

    def __init__(self, bucket: Bucket) -> None:
        members, heads = bucket.members, bucket.heads
        self.input_ids = np.zeros((members, heads), dtype=np.int64)
        self.positions = np.zeros(members, dtype=np.int64)
        self.slot_mapping = np.full(members, -1, dtype=np.int64)
        self.block_tables = np.zeros((members, bucket.table_width), dtype=np.int32)
        self.context_lens = np.zeros(members, dtype=np.int32)

    def fill(self, batch: _C.DecodeBatch) -> None:
        input_ids, positions, slot_mapping, block_tables, context_lens = batch.prepare()
        members, width = batch.num_members, batch.table_width
        self.input_ids[:members] = input_ids
        self.positions[:members] = positions
        self.slot_mapping[:members] = slot_mapping
        self.block_tables[:members] = 0
        self.block_tables[:members, :width] = block_tables
        self.context_lens[:members] = context_lens
        for array in (self.input_ids, self.positions, self.context_lens):
            array[members:] = 0
        self.slot_mapping[members:] = -1
        self.block_tables[members:] = 0
