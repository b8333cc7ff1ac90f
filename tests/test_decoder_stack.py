"""The native decoder stack (vivace._C.DecoderStack) against the stage transformer's Python layers.

Both run the same int8 kernels, KV writes and paged attention; the stack's norms sum in float64 and its
cross-attention in its own order, so its hidden states differ from the Python layers' by float32 rounding (seen: at
most 2.8e-7 of the largest logit), and where that rounding moves an activation across a uint8 quantization step
(range / 255, about 0.03 for a normed row), by that step times a weight: about 1e-3 of the logits, rare and legitimate.
So every row stays within FLIP_BOUND and the median row within ROUNDING_BOUND; an indexing, masking or cache error
is O(1), a wrong norm constant far above 1e-5. Within the stack, rows are independent: the same row gives the same
bits alone, in any batch, on any thread count. The stack's float32 linear (vivace._C.float32_linear) is checked
against a float64 product here too.
"""
from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
import torch
from kernel_device import relative_error
from musicgen_checkpoints import one_thread  # noqa: F401 - autouse fixture: tiny models, one thread
from stage_models import PagedDriver, make_model

from vivace import Engine, VivaceError, _C
from vivace.kernels.kv_int8 import as_float
from vivace.model.decoder_stack import NativeDecoderStack, _linear, _norm, unsupported, use_native_stacks
from vivace.model.int4 import int4_supported
from vivace.model.quant import choose_kernels, native_kernels, quantize_stage
from vivace.model.transformer import AttentionBatch, CrossBatch, StageTransformer

pytestmark = pytest.mark.skipif(not native_kernels(), reason="vivace's int8 kernels need AVX2, AVX-512 VNNI or AMX")

# max |difference| / max |logit| (kernel_device.relative_error)
ROUNDING_BOUND = 1e-5
FLIP_BOUND = 1e-2


def int8_model(position: str, cross: bool, seed: int = 0, mode: str = "int8") -> StageTransformer:
    model = make_model(position, cross=cross, seed=seed)
    quantize_stage(model, mode)
    choose_kernels([model], native_kernels()[0])
    return model


def stage_model(weights: str, position: str, cross: bool, seed: int = 0) -> StageTransformer:
    if weights == "float32":
        return make_model(position, cross=cross, seed=seed)
    return int8_model(position, cross, seed, mode=weights)


# float32 and bfloat16-weight layers run natively only where float32_linear has its AVX-512 form (elsewhere F.linear
# is faster); int4 layers (int8 heads) where the CPU has AVX-512 VNNI or AVX2
WEIGHTS = ["int8", pytest.param("float32", marks=pytest.mark.skipif(
    not _C.float32_linear_fast(), reason="the native float32 linear's fast form needs AVX-512")),
    pytest.param("int4", marks=pytest.mark.skipif(not int4_supported(), reason="the int4 kernel needs AVX-512 VNNI or AVX2")),
    pytest.param("bfloat16", marks=pytest.mark.skipif(
        not _C.float32_linear_fast(), reason="the bfloat16-weight kernel needs AVX-512"))]


def cross_batch(model: StageTransformer, rows: list[int], tokens: list[int] | None = None) -> CrossBatch:
    """Encoder states for three sequences of different lengths (the third: every position masked, as guidance's
    null condition), padded to one length as the model runner pads them; row i's tokens[i] tokens (default one)
    attend to sequence rows[i] % 3."""
    generator = torch.Generator().manual_seed(7)
    encoder = torch.randn(3, 7, model.config.cross_dim, generator=generator)
    enc_mask = torch.arange(7).unsqueeze(0) < torch.tensor([5, 7, 0]).unsqueeze(1)
    keys, values = model.encode_cross(encoder)
    token_seq = torch.tensor([row % 3 for row in rows]).repeat_interleave(torch.tensor(tokens or [1] * len(rows)))
    return CrossBatch(keys, values, enc_mask, token_seq)


