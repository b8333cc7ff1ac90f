"""bfloat16 KV caches under a float32 engine: the C++ kernel reads them in place, and requests stay independent
(int8 caches: test_kv_int8, and the batch and thread independence below)."""
from pathlib import Path

import numpy as np
import pytest
import torch

from kernel_device import relative_error
from test_cpu_attention import batch_lengths, forms, native, paged_case, reference
from test_kv_int8 import int8_case
from vivace import Engine, VivaceError, WindowFinished, _C
from vivace.cli import main
from vivace.engine import check_kv_cache_dtype
from vivace.kernels import cpu_paged_attention as cpu


def bfloat16_caches(args: tuple) -> tuple:
    query, key_cache, value_cache, tables, lens = args
    return query, key_cache.bfloat16(), value_cache.bfloat16(), tables, lens


# The kernel widens each stored bfloat16 exactly, so against the reference on the widened caches only its float32
# summation order differs, as for float32 caches (test_cpu_attention: 1e-5).
@pytest.mark.parametrize("isa,head_dim", forms([24, 64]))
@pytest.mark.parametrize("block_size", [1, 16])
@pytest.mark.parametrize("bias_width", [0, 33])
def test_native_decode_reads_bfloat16_caches(isa: str, head_dim: int, block_size: int, bias_width: int) -> None:
    seed = head_dim + block_size + bias_width
    query, key_cache, value_cache, tables, lens = bfloat16_caches(
        paged_case(seed, batch_lengths(5, block_size, seed), block_size, 4, head_dim)
    )
    bias = torch.randn(4, bias_width, generator=torch.Generator().manual_seed(seed)) if bias_width else None
    out = native(query, key_cache.view(torch.int16), value_cache.view(torch.int16), tables, lens, bias, 0, isa, 0.3)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    if isa == _C.paged_attention_isas(head_dim)[0]:  # the one the engine's path runs
        assert torch.equal(out, cpu.paged_decode_attention(query, key_cache, value_cache, tables, lens, 0.3, bias))
    assert relative_error(out, reference(query, key_cache.float(), value_cache.float(), tables, lens, 0.3, bias)) <= 1e-5
    torch_path = cpu.torch_decode_attention(query, key_cache, value_cache, tables, lens, 0.3, bias)
    assert relative_error(out, torch_path) <= 1e-5


@pytest.mark.parametrize("isa", _C.paged_attention_isas(64))
@pytest.mark.parametrize("cache_dtype", ["bfloat16", "int8"])
def test_reduced_cache_rows_do_not_depend_on_batch_or_threads(isa: str, cache_dtype: str) -> None:
    if cache_dtype == "int8":
        (query, keys, values, tables, lens), _ = int8_case(5, [700, 1, 650, 800, 33], 16, 4, 64)
    else:
        query, key_cache, value_cache, tables, lens = bfloat16_caches(paged_case(5, [700, 1, 650, 800, 33], 16, 4, 64))
        keys, values = key_cache.view(torch.int16), value_cache.view(torch.int16)
    bias = torch.randn(4, 129)
    single = native(query, keys, values, tables, lens, bias, 1, isa)
    assert torch.equal(native(query, keys, values, tables, lens, bias, 2, isa), single)
    for s in range(len(lens)):
        alone = native(query[s : s + 1], keys, values, tables[s : s + 1], lens[s : s + 1], bias, 1, isa)
        assert torch.equal(alone[0], single[s])


def test_mixed_cache_dtypes_are_refused_in_one_line() -> None:
    query, key_cache, value_cache, tables, lens = paged_case(4, [1, 40], 16, 4, 16)
    with pytest.raises(ValueError) as error:
        native(query, key_cache, value_cache.bfloat16().view(torch.int16), tables, lens, torch.randn(4, 9), 1)
    assert "key_cache and value_cache must have the same dtype" in str(error.value) and "\n" not in str(error.value)


def tokens(events: list) -> dict:
    return {(e.stage, e.index): e.tokens for e in events if isinstance(e, WindowFinished)}


def test_engine_with_bfloat16_kv_caches(tiny_pack: Path) -> None:
    engine = Engine.from_pack(tiny_pack, kv_cache_dtype="bfloat16")
    assert engine.info()["kv_cache_dtype"] == "bfloat16" and engine.info()["dtype"] == "float32"
    assert {runner.pool.data.dtype for runner in engine.core.runners.values()} == {torch.bfloat16}
    # where the budget binds (below the pools' cap of 64 longest sequences), it holds twice the blocks
    small = {dtype: Engine.from_pack(tiny_pack, kv_cache_gb=0.002, kv_cache_dtype=dtype).info()["kv_blocks"]
             for dtype in ("float32", "bfloat16")}
    assert small["bfloat16"] == {stage: 2 * blocks for stage, blocks in small["float32"].items()}
    alone = list(engine.events("drums", 0.7, seed=4))
    batch = list(engine.events(["calm piano", "drums"], 0.7, seed=[3, 4]))
    assert tokens([e for e in batch if isinstance(e, WindowFinished) and e.row == 1]) == tokens(alone)
    audio = engine.generate(["calm piano", "drums"], 0.7, seed=[3, 4])
    np.testing.assert_array_equal(audio[1], engine.generate("drums", 0.7, seed=4)[0])
    assert bool(np.isfinite(audio).all()) and float(np.abs(audio).max()) > 0


def test_kv_cache_dtype_is_checked_before_loading(tiny_pack: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(VivaceError, match="unknown kv_cache_dtype 'int4'"):
        Engine.from_pack(tiny_pack, kv_cache_dtype="int4")
    with pytest.raises(VivaceError, match="runs on the CPU only"):
        check_kv_cache_dtype("bfloat16", torch.float32, torch.device("cuda"))
    assert check_kv_cache_dtype("auto", torch.bfloat16, torch.device("cuda")) == torch.bfloat16
    out = tmp_path / "kv.wav"
    argv = ["generate", "--pack", str(tiny_pack), "drums", "--duration", "0.6", "-o", str(out), "--quiet"]
    assert main([*argv, "--kv-cache-dtype", "bfloat16"]) == 0 and out.is_file()
    bad = tmp_path / "bad.wav"
    assert main([*argv[:-3], "-o", str(bad), "--quiet", "--kv-cache-dtype", "int4"]) == 2
    err = capsys.readouterr().err
    assert "--kv-cache-dtype 'int4'" in err and len(err.strip().splitlines()) == 1 and not bad.exists()
