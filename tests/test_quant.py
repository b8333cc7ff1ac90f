"""Int8 stage linears: the layer's two CPU kernels against float references, the measured choice between them, and
packs generating end to end with them.

Tolerances (relative error of the whole output, ||y - ref|| / ||ref||):
- against the exactly dequantized weights (q * scale, float64): torch's pack mm rounds activations, scales and
  outputs to bfloat16 (each <= 2**-9 relative, independent), measured <= 0.3%; bound 1%. The VNNI kernel rounds each
  activation row to 255 steps of its range (an error of standard deviation range / (255 * sqrt(12)) per
  activation: for Gaussian rows, range ~7 standard deviations at 1024-4096 inputs, ~0.8% of the output norm),
  measured 0.54-0.81%; bound 1.5%. The
  dequantize-per-call path accumulates in float32: bound 1e-5.
- against the original float weights: rounding a weight to its channel's int8 grid errs by at most
  max|w_row| / 254; for nn.Linear's uniform init that is 1 / (254 * sqrt(3)) * sqrt(3) ~= 0.4% of the output
  norm, plus the activations' rounding above; measured <= 0.5% (pack mm), <= 0.9% (VNNI); bound 1.5% (pack mm),
  2% (VNNI).
"""
from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from musicgen_checkpoints import TinyMusicGen, write_checkpoint
import torch.nn.functional as F
from torch import nn

from vivace import Engine, VivaceError
from vivace.cli import main
from vivace.export.musicgen import convert_musicgen
from vivace import _C
from vivace.model import quant
from vivace.model.linear_plan import ROW_BUCKETS, PlanCache
from vivace.model.quant import (
    NATIVE_ISAS,
    PACKED_KERNELS,
    Int8Linear,
    choose_kernels,
    native_kernels,
    pack_mm_available,
    quantize_weight,
)

SHAPES = [(1024, 4096, False), (4096, 1024, False), (64, 96, True), (37, 5, True)]  # (in, out, bias)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny matmuls: on a shared host a second intra-op thread waits at barriers for a busy core (100x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def relative_error(y: torch.Tensor, reference: torch.Tensor) -> float:
    return float((y.double() - reference.double()).norm() / reference.double().norm())


def test_quantize_weight_rounds_to_the_channel_grid() -> None:
    weight = torch.randn(64, 128) * torch.logspace(-3, 1, 64)[:, None]  # channels of very different magnitude
    q, scales = quantize_weight(weight)
    assert q.dtype == torch.int8 and int(q.abs().max()) <= 127
    assert torch.equal(q.abs().amax(dim=1), torch.full((64,), 127, dtype=torch.int8))
    error = (q.float() * scales[:, None] - weight).abs()
    assert bool((error <= scales[:, None] / 2 * (1 + 1e-5)).all())
    zero_q, zero_scales = quantize_weight(torch.zeros(3, 8))
    assert not zero_q.any() and bool(torch.isfinite(zero_scales).all())


NATIVE = list(native_kernels())  # vivace's kernels this CPU runs (amx, vnni, avx2)
PACKED = [kernel for kernel in NATIVE if kernel in PACKED_KERNELS]  # those that read int8_vnni_pack's layout
KERNELS = ["pack_mm", *NATIVE]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("in_features,out_features,bias", SHAPES)
def test_int8_linear_matches_float_references(in_features: int, out_features: int, bias: bool, kernel: str) -> None:
    torch.manual_seed(in_features + out_features)
    linear = nn.Linear(in_features, out_features, bias=bias)
    quantized = Int8Linear.from_linear(linear)
    quantized.kernel = kernel
    x = torch.randn(2, 3, in_features)
    with torch.no_grad():
        y = quantized(x)
        reference = linear(x)
    bias64 = None if linear.bias is None else linear.bias.detach().double()
    dequantized = torch.nn.functional.linear(x.double(), quantized.dequantized().double(), bias64)
    assert y.shape == reference.shape and y.dtype == x.dtype
    native = quantized.use_native(x)
    assert native == (kernel != "pack_mm")
    pack_mm = not native and quantized.use_pack_mm(x)
    if kernel == "pack_mm":
        assert pack_mm == (in_features % 32 == 0 and pack_mm_available())
    assert relative_error(y, dequantized) <= (1.5e-2 if native else 1e-2 if pack_mm else 1e-5)
    assert relative_error(y, reference) <= (2e-2 if native else 1.5e-2)


