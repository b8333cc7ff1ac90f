"""The block manager of one stage: which KV cache blocks each sequence's rows hold, shared prompt prefixes included.

Blocks are reference counted. A full block of prompt tokens is registered under the hash of the whole prefix up to
its end, so later sequences with the same prefix (N samples of one prompt, a guidance pair) point at the same block
instead of computing and storing it again. Only full prompt blocks are shared and a sequence never writes into a
block it shares, so no copy-on-write is needed.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Sequence as Rows
from dataclasses import dataclass

from vivace.core.sequence import Sequence


class BlockAllocator:
    """Free list and reference counts over block ids 0..num_blocks-1, plus the prefix-block registry."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.free_blocks: deque[int] = deque(range(num_blocks))
        self.ref_counts = [0] * num_blocks
        self.block_hash: dict[int, int] = {}
        self.hash_to_block: dict[int, int] = {}
        self.block_content: dict[int, tuple[int, tuple]] = {}  # block -> (previous block, its token rows)

    @property
    def num_free(self) -> int:
        return len(self.free_blocks)

    def allocate(self) -> int:
        block = self.free_blocks.pop()  # most recently freed first: keeps the touched part of the pool small
        self.ref_counts[block] = 1
        return block

    def share(self, block: int) -> None:
        self.ref_counts[block] += 1

    def release(self, block_table: Rows[int]) -> None:
        for block in block_table:
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                prefix_hash = self.block_hash.pop(block, None)
                if prefix_hash is not None:
                    del self.hash_to_block[prefix_hash]
                    del self.block_content[block]
                self.free_blocks.append(block)

    def register(self, block: int, prefix_hash: int, previous_block: int, rows: tuple) -> None:
        if prefix_hash not in self.hash_to_block:
            self.hash_to_block[prefix_hash] = block
            self.block_hash[block] = prefix_hash
            self.block_content[block] = (previous_block, rows)

    def lookup(self, prefix_hash: int, previous_block: int, rows: tuple) -> int | None:
        """The live block holding exactly this prefix, checked token by token (a hash match is not enough)."""
        block = self.hash_to_block.get(prefix_hash)
        if block is None or self.block_content[block] != (previous_block, rows):
            return None
        return block


def block_rows(token_rows: Rows[tuple[int, ...]], block_size: int, num_full_blocks: int) -> list[tuple]:
    return [tuple(token_rows[b * block_size : (b + 1) * block_size]) for b in range(num_full_blocks)]


def prefix_hashes(blocks: Rows[tuple]) -> list[int]:
    """Chained hash of the prefix ending at each block."""
    hashes = []
    running = 0
    for rows in blocks:
        running = hash((running, rows))
        hashes.append(running)
    return hashes


@dataclass(frozen=True)
class PrefixPlan:
    """How one row is admitted: the cached blocks it reuses and the full prompt blocks it registers."""

    shared: list[int]
    hashes: list[int]
    contents: list[tuple]
    num_blocks: int


class BlockManager:
    """Gives sequences (each row of a guided pair alike) the blocks for their tokens and takes them back."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.allocator = BlockAllocator(num_blocks, block_size)

    @property
    def num_free(self) -> int:
        return self.allocator.num_free

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def missing(self, seq: Sequence, ahead: int = 0) -> int:
        """Blocks the rows of seq lack to store their last token and `ahead` more."""
        return sum(max(0, self.blocks_for(m.length + ahead) - len(m.block_table)) for m in seq.members)

    def extend(self, seq: Sequence, ahead: int = 0) -> None:
        for member in seq.members:
            while len(member.block_table) < self.blocks_for(member.length + ahead):
                member.state.add_block(self.allocator.allocate())

    def release(self, seq: Sequence) -> None:
        for member in seq.members:
            self.allocator.release(member.block_table)
            member.block_table = []
            member.num_cached = 0

    def try_allocate(self, seq: Sequence) -> bool:
        """Gives every row of seq the blocks of its prompt, reusing cached prefix blocks; False (nothing taken)
        when the free blocks are too few."""
        plans = [self._prefix_plan(member) for member in seq.members]
        if sum(plan.num_blocks - len(plan.shared) for plan in plans) > self.allocator.num_free:
            return False
        for member, plan in zip(seq.members, plans):
            self._assign(member, plan)
        return True

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

    def _assign(self, seq: Sequence, plan: PrefixPlan) -> None:
        for block in plan.shared:
            self.allocator.share(block)
        seq.block_table = plan.shared + [self.allocator.allocate() for _ in range(plan.num_blocks - len(plan.shared))]
        for b in range(len(plan.shared), len(plan.contents)):
            previous = seq.block_table[b - 1] if b else -1
            self.allocator.register(seq.block_table[b], plan.hashes[b], previous, plan.contents[b])
        seq.num_cached = len(plan.shared) * self.block_size
