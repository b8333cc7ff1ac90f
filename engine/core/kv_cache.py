"""Paged KV cache: the key and value blocks of one stage, for every layer (vivace.core.block_manager hands them
out)."""
from __future__ import annotations

import torch

from vivace.kernels.kv_int8 import row_width


class KVCachePool:
    """Key and value blocks of every layer: [num_layers, 2, num_blocks, block_size, num_heads, row], a row being
    head_dim values (float32, bfloat16) or head_dim int8 values and their scale (vivace.kernels.kv_int8)."""

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
        self.head_dim = head_dim
        # Never read before written: slots are only read through block tables of tokens already stored.
        self.data = torch.empty(
            num_layers, 2, num_blocks, block_size, num_heads, row_width(head_dim, dtype), dtype=dtype, device=device
        )

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data[index, 0], self.data[index, 1]

    def layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [self.layer(i) for i in range(self.data.shape[0])]

    @property
    def bytes_per_token(self) -> int:
        """Key and value bytes of one cached token, every layer: what a decode step reads per key it attends to."""
        num_layers, _, _, _, num_heads, _ = self.data.shape
        return self.bytes_per_block(num_layers, 1, num_heads, self.head_dim, self.data.dtype)

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return num_layers * 2 * block_size * num_heads * row_width(head_dim, dtype) * dtype.itemsize
