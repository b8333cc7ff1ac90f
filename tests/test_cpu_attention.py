"""The CPU decode paths (the C++ kernel for float32, torch's for the rest) against the plain-torch reference."""
import pytest
import torch

from kernel_device import relative_error
from vivace import _C
from vivace.kernels import cpu_paged_attention as cpu
from vivace.kernels import paged_attention as ref
from vivace.kernels.kv_int8 import quantize_rows

# float32: both paths sum the same products in float32 in different orders (~1e-7). bfloat16 caches: both
# upcast the same stored values, so only that order and the final rounding to bfloat16 (2**-8) differ.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def paged_case(seed: int, lengths: list[int], block_size: int, heads: int, head_dim: int, dtype=torch.float32):
    """query, key_cache, value_cache, block_tables, context_lens: blocks in random order, every unused slot NaN."""
    gen = torch.Generator().manual_seed(seed)
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
    return query, key_cache, value_cache, tables, torch.tensor(lengths, dtype=torch.int32)


def reference(query, key_cache, value_cache, tables, lens, scale, bias) -> torch.Tensor:
    # the reference zeroes unused value slots but computes scores on them, so it gets NaN-free caches
    return ref.paged_decode_attention(query, key_cache.nan_to_num(0.0), value_cache.nan_to_num(0.0), tables, lens, scale, bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", [1, 16, 32])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("padded_limit", [0, 1 << 40])  # every batch per sequence / every batch padded
def test_torch_path_matches_reference(monkeypatch, dtype, block_size, with_bias, padded_limit) -> None:
    monkeypatch.setattr(cpu, "PADDED_GATHER_LIMIT", padded_limit)
    args = paged_case(block_size + 7 * with_bias, [1, 37, block_size, 90, 5], block_size, 4, 16, dtype)
    bias = torch.randn(4, 33, generator=torch.Generator().manual_seed(block_size)) if with_bias else None
    out = cpu.torch_decode_attention(*args, 0.3, bias)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert relative_error(out, reference(*args, 0.3, bias)) <= TOLERANCE[dtype]


def test_half_precision_takes_the_torch_path() -> None:
    args = paged_case(3, [1, 40, 17], 16, 4, 16, torch.bfloat16)
    assert torch.equal(cpu.paged_decode_attention(*args, 0.3), cpu.torch_decode_attention(*args, 0.3))


def batch_lengths(batch: int, block_size: int, seed: int) -> list[int]:
    """Ragged lengths with a context of 1 and one of exactly four blocks."""
    if batch == 1:
        return [4 * block_size]
    rest = torch.randint(1, 300, (batch - 2,), generator=torch.Generator().manual_seed(seed)).tolist()
    return [1, 4 * block_size, *rest]


# The kernel's logits match the reference's float32 dot products to ~sqrt(head_dim) * 2**-24 of |q||k|, its exp
# is within 1 ulp and it sums weights and weighted values in float64 (per block in float32); the reference sums
# in float32 over up to 300 keys. Both land ~1e-6 of the largest output apart; 1e-5 leaves room for the order.
# Every form of the kernel this CPU runs: the AVX-512 one (64 and 128 here) and the portable one (every head_dim).
def forms(head_dims: list[int]) -> list[tuple[str, int]]:
    """(isa, head_dim) for every form of the kernel this CPU runs at each head_dim (AVX-512: 32, 64, 128)."""
    return [(isa, head_dim) for head_dim in head_dims for isa in _C.paged_attention_isas(head_dim)]


@pytest.mark.parametrize("isa,head_dim", forms([24, 64, 128]))  # 24: sixteen lanes and a tail
@pytest.mark.parametrize("block_size", [1, 16, 32])
@pytest.mark.parametrize("batch", [1, 3, 17])
@pytest.mark.parametrize("bias_width", [0, 33])  # 33: saturates beyond distance 32
def test_native_decode_matches_reference(isa, head_dim, block_size, batch, bias_width) -> None:
    seed = head_dim + block_size + batch + bias_width
    args = paged_case(seed, batch_lengths(batch, block_size, seed), block_size, 4, head_dim)
    bias = torch.randn(4, bias_width, generator=torch.Generator().manual_seed(seed)) * 2 if bias_width else None
    out = native(*args, bias, 0, isa=isa, scale=head_dim**-0.5 * 2)
    assert out.dtype == torch.float32 and out.shape == args[0].shape and torch.isfinite(out).all()
    assert relative_error(out, reference(*args, head_dim**-0.5 * 2, bias)) <= 1e-5


def test_auto_takes_the_fastest_isa() -> None:
    args = paged_case(2, [1, 40, 300], 16, 4, 64)
    fastest = _C.paged_attention_isas(64)[0]
    assert torch.equal(native(*args, None, 1), native(*args, None, 1, isa=fastest))
    assert _C.paged_attention_isas(24) == ["portable"]


def test_avx512_is_refused_where_it_cannot_run() -> None:
    args = paged_case(2, [1, 40], 16, 4, 24)
    with pytest.raises(ValueError, match="head_dim 32, 64 or 128"):
        native(*args, None, 1, isa="avx512")
    with pytest.raises(ValueError, match='isa must be "auto", "avx512" or "portable"'):
        native(*args, None, 1, isa="avx2")


def native(query, key_cache, value_cache, tables, lens, bias, threads: int, isa="auto", scale=0.125) -> torch.Tensor:
    arrays = (t.numpy() for t in (query, key_cache, value_cache, tables, lens))
    bias = None if bias is None else bias.numpy()
    return torch.from_numpy(_C.paged_decode_attention(*arrays, scale, bias, threads, isa))


@pytest.mark.parametrize("isa", _C.paged_attention_isas(64))
def test_native_rows_do_not_depend_on_batch_or_threads(isa) -> None:
    # long enough (2 * 6 * ~700 * 4 * 64 floats) that 2 and 4 threads are really used, split by heads
    query, key_cache, value_cache, tables, lens = paged_case(5, [700, 1, 650, 800, 33, 720], 16, 4, 64)
    bias = torch.randn(4, 129)
    single = native(query, key_cache, value_cache, tables, lens, bias, 1, isa)
    for threads in (2, 4):
        assert torch.equal(native(query, key_cache, value_cache, tables, lens, bias, threads, isa), single)
    for s in range(len(lens)):
        alone = native(query[s : s + 1], key_cache, value_cache, tables[s : s + 1], lens[s : s + 1], bias, 1, isa)
        assert torch.equal(alone[0], single[s])
    order = torch.tensor([3, 0, 5, 1, 4, 2])
    shuffled = native(query[order], key_cache, value_cache, tables[order], lens[order], bias, 2, isa)
    assert torch.equal(shuffled, single[order])


@pytest.mark.parametrize("change, message", [
    (lambda a: a.update(lens=torch.tensor([0, 40, 17], dtype=torch.int32)), "context_lens\\[0\\] = 0"),
    (lambda a: a.update(lens=torch.tensor([1, 49, 17], dtype=torch.int32)), "context_lens\\[1\\] = 49"),
    (lambda a: a["tables"].__setitem__((2, 1), 99), "block_tables\\[2, 1\\] = 99"),
    (lambda a: a.update(key_cache=a["key_cache"].transpose(0, 1).contiguous().transpose(0, 1)), "C-contiguous"),
    (lambda a: a.update(value_cache=a["value_cache"][:, :8].contiguous()), "same shape"),
])
def test_native_rejects_bad_inputs(change, message) -> None:
    args = dict(zip(["query", "key_cache", "value_cache", "tables", "lens"], paged_case(4, [1, 40, 17], 16, 4, 16)))
    change(args)
    with pytest.raises(ValueError, match=message):
        cpu.paged_decode_attention(*args.values(), 0.3)


# -- KV cache writes (vivace._C.store_kv behind cpu_paged_attention.store_kv) ---------------------------------------
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
def test_native_store_equals_the_reference_bit_for_bit(cache_dtype) -> None:
    """Keys and values split from a fused projection (strided views) land in their slots as the reference writes
    them: float32 copied, bfloat16 rounded to nearest even as torch converts (NaN, infinities, overflow to inf,
    subnormals and ties included); negative slots are skipped."""
    gen = torch.Generator().manual_seed(5)
    heads, head_dim, tokens = 4, 16, 6
    qkv = torch.randn(tokens, 3, heads, head_dim, generator=gen) * 10
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), 3.4e38, 1e-40, -1e-42, 1.00390625, 1.01171875])
    qkv[0, 1, 0, :8] = specials  # 1 + 2**-8 and 1 + 3 * 2**-8: ties, to even down and up
    _, key, value = qkv.unbind(1)
    assert not key.is_contiguous()
    slots = torch.tensor([3, 17, -1, 0, 30, 9])
    caches = [torch.full((4, 8, heads, head_dim), 7.0, dtype=cache_dtype) for _ in range(4)]
    cpu.store_kv(key, value, caches[0], caches[1], slots)
    written = slots >= 0
    ref.store_kv(key[written], value[written], caches[2], caches[3], slots[written])
    for ours, theirs in ((caches[0], caches[2]), (caches[1], caches[3])):
        assert torch.equal(ours.view(torch.int16 if cache_dtype == torch.bfloat16 else torch.int32),
                           theirs.view(torch.int16 if cache_dtype == torch.bfloat16 else torch.int32))


