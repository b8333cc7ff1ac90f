"""Int8 weight-only stage linears: the layer against float references, and packs generating end to end with them.

Tolerances (relative error of the whole output, ||y - ref|| / ||ref||):
- against the exactly dequantized weights (q * scale, float64): the CPU kernel rounds activations, scales and
  outputs to bfloat16 (each <= 2**-9 relative, independent), measured <= 0.3%; bound 1%. The dequantize-per-call
  path accumulates in float32: bound 1e-5.
- against the original float weights: rounding a weight to its channel's int8 grid errs by at most
  max|w_row| / 254; for nn.Linear's uniform init that is 1 / (254 * sqrt(3)) * sqrt(3) ~= 0.4% of the output
  norm, plus the bfloat16 rounding above; measured <= 0.5%; bound 1.5%.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from musicgen_checkpoints import TinyMusicGen, write_checkpoint
from torch import nn

from vivace import Engine, VivaceError
from vivace.cli import main
from vivace.export.musicgen import convert_musicgen
from vivace.model.quant import Int8Linear, pack_mm_available, quantize_weight

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


@pytest.mark.parametrize("in_features,out_features,bias", SHAPES)
def test_int8_linear_matches_float_references(in_features: int, out_features: int, bias: bool) -> None:
    torch.manual_seed(in_features + out_features)
    linear = nn.Linear(in_features, out_features, bias=bias)
    quantized = Int8Linear.from_linear(linear)
    x = torch.randn(2, 3, in_features)
    with torch.no_grad():
        y = quantized(x)
        reference = linear(x)
    bias64 = None if linear.bias is None else linear.bias.detach().double()
    dequantized = torch.nn.functional.linear(x.double(), quantized.dequantized().double(), bias64)
    assert y.shape == reference.shape and y.dtype == x.dtype
    kernel = quantized.use_pack_mm(x)
    assert kernel == (in_features % 32 == 0 and pack_mm_available())
    assert relative_error(y, dequantized) <= (1e-2 if kernel else 1e-5)
    assert relative_error(y, reference) <= 1.5e-2


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
        Engine.from_pack(tiny_pack, quantize="int4")
