"""Runs the sequences of one stage: admits them into the paged cache, batches their steps, samples, preempts.

Each step: running sequences that need a new block get one, preempting the least urgent running sequences
when the pool is empty (their blocks are freed and their tokens recomputed when resumed); then waiting
sequences are admitted in priority order while their blocks fit, and prefilled in one forward; the other
running sequences decode one token each in a second forward.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from vivace.errors import VivaceError
from vivace.kv_cache import BlockAllocator, KVCachePool, block_rows, prefix_hashes
from vivace.kernels.dispatch import sample
from vivace.sampling import SamplingBatch
from vivace.sequence import Sequence, SequenceStatus
from vivace.transformer import AttentionBatch, StageTransformer

Sampler = Callable[[torch.Tensor, SamplingBatch], torch.Tensor]


@dataclass
class StepStats:
    prefill_tokens: int = 0
    decode_tokens: int = 0
    preemptions: int = 0


class StageRunner:
    def __init__(
        self,
        name: str,
        model: StageTransformer,
        pool: KVCachePool,
        device: torch.device,
        sampler: Sampler = sample,
    ) -> None:
        self.name = name
        self.model = model
        self.pool = pool
        self.kv_caches = pool.layers()
        self.allocator = BlockAllocator(pool.num_blocks, pool.block_size)
        self.block_size = pool.block_size
        self.device = device
        self.sampler = sampler
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.stats = StepStats()

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def add(self, seq: Sequence) -> None:
        if self.blocks_for(seq.max_len) > self.pool.num_blocks:
            raise VivaceError(
                f"stage {self.name!r}: a sequence of {seq.max_len} tokens needs {self.blocks_for(seq.max_len)} "
                f"KV blocks but the pool has {self.pool.num_blocks}; raise kv_cache_gb"
            )
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)
        self.waiting.sort(key=lambda s: s.priority)

    def cancel(self, seq: Sequence) -> None:
        """Drops a sequence wherever it is and returns its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)
        seq.status = SequenceStatus.FINISHED

    def cancel_all(self) -> None:
        for seq in self.running + self.waiting:
            self.cancel(seq)

    def _release(self, seq: Sequence) -> None:
        self.allocator.release(seq.block_table)
        seq.block_table = []
        seq.num_cached = 0

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)
        self.waiting.sort(key=lambda s: s.priority)
        self.stats.preemptions += 1

    def _reserve_decode_slots(self) -> list[Sequence]:
        """Gives every running sequence room for its next token, preempting from the least urgent end."""
        self.running.sort(key=lambda s: s.priority)
        scheduled: list[Sequence] = []
        for seq in list(self.running):
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            while len(seq.block_table) < self.blocks_for(seq.length) and self.allocator.num_free == 0:
                self._preempt(self.running[-1])
                if seq.status is not SequenceStatus.RUNNING:
                    break
            if seq.status is SequenceStatus.RUNNING:
                if len(seq.block_table) < self.blocks_for(seq.length):
                    seq.block_table.append(self.allocator.allocate())
                scheduled.append(seq)
        return scheduled

    def _admit(self) -> list[Sequence]:
        admitted = []
        while self.waiting:
            seq = self.waiting[0]
            shareable = (seq.length - 1) // self.block_size  # the block of the last token is always computed
            rows = block_rows(seq.rows, self.block_size, shareable)
            hashes = prefix_hashes(rows)
            shared: list[int] = []
            previous = -1
            for prefix_hash, block_content in zip(hashes, rows):
                block = self.allocator.lookup(prefix_hash, previous, block_content)
                if block is None:
                    break
                shared.append(block)
                previous = block
            needed = self.blocks_for(seq.length) - len(shared)
            if needed > self.allocator.num_free:
                break
            for block in shared:
                self.allocator.share(block)
            seq.block_table = shared + [self.allocator.allocate() for _ in range(needed)]
            for b in range(len(shared), shareable):
                previous = seq.block_table[b - 1] if b else -1
                self.allocator.register(seq.block_table[b], hashes[b], previous, rows[b])
            seq.num_cached = len(shared) * self.block_size
            seq.status = SequenceStatus.RUNNING
            self.waiting.pop(0)
            self.running.append(seq)
            admitted.append(seq)
        return admitted

    def step(self) -> list[Sequence]:
        """Runs one step; returns the sequences that finished in it."""
        decode = self._reserve_decode_slots()
        prefill = self._admit()
        if not decode and not prefill and self.waiting:
            raise VivaceError(f"stage {self.name!r}: the KV pool cannot hold the next sequence; raise kv_cache_gb")
        if prefill:
            self._forward(prefill, is_decode=False)
        if decode:
            self._forward(decode, is_decode=True)
        finished = [seq for seq in prefill + decode if seq.is_finished]
        for seq in finished:
            self.running.remove(seq)
            self._release(seq)
            seq.status = SequenceStatus.FINISHED
        return finished

    def _forward(self, seqs: list[Sequence], is_decode: bool) -> None:
        rows: list[tuple[int, ...]] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start = [0]
        for seq in seqs:
            start = seq.length - 1 if is_decode else seq.num_cached
            for pos in range(start, seq.length):
                rows.append(seq.rows[pos])
                positions.append(pos)
                slots.append(seq.block_table[pos // self.block_size] * self.block_size + pos % self.block_size)
            query_start.append(len(rows))
        max_blocks = max(len(seq.block_table) for seq in seqs)
        tables = [seq.block_table + [0] * (max_blocks - len(seq.block_table)) for seq in seqs]
        device = self.device
        batch = AttentionBatch(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=device),
            context_lens=torch.tensor([seq.length for seq in seqs], dtype=torch.int32, device=device),
            query_start_loc=torch.tensor(query_start, dtype=torch.int32, device=device),
            is_decode=is_decode,
        )
        input_ids = torch.tensor(rows, dtype=torch.int64, device=device)
        hidden = self.model(input_ids, torch.tensor(positions, device=device), self.kv_caches, batch)
        last = torch.tensor(query_start[1:], device=device) - 1
        logits = self.model.compute_logits(hidden[last])[:, 0]
        tokens = self.sampler(logits.float(), self._sampling_batch(seqs)).tolist()
        for seq, token in zip(seqs, tokens):
            seq.num_cached = seq.length
            seq.append(token)
        if is_decode:
            self.stats.decode_tokens += len(seqs)
        else:
            self.stats.prefill_tokens += len(rows)

    @staticmethod
    def _sampling_batch(seqs: list[Sequence]) -> SamplingBatch:
        windows = [seq.next_window() for seq in seqs]
        return SamplingBatch(
            temperature=torch.tensor([s.sampling.temperature for s in seqs], dtype=torch.float64),
            top_k=torch.tensor([s.sampling.top_k for s in seqs], dtype=torch.int64),
            top_p=torch.tensor([s.sampling.top_p for s in seqs], dtype=torch.float64),
            vocab_lo=torch.tensor([w[0] for w in windows], dtype=torch.int64),
            vocab_hi=torch.tensor([w[1] for w in windows], dtype=torch.int64),
            seed=np.array([s.seed for s in seqs], dtype=np.uint64),
            stream=np.array([s.stream for s in seqs], dtype=np.uint64),
            step=np.array([s.length for s in seqs], dtype=np.uint64),
        )
