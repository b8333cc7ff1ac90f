"""The model runner of one stage: turns scheduled sequences into forwards over the paged cache and draws tokens.

A prefill computes the uncached part of each admitted row's prompt in one forward and draws its first token. A decode
step reads its inputs from a vivace._C.DecodeBatch, built once per batch composition: prepare() (every row's last
token, position, cache slot and context) -> forward -> sample_and_advance(logits) (guidance mix, draw, append, stop
check); Python touches a running sequence only when the batch changes. With DecodeOptions.steps_per_sync > 1 several
decode steps run on the device between host syncs (vivace.core.device_decode).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence

from vivace import _C
from vivace.core.device_decode import DeviceLoops
from vivace.core.sequence import CrossCondition, Sequence
from vivace.errors import VivaceError
from vivace.kernels.dispatch import sample_and_advance, use_triton
from vivace.model.transformer import AttentionBatch, CrossBatch, PrefixBatch, StageTransformer


@dataclass(frozen=True)
class DecodeOptions:
    """How decode steps run. steps_per_sync > 1: up to that many steps per host sync on the device
    (vivace.core.device_decode; Triton on CUDA, or the Triton interpreter), runs ending where a sequence of the batch
    finishes (so a large value syncs once per window); cuda_graphs: those steps as replays of CUDA graphs of up to
    16 steps each."""

    steps_per_sync: int = 1
    cuda_graphs: bool = False

    def validate(self, device: torch.device) -> None:
        if isinstance(self.steps_per_sync, bool) or not isinstance(self.steps_per_sync, int) or self.steps_per_sync < 1:
            raise VivaceError(f"steps_per_sync must be an integer >= 1, got {self.steps_per_sync!r}")
        if self.cuda_graphs and (device.type != "cuda" or self.steps_per_sync < 2):
            raise VivaceError("cuda_graphs needs a CUDA device and steps_per_sync >= 2")
        if self.steps_per_sync > 1 and not use_triton(torch.empty(0, device=device)):
            raise VivaceError(
                "steps_per_sync > 1 samples on the device with Triton: it needs a CUDA device with triton installed "
                "(pip install vivace[gpu]), or VIVACE_TRITON_INTERPRET=1 on the CPU"
            )


@dataclass
class StepStats:
    prefill_tokens: int = 0
    decode_tokens: int = 0
    preemptions: int = 0
    device_runs: int = 0  # runs of several decode steps per host sync
    context_tokens: int = 0  # keys the decoded rows attended to, summed over steps (the KV cache reads, per layer)
    prefill_s: float = 0.0  # host wall seconds in prefill calls (on a GPU: until the sampled tokens are read back)
    decode_s: float = 0.0  # host wall seconds in decode steps (the same)


@dataclass(frozen=True)
class DecodePlan:
    """The running batch as the decode loop sees it, rebuilt only when its sequences change."""

    seqs: list[Sequence]
    batch: _C.DecodeBatch
    inputs: tuple[torch.Tensor, ...]  # input_ids, positions, slot_mapping, block_tables, context_lens (batch's arrays)
    query_start_loc: torch.Tensor
    cross: CrossBatch | None


def decode_batch(seqs: list[Sequence], block_size: int) -> _C.DecodeBatch:
    """One group per sequence: its rows (itself and its null twin) and how it draws."""
    return _C.DecodeBatch(
        block_size,
        [[member.state for member in seq.members] for seq in seqs],
        temperature=np.array([seq.sampling.temperature for seq in seqs], dtype=np.float64),
        top_k=np.array([seq.sampling.top_k for seq in seqs], dtype=np.int64),
        top_p=np.array([seq.sampling.top_p for seq in seqs], dtype=np.float64),
        seed=np.array([seq.seed for seq in seqs], dtype=np.uint64),
        stream=np.array([seq.stream for seq in seqs], dtype=np.uint64),
        guidance_scale=np.array([seq.guidance_scale for seq in seqs], dtype=np.float64),
    )


class ModelRunner:
    def __init__(
        self,
        model: StageTransformer,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        block_size: int,
        device: torch.device,
        device_loops: DeviceLoops,
        stats: StepStats,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device
        self.device_loops = device_loops
        self.stats = stats
        self.plan: DecodePlan | None = None  # the decode batch last built, reused while the scheduler's is unchanged
        self._cross_memo: tuple[list[CrossCondition], CrossBatch] | None = None  # the last step's, while unchanged

    def decode_plan(self, seqs: list[Sequence]) -> DecodePlan:
        if self.plan is not None and self.plan.seqs is seqs:
            return self.plan
        batch = decode_batch(seqs, self.block_size)
        arrays = batch.prepare()
        members = [member for seq in seqs for member in seq.members]
        query_start = list(range(len(members) + 1))
        self.plan = DecodePlan(
            seqs=seqs,
            batch=batch,
            inputs=tuple(torch.from_numpy(array) for array in arrays),
            query_start_loc=torch.tensor(query_start, dtype=torch.int32, device=self.device),
            cross=self._cross_batch(members, query_start),
        )
        return self.plan

    def decode(self, plan: DecodePlan) -> list[Sequence]:
        """One token for every sequence of the plan: prepare -> forward -> sample and advance, no Python per row."""
        plan.batch.prepare()  # refills the arrays behind plan.inputs
        input_ids, positions, slot_mapping, block_tables, context_lens = (t.to(self.device) for t in plan.inputs)
        batch = AttentionBatch(
            slot_mapping=slot_mapping,
            block_tables=block_tables,
            context_lens=context_lens,
            query_start_loc=plan.query_start_loc,
            is_decode=True,
            cross=plan.cross,
        )
        hidden = self.model(input_ids, positions, self.kv_caches, batch)
        logits = self.model.compute_logits(hidden).float()
        finished = sample_and_advance(plan.batch, logits)
        self.stats.decode_tokens += plan.batch.num_members
        self.stats.context_tokens += int(plan.inputs[4].sum())
        return [plan.seqs[index] for index in finished.tolist()]

    def decode_on_device(self, plan: DecodePlan, steps: int) -> list[Sequence]:
        """`steps` tokens for every sequence of the plan with one host sync (their blocks already reserved)."""
        context = sum(member.length for seq in plan.seqs for member in seq.members)  # the first step's, per row
        drawn = self.device_loops.bound_to(plan.batch, plan.cross).run(steps)
        for tokens in drawn:
            finished = plan.batch.advance(tokens)  # groups finish only at the last step (steps <= steps_left)
        self.stats.decode_tokens += plan.batch.num_members * steps
        self.stats.context_tokens += steps * context + plan.batch.num_members * steps * (steps - 1) // 2  # a key per step
        self.stats.device_runs += 1
        return [plan.seqs[index] for index in finished.tolist()]

    def prefill(self, seqs: list[Sequence]) -> list[Sequence]:
        """Computes the uncached part of each admitted row's prompt in one forward and draws its first token."""
        members = [member for seq in seqs for member in seq.members]
        pieces = [member.token_array(member.num_cached) for member in members]
        positions = [torch.arange(member.num_cached, member.length) for member in members]
        query_start = np.cumsum([0] + [len(piece) for piece in pieces]).tolist()
        slots = [
            torch.tensor(member.block_table, dtype=torch.int64)[pos // self.block_size] * self.block_size
            + pos % self.block_size
            for member, pos in zip(members, positions)
        ]
        max_blocks = max(len(member.block_table) for member in members)
        tables = [member.block_table + [0] * (max_blocks - len(member.block_table)) for member in members]
        device = self.device
        batch = AttentionBatch(
            slot_mapping=torch.cat(slots).to(device),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=device),
            context_lens=torch.tensor([member.length for member in members], dtype=torch.int32, device=device),
            query_start_loc=torch.tensor(query_start, dtype=torch.int32, device=device),
            is_decode=False,
            cross=self._cross_batch(members, query_start),
            prefix=self._prefix_batch(members, query_start),
        )
        input_ids = torch.from_numpy(np.concatenate(pieces)).to(device)
        hidden = self.model(input_ids, torch.cat(positions).to(device), self.kv_caches, batch)
        last = torch.tensor(query_start[1:], device=device) - 1
        logits = self.model.compute_logits(hidden[last]).float()
        finished = sample_and_advance(decode_batch(seqs, self.block_size), logits)
        self.stats.prefill_tokens += len(input_ids)
        return [seqs[index] for index in finished.tolist()]

    def _cross_batch(self, members: list[Sequence], query_start: list[int]) -> CrossBatch | None:
        if members[0].cross is None:
            return None
        crosses = [m.cross for m in members]
        memo = self._cross_memo
        if memo is None or len(memo[0]) != len(crosses) or any(a is not b for a, b in zip(memo[0], crosses)):
            num_layers = len(crosses[0].keys)
            keys = [pad_sequence([c.keys[i] for c in crosses], batch_first=True) for i in range(num_layers)]
            values = [pad_sequence([c.values[i] for c in crosses], batch_first=True) for i in range(num_layers)]
            mask = pad_sequence([c.mask for c in crosses], batch_first=True, padding_value=False)
            self._cross_memo = (crosses, CrossBatch(keys, values, mask, torch.empty(0, dtype=torch.int64)))
        cached = self._cross_memo[1]
        counts = torch.tensor(np.diff(query_start), device=self.device)
        token_seq = torch.repeat_interleave(torch.arange(len(members), device=self.device), counts)
        return CrossBatch(cached.keys, cached.values, cached.enc_mask, token_seq)

    def _prefix_batch(self, members: list[Sequence], query_start: list[int]) -> PrefixBatch | None:
        """The prefix embeddings of the positions this forward computes: only prefills (a prompt's start) reach them."""
        index: list[torch.Tensor] = []
        embeds: list[torch.Tensor] = []
        for i, seq in enumerate(members):
            start = seq.length - (query_start[i + 1] - query_start[i])
            if seq.prefix is not None and start < seq.prefix_len:
                index.append(torch.arange(query_start[i], query_start[i] + seq.prefix_len - start))
                embeds.append(seq.prefix[start:])
        if not index:
            return None
        return PrefixBatch(torch.cat(index).to(self.device), torch.cat(embeds))
