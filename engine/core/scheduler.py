"""The scheduler of one stage: which sequences wait, which run, and who is preempted when the pool runs dry.

Each step: running sequences that need a new block get one, preempting the least urgent running sequences when the
pool is empty (their blocks are freed and their tokens recomputed when resumed); then waiting sequences are admitted
in priority order while their blocks fit. A guided sequence (classifier-free guidance) is one unit with its null
twin: both rows are admitted, preempted and finished together.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from vivace.core.block_manager import BlockManager
from vivace.core.sequence import Sequence, SequenceStatus
from vivace.errors import VivaceError


class Scheduler:
    def __init__(self, name: str, blocks: BlockManager) -> None:
        self.name = name
        self.blocks = blocks
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.preemptions = 0
        # the running sequences as last scheduled for decode, the same list while none joins, leaves or is preempted
        self.batch: list[Sequence] | None = None

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        if seq.max_len <= seq.length:
            raise VivaceError(f"stage {self.name!r}: sequence {seq.seq_id} has no token to generate")
        needed = self.blocks.blocks_for(seq.max_len) * len(seq.members)
        if needed > self.blocks.num_blocks:
            raise VivaceError(
                f"stage {self.name!r}: a sequence of {seq.max_len} tokens needs {needed} KV blocks "
                f"({len(seq.members)} rows) but the pool has {self.blocks.num_blocks}; raise kv_cache_gb"
            )
        self._enqueue(seq)

    def cancel(self, seq: Sequence) -> None:
        """Drops a sequence wherever it is and returns its blocks."""
        if seq in self.running:
            self.running.remove(seq)
            self.batch = None
        if seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.release(seq)
        seq.status = SequenceStatus.FINISHED

    def finish(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            self.running.remove(seq)
            self.blocks.release(seq)
            seq.status = SequenceStatus.FINISHED
        if seqs:
            self.batch = None

    def _enqueue(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)
        self.waiting.sort(key=lambda s: s.priority)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.batch = None
        self.blocks.release(seq)
        self._enqueue(seq)
        self.preemptions += 1

    def reserve_decode_slots(self, batch_missing: Callable[[], np.ndarray]) -> list[Sequence]:
        """Gives every running sequence room for its next token, preempting from the least urgent end.

        While the batch is unchanged only the sequences that cross into a new block are visited: batch_missing()
        gives the blocks each sequence of self.batch lacks (its decode batch counts them without Python per row)."""
        blocks = self.blocks
        if self.batch is not None:
            missing = batch_missing()
            if not missing.any():
                return self.batch
            if int(missing.sum()) <= blocks.num_free:
                for index in np.flatnonzero(missing).tolist():
                    blocks.extend(self.batch[index])
                return self.batch
        self.running.sort(key=lambda s: s.priority)
        scheduled: list[Sequence] = []
        for seq in list(self.running):
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            while blocks.missing(seq) > blocks.num_free:
                self._preempt(self.running[-1])
                if seq.status is not SequenceStatus.RUNNING:
                    break
            if seq.status is SequenceStatus.RUNNING:
                blocks.extend(seq)
                scheduled.append(seq)
        self.batch = scheduled if scheduled else None
        return scheduled

    def admit(self) -> list[Sequence]:
        """Waiting sequences, most urgent first, while their prompts' blocks fit."""
        admitted = []
        while self.waiting and self.blocks.try_allocate(self.waiting[0]):
            seq = self.waiting.pop(0)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            self.batch = None
            admitted.append(seq)
        return admitted
