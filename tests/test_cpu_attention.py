"""The CPU decode path against the plain-torch reference (both its padded and its per-sequence form)."""
import pytest
import torch

from vivace.kernels import cpu_paged_attention as cpu
from vivace.kernels import paged_attention as ref

# float32: both paths sum the same products in float32 in different orders (~1e-7). bfloat16 caches: both
# upcast the same stored values, so only that order and the final rounding to bfloat16 (2**-8) differ.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", [1, 16, 32])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("padded_limit", [0, 1 << 40])  # every batch per sequence / every batch padded
def test_decode_matches_reference(monkeypatch, dtype, block_size, with_bias, padded_limit) -> None:
    monkeypatch.setattr(cpu, "PADDED_GATHER_LIMIT", padded_limit)
    gen = torch.Generator().manual_seed(block_size + 7 * with_bias)
    heads, head_dim = 4, 16
    lengths = [1, 37, block_size, 90, 5]
    per_seq = [-(-n // block_size) for n in lengths]
    num_blocks = sum(per_seq) + 6
    key_cache = torch.full((num_blocks, block_size, heads, head_dim), float("nan"), dtype=dtype)
    value_cache = key_cache.clone()
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables = torch.zeros(len(lengths), max(per_seq), dtype=torch.int32)
    for s, n in enumerate(lengths):
        blocks = [order.pop() for _ in range(per_seq[s])]
        tables[s, : len(blocks)] = torch.tensor(blocks)
        rows = torch.tensor([b * block_size + i for b in blocks for i in range(block_size)][:n])
        key_cache.view(-1, heads, head_dim)[rows] = torch.randn(n, heads, head_dim, generator=gen).to(dtype)
        value_cache.view(-1, heads, head_dim)[rows] = torch.randn(n, heads, head_dim, generator=gen).to(dtype)
    query = torch.randn(len(lengths), heads, head_dim, generator=gen).to(dtype)
    bias = torch.randn(heads, 33, generator=gen) if with_bias else None
    lens = torch.tensor(lengths, dtype=torch.int32)
    out = cpu.paged_decode_attention(query, key_cache, value_cache, tables, lens, 0.3, bias)
    # the reference zeroes unused value slots but computes scores on them, so it gets NaN-free caches
    expected = ref.paged_decode_attention(query, key_cache.nan_to_num(0.0), value_cache.nan_to_num(0.0), tables, lens, 0.3, bias)
    assert out.dtype == dtype and torch.isfinite(out).all()
    error = ((out.float() - expected.float()).abs().max() / expected.float().abs().max()).item()
    assert error <= TOLERANCE[dtype]