def test_int8_linear_keeps_bfloat16_activations() -> None:
    torch.manual_seed(1)
    linear = nn.Linear(256, 128).to(torch.bfloat16)
    quantized = Int8Linear.from_linear(linear)
    x = torch.randn(4, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        y = quantized(x)
        reference = linear(x.float().to(torch.bfloat16)).float()
    assert y.dtype == torch.bfloat16
    assert relative_error(y.float(), reference) <= 2e-2


def test_musiclm_pack_generates_with_int8_linears(tiny_pack: Path) -> None:
    engine = Engine.from_pack(tiny_pack, quantize="int8")
    for model in engine.pack.stages.values():
        assert not any(isinstance(m, nn.Linear) for m in model.modules())
        assert sum(isinstance(m, Int8Linear) for m in model.modules()) == 4 * model.config.num_layers + 1
    audio = engine.generate(["calm piano", "drums"], duration_s=0.7, seed=3)
    assert audio.shape == (2, round(0.7 * engine.sample_rate))
    assert bool(np.isfinite(audio).all()) and float(np.abs(audio).max()) > 0
    again = engine.generate("drums", duration_s=0.7, seed=4)
    np.testing.assert_array_equal(again[0], audio[1])


def test_musicgen_pack_generates_with_int8_linears(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        src = write_checkpoint(tmp_path / "src", TinyMusicGen(seed=4))
    pack = convert_musicgen(src, tmp_path / "pack")
    reference = Engine.from_pack(pack)
    engine = Engine.from_pack(pack, quantize="int8")
    decoder = engine.pack.decoder
    assert sum(isinstance(m, Int8Linear) for m in decoder.modules()) == 7 * decoder.config.num_layers + decoder.config.num_codebooks
    seconds = 20 / engine.config.frame_rate
    audio = engine.generate("slow piano with drums", seconds, seed=0, guidance_scale=3.0)
    assert audio.shape == reference.generate("slow piano with drums", seconds, seed=0).shape
    assert bool(np.isfinite(audio).all())


def test_cli_generate_with_int8(tiny_pack: Path, tmp_path: Path) -> None:
    out = tmp_path / "int8.wav"
    argv = ["generate", "--pack", str(tiny_pack), "calm piano", "--duration", "0.6", "--quantize", "int8", "-o", str(out), "--quiet"]
    assert main(argv) == 0
    audio, rate = sf.read(out)
    assert rate == 24000 and len(audio) == round(0.6 * 24000)


def test_unknown_quantize_mode_is_refused(tiny_pack: Path) -> None:
    with pytest.raises(VivaceError, match="quantize"):
        Engine.from_pack(tiny_pack, quantize="int2")


# -- vivace's kernel (csrc/int8_linear.cpp): per-row uint8 activations, exact int32 sums ---------------------------
needs_vnni = pytest.mark.skipif("vnni" not in native_kernels(), reason="this CPU has no AVX-512 VNNI")
needs_native = pytest.mark.skipif(not native_kernels(), reason="this CPU has neither AVX-512 VNNI nor AVX2")
VNNI_SHAPES = [(1024, 4096, False), (4096, 1024, True), (64, 96, True), (37, 5, True), (130, 7, False)]


def vnni_reference(x: torch.Tensor, layer: Int8Linear) -> torch.Tensor:
    """The kernel's arithmetic in plain torch, op for op in float32, with the integer sums in float64 (exact: at most
    255 * 127 * in_features < 2**53)."""
    low = x.amin(dim=1).clamp(max=0.0)
    high = x.amax(dim=1).clamp(min=0.0)
    scale = torch.where(high > low, (high - low) / 255.0, torch.ones_like(high))
    zero = torch.round(-low / scale).clamp(0, 255)
    xq = (torch.round(x * (1.0 / scale)[:, None]) + zero[:, None]).clamp(0, 255)
    sums = (xq.double() @ layer.weight.double().T) - zero.double()[:, None] * layer.weight_sums.double()[None, :]
    out = sums.float() * (scale[:, None] * layer.scales[None, :])
    return out if layer.bias is None else out + layer.bias


def vnni_layer(in_features: int, out_features: int, bias: bool, kernel: str = "vnni") -> tuple[nn.Linear, Int8Linear]:
    torch.manual_seed(in_features * 7 + out_features)
    linear = nn.Linear(in_features, out_features, bias=bias)
    layer = Int8Linear.from_linear(linear)
    layer.kernel = kernel
    return linear, layer


@pytest.mark.parametrize("kernel", NATIVE)
@pytest.mark.parametrize("in_features,out_features,bias", VNNI_SHAPES)
def test_native_kernels_equal_their_reference_exactly(in_features: int, out_features: int, bias: bool, kernel: str) -> None:
    """Every step is the reference's float32 op or an exact integer sum, so the outputs are equal, bit for bit, on
    either instruction set (row tails past 64 or 16 inputs and channels past a block of four included)."""
    _, layer = vnni_layer(in_features, out_features, bias, kernel)
    x = torch.randn(7, in_features) * torch.logspace(-2, 1, 7)[:, None]  # rows of very different ranges
    x[3] = x[3].abs()  # a row without negatives: its zero point is 0
    x[5] = 0.0  # an all-zero row
    with torch.no_grad():
        y = layer(x)
    assert layer.use_native(x) and y.dtype == torch.float32
    assert torch.equal(y, vnni_reference(x, layer))


@pytest.mark.parametrize("kernel", NATIVE)
def test_native_rows_do_not_depend_on_the_batch_or_threads(kernel: str) -> None:
    _, layer = vnni_layer(1024, 256, True, kernel)
    x = torch.randn(11, 1024)
    with torch.no_grad():
        batch = layer(x)
        alone = torch.cat([layer(x[i:i + 1]) for i in range(len(x))])
        torch.set_num_threads(2)
        two_threads = layer(x)
    assert torch.equal(batch, alone) and torch.equal(batch, two_threads)


@pytest.mark.parametrize("kernel", PACKED)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 13, 16, 17, 35])
@pytest.mark.parametrize("in_features,out_features", [(256, 1024), (37, 5), (255, 65), (1024, 130), (100, 70)])
def test_packed_kernels_read_their_packed_weights(rows: int, in_features: int, out_features: int, kernel: str) -> None:
    """An "amx" or "vnni" layer keeps its weights packed (16 channels x 4 inputs per 64 bytes, zeros past the last
    group and step); packed or packed per call, its rows equal the reference's bit for bit (groups of 64 channels,
    steps of 4 inputs, vnni's blocks of 4 rows and amx's tiles of 16 rows and 64 inputs, each with a tail)."""
    _, layer = vnni_layer(in_features, out_features, rows % 2 == 0, kernel)
    packed = layer.vnni_weight
    assert packed.shape == (-(-out_features // 64), -(-in_features // 4), 64, 4)
    unpacked = torch.zeros(packed.shape[0] * 64, packed.shape[1] * 4, dtype=torch.int8)
    unpacked.view(packed.shape[0], 64, packed.shape[1], 4).copy_(packed.permute(0, 2, 1, 3))
    assert torch.equal(unpacked[:out_features, :in_features], layer.weight) and unpacked.sum() == layer.weight.sum()
    x = torch.randn(rows, in_features)
    bias = None if layer.bias is None else layer.bias.float()
    args = (x, layer.weight, layer.scales, layer.weight_sums, bias, 2, NATIVE_ISAS[kernel])
    expected = vnni_reference(x, layer)
    with torch.no_grad():
        assert torch.equal(layer(x), expected)
    assert torch.equal(torch.from_numpy(_C.int8_linear(*args)), expected)  # packed per call
    layer.kernel = "avx2" if "avx2" in native_kernels() else "pack_mm"
    assert layer.vnni_weight is None  # only the "amx" and "vnni" kernels keep the packed copy


@needs_vnni
def test_packed_weights_are_checked() -> None:
    _, layer = vnni_layer(64, 8, False)
    args = (torch.randn(2, 64), layer.weight, layer.scales, layer.weight_sums, None, 1)
    cases = {
        "vnni_weight (1, 15, 64, 4) must be int8_vnni_pack(weight), shape (1, 16, 64, 4)":
            (*args, "avx512_vnni", layer.vnni_weight[:, :15].contiguous()),
        "vnni_weight is read by the avx512_vnni and amx_int8 kernels; isa 'avx2' runs avx2": (*args, "avx2", layer.vnni_weight),
    }
    for message, call_args in cases.items():
        with pytest.raises(ValueError) as error:
            _C.int8_linear(*call_args)
        assert message in str(error.value) and "\n" not in str(error.value)


@needs_native
def test_native_kernel_refuses_bad_arguments_in_one_line() -> None:
    _, layer = vnni_layer(64, 8, False)
    args = (torch.randn(2, 64), layer.weight, layer.scales, layer.weight_sums)
    cases = {
        "x must have dtype float32": (args[0].double(), *args[1:]),
        "weight (8, 64) must have 32 columns": (torch.randn(2, 32), *args[1:]),
        "weight_sums (7,) must have one value per weight row (8)": (*args[:3], layer.weight_sums[:7]),
        "weight must be C-contiguous": (args[0], layer.weight.T.contiguous().T, *args[2:]),
        "int8_linear isa 'amx' does not run on this CPU": (*args, None, 1, "amx"),
    }
    for message, call_args in cases.items():
        with pytest.raises(ValueError) as error:
            _C.int8_linear(*call_args)
        assert message in str(error.value) and "\n" not in str(error.value)


def test_int8_kernel_choice_is_measured_once_per_machine(tmp_path: Path) -> None:
    cache = PlanCache(tmp_path / "plans.json")
    model = nn.Sequential(Int8Linear.from_linear(nn.Linear(64, 32)), Int8Linear.from_linear(nn.Linear(32, 64)))
    chosen = choose_kernels([model], "auto", cache)
    assert set(chosen) == {(64, 32), (32, 64)} and set(chosen.values()) <= {"pack_mm", "amx", "vnni", "avx2"}
    assert [layer.kernel for layer in model] == [chosen[(64, 32)], chosen[(32, 64)]]
    stored = json.loads((tmp_path / "plans.json").read_text())
    assert [entries for key, entries in stored.items() if "int8 kernels: " in key] == [
        {"64x32": chosen[(64, 32)], "32x64": chosen[(32, 64)]}
    ]
    for layer in model:
        layer.kernel = "unset"
    assert choose_kernels([model], "auto", cache) == chosen  # read back, not measured again
    assert choose_kernels([model], "pack_mm", cache) == {(64, 32): "pack_mm", (32, 64): "pack_mm"}
    with pytest.raises(VivaceError, match="int8_kernel must be one of auto, pack_mm, amx, vnni, avx2, got 'fast'"):
        choose_kernels([model], "fast", cache)
    assert set(choose_kernels([model], "auto", cache, activations=torch.bfloat16).values()) == {"pack_mm"}
    assert {layer.kernel for layer in model} == {"pack_mm"}


@needs_vnni
def test_vnni_with_bfloat16_activations_is_refused_before_loading(tiny_pack: Path) -> None:
    with pytest.raises(VivaceError) as error:
        Engine.from_pack(tiny_pack, dtype="bfloat16", quantize="int8", int8_kernel="vnni")
    assert str(error.value) == "int8_kernel 'vnni' takes float32 activations; with dtype bfloat16 the int8 layers run pack_mm"
    engine = Engine.from_pack(tiny_pack, dtype="bfloat16", quantize="int8")
    assert set(engine.info()["int8_kernels"].values()) == {"pack_mm"}


@pytest.mark.parametrize("kernel", NATIVE)
def test_engine_runs_a_native_kernel(tiny_pack: Path, tmp_path: Path, kernel: str) -> None:
    engine = Engine.from_pack(tiny_pack, quantize="int8", int8_kernel=kernel)
    assert set(engine.info()["int8_kernels"].values()) == {kernel}
    layers = [m for model in engine.pack.stages.values() for m in model.modules() if isinstance(m, Int8Linear)]
    assert layers and all(layer.kernel == kernel for layer in layers)
    audio = engine.generate(["calm piano", "drums"], duration_s=0.7, seed=3)
    assert bool(np.isfinite(audio).all()) and float(np.abs(audio).max()) > 0
    np.testing.assert_array_equal(engine.generate("drums", duration_s=0.7, seed=4)[0], audio[1])
    out = tmp_path / f"{kernel}.wav"
    argv = ["generate", "--pack", str(tiny_pack), "drums", "--duration", "0.6", "--quantize", "int8",
            "--int8-kernel", kernel, "-o", str(out), "--quiet"]
    assert main(argv) == 0 and out.is_file()


@pytest.mark.skipif(len(native_kernels()) < 2, reason="needs two of AMX-INT8, AVX-512 VNNI and AVX2")
def test_every_instruction_set_gives_the_same_audio(tiny_pack: Path) -> None:
    audio = [Engine.from_pack(tiny_pack, quantize="int8", int8_kernel=kernel).generate("drums", 0.7, seed=4)
             for kernel in native_kernels()]
    for other in audio[1:]:
        np.testing.assert_array_equal(audio[0], other)


def test_cli_refuses_an_unknown_int8_kernel(tiny_pack: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["generate", "--pack", str(tiny_pack), "drums", "--duration", "0.6", "--quantize", "int8",
            "--int8-kernel", "fast", "-o", str(tmp_path / "x.wav"), "--quiet"]
    assert main(argv) == 2
    assert "--int8-kernel" in capsys.readouterr().err and not (tmp_path / "x.wav").exists()


# -- GELU in the int8 layer's output pass (FeedForward.fuse_activation) ----------------------------------------------
@pytest.mark.parametrize("kernel", NATIVE)
def test_native_gelu_is_torchs_gelu_within_ulps_and_the_same_bits_on_every_isa(kernel: str) -> None:
    """The output pass computes the exact GELU with erf by Abramowitz and Stegun 7.1.26 (|error| < 1.5e-7, scaled
    by |x| / 2 where 1 + erf cancels: the largest differences lie between x = -4 and -2): within 1e-6 of F.gelu
    over the outputs' whole range, against the int8 layer's own error of about 1 %; and the same bits whichever
    kernel produced the sums."""
    _, layer = vnni_layer(1024, 4096, True, kernel)
    x = torch.randn(5, 1024) * torch.logspace(-1, 1.5, 5)[:, None]  # outputs from about -300 to 300
    with torch.no_grad():
        plain = layer(x)
        layer.activation = "gelu"
        fused = layer(x)
    torch.testing.assert_close(fused, F.gelu(plain), rtol=1e-6, atol=1e-6)
    layer.kernel = NATIVE[0]
    with torch.no_grad():
        assert torch.equal(layer(x), fused)


def test_quantized_stage_applies_gelu_once_inside_fc1(tiny_pack: Path) -> None:
    engine = Engine.from_pack(tiny_pack, quantize="int8")
    ffns = [layer.ffn for model in engine.pack.stages.values() for layer in model.layers]
    assert ffns and all(ffn.activation is None and ffn.fc1.activation == ffn.activation_name == "gelu" for ffn in ffns)
    ffn = ffns[0]
    x = torch.randn(3, ffn.fc1.in_features)
    with torch.no_grad():
        fused = ffn(x)
        ffn.fc1.activation, ffn.activation = "none", F.gelu
        unfused = ffn(x)
    torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-6)


def test_native_activation_is_checked() -> None:
    _, layer = vnni_layer(64, 8, False, NATIVE[0])
    with pytest.raises(ValueError, match="activation must be 'none' or 'gelu', got 'tanh'"):
        _C.int8_linear(torch.randn(2, 64), layer.weight, layer.scales, layer.weight_sums, None, 1, "auto", None, "tanh")


def test_amx_takes_over_from_the_fewest_rows_where_it_keeps_winning() -> None:
    assert quant.amx_threshold({2: (1.0, 1.2), 8: (1.0, 0.8), 16: (1.0, 0.5), 32: (1.0, 0.4)}) == 8
    assert quant.amx_threshold({2: (1.0, 0.5), 8: (1.0, 0.95), 16: (1.0, 0.5)}) == 16  # a loss at 8 rows in between
    assert quant.amx_threshold({2: (1.0, 0.5), 8: (1.0, 0.5), 16: (1.0, 1.0)}) is None  # not at the largest bucket
    assert quant.amx_threshold({2: (1.0, 0.89), 4: (1.0, 0.9)}) is None  # a win means under 90 % of vnni's time


@pytest.mark.skipif(not {"amx", "vnni"} <= set(native_kernels()), reason="needs AMX-INT8 and AVX-512 VNNI")
def test_vnni_layers_switch_to_amx_by_rows_without_changing_a_bit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """auto measures vnni against amx per row bucket for the shapes it keeps on vnni, once per machine and thread
    count; a layer then runs amx from that many rows on, and every row equals the row computed alone."""
    cache = PlanCache(tmp_path / "plans.json")
    model = nn.Sequential(Int8Linear.from_linear(nn.Linear(1024, 256)))
    monkeypatch.setattr(quant, "measured_kernels", lambda shapes, *_: dict.fromkeys(shapes, "vnni"))
    choose_kernels([model], "auto", cache)
    measured = model[0].amx_from_rows
    assert measured is None or measured in ROW_BUCKETS
    stored = json.loads((tmp_path / "plans.json").read_text())
    assert [entries for key, entries in stored.items() if key.endswith("int8 amx from rows")] == [{"1024x256": measured or 0}]
    monkeypatch.setattr(quant, "amx_row_timings", lambda *shape: pytest.fail("measured twice"))
    choose_kernels([model], "auto", cache)  # read back
    assert model[0].amx_from_rows == measured
    model[0].amx_from_rows = 8
    calls = []
    isas = quant._C.int8_linear
    monkeypatch.setattr(quant._C, "int8_linear", lambda *args: calls.append(args[6]) or isas(*args))
    x = torch.randn(11, 1024)
    with torch.no_grad():
        batch = model(x)
        alone = torch.cat([model(x[i:i + 1]) for i in range(len(x))])
    assert calls == ["amx_int8"] + ["avx512_vnni"] * 11
    assert torch.equal(batch, alone)
    model[0].kernel = "vnni"
    assert model[0].amx_from_rows is None  # a kernel set by hand runs alone
