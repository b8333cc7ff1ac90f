"""bfloat16 weights under float32 activations (quantize="bfloat16"): the kernel against float64 products on the
widened weights, its bits against float32_linear's on the same values, and engines of both families generating.

Tolerances: the kernel sums the same float32 products as float32_linear in the same order, so on weights that are
bfloat16 values the two give the same bits (torch.equal), and against the float64 product of the widened weights
it keeps float32_linear's bound (1e-6 of the largest output). Against the original float32 weights a layer errs by
their rounding to bfloat16 (at most 2**-9 relative each, about 0.1 % of the output norm for random rows); bound
0.5 %.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from kernel_device import relative_error
from musicgen_checkpoints import TinyMusicGen, write_checkpoint
from torch import nn

from vivace import Engine, VivaceError, _C
from vivace.cli import main
from vivace.export.musicgen import convert_musicgen
from vivace.model.bf16_weights import BFloat16Linear
from vivace.model.quant import quantize_stage

needs_avx512 = pytest.mark.skipif(not _C.float32_linear_fast(), reason="the bfloat16-weight kernel needs AVX-512")


def bits(weight: torch.Tensor) -> np.ndarray:
    return weight.to(torch.bfloat16).view(torch.int16).numpy().view("uint16")


@pytest.mark.parametrize("rows,in_features,out_features,bias", [(1, 1024, 4096, False), (2, 4096, 1024, True),
                                                                 (7, 37, 13, True), (16, 64, 96, False)])
@pytest.mark.parametrize("portable", [pytest.param(False, marks=needs_avx512), True])
def test_bfloat16_weights_give_float32_linears_bits_on_the_widened_weights(
    rows: int, in_features: int, out_features: int, bias: bool, portable: bool,
) -> None:
    generator = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, in_features, generator=generator)
    weight = torch.randn(out_features, in_features, generator=generator)
    b = torch.randn(out_features, generator=generator).numpy() if bias else None
    widened = weight.to(torch.bfloat16).float()
    out = torch.from_numpy(_C.bfloat16_weight_linear(x.numpy(), bits(weight), b, 2, portable=portable))
    assert torch.equal(out, torch.from_numpy(_C.float32_linear(x.numpy(), widened.numpy(), b, 2, portable=portable)))
    reference = x.double() @ widened.double().T + (0 if b is None else torch.from_numpy(b).double())
    assert relative_error(out, reference) <= 1e-6
    for r in range(rows):
        alone = _C.bfloat16_weight_linear(x[r:r + 1].numpy(), bits(weight), b, 1, portable=portable)
        assert torch.equal(torch.from_numpy(alone)[0], out[r])


def test_bfloat16_layer_tracks_its_float32_layer() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(512, 384)
    layer = BFloat16Linear.from_linear(linear)
    x = torch.randn(3, 5, 512)
    with torch.no_grad():
        out, reference = layer(x), linear(x)
    assert out.shape == (3, 5, 384) and out.dtype == torch.float32
    assert ((out - reference).norm() / reference.norm()).item() <= 5e-3
    with torch.no_grad():  # wider activations take the widening path
        wide = layer(x.double())
    assert wide.dtype == torch.float64 and relative_error(wide.float(), out) <= 1e-5


def test_bfloat16_weight_arguments_are_refused_in_one_line() -> None:
    x = torch.zeros(2, 8).numpy()
    cases = {
        "weight must have dtype uint16 (bfloat16 bits)": dict(weight=torch.zeros(4, 8).numpy()),
        "weight (4, 6) must have 8 columns": dict(weight=bits(torch.zeros(4, 6))),
        "bias (3,) must have one value per weight row (4)": dict(bias=torch.zeros(3).numpy()),
    }
    for expected, change in cases.items():
        with pytest.raises(ValueError, match=re.escape(expected)) as error:
            _C.bfloat16_weight_linear(**(dict(x=x, weight=bits(torch.zeros(4, 8))) | change))
        assert "\n" not in str(error.value)


@needs_avx512
def test_musiclm_pack_generates_with_bfloat16_weights(tiny_pack: Path) -> None:
    engine = Engine.from_pack(tiny_pack, quantize="bfloat16")
    info = engine.info()
    assert info["quantize"] == "bfloat16" and set(info["native_layers"].values()) == {True}
    for model in engine.pack.stages.values():
        assert not any(isinstance(m, nn.Linear) for m in model.modules())
        assert model.native_heads is not None
    audio = engine.generate(["calm piano", "drums"], duration_s=0.7, seed=3)
    assert audio.shape == (2, round(0.7 * engine.sample_rate)) and bool(np.isfinite(audio).all())
    np.testing.assert_array_equal(engine.generate("drums", duration_s=0.7, seed=4)[0], audio[1])


@needs_avx512
def test_musicgen_pack_generates_with_bfloat16_weights(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        src = write_checkpoint(tmp_path / "src", TinyMusicGen(seed=4))
    pack = convert_musicgen(src, tmp_path / "pack")
    engine = Engine.from_pack(pack, quantize="bfloat16")
    decoder = engine.pack.decoder
    assert sum(isinstance(m, BFloat16Linear) for m in decoder.modules()) == 7 * decoder.config.num_layers + decoder.config.num_codebooks
    seconds = 20 / engine.config.frame_rate
    pair = engine.generate(["slow piano with drums", "fast drums"], seconds, seed=[0, 1], guidance_scale=3.0)
    assert bool(np.isfinite(pair).all())
    np.testing.assert_array_equal(engine.generate("fast drums", seconds, seed=1, guidance_scale=3.0)[0], pair[1])


def test_quantize_stage_bfloat16_keeps_the_ffn_activation_in_python(tiny_pack: Path) -> None:
    model = next(iter(Engine.from_pack(tiny_pack).pack.stages.values()))
    quantize_stage(model, "bfloat16")
    assert all(isinstance(m, BFloat16Linear) for m in [*model.heads, *(l.ffn.fc1 for l in model.layers)])
    assert all(layer.ffn.activation is not None for layer in model.layers)


def test_bfloat16_weights_are_refused_where_their_kernel_cannot_run(tiny_pack: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(VivaceError, match="quantize 'bfloat16' runs on the CPU with dtype float32 only; use dtype 'bfloat16'"):
        Engine.from_pack(tiny_pack, quantize="bfloat16", dtype="bfloat16")
    out = tmp_path / "x.wav"
    argv = ["generate", "--pack", str(tiny_pack), "calm piano", "--duration", "0.4", "--quantize", "bfloat16",
            "--dtype", "bfloat16", "-o", str(out), "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "bfloat16" in err and "\n" not in err and not out.exists()
