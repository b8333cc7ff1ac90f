"""Runs the sequences of one stage: admits them into the paged cache, batches their steps, samples, preempts.

Each step: running sequences that need a new block get one, preempting the least urgent running sequences
when the pool is empty (their blocks are freed and their tokens recomputed when resumed); then waiting
sequences are admitted in priority order while their blocks fit, and prefilled in one forward; the other
running sequences decode one token each in a second forward.

The decode forward reads its inputs from a vivace._C.DecodeBatch, built once per batch composition: a step is
prepare() (every row's last token, position, cache slot and context) -> forward -> sample_and_advance(logits)
(guidance mix, draw, append, stop check). Python touches a running sequence only when it crosses into a new
cache block or the batch changes.

A guided sequence (classifier-free guidance) is scheduled as one unit with its null twin: both rows are
admitted, preempted and run together, their logits mixed, and the token drawn once is fed to both.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence

from vivace import _C
from vivace.errors import VivaceError
from vivace.device_decode import DeviceLoops
from vivace.kernels.dispatch import sample_and_advance, use_triton
from vivace.kv_cache import BlockAllocator, KVCachePool, block_rows, prefix_hashes
from vivace.sequence import CrossCondition, Sequence, SequenceStatus
from vivace.transformer import AttentionBatch, CrossBatch, PrefixBatch, StageTransformer


@dataclass(frozen=True)
class DecodeOptions:
    """How decode steps run. steps_per_sync > 1: up to that many steps per host sync on the device
    (vivace.device_decode; Triton on CUDA, or the Triton interpreter), runs ending where a sequence of the batch
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


