"""Several decode steps of a fixed batch on the device, with no host work between them, optionally as one CUDA graph.

vivace._C.DecodeBatch.plan_steps(n) says ahead of time what the n steps need: each step's vocabulary windows and
draw counters, and the forced ids of its next input rows. On the device each step is forward -> guidance mix ->
Triton sampler (vivace.kernels.triton_sampling.sample_on_device) -> next rows where(forced >= 0, forced,
offset + drawn) -> positions, context lengths and slots + 1. The host syncs once per run: it reads the drawn
tokens back and the decode batch appends them (its state stays the reference). The runner reserves the blocks of
all n steps first, so block tables do not change inside a run.

With capture=True (CUDA only) the n unrolled steps are captured once per n as a CUDA graph after a first eager run
and replayed afterwards: one launch per n steps. Every kernel's grid depends only on tensor shapes.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from vivace import _C
from vivace.sampling import GuidanceRows
from vivace.transformer import AttentionBatch, CrossBatch, StageTransformer


class DeviceDecodeLoop:
    """Static device buffers for one decode batch and up to max_steps steps per run."""

    def __init__(
        self,
        model: StageTransformer,
        kv_caches: Sequence[tuple[torch.Tensor, torch.Tensor]],
        batch: _C.DecodeBatch,
        cross: CrossBatch | None,
        block_size: int,
        device: torch.device,
        max_steps: int,
        capture: bool = False,
    ) -> None:
        from vivace.kernels.triton_sampling import bits_as_int64, sample_on_device  # triton is optional

        self.sample = sample_on_device

        if capture and device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.model, self.kv_caches, self.batch = model, kv_caches, batch
        self.block_size, self.device, self.max_steps, self.capture = block_size, device, max_steps, capture

        groups, heads = batch.num_groups, batch.num_heads
        lead, null, _ = guidance = batch.guidance()
        self.guidance = GuidanceRows.of(guidance, device)
        member_group = np.empty(batch.num_members, dtype=np.int64)
        member_group[lead] = np.arange(groups)  # a guided pair's null row takes its group's row too
        guided = np.flatnonzero(null >= 0)
        member_group[null[guided]] = guided

        def on_device(array: np.ndarray, dtype: torch.dtype | None = None) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(array)).to(device, dtype)

        self.member_group = on_device(member_group)
        rows = batch.sampling_rows()  # the sampling settings do not change between steps
        self.temperature = on_device(rows["temperature"], torch.float64)
        self.top_k = on_device(rows["top_k"], torch.int64)
        self.top_p = on_device(rows["top_p"], torch.float64)
        self.seed = bits_as_int64(rows["seed"], len(rows["seed"]), device)
        self.stream = bits_as_int64(rows["stream"], len(rows["stream"]), device)
        members = batch.num_members  # the step inputs, filled by every run (_load)
        self.input_ids = torch.empty(members, batch.num_heads, dtype=torch.int64, device=device)
        self.positions = torch.empty(members, dtype=torch.int64, device=device)
        self.slot_mapping = torch.empty(members, dtype=torch.int64, device=device)
        self.block_tables = torch.empty(members, batch.table_width, dtype=torch.int32, device=device)
        self.context_lens = torch.empty(members, dtype=torch.int32, device=device)
        self.attention = AttentionBatch(
            slot_mapping=self.slot_mapping, block_tables=self.block_tables, context_lens=self.context_lens,
            query_start_loc=torch.arange(batch.num_members + 1, dtype=torch.int32, device=device),
            is_decode=True, cross=cross,
        )
        self.vocab_lo = torch.zeros(max_steps, groups * heads, dtype=torch.int64, device=device)
        self.vocab_hi = torch.zeros_like(self.vocab_lo)
        self.step = torch.zeros_like(self.vocab_lo)
        self.forced = torch.zeros(max_steps, groups, heads, dtype=torch.int64, device=device)
        self.offset = torch.zeros(groups, heads, dtype=torch.int64, device=device)
        self.drawn = torch.zeros(max_steps, groups, heads, dtype=torch.int64, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.runs: dict[int, int] = {}

    def _load(self, steps: int) -> None:
        """Copies the batch's current inputs and the plan of the next `steps` steps into the static buffers."""
        input_ids, positions, slot_mapping, block_tables, context_lens = self.batch.prepare()
        for static, host in ((self.input_ids, input_ids), (self.positions, positions), (self.slot_mapping, slot_mapping),
                             (self.block_tables, block_tables), (self.context_lens, context_lens)):
            static.copy_(torch.from_numpy(host), non_blocking=False)
        plan = self.batch.plan_steps(steps)
        self.vocab_lo[:steps].copy_(torch.from_numpy(plan["vocab_lo"]))
        self.vocab_hi[:steps].copy_(torch.from_numpy(plan["vocab_hi"]))
        self.step[:steps].copy_(torch.from_numpy(np.ascontiguousarray(plan["step"]).view(np.int64)))
        self.forced[:steps].copy_(torch.from_numpy(plan["forced"]))
        self.offset.copy_(torch.from_numpy(plan["offset"]))

    def _steps(self, steps: int) -> None:
        groups, heads = self.batch.num_groups, self.batch.num_heads
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
            self.positions.add_(1)
            self.context_lens.add_(1)
            block = self.block_tables.gather(1, (self.positions // self.block_size).unsqueeze(1)).squeeze(1)
            self.slot_mapping.copy_(block.long() * self.block_size + self.positions % self.block_size)

    @torch.inference_mode()
    def run(self, steps: int) -> np.ndarray:
        """Runs `steps` steps; returns the drawn tokens [steps, groups, heads]. The caller appends them."""
        if not 0 < steps <= min(self.max_steps, self.batch.steps_left):
            raise ValueError(f"steps must be in [1, {min(self.max_steps, self.batch.steps_left)}], got {steps}")
        self._load(steps)
        graph = self.graphs.get(steps)
        if graph is not None:
            graph.replay()
        elif self.capture and self.runs.get(steps, 0) >= 1:  # the eager run before warmed up every kernel
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._steps(steps)
            self.graphs[steps] = graph
            graph.replay()
        else:
            self._steps(steps)
        self.runs[steps] = self.runs.get(steps, 0) + 1
        return self.drawn[:steps].cpu().numpy()