@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("position,cross", [("t5_relative", False), ("learned", False), ("sinusoidal", True)])
@torch.inference_mode()
def test_native_stack_tracks_the_python_layers(position: str, cross: bool, cache_dtype: torch.dtype, weights: str) -> None:
    """float32 layers have no activation steps to cross: every row within ROUNDING_BOUND."""
    rng = random.Random(3)
    model = stage_model(weights, position, cross)
    stack = NativeDecoderStack(model)
    lengths = [rng.randint(2, 40) for _ in range(5)]
    seqs = {i: torch.randint(0, 40, (n + 12, model.config.num_codebooks)) for i, n in enumerate(lengths)}
    drivers = {name: PagedDriver(model, 4, 128, cache_dtype) for name in ("python", "native")}
    crosses = cross_batch(model, list(seqs), lengths) if cross else None
    for driver in drivers.values():  # prompts through the Python prefill, in the same pieces
        driver.run([(i, seqs[i], n) for i, n in enumerate(lengths)], crosses)
    for step in range(12):
        live = [i for i in seqs if not (step > 6 and i % 2)]  # rows leave the batch half way
        crosses = cross_batch(model, live) if cross else None
        pieces = [(i, seqs[i], 1) for i in live]
        model.native_decoder = None
        reference = drivers["python"].run(pieces, crosses)
        model.native_decoder = stack
        native = drivers["native"].run(pieces, crosses)
        errors = [relative_error(native[row], reference[row]) for row in range(len(live))]
        assert max(errors) <= (ROUNDING_BOUND if weights in ("float32", "bfloat16") else FLIP_BOUND)
        assert sorted(errors)[len(errors) // 2] <= ROUNDING_BOUND
    python_pool, native_pool = as_float(drivers["python"].pool.data), as_float(drivers["native"].pool.data)
    written = ~python_pool.isnan()
    assert torch.equal(written, ~native_pool.isnan()), "the stack must write exactly the slots the Python layers write"
    assert relative_error(native_pool[written], python_pool[written]) <= FLIP_BOUND


@torch.inference_mode()
@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("position,cross", [("t5_relative", False), ("sinusoidal", True)])
@pytest.mark.parametrize("row_slices", [True, False])
def test_native_rows_do_not_depend_on_the_batch_or_the_threads(position: str, cross: bool, weights: str, row_slices: bool) -> None:
    model = stage_model(weights, position, cross, seed=2)
    stack = NativeDecoderStack(model, row_slices)
    assert stack.stack.row_slices == row_slices
    driver = PagedDriver(model, 4, 64)
    lengths = [9, 23, 4, 15]
    seqs = {i: torch.randint(0, 40, (n + 1, model.config.num_codebooks)) for i, n in enumerate(lengths)}
    prompts = [n + 1 for n in lengths]  # the decoded rows below rewrite each prompt's last slot
    driver.run([(i, seqs[i], n) for i, n in enumerate(prompts)], cross_batch(model, list(seqs), prompts) if cross else None)
    hidden = torch.randn(4, model.config.d_model, generator=torch.Generator().manual_seed(1))
    tables = [driver.tables[i] + [0] * (6 - len(driver.tables[i])) for i in seqs]

    def decode(rows: list[int], threads: int) -> torch.Tensor:
        # each row's last slot, rewritten with the same key and value on every call
        slots = [driver.tables[i][n // 4] * 4 + n % 4 for i, n in zip(rows, [lengths[i] for i in rows])]
        batch = AttentionBatch(
            slot_mapping=torch.tensor(slots), block_tables=torch.tensor([tables[i] for i in rows], dtype=torch.int32),
            context_lens=torch.tensor([lengths[i] + 1 for i in rows], dtype=torch.int32),
            query_start_loc=torch.arange(len(rows) + 1, dtype=torch.int32), is_decode=True,
            cross=cross_batch(model, rows) if cross else None,
        )
        torch.set_num_threads(threads)
        return stack(hidden[rows], driver.pool.layers(), batch, model.distance_bias)

    together = decode([0, 1, 2, 3], 1)
    for threads in (2, 3, 4):  # the rows split into as many slices, of unequal lengths
        assert torch.equal(decode([0, 1, 2, 3], threads), together)
    for i in range(4):
        assert torch.equal(decode([i], 1)[0], together[i])
    assert torch.equal(decode([3, 1], 2), together[[3, 1]])


@torch.inference_mode()
def test_bad_step_inputs_are_refused_in_one_line() -> None:
    model = int8_model("t5_relative", False)
    stack = NativeDecoderStack(model).stack
    driver = PagedDriver(model, 4, 8)
    caches = driver.pool.layers()
    keys, values = [k.numpy() for k, _ in caches], [v.numpy() for _, v in caches]
    hidden = torch.zeros(1, model.config.d_model).numpy()
    slots, tables, lens = torch.tensor([0]).numpy(), torch.zeros(1, 2, dtype=torch.int32).numpy(), torch.tensor([1], dtype=torch.int32).numpy()
    cases = {
        "one cache per layer": dict(key_caches=keys[:1], value_caches=values[:1]),
        "outside [1, 8]": dict(context_lens=torch.tensor([9], dtype=torch.int32).numpy()),
        "past the 32-slot cache": dict(slot_mapping=torch.tensor([32]).numpy()),
        "d_model = 32": dict(hidden=torch.zeros(1, 16).numpy()),
        "no cross-attention": dict(cross_keys=keys, cross_values=values),
    }
    for expected, change in cases.items():
        args = dict(hidden=hidden, key_caches=keys, value_caches=values, slot_mapping=slots, block_tables=tables,
                    context_lens=lens, scale=1.0) | change
        with pytest.raises(ValueError, match=re.escape(expected)) as error:
            stack.decode(**args)
        assert "\n" not in str(error.value)


def test_only_stages_whose_layers_run_native_kernels_get_a_stack() -> None:
    float_model = make_model("learned")
    assert (unsupported(float_model) is None) == _C.float32_linear_fast()
    pack_mm = make_model("learned")
    quantize_stage(pack_mm)
    choose_kernels([pack_mm], "pack_mm")
    assert "neither int8 or int4 on vivace's kernels" in unsupported(pack_mm)
    fast = _C.float32_linear_fast()
    assert use_native_stacks([float_model, pack_mm, int8_model("learned", False)]) == [fast, False, True]
    native = int8_model("learned", False)
    use_native_stacks([native])
    native.to(torch.float32)  # a move may replace the weights the stack reads: it is dropped
    assert native.native_decoder is None


@torch.inference_mode()
def test_native_heads_are_the_python_heads_bit_for_bit() -> None:
    """int8 heads run the same kernel on the same inputs in one call: logits identical for any batch; float32 heads
    stay F.linear's (no native_heads), and a model move drops them with the stack."""
    model = int8_model("sinusoidal", True)  # two output heads
    model.heads[1].amx_from_rows = 3 if "amx" in native_kernels() else None  # the row switch as choose_kernels sets it
    use_native_stacks([model])
    assert model.native_heads is not None and model.native_decoder.stack.num_output_heads == 2
    hidden = torch.randn(7, model.config.d_model, generator=torch.Generator().manual_seed(5))
    python = torch.stack([head(hidden) for head in model.heads], dim=1)
    for rows in (slice(0, 1), slice(0, 2), slice(0, 7), slice(3, 5)):
        assert torch.equal(model.compute_logits(hidden[rows]), python[rows])
    wide = hidden.double()  # not float32: the Python heads
    assert torch.equal(model.compute_logits(wide), torch.stack([head(wide) for head in model.heads], dim=1))
    float_model = make_model("learned")
    use_native_stacks([float_model])
    assert float_model.native_heads is None
    model.to(torch.float32)
    assert model.native_heads is None and model.native_decoder is None


def test_bad_output_heads_and_logits_calls_are_refused_in_one_line() -> None:
    model = int8_model("learned", False)
    layers = [{"attn_norm": _norm(layer.attn_norm), "ffn_norm": _norm(layer.ffn_norm), "qkv": _linear(layer.attn.qkv_proj),
               "o": _linear(layer.attn.o_proj), "fc1": _linear(layer.ffn.fc1, "gelu"), "fc2": _linear(layer.ffn.fc2)}
              for layer in model.layers]
    weight, scales, sums, bias, isa, packed = model.heads[0].native_args()
    cases = {
        "must read d_model = 32": [(weight[:, :16].copy(), scales, sums, bias, isa, None, 0, "none")],
        "apply no activation": [(weight, scales, sums, bias, isa, packed, 0, "gelu")],
        "got 'int4' with 3 fields": [("int4", weight, bias)],
        "output_heads[0].packed (1, 1, 2176) must be int4_pack of a [70, 32] weight": [
            ("int4", torch.zeros(1, 1, 2176, dtype=torch.uint8).numpy(), None, 32, 70, "none")],
    }
    for expected, heads in cases.items():
        with pytest.raises(ValueError, match=re.escape(expected)) as error:
            _C.DecoderStack(layers, None, model.config.num_heads, model.config.head_dim, heads)
        assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="without output_heads"):
        _C.DecoderStack(layers, None, model.config.num_heads, model.config.head_dim).logits(torch.zeros(1, 32).numpy())
    with pytest.raises(ValueError, match=re.escape("d_model = 32")):
        NativeDecoderStack(model).stack.logits(torch.zeros(1, 16).numpy())


def test_engine_reports_and_switches_native_layers(tiny_pack: Path) -> None:
    assert set(Engine.from_pack(tiny_pack, quantize="int8").info()["native_layers"].values()) == {True}
    assert set(Engine.from_pack(tiny_pack, quantize="int8", native_layers=False).info()["native_layers"].values()) == {False}
    assert set(Engine.from_pack(tiny_pack).info()["native_layers"].values()) == {_C.float32_linear_fast()}
    assert set(Engine.from_pack(tiny_pack, dtype="bfloat16").info()["native_layers"].values()) == {False}
    with pytest.raises(VivaceError, match="native_layers"):
        Engine.from_pack(tiny_pack, quantize="int8", native_layers="yes")


@pytest.mark.parametrize("rows,in_features,out_features,bias", [(1, 1024, 4096, False), (2, 4096, 1024, True),
                                                                 (7, 37, 13, True), (16, 64, 96, False)])
def test_float32_linear_is_a_float32_product_and_the_same_bits_for_any_batch(
    rows: int, in_features: int, out_features: int, bias: bool,
) -> None:
    """Within 1e-6 of the float64 product, relative to its largest output (seen 2.5e-7; F.linear 3.7e-7): float32
    sums over up to 4096 products."""
    generator = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, in_features, generator=generator)
    weight = torch.randn(out_features, in_features, generator=generator)
    b = torch.randn(out_features, generator=generator) if bias else None
    out = torch.from_numpy(_C.float32_linear(x.numpy(), weight.numpy(), None if b is None else b.numpy(), 2))
    reference = x.double() @ weight.double().T + (0 if b is None else b.double())
    assert relative_error(out, reference) <= 1e-6
    for r in range(rows):
        alone = _C.float32_linear(x[r:r + 1].numpy(), weight.numpy(), None if b is None else b.numpy(), 1)
        assert torch.equal(torch.from_numpy(alone)[0], out[r])
    # the portable form (CPUs without AVX-512) sums in the same order: the same bits on every x86 machine
    portable = _C.float32_linear(x.numpy(), weight.numpy(), None if b is None else b.numpy(), 2, portable=True)
    assert torch.equal(torch.from_numpy(portable), out)


def test_float32_linear_refuses_bad_arguments_in_one_line() -> None:
    x, weight = torch.zeros(2, 8).numpy(), torch.zeros(4, 8).numpy()
    cases = {
        "weight (4, 6) must have 8 columns": dict(weight=torch.zeros(4, 6).numpy()),
        "bias (3,) must have one value per weight row (4)": dict(bias=torch.zeros(3).numpy()),
        "x must have dtype float32": dict(x=torch.zeros(2, 8, dtype=torch.float64).numpy()),
        "num_threads must be >= 1": dict(num_threads=0),
    }
    for expected, change in cases.items():
        with pytest.raises(ValueError, match=re.escape(expected)) as error:
            _C.float32_linear(**(dict(x=x, weight=weight) | change))
        assert "\n" not in str(error.value)
