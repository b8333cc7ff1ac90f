"""int8 KV caches (vivace.kernels.kv_int8): the format, the C++ writes and reads against the plain-torch reference, and
an engine of each family running on them with requests independent of one another.

Tolerances: the C++ decode reads the same int8 values and scales as the reference, which dequantizes them first; the
kernel applies a key's scale to its summed dot product and a value's to its weight instead, so only float32 rounding
order differs (1e-5, as for float32 caches in test_cpu_attention). Against float32 caches, every stored element is off
by at most half its row's step (max|row| / 254); for Gaussian rows of 64 that is about 0.6 % of the row's rms, and the
attention output over a few hundred keys stays within 2e-2 of float32's (relative to its largest magnitude).
"""
from pathlib import Path

import numpy as np
import pytest
import torch

from kernel_device import relative_error
from musicgen_checkpoints import converted_32khz_pack, one_thread  # noqa: F401 - autouse fixture
from test_cpu_attention import batch_lengths, forms, native, paged_case, reference
from vivace import Engine, VivaceError, WindowFinished, _C
from vivace.cli import main
from vivace.engine import check_kv_cache_dtype
from vivace.core.kv_cache import KVCachePool
from vivace.kernels import cpu_paged_attention as cpu
from vivace.kernels import paged_attention as ref
from vivace.kernels.kv_int8 import SCALE_BYTES, as_float, dequantize_rows, quantize_rows


def int8_case(seed: int, lengths: list[int], block_size: int, heads: int, head_dim: int):
    """paged_case's float32 caches and the same caches quantized (unused slots: bytes 0xff, a NaN scale)."""
    query, key_cache, value_cache, tables, lens = paged_case(seed, lengths, block_size, heads, head_dim)
    quantized = []
    for cache in (key_cache, value_cache):
        rows = quantize_rows(cache.nan_to_num(0.0))
        rows[cache.isnan().any(-1)] = -1
        quantized.append(rows)
    return (query, *quantized, tables, lens), (query, key_cache, value_cache, tables, lens)


def test_rows_keep_their_scale_and_round_to_nearest_even() -> None:
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -126.5, -3.0, 0.0, 1.0]])  # scale 1: ties go to even
    rows = quantize_rows(x)
    assert rows.dtype == torch.int8 and rows.shape == (1, 8 + SCALE_BYTES)
    assert rows[0, :8].tolist() == [127, 0, 2, 2, -126, -3, 0, 1]
    assert rows[0, 8:].view(torch.float32).item() == 1.0
    assert torch.equal(dequantize_rows(quantize_rows(torch.zeros(3, 16))), torch.zeros(3, 16))
    gaussian = torch.randn(500, 64, generator=torch.Generator().manual_seed(0)) * 5
    error = (dequantize_rows(quantize_rows(gaussian)) - gaussian).abs()
    step = gaussian.abs().amax(-1, keepdim=True) / 127
    assert bool((error <= step / 2 * (1 + 1e-6)).all())
    assert torch.equal(as_float(gaussian), gaussian)
    broken = dequantize_rows(quantize_rows(torch.tensor([[1.0, float("nan")], [float("inf"), 0.0], [1.0, 2.0]])))
    assert broken[:2].isnan().all() and torch.allclose(broken[2], torch.tensor([1.0, 2.0]), atol=1 / 127)


def test_native_store_equals_the_reference_bit_for_bit() -> None:
    """Keys and values split from a fused projection (strided views) land in their slots as quantize_rows writes
    them (zero rows, ties, huge values, NaN and infinite ones included); negative slots are skipped."""
    gen = torch.Generator().manual_seed(5)
    heads, head_dim, tokens = 4, 16, 6
    qkv = torch.randn(tokens, 3, heads, head_dim, generator=gen) * 10
    qkv[0, 1, 0] = 0.0
    qkv[1, 1, 1, :4] = torch.tensor([127.0, 0.5, 2.5, -1.5])
    qkv[2, 2, 3] *= 1e30
    qkv[3, 1, 2, 5] = float("nan")
    qkv[4, 2, 0, 0] = -float("inf")
    _, key, value = qkv.unbind(1)
    assert not key.is_contiguous()
    slots = torch.tensor([3, 17, -1, 0, 30, 9])
    caches = [torch.full((4, 8, heads, head_dim + SCALE_BYTES), 7, dtype=torch.int8) for _ in range(4)]
    cpu.store_kv(key, value, caches[0], caches[1], slots)
    written = slots >= 0
    ref.store_kv(key[written], value[written], caches[2], caches[3], slots[written])
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    assert int((caches[0] != 7).any(-1).any(-1).sum()) == int(written.sum())  # nothing but the written slots


@pytest.mark.parametrize("isa,head_dim", forms([24, 64]))
@pytest.mark.parametrize("block_size", [1, 16])
@pytest.mark.parametrize("bias_width", [0, 33])
def test_native_decode_reads_int8_caches(isa: str, head_dim: int, block_size: int, bias_width: int) -> None:
    seed = head_dim + block_size + bias_width
    int8_args, float_args = int8_case(seed, batch_lengths(5, block_size, seed), block_size, 4, head_dim)
    query, key_cache, value_cache, tables, lens = int8_args
    bias = torch.randn(4, bias_width, generator=torch.Generator().manual_seed(seed)) if bias_width else None
    out = native(query, key_cache, value_cache, tables, lens, bias, 0, isa, 0.3)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    if isa == _C.paged_attention_isas(head_dim)[0]:  # the one the engine's path runs
        assert torch.equal(out, cpu.paged_decode_attention(*int8_args, 0.3, bias))
    dequantized = (query, as_float(key_cache).nan_to_num(0.0), as_float(value_cache).nan_to_num(0.0), tables, lens)
    assert relative_error(out, ref.paged_decode_attention(*dequantized, 0.3, bias)) <= 1e-5
    assert relative_error(out, cpu.torch_decode_attention(*int8_args, 0.3, bias)) <= 1e-5
    assert relative_error(out, reference(*float_args, 0.3, bias)) <= 2e-2


