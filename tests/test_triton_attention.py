"""Triton paged-attention kernels against the plain-torch reference, under the Triton CPU interpreter (or on a GPU
at full shapes too: tests/kernel_device.py).

Tolerances are on max |out - ref| / max |ref|. fp32: 1e-4, since only the summation order and exp2-vs-exp
differ. bf16: 2e-2, since the output is rounded to an 8-bit mantissa (2**-8 ~ 4e-3 relative) and prefill
also rounds the softmax weights to bf16 before the PV product, as flash attention does; fp16 (11-bit): 4e-3.
Every buffer the kernels allocate is poisoned with NaN, and cache rows no sequence owns hold NaN, so a
missed write or an unmasked read shows up as NaN.
"""
from __future__ import annotations

from kernel_device import DEVICE, full_shapes, relative_error  # before anything imports triton

import pytest
import torch

from vivace.kernels import dispatch
from vivace.kernels import cpu_paged_attention
from vivace.kernels import paged_attention as ref
from vivace.kernels import triton_paged_attention as tpa

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 4e-3}


pytestmark = pytest.mark.usefixtures("poisoned_kernel_buffers")


def paged_cache(
    context_lens: list[int], block_size: int, num_heads: int, head_dim: int, dtype: torch.dtype, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NaN-filled cache whose blocks are shuffled among the sequences; owned positions hold random K/V."""
    needed = [-(-n // block_size) for n in context_lens]
    max_blocks = max(needed) + 1  # a spare column: the table is wider than any sequence needs
    num_blocks = sum(needed) + 3
    shape = (num_blocks, block_size, num_heads, head_dim)
    key_cache = torch.full(shape, float("nan"), dtype=dtype)
    value_cache = torch.full(shape, float("nan"), dtype=dtype)
    order = torch.randperm(num_blocks, generator=gen)
    # unused table entries point at arbitrary (possibly NaN) blocks; only the first ceil(len/bs) are owned
    block_tables = torch.randint(0, num_blocks, (len(context_lens), max_blocks), generator=gen, dtype=torch.int32)
    first = 0
    for s, (length, count) in enumerate(zip(context_lens, needed)):
        blocks = order[first:first + count]
        first += count
        block_tables[s, :count] = blocks.int()
        slots = (blocks.unsqueeze(1) * block_size + torch.arange(block_size)).reshape(-1)[:length]
        for cache in (key_cache, value_cache):
            rows = torch.randn(length, num_heads, head_dim, generator=gen)
            cache.view(-1, num_heads, head_dim)[slots] = rows.to(dtype)
    return key_cache.to(DEVICE), value_cache.to(DEVICE), block_tables.to(DEVICE)


def random_bias(num_heads: int, max_distance: int, gen: torch.Generator) -> torch.Tensor:
    # a transposed view, as T5 stores its table [distance, heads]
    return torch.randn(max_distance + 1, num_heads, generator=gen).to(DEVICE).t()


def fused_query(
    num_tokens: int, num_heads: int, head_dim: int, dtype: torch.dtype, gen: torch.Generator
) -> torch.Tensor:
    """A strided query view, as it comes out of a fused QKV projection."""
    qkv = torch.randn(num_tokens, 3 * num_heads * head_dim, generator=gen).to(DEVICE, dtype)
    return qkv[:, : num_heads * head_dim].view(num_tokens, num_heads, head_dim)


# (input dtype, cache dtype, tolerance): casts happen in the kernel. The interpreter truncates fp32 to bf16
# where GPUs round to nearest even, so that cast is only held to one bf16 ulp; everything else is exact.
STORE_CASES = [
    (torch.float32, torch.float32, 0.0),
    (torch.bfloat16, torch.bfloat16, 0.0),
    (torch.float16, torch.float16, 0.0),
    (torch.bfloat16, torch.float32, 0.0),
    (torch.float32, torch.bfloat16, 2.0 ** -7),
]


@pytest.mark.parametrize("dtype,cache_dtype,rtol", STORE_CASES)
def test_store_kv_matches_reference(dtype: torch.dtype, cache_dtype: torch.dtype, rtol: float) -> None:
    gen = torch.Generator().manual_seed(0)
    num_blocks, block_size, num_heads, head_dim = 6, 16, 3, 16
    qkv = torch.randn(40, 3, num_heads, head_dim, generator=gen).to(DEVICE, dtype)
    key, value = qkv[:, 1], qkv[:, 2]  # strided token dimension
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:40].to(DEVICE)
    shape = (num_blocks, block_size, num_heads, head_dim)
    caches = [torch.full(shape, float("nan"), dtype=cache_dtype, device=DEVICE) for _ in range(4)]
    ref.store_kv(key, value, caches[0], caches[1], slots)
    tpa.store_kv(key, value, caches[2], caches[3], slots)
    torch.testing.assert_close(caches[2], caches[0], rtol=rtol, atol=0, equal_nan=True)
    torch.testing.assert_close(caches[3], caches[1], rtol=rtol, atol=0, equal_nan=True)


def test_store_kv_skips_negative_slots() -> None:
    gen = torch.Generator().manual_seed(1)
    key = torch.randn(5, 2, 16, generator=gen).to(DEVICE)
    value = torch.randn(5, 2, 16, generator=gen).to(DEVICE)
    slots = torch.tensor([3, -1, 0, -1, 7], device=DEVICE)
    key_cache = torch.full((2, 4, 2, 16), float("nan"), device=DEVICE)
    value_cache = torch.full((2, 4, 2, 16), float("nan"), device=DEVICE)
    tpa.store_kv(key, value, key_cache, value_cache, slots)
    written = slots >= 0
    assert torch.equal(key_cache.view(8, 2, 16)[slots[written]], key[written])
    assert torch.equal(value_cache.view(8, 2, 16)[slots[written]], value[written])
    assert int((~torch.isnan(key_cache)).sum()) == 3 * 2 * 16


# (head_dim, block_size, num_seqs, max_context): every block size with each small head dim, batches 1..8; on a GPU
# also head dims 64 and 128 at every block size, batches up to 64, contexts up to 4096
DECODE_SHAPES = full_shapes(
    [(16, 1, 3, 200), (16, 16, 8, 200), (16, 32, 1, 200), (64, 1, 2, 200), (64, 16, 5, 200), (64, 32, 8, 200)],
    [(d, b, n, 4096) for d in (64, 128) for b in (1, 16, 32) for n in (1, 7, 64)],
)


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim,block_size,num_seqs,max_context", DECODE_SHAPES)
def test_decode_matches_reference(
    head_dim: int, block_size: int, num_seqs: int, max_context: int, dtype: torch.dtype, with_bias: bool
) -> None:
    gen = torch.Generator().manual_seed(head_dim * 100 + block_size * 10 + num_seqs)
    num_heads = 2
    context_lens = torch.randint(1, max_context, (num_seqs,), generator=gen).tolist()
    context_lens[0] = 1 if num_seqs > 1 else 161
    if num_seqs > 2:
        context_lens[1] = 4 * 32  # ends exactly on a block (and partition) boundary
    key_cache, value_cache, block_tables = paged_cache(context_lens, block_size, num_heads, head_dim, dtype, gen)
    lens = torch.tensor(context_lens, dtype=torch.int32, device=DEVICE)
    query = fused_query(num_seqs, num_heads, head_dim, dtype, gen)
    bias = random_bias(num_heads, 24, gen) if with_bias else None
    scale = head_dim ** -0.5

    out = tpa.paged_decode_attention(query, key_cache, value_cache, block_tables, lens, scale, bias)
    expected = ref.paged_decode_attention(
        query, key_cache.nan_to_num(0.0), value_cache.nan_to_num(0.0), block_tables, lens, scale, bias
    )
    assert out.dtype == dtype and out.shape == expected.shape
    assert not out.isnan().any()
    assert relative_error(out, expected) <= TOLERANCE[dtype]


def test_decode_of_an_empty_context_is_zero() -> None:
    """The device loop's padding rows have no context: their output must stay finite (it is never read)."""
    gen = torch.Generator().manual_seed(5)
    key_cache, value_cache, block_tables = paged_cache([9, 3], 16, 2, 16, torch.float32, gen)
    lens = torch.tensor([9, 0], dtype=torch.int32, device=DEVICE)
    query = torch.randn(2, 2, 16, generator=gen).to(DEVICE)
    out = tpa.paged_decode_attention(query, key_cache, value_cache, block_tables, lens, 0.25)
    expected = ref.paged_decode_attention(
        query[:1], key_cache.nan_to_num(0.0), value_cache.nan_to_num(0.0), block_tables[:1], lens[:1], 0.25
    )
    assert relative_error(out[:1], expected) <= 1e-4
    assert torch.equal(out[1], torch.zeros_like(out[1]))


def test_decode_splits_long_contexts_into_many_partitions() -> None:
    gen = torch.Generator().manual_seed(7)
    context_lens = [4500, 37]
    key_cache, value_cache, block_tables = paged_cache(context_lens, 32, 1, 16, torch.float32, gen)
    partition = tpa._partition_size(2, 1, block_tables.shape[1] * 32)
    assert -(-4500 // partition) > 64  # more partitions than one merge step takes
    lens = torch.tensor(context_lens, dtype=torch.int32, device=DEVICE)
    query = torch.randn(2, 1, 16, generator=gen).to(DEVICE)
    bias = random_bias(1, 128, gen)
    out = tpa.paged_decode_attention(query, key_cache, value_cache, block_tables, lens, 0.25, bias)
    expected = ref.paged_decode_attention(
        query, key_cache.nan_to_num(0.0), value_cache.nan_to_num(0.0), block_tables, lens, 0.25, bias
    )
    assert relative_error(out, expected) <= 1e-4


def test_decode_fp16_head_dim_128() -> None:
    gen = torch.Generator().manual_seed(11)
    context_lens = [70, 3, 129]
    key_cache, value_cache, block_tables = paged_cache(context_lens, 16, 2, 128, torch.float16, gen)
    lens = torch.tensor(context_lens, dtype=torch.int32, device=DEVICE)
    query = torch.randn(3, 2, 128, generator=gen).half().to(DEVICE)
    bias = random_bias(2, 32, gen)
    out = tpa.paged_decode_attention(query, key_cache, value_cache, block_tables, lens, 128 ** -0.5, bias)
    expected = ref.paged_decode_attention(
        query, key_cache.nan_to_num(0.0), value_cache.nan_to_num(0.0), block_tables, lens, 128 ** -0.5, bias
    )
    assert out.dtype == torch.float16
    assert relative_error(out, expected) <= TOLERANCE[torch.float16]


# (head_dim, block_size, num_seqs, max_context); on a GPU also head dims 64 and 128, batches up to 64
PREFILL_SHAPES = full_shapes(
    [(16, 1, 2, 150), (16, 16, 4, 150), (16, 32, 1, 150), (64, 1, 1, 150), (64, 16, 3, 150), (64, 32, 4, 150)],
    [(d, b, n, 1500) for d in (64, 128) for b in (1, 16, 32) for n in (1, 7, 64)],
)


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim,block_size,num_seqs,max_context", PREFILL_SHAPES)
def test_prefill_matches_reference(
    head_dim: int, block_size: int, num_seqs: int, max_context: int, dtype: torch.dtype, with_bias: bool
) -> None:
    gen = torch.Generator().manual_seed(head_dim * 100 + block_size * 10 + num_seqs + 1)
    num_heads = 2
    context_lens = torch.randint(1, max_context, (num_seqs,), generator=gen).tolist()
    # full prefill, chunked prefill after a cached prefix, a single new token, and no new tokens at all
    query_lens = [context_lens[0]] + [int(torch.randint(0, n + 1, (1,), generator=gen)) for n in context_lens[1:]]
    if num_seqs > 2:
        query_lens[1] = 0
        query_lens[2] = 1
    key_cache, value_cache, block_tables = paged_cache(context_lens, block_size, num_heads, head_dim, dtype, gen)
    starts = torch.tensor([0] + query_lens).cumsum(0).to(DEVICE, torch.int32)
    query = fused_query(int(starts[-1]), num_heads, head_dim, dtype, gen)
    lens = torch.tensor(context_lens, dtype=torch.int32, device=DEVICE)
    bias = random_bias(num_heads, 40, gen) if with_bias else None
    scale = head_dim ** -0.5

    out = tpa.paged_prefill_attention(query, key_cache, value_cache, block_tables, lens, starts, scale, bias)
    expected = ref.paged_prefill_attention(query, key_cache, value_cache, block_tables, lens, starts, scale, bias)
    assert out.dtype == dtype and out.shape == expected.shape
    assert not out.isnan().any()
    assert relative_error(out, expected) <= TOLERANCE[dtype]


def test_prefill_fp16_head_dim_128_long_chunks() -> None:
    gen = torch.Generator().manual_seed(13)
    context_lens = [150, 90]  # queries: the last 100 and 90 positions, several query tiles per sequence
    key_cache, value_cache, block_tables = paged_cache(context_lens, 16, 1, 128, torch.float16, gen)
    starts = torch.tensor([0, 100, 190], dtype=torch.int32, device=DEVICE)
    query = torch.randn(190, 1, 128, generator=gen).half().to(DEVICE)
    lens = torch.tensor(context_lens, dtype=torch.int32, device=DEVICE)
    bias = random_bias(1, 64, gen)
    out = tpa.paged_prefill_attention(query, key_cache, value_cache, block_tables, lens, starts, 128 ** -0.5, bias)
    expected = ref.paged_prefill_attention(query, key_cache, value_cache, block_tables, lens, starts, 128 ** -0.5, bias)
    assert relative_error(out, expected) <= TOLERANCE[torch.float16]


def test_dispatch_picks_triton_only_when_asked_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Routing only (nothing is launched), so it holds on a GPU machine too."""
    cpu = torch.zeros(1)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # use_triton sets it for CPU tensors; restored afterwards
    monkeypatch.delenv("VIVACE_TRITON_INTERPRET", raising=False)
    assert not dispatch.use_triton(cpu)  # TRITON_INTERPRET=1 alone leaves the engine on its CPU path
    assert dispatch.attention_ops(cpu) is cpu_paged_attention
    monkeypatch.setenv("VIVACE_TRITON_INTERPRET", "1")
    assert dispatch.use_triton(cpu)
    assert dispatch.attention_ops(cpu) is tpa


def test_dispatch_runs_the_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VIVACE_TRITON_INTERPRET", "1")
    gen = torch.Generator().manual_seed(17)
    key_cache, value_cache, block_tables = paged_cache([33, 5], 16, 2, 16, torch.float32, gen)
    lens = torch.tensor([33, 5], dtype=torch.int32, device=DEVICE)
    query = torch.randn(2, 2, 16, generator=gen).to(DEVICE)
    assert dispatch.attention_ops(query) is tpa
    out = dispatch.attention_ops(query).paged_decode_attention(query, key_cache, value_cache, block_tables, lens, 0.25)
    expected = ref.paged_decode_attention(
        query, key_cache.nan_to_num(0.0), value_cache.nan_to_num(0.0), block_tables, lens, 0.25
    )
    assert relative_error(out, expected) <= 1e-4
