"""int8 KV cache rows: the reference of the format the native kernels read and write (csrc/kv_cache_format.h).

An int8 cache is [num_blocks, block_size, num_heads, head_dim + 4] int8. Each (token, head) row holds head_dim
signed values q and, in its last 4 bytes, the row's float32 scale s (native byte order): the row stands for q * s.
s = max|x| / 127 and q = x / s rounded to nearest even, both in float32, so the largest magnitude maps to ±127 and
the error of any element is at most s / 2 (a row of zeros gets s = 0). One scale per row keeps a token's heads
independent of one another and of every other token: a row's bytes depend on that row's values alone, so a request's
cache, and its output, do not depend on what else is batched with it. The scale inside the row keeps every cache a
single tensor addressed by slot, like the float32 and bfloat16 caches; it costs 4 bytes per row (6 % at head_dim 64),
and the row is a quarter of float32's bytes plus that.
"""
from __future__ import annotations

import torch

SCALE_BYTES = 4


def is_int8_cache(cache: torch.Tensor) -> bool:
    return cache.dtype == torch.int8


def row_width(head_dim: int, dtype: torch.dtype) -> int:
    """Elements per (token, head) row of a cache of this dtype."""
    return head_dim + SCALE_BYTES if dtype == torch.int8 else head_dim


def quantize_rows(x: torch.Tensor) -> torch.Tensor:
    """[..., head_dim] float rows -> [..., head_dim + 4] int8 rows with their scales. A row holding a NaN or an
    infinity gets a NaN scale (so it reads back as NaN, as a float cache would show it) and zeros."""
    x = x.float()
    finite = torch.isfinite(x).all(dim=-1, keepdim=True)
    scale = torch.where(finite, x.abs().amax(dim=-1, keepdim=True) / 127.0, float("nan"))
    usable = finite & (scale > 0)
    quotient = torch.where(usable, x / torch.where(usable, scale, 1.0), 0.0)
    values = quotient.round().clamp(-127, 127).to(torch.int8)
    return torch.cat([values, scale.contiguous().view(torch.int8)], dim=-1)


def dequantize_rows(rows: torch.Tensor) -> torch.Tensor:
    """[..., head_dim + 4] int8 rows -> [..., head_dim] float32 (q * s)."""
    scale = rows[..., -SCALE_BYTES:].contiguous().view(torch.float32)
    return rows[..., :-SCALE_BYTES].float() * scale


def as_float(rows: torch.Tensor) -> torch.Tensor:
    """Cached rows of any cache dtype as float32 values: int8 rows dequantized, others widened."""
    return dequantize_rows(rows) if is_int8_cache(rows) else rows.float()
