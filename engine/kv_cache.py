"""Paged KV cache: the block pool of one stage and the allocator that hands its blocks to sequences.

Blocks are reference counted. A full block of prompt tokens is registered under the hash of the whole
prefix up to its end, so later sequences with the same prefix (N samples of one prompt, a guidance pair)
point at the same block instead of computing and storing it again. Only full prompt blocks are
shared and a sequence never writes into a block it shares, so no copy-on-write is needed.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import torch


class KVCachePool:
    """Key and value blocks of every layer: [num_layers, 2, num_blocks, block_size, num_heads, head_dim]."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        # Never read before written: slots are only read through block tables of tokens already stored.
        self.data = torch.empty(num_layers, 2, num_blocks, block_size, num_heads, head_dim, dtype=dtype, device=device)

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data[index, 0], self.data[index, 1]

    def layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [self.layer(i) for i in range(self.data.shape[0])]

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return num_layers * 2 * block_size * num_heads * head_dim * torch.finfo(dtype).bits // 8


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

    def release(self, block_table: Sequence[int]) -> None:
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


def block_rows(token_rows: Sequence[tuple[int, ...]], block_size: int, num_full_blocks: int) -> list[tuple]:
    return [tuple(token_rows[b * block_size : (b + 1) * block_size]) for b in range(num_full_blocks)]


def prefix_hashes(blocks: Sequence[tuple]) -> list[int]:
    """Chained hash of the prefix ending at each block."""
    hashes = []
    running = 0
    for rows in blocks:
        running = hash((running, rows))
        hashes.append(running)
    return hashes
