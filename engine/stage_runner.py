"""Runs the sequences of one stage: admits them into the paged cache, batches their steps, samples, preempts.

Each step: running sequences that need a new block get one, preempting the least urgent running sequences
when the pool is empty (their blocks are freed and their tokens recomputed when resumed); then waiting
sequences are admitted in priority order while their blocks fit, and prefilled in one forward; the other
running sequences decode one token each in a second forward.

A guided sequence (classifier-free guidance) is scheduled as one unit with its null twin: both rows are
admitted, preempted and run together, their logits mixed, and the token drawn once is fed to both.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence

from vivace.errors import VivaceError
from vivace.kv_cache import BlockAllocator, KVCachePool, block_rows, prefix_hashes
from vivace.kernels.dispatch import sample
from vivace.sampling import SamplingBatch
from vivace.sequence import CrossCondition, Sequence, SequenceStatus
from vivace.transformer import AttentionBatch, CrossBatch, PrefixBatch, StageTransformer

Sampler = Callable[[torch.Tensor, SamplingBatch], torch.Tensor]


@dataclass
class StepStats:
    prefill_tokens: int = 0
    decode_tokens: int = 0
    preemptions: int = 0


@dataclass(frozen=True)
class PrefixPlan:
    """How one row is admitted: the cached blocks it reuses and the full prompt blocks it registers."""

    shared: list[int]
    hashes: list[int]
    contents: list[tuple]
    num_blocks: int


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
        self._cross_memo: tuple[list[CrossCondition], CrossBatch] | None = None  # the last step's, reused while unchanged

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def add(self, seq: Sequence) -> None:
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
        self._release(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)
        self.waiting.sort(key=lambda s: s.priority)
        self.stats.preemptions += 1

    def _missing_blocks(self, seq: Sequence) -> int:
        return sum(self.blocks_for(m.length) - len(m.block_table) for m in seq.members)

    def _reserve_decode_slots(self) -> list[Sequence]:
        """Gives every running sequence room for its next token, preempting from the least urgent end."""
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
                for member in seq.members:
                    if len(member.block_table) < self.blocks_for(member.length):
                        member.block_table.append(self.allocator.allocate())
                scheduled.append(seq)
        return scheduled

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
            admitted.append(seq)
        return admitted

    @torch.inference_mode()
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
        members = [member for seq in seqs for member in seq.members]
        rows: list[tuple[int, ...]] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start = [0]
        for seq in members:
            start = seq.length - 1 if is_decode else seq.num_cached
            for pos in range(start, seq.length):
                rows.append(seq.rows[pos])
                positions.append(pos)
                slots.append(seq.block_table[pos // self.block_size] * self.block_size + pos % self.block_size)
            query_start.append(len(rows))
        max_blocks = max(len(seq.block_table) for seq in members)
        tables = [seq.block_table + [0] * (max_blocks - len(seq.block_table)) for seq in members]
        device = self.device
        batch = AttentionBatch(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=device),
            context_lens=torch.tensor([seq.length for seq in members], dtype=torch.int32, device=device),
            query_start_loc=torch.tensor(query_start, dtype=torch.int32, device=device),
            is_decode=is_decode,
            cross=self._cross_batch(members, query_start),
            prefix=None if is_decode else self._prefix_batch(members, query_start),  # prefixes sit inside prompts
        )
        input_ids = torch.tensor(rows, dtype=torch.int64, device=device)
        hidden = self.model(input_ids, torch.tensor(positions, device=device), self.kv_caches, batch)
        last = torch.tensor(query_start[1:], device=device) - 1
        logits = self._guided_logits(seqs, self.model.compute_logits(hidden[last]).float())
        num_heads = logits.shape[1]
        tokens = self.sampler(logits.flatten(0, 1), self._sampling_batch(seqs, num_heads)).view(-1, num_heads).tolist()
        for seq, drawn in zip(seqs, tokens):
            for member in seq.members:
                member.num_cached = member.length
                member.append(tuple(drawn))
        if is_decode:
            self.stats.decode_tokens += len(members)
        else:
            self.stats.prefill_tokens += len(rows)

    @staticmethod
    def _guided_logits(seqs: list[Sequence], logits: torch.Tensor) -> torch.Tensor:
        """[member rows, heads, vocab] -> [seqs, heads, vocab]. A guided pair mixes its rows as transformers'
        ClassifierFreeGuidanceLogitsProcessor does: null + (cond - null) * guidance_scale, in float32."""
        if all(seq.null is None for seq in seqs):
            return logits
        first_rows = np.cumsum([0] + [len(seq.members) for seq in seqs[:-1]]).tolist()
        out = logits[first_rows]
        for i, (seq, row) in enumerate(zip(seqs, first_rows)):
            if seq.null is not None:
                cond, null = logits[row], logits[row + 1]
                out[i] = null + (cond - null) * seq.guidance_scale
        return out

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

    @staticmethod
    def _sampling_batch(seqs: list[Sequence], num_heads: int) -> SamplingBatch:
        """One row per (sequence, head); head h of a step at position p draws with counter p * num_heads + h."""
        windows = [window for seq in seqs for window in seq.next_windows()]

        def per_row(values: Iterable) -> list:
            return [value for value in values for _ in range(num_heads)]

        steps = [seq.length * num_heads + h for seq in seqs for h in range(num_heads)]
        return SamplingBatch(
            temperature=torch.tensor(per_row(s.sampling.temperature for s in seqs), dtype=torch.float64),
            top_k=torch.tensor(per_row(s.sampling.top_k for s in seqs), dtype=torch.int64),
            top_p=torch.tensor(per_row(s.sampling.top_p for s in seqs), dtype=torch.float64),
            vocab_lo=torch.tensor([w[0] for w in windows], dtype=torch.int64),
            vocab_hi=torch.tensor([w[1] for w in windows], dtype=torch.int64),
            seed=np.array(per_row(s.seed for s in seqs), dtype=np.uint64),
            stream=np.array(per_row(s.stream for s in seqs), dtype=np.uint64),
            step=np.array(steps, dtype=np.uint64),
        )
