"""4-bit group-wise layer weights (quantize="int4"): the grid, the packed layout, the kernel against its torch
reference and against the dequantized product, and engines of both families generating with it.

Tolerances:
- kernel against int4_reference (the same integer sums, the same group order): the kernel fuses each group's
  multiply-add, the reference rounds twice, so they agree to float32 rounding of a sum over ceil(in / 64) groups;
  bound 1e-6 of the largest output (seen <= 2.2e-7).
- kernel against the dequantized weights' product (float64): the activations are rounded to 127 steps of each
  group's largest magnitude, an error of standard deviation max|x_g| / (127 * sqrt(12)) per activation, about
  0.55% of the output norm for Gaussian rows; seen 0.15-0.56%; bound 1.5%.
- dequantized weights against the original: a weight errs by at most half its group's step (scale / 2); q never
  leaves [-8, 7].
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from kernel_device import relative_error
from musicgen_checkpoints import TinyMusicGen, write_checkpoint
from torch import nn

from vivace import Engine, VivaceError, _C
from vivace.cli import main
from vivace.export.musicgen import convert_musicgen
from vivace.model.int4 import GROUP, Int4Linear, dequantize_int4, int4_isas, int4_reference, int4_supported, quantize_int4
from vivace.model.quant import Int8Linear, quantize_stage

needs_int4 = pytest.mark.skipif(not int4_supported(), reason="vivace's int4 kernel needs AVX-512 VNNI or AVX2")
SHAPES = [(1024, 4096, False), (4096, 1024, True), (64, 64, True), (130, 37, True), (17, 200, False), (96, 1, True)]


def layer(out_features: int, in_features: int, bias: bool, seed: int = 0) -> tuple[nn.Linear, Int4Linear]:
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias)
    return linear, Int4Linear.from_linear(linear)


def test_quantize_int4_rounds_each_group_to_its_bfloat16_scale() -> None:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(70, 150, generator=generator) * torch.logspace(-4, 1, 150)  # groups of very different sizes
    weight[3, 64:128] = 0.0  # an all-zero group
    q, scales = quantize_int4(weight)
    assert q.dtype == torch.int8 and q.shape == (70, 150) and scales.shape == (70, 3)
    assert int(q.min()) >= -8 and int(q.max()) <= 7
    assert torch.equal(scales, scales.to(torch.bfloat16).float()), "stored scales are bfloat16 values"
    step = scales.repeat_interleave(GROUP, dim=1)[:, :150]
    assert bool(((dequantize_int4(q, scales) - weight).abs() <= step / 2 + 1e-12).all())
    assert bool((q[3, 64:128] == 0).all())


@pytest.mark.parametrize("in_features", [64, 1024, 4096])
def test_int4_weights_err_about_11_percent_of_a_gaussian_layers_output(in_features: int) -> None:
    """The figure README and docs give for 4-bit weights against the float weights (int8: under 1 %): the groups'
    rounding alone, exact float64 products, Gaussian weights and rows; seen 0.106 at 64, 1024 and 4096 inputs (each
    group of 64 errs alike)."""
    generator = torch.Generator().manual_seed(in_features)
    weight = torch.randn(256, in_features, generator=generator)
    x = torch.randn(16, in_features, generator=generator).double()
    exact = x @ weight.double().T
    error = ((x @ dequantize_int4(*quantize_int4(weight)).double().T - exact).norm() / exact.norm()).item()
    assert 0.09 <= error <= 0.12


@pytest.mark.parametrize("out_features,in_features", [(1, 1), (64, 64), (65, 129), (130, 37)])
def test_pack_and_unpack_are_inverse(out_features: int, in_features: int) -> None:
    generator = torch.Generator().manual_seed(out_features)
    q = torch.randint(-8, 8, (out_features, in_features), dtype=torch.int8, generator=generator)
    scales = torch.rand(out_features, -(-in_features // GROUP), generator=generator).to(torch.bfloat16).float()
    packed = _C.int4_pack(q.numpy(), scales.numpy())
    assert packed.shape == (-(-out_features // 64), -(-in_features // GROUP), 64 * GROUP // 2 + 128)
    back_q, back_scales = _C.int4_unpack(packed, out_features, in_features)
    assert torch.equal(torch.from_numpy(back_q), q) and torch.equal(torch.from_numpy(back_scales), scales)


@needs_int4
@pytest.mark.parametrize("out_features,in_features,bias", SHAPES)
def test_int4_kernel_matches_its_reference_and_the_dequantized_product(out_features: int, in_features: int, bias: bool) -> None:
    linear, quantized = layer(out_features, in_features, bias)
    q, scales = quantized.unpacked()
    for rows in (1, 2, 3, 5, 16):
        x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(rows))
        with torch.no_grad():
            out = quantized(x)
        b = None if linear.bias is None else linear.bias.detach()
        assert relative_error(out, int4_reference(x, q, scales, b)) <= 1e-6
        exact = x.double() @ dequantize_int4(q, scales).double().T + (0 if b is None else b.double())
        assert ((out.double() - exact).norm() / exact.norm()).item() <= 1.5e-2


@pytest.mark.skipif(len(int4_isas()) < 2, reason="this CPU runs fewer than two int4 instruction sets")
@pytest.mark.parametrize("out_features,in_features,bias", SHAPES)
def test_every_int4_instruction_set_gives_the_same_bits(out_features: int, in_features: int, bias: bool) -> None:
    """AVX2 sums each group exactly as vpdpbusd does (vpmaddubsw cannot saturate on nibbles) and folds the groups
    with the same fused multiply-adds in the same order."""
    _, quantized = layer(out_features, in_features, bias, seed=3)
    packed, b = quantized.native_args()
    for rows in (1, 2, 3, 7):
        x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(rows)).numpy()
        outputs = [_C.int4_linear(x, packed, out_features, b, 2, "none", isa) for isa in int4_isas()]
        assert all(np.array_equal(out, outputs[0]) for out in outputs[1:])


@needs_int4
def test_int4_rows_do_not_depend_on_the_batch_or_the_threads() -> None:
    _, quantized = layer(200, 300, True, seed=1)
    packed, bias = quantized.native_args()
    x = torch.randn(9, 300, generator=torch.Generator().manual_seed(2)).numpy()
    for isa in int4_isas():
        together = _C.int4_linear(x, packed, 200, bias, 1, "none", isa)
        assert np.array_equal(_C.int4_linear(x, packed, 200, bias, 2, "none", isa), together)
        for r in range(9):
            assert np.array_equal(_C.int4_linear(x[r:r + 1], packed, 200, bias, 2, "none", isa)[0], together[r])


@needs_int4
def test_int4_gelu_is_applied_to_the_outputs() -> None:
    _, quantized = layer(96, 128, True)
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        plain = quantized(x)
        quantized.activation = "gelu"
        fused = quantized(x)
    assert relative_error(fused, F.gelu(plain)) <= 1e-6


def test_int4_dequantizing_path_runs_other_dtypes() -> None:
    linear, quantized = layer(48, 80, True)
    x = torch.randn(4, 80, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = quantized.to(torch.float64)(x)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, F.linear(x, quantized.dequantized().double(), quantized.bias), rtol=1e-12, atol=1e-12)


def test_int4_arguments_are_refused_in_one_line() -> None:
    q, scales = torch.zeros(4, 64, dtype=torch.int8), torch.ones(4, 1)
    packed = _C.int4_pack(q.numpy(), scales.numpy())
    x = torch.zeros(2, 64).numpy()
    cases = [
        (lambda: _C.int4_pack(torch.full((4, 64), 9, dtype=torch.int8).numpy(), scales.numpy()), "q must hold values in [-8, 7], got 9"),
        (lambda: _C.int4_pack(q.numpy(), torch.ones(4, 2).numpy()), "scales (4, 2) must be (4, 1)"),
        (lambda: _C.int4_unpack(packed, 4, 65), "packed (1, 1, 2176) must be int4_pack of a [4, 65] weight, shape (1, 2, 2176)"),
    ]
    if int4_supported():
        cases += [
            (lambda: _C.int4_linear(torch.zeros(2, 65).numpy(), packed, 4), "must be int4_pack of a [4, 65] weight"),
            (lambda: _C.int4_linear(x, packed, 4, torch.zeros(3).numpy()), "bias (3,) must have one value per weight row (4)"),
            (lambda: _C.int4_linear(x, packed, 4, None, 0), "num_threads must be >= 1"),
            (lambda: _C.int4_linear(x, packed, 4, None, 1, "tanh"), "activation must be 'none' or 'gelu'"),
            (lambda: _C.int4_linear(x, packed, 4, None, 1, "none", "sse2"), "int4_linear isa 'sse2' does not run on this CPU"),
        ]
    for call, expected in cases:
        with pytest.raises(ValueError, match=re.escape(expected)) as error:
            call()
        assert "\n" not in str(error.value)


def test_int4_stage_keeps_its_heads_int8(tiny_pack: Path) -> None:
    engine = Engine.from_pack(tiny_pack)
    model = next(iter(engine.pack.stages.values()))
    quantize_stage(model, "int4")
    layers = [m for m in model.layers.modules() if isinstance(m, nn.Linear | Int8Linear | Int4Linear)]
    assert layers and all(isinstance(m, Int4Linear) for m in layers)
    assert all(isinstance(head, Int8Linear) for head in model.heads)
    assert all(layer.ffn.fc1.activation == "gelu" for layer in model.layers if layer.ffn.activation_name == "gelu")


@needs_int4
def test_musiclm_pack_generates_with_int4_layers(tiny_pack: Path) -> None:
    engine = Engine.from_pack(tiny_pack, quantize="int4")
    info = engine.info()
    assert info["quantize"] == "int4" and set(info["native_layers"].values()) == {True}
    audio = engine.generate(["calm piano", "drums"], duration_s=0.7, seed=3)
    assert audio.shape == (2, round(0.7 * engine.sample_rate)) and bool(np.isfinite(audio).all())
    np.testing.assert_array_equal(engine.generate("drums", duration_s=0.7, seed=4)[0], audio[1])
    python_layers = Engine.from_pack(tiny_pack, quantize="int4", native_layers=False)
    assert set(python_layers.info()["native_layers"].values()) == {False}
    assert bool(np.isfinite(python_layers.generate("drums", duration_s=0.4, seed=4)).all())


@needs_int4
def test_musicgen_pack_generates_with_int4_layers(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        src = write_checkpoint(tmp_path / "src", TinyMusicGen(seed=4))
    engine = Engine.from_pack(convert_musicgen(src, tmp_path / "pack"), quantize="int4")
    decoder = engine.pack.decoder
    assert sum(isinstance(m, Int4Linear) for m in decoder.modules()) == 7 * decoder.config.num_layers
    assert sum(isinstance(m, Int8Linear) for m in decoder.modules()) == decoder.config.num_codebooks
    seconds = 20 / engine.config.frame_rate
    pair = engine.generate(["slow piano with drums", "fast drums"], seconds, seed=[0, 1], guidance_scale=3.0)
    assert bool(np.isfinite(pair).all())
    alone = engine.generate("fast drums", seconds, seed=1, guidance_scale=3.0)
    np.testing.assert_array_equal(alone[0], pair[1])


def test_int4_is_refused_where_its_kernel_cannot_run(tiny_pack: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(VivaceError, match="int4' runs on the CPU with dtype float32 only"):
        Engine.from_pack(tiny_pack, quantize="int4", dtype="bfloat16")
    argv = ["generate", "--pack", str(tiny_pack), "calm piano", "--duration", "0.4", "--quantize", "int4",
            "--dtype", "bfloat16", "-o", str(tmp_path / "x.wav"), "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "int4" in err and "\n" not in err and not (tmp_path / "x.wav").exists()


@needs_int4
def test_cli_generate_with_int4(tiny_pack: Path, tmp_path: Path) -> None:
    out = tmp_path / "int4.wav"
    argv = ["generate", "--pack", str(tiny_pack), "calm piano", "--duration", "0.5", "--quantize", "int4", "-o", str(out), "--quiet"]
    assert main(argv) == 0 and out.stat().st_size > 0