@dataclass(frozen=True)
class PrefixPlan:
    """How one row is admitted: the cached blocks it reuses and the full prompt blocks it registers."""

    shared: list[int]
    hashes: list[int]
    contents: list[tuple]
    num_blocks: int


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
        self.model = model
        self.pool = pool
        self.kv_caches = pool.layers()
        self.allocator = BlockAllocator(pool.num_blocks, pool.block_size)
        self.block_size = pool.block_size
        self.device = device
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.stats = StepStats()
        self._cross_memo: tuple[list[CrossCondition], CrossBatch] | None = None  # the last step's, reused while unchanged
        self._plan: DecodePlan | None = None  # the decode batch of the running sequences; None when they change
        self.device_loops = device_loops or DeviceLoops(model, self.kv_caches, self.block_size, device, options.cuda_graphs)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def add(self, seq: Sequence) -> None:
        if seq.max_len <= seq.length:
            raise VivaceError(f"stage {self.name!r}: sequence {seq.seq_id} has no token to generate")
        needed = self.blocks_for(seq.max_len) * len(seq.members)
        if needed > self.pool.num_blocks:
            raise VivaceError(
                f"stage {self.name!r}: a sequence of {seq.max_len} tokens needs {needed} KV blocks "
                f"({len(seq.members)} rows) but the pool has {self.pool.num_blocks}; raise kv_cache_gb"
            )
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)
        self.waiting.sort(key=lambda s: s.priority)

    def cancel(self, seq: Sequence) -> None:
        """Drops a sequence wherever it is and returns its blocks."""
        if seq in self.running:
            self.running.remove(seq)
            self._plan = None
        if seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)
        seq.status = SequenceStatus.FINISHED

    def cancel_all(self) -> None:
        for seq in self.running + self.waiting:
            self.cancel(seq)

    def _release(self, seq: Sequence) -> None:
        for member in seq.members:
            self.allocator.release(member.block_table)
            member.block_table = []
            member.num_cached = 0

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._plan = None
        self._release(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)
        self.waiting.sort(key=lambda s: s.priority)
        self.stats.preemptions += 1

    def _missing_blocks(self, seq: Sequence, ahead: int = 0) -> int:
        """Blocks the rows of seq lack to store their last token and `ahead` more."""
        return sum(max(0, self.blocks_for(m.length + ahead) - len(m.block_table)) for m in seq.members)

    def _reserve_decode_slots(self) -> list[Sequence]:
        """Gives every running sequence room for its next token, preempting from the least urgent end.

        While the batch is unchanged only the sequences that cross into a new block are visited."""
        plan = self._plan
        if plan is not None:
            missing = plan.batch.missing_blocks()
            if not missing.any():
                return plan.seqs
            if int(missing.sum()) <= self.allocator.num_free:
                for index in np.flatnonzero(missing).tolist():
                    self._extend(plan.seqs[index])
                return plan.seqs
        self.running.sort(key=lambda s: s.priority)
        scheduled: list[Sequence] = []
        for seq in list(self.running):
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            while self._missing_blocks(seq) > self.allocator.num_free:
                self._preempt(self.running[-1])
                if seq.status is not SequenceStatus.RUNNING:
                    break
            if seq.status is SequenceStatus.RUNNING:
                self._extend(seq)
                scheduled.append(seq)
        return scheduled

    def _extend(self, seq: Sequence, ahead: int = 0) -> None:
        for member in seq.members:
            while len(member.block_table) < self.blocks_for(member.length + ahead):
                member.state.add_block(self.allocator.allocate())

    def _prefix_plan(self, seq: Sequence) -> PrefixPlan:
        shareable = (seq.length - 1) // self.block_size  # the block of the last token is always computed
        contents = [(seq.cache_salt, rows) for rows in block_rows(seq.rows, self.block_size, shareable)]
        hashes = prefix_hashes(contents)
        shared: list[int] = []
        previous = -1
        for prefix_hash, content in zip(hashes, contents):
            block = self.allocator.lookup(prefix_hash, previous, content)
            if block is None:
                break
            shared.append(block)
            previous = block
        return PrefixPlan(shared, hashes, contents, self.blocks_for(seq.length))

    def _assign_blocks(self, seq: Sequence, plan: PrefixPlan) -> None:
        for block in plan.shared:
            self.allocator.share(block)
        seq.block_table = plan.shared + [self.allocator.allocate() for _ in range(plan.num_blocks - len(plan.shared))]
        for b in range(len(plan.shared), len(plan.contents)):
            previous = seq.block_table[b - 1] if b else -1
            self.allocator.register(seq.block_table[b], plan.hashes[b], previous, plan.contents[b])
        seq.num_cached = len(plan.shared) * self.block_size

    def _admit(self) -> list[Sequence]:
        admitted = []
        while self.waiting:
            seq = self.waiting[0]
            plans = [self._prefix_plan(member) for member in seq.members]
            if sum(plan.num_blocks - len(plan.shared) for plan in plans) > self.allocator.num_free:
                break
            for member, plan in zip(seq.members, plans):
                self._assign_blocks(member, plan)
            seq.status = SequenceStatus.RUNNING
            self.waiting.pop(0)
            self.running.append(seq)
            self._plan = None
            admitted.append(seq)
        return admitted

    @torch.inference_mode()
    def step(self) -> list[Sequence]:
        """Runs one step; returns the sequences that finished in it."""
        decode = self._reserve_decode_slots()
        plan = self._decode_plan(decode) if decode else None  # before admission changes the running set
        prefill = self._admit()
        if not decode and not prefill and self.waiting:
            raise VivaceError(f"stage {self.name!r}: the KV pool cannot hold the next sequence; raise kv_cache_gb")
        finished: list[Sequence] = []
        if prefill:
            finished += self._prefill(prefill)
        if plan is not None:
            steps = self._steps_per_sync(plan)
            finished += self._decode(plan) if steps == 1 else self._decode_on_device(plan, steps)
        for seq in finished:
            self.running.remove(seq)
            self._release(seq)
            seq.status = SequenceStatus.FINISHED
        if finished:
            self._plan = None
        return finished

    def _decode_plan(self, seqs: list[Sequence]) -> DecodePlan:
        if self._plan is not None and self._plan.seqs is seqs:
            return self._plan
        batch = decode_batch(seqs, self.block_size)
        arrays = batch.prepare()
        members = [member for seq in seqs for member in seq.members]
        query_start = list(range(len(members) + 1))
        self._plan = DecodePlan(
            seqs=seqs,
            batch=batch,
            inputs=tuple(torch.from_numpy(array) for array in arrays),
            query_start_loc=torch.tensor(query_start, dtype=torch.int32, device=self.device),
            cross=self._cross_batch(members, query_start),
        )
        return self._plan

    def _decode(self, plan: DecodePlan) -> list[Sequence]:
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
        return [plan.seqs[index] for index in finished.tolist()]

    def _steps_per_sync(self, plan: DecodePlan) -> int:
        """How many steps the plan runs before the next host sync: up to options.steps_per_sync, as long as no group
        finishes earlier, halved until the blocks of all of them can be reserved now (block tables are fixed inside
        a run)."""
        steps = min(self.options.steps_per_sync, plan.batch.steps_left)
        while steps > 1 and sum(self._missing_blocks(seq, steps - 1) for seq in plan.seqs) > self.allocator.num_free:
            steps //= 2
        if steps <= 1:
            return 1
        for seq in plan.seqs:
            self._extend(seq, steps - 1)
        return steps

    def _decode_on_device(self, plan: DecodePlan, steps: int) -> list[Sequence]:
        """`steps` tokens for every sequence of the plan with one host sync (vivace.device_decode)."""
        drawn = self.device_loops.bound_to(plan.batch, plan.cross).run(steps)
        for tokens in drawn:
            finished = plan.batch.advance(tokens)  # groups finish only at the last step (steps <= steps_left)
        self.stats.decode_tokens += plan.batch.num_members * steps
        self.stats.device_runs += 1
        return [plan.seqs[index] for index in finished.tolist()]

    def _prefill(self, seqs: list[Sequence]) -> list[Sequence]:
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