@pytest.mark.parametrize("change,message", [
    ({"slots": torch.tensor([0, 32])}, "slot_mapping holds slot 32, past the 32-slot cache"),
    ({"key": torch.randn(2, 3, 16)}, "key (2, 3, 16) must be [2, 4, 16] (tokens, the cache's heads and head_dim)"),
    ({"value": torch.randn(2, 4, 16).double()}, "value must have dtype float32, got float64"),
    ({"value_cache": torch.zeros(4, 8, 4, 8)}, "must have one shape"),
    ({"key": torch.randn(2, 4, 32)[:, :, ::2]}, "key must have contiguous rows of head_dim values"),
])
def test_native_store_refuses_bad_inputs_in_one_line(change, message) -> None:
    args = {"key": torch.randn(2, 4, 16), "value": torch.randn(2, 4, 16), "key_cache": torch.zeros(4, 8, 4, 16),
            "value_cache": torch.zeros(4, 8, 4, 16), "slots": torch.tensor([0, 5])}
    args.update(change)
    before = args["key_cache"].clone()
    with pytest.raises(ValueError) as error:
        _C.store_kv(*args.values())
    assert message in str(error.value) and "\n" not in str(error.value)
    assert torch.equal(args["key_cache"], before)  # checked before anything is written


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("block_size", [1, 16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_prefill_matches_reference(cache_dtype, block_size, with_bias) -> None:
    """Prefill through the native kernel (one query row per new token) against the reference, on sequences whose
    new tokens are all of their context, part of it (a chunked prefill or a cached prefix) or none; and each token's
    row equal to a decode step at its position."""
    lengths, new = [37, 90, 5, 16], [37, 20, 1, 0]
    _, keys, values, tables, lens = paged_case(block_size + with_bias, lengths, block_size, 4, 64)
    if cache_dtype == torch.int8:
        keys, values = (quantize_rows(c.nan_to_num(0.0)) for c in (keys, values))
    else:
        keys, values = keys.to(cache_dtype), values.to(cache_dtype)
    query = torch.randn(sum(new), 4, 64, generator=torch.Generator().manual_seed(9))
    starts = torch.tensor([0, *torch.tensor(new).cumsum(0).tolist()], dtype=torch.int32)
    bias = torch.randn(4, 33, generator=torch.Generator().manual_seed(2)) if with_bias else None
    out = cpu.paged_prefill_attention(query, keys, values, tables, lens, starts, 0.125, bias)
    clean = (keys, values) if cache_dtype == torch.int8 else (keys.nan_to_num(0.0), values.nan_to_num(0.0))
    expected = ref.paged_prefill_attention(query, *clean, tables, lens, starts, 0.125, bias)
    assert relative_error(out, expected) <= 1e-5
    token = int(starts[1]) + 5  # the second sequence's sixth new token, at position 90 - 20 + 5
    step = cpu.paged_decode_attention(query[token : token + 1], keys, values, tables[1:2],
                                      torch.tensor([76], dtype=torch.int32), 0.125, bias)
    assert torch.equal(out[token], step[0])