def test_prefill_reads_int8_caches_as_their_values() -> None:
    (query, keys, values, tables, lens), _ = int8_case(9, [20, 45], 16, 4, 32)
    query = torch.randn(7, 4, 32)  # the last 3 and 4 positions of the two sequences
    starts = torch.tensor([0, 3, 7], dtype=torch.int32)
    out = ref.paged_prefill_attention(query, keys, values, tables, lens, starts, 0.2)
    dequantized = ref.paged_prefill_attention(query, as_float(keys), as_float(values), tables, lens, starts, 0.2)
    assert torch.isfinite(out).all() and torch.equal(out, dequantized)


def test_bad_int8_caches_are_refused_in_one_line() -> None:
    (query, keys, values, tables, lens), _ = int8_case(4, [1, 40], 16, 4, 16)
    short = (keys[..., :16].contiguous(), values[..., :16].contiguous())  # rows without their scale
    for bad, message in ((short, "must be [num_blocks, block_size >= 1, 4, 20] for query (2, 4, 16) (int8 rows)"),
                         ((keys.float(), values), "must have the same dtype")):
        with pytest.raises(ValueError) as error:
            native(query, *bad, tables, lens, None, 1)
        assert message in str(error.value) and "\n" not in str(error.value)


def test_pool_bytes_follow_the_rows() -> None:
    pool = KVCachePool(2, 3, 4, 4, 64, torch.int8, "cpu")
    assert pool.data.shape == (2, 2, 3, 4, 4, 64 + SCALE_BYTES)
    assert pool.bytes_per_token == 2 * 2 * 4 * (64 + SCALE_BYTES)
    assert KVCachePool(2, 3, 4, 4, 64, torch.float32, "cpu").bytes_per_token == 2 * 2 * 4 * 64 * 4


def window_tokens(events: list, row: int | None = None) -> dict:
    return {(e.stage, e.index): e.tokens for e in events
            if isinstance(e, WindowFinished) and (row is None or e.row == row)}


def test_musiclm_engine_with_int8_kv_caches(tiny_pack: Path) -> None:
    engine = Engine.from_pack(tiny_pack, kv_cache_dtype="int8")
    assert engine.info()["kv_cache_dtype"] == "int8"
    assert {runner.pool.data.dtype for runner in engine.core.runners.values()} == {torch.int8}
    small = {dtype: Engine.from_pack(tiny_pack, kv_cache_gb=0.001, kv_cache_dtype=dtype).info()["kv_blocks"]
             for dtype in ("float32", "int8")}
    for stage, blocks in small["float32"].items():  # where the budget binds: 64 / 20 as many (head_dim 16)
        assert 3.2 * blocks <= small["int8"][stage] < 3.2 * (blocks + 1), stage
    alone = list(engine.events("drums", 0.7, seed=4))
    batch = list(engine.events(["calm piano", "drums"], 0.7, seed=[3, 4]))
    assert window_tokens(batch, row=1) == window_tokens(alone)
    audio = engine.generate(["calm piano", "drums"], 0.7, seed=[3, 4])
    np.testing.assert_array_equal(audio[1], engine.generate("drums", 0.7, seed=4)[0])
    assert bool(np.isfinite(audio).all()) and float(np.abs(audio).max()) > 0
    assert all(runner.allocator.num_free == runner.pool.num_blocks for runner in engine.core.runners.values())


def test_musicgen_engine_with_int8_kv_caches(tmp_path: Path) -> None:
    """Guided pairs and cross-attention over int8 caches; a row's tokens do not depend on its batch."""
    pack = converted_32khz_pack(tmp_path, seed=6)
    engine = Engine.from_pack(pack, kv_cache_dtype="int8")
    options = {"guidance_scale": 3.0, "top_k": 20}
    alone = window_tokens(list(engine.events("rock", 0.3, seed=2, **options)))
    batch = window_tokens(list(engine.events(["jazz", "rock"], 0.3, seed=[1, 2], **options)), row=1)
    assert batch == alone and alone
    float32 = Engine.from_pack(pack)
    audio, reference_audio = engine.generate("rock", 0.3, seed=2, **options), float32.generate("rock", 0.3, seed=2, **options)
    assert audio.shape == reference_audio.shape and bool(np.isfinite(audio).all())


def test_cli_takes_int8_kv_caches(tiny_pack: Path, tmp_path: Path) -> None:
    out = tmp_path / "kv.wav"
    argv = ["generate", "--pack", str(tiny_pack), "drums", "--duration", "0.6", "-o", str(out), "--quiet"]
    assert main([*argv, "--kv-cache-dtype", "int8"]) == 0 and out.is_file()


def test_int8_caches_are_refused_off_the_cpu_in_one_line() -> None:
    with pytest.raises(VivaceError, match="kv_cache_dtype 'int8' differs from dtype 'float32': that runs on the CPU only"):
        check_kv_cache_dtype("int8", torch.float32, torch.device("cuda"))
    assert check_kv_cache_dtype("int8", torch.float32, torch.device("cpu")) == torch.int8
