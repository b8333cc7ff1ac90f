"""Triton elementwise fusions (embedding sum, residual add + norm) against their torch references, under the
Triton CPU interpreter (or on a GPU: tests/kernel_device.py), and the references against the transformer's unfused
path.

Tolerances are on max |out - ref| / max |ref|. fp32: the residual sums are bit-identical (same additions, same
order, each rounded to fp32); the norm's reductions and the sinusoid's cos / sin differ in their last bits, held to
1e-5. fp16: 2e-3 (the output's 11-bit mantissa). bf16: 2e-2, since the interpreter truncates fp32 to bf16 where GPUs
round to nearest even (one bf16 ulp, 2**-7 relative, per rounding). Every output buffer is poisoned with NaN.
"""
from __future__ import annotations

import pytest
import torch
from kernel_device import DEVICE, ON_GPU, full_shapes, relative_error  # before anything imports triton
from torch import nn

from vivace.kernels import dispatch
from vivace.kernels import fused as ref
from vivace.kernels import triton_fused as tf
from vivace.kernels.sinusoid import sinusoid_frequencies
from vivace.model.config import TransformerConfig
from vivace.model.transformer import StageTransformer

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


pytestmark = pytest.mark.usefixtures("poisoned_kernel_buffers")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("position", ["none", "learned", "sinusoidal"])
@pytest.mark.parametrize("num_tokens,num_codebooks,d_model", full_shapes(
    [(1, 1, 64), (7, 4, 96), (33, 4, 1024), (5, 2, 33)], [(128, 4, 1536), (64, 8, 2048), (512, 1, 1024)]))
def test_embed_codebooks_matches_reference(
    num_tokens: int, num_codebooks: int, d_model: int, position: str, dtype: torch.dtype
) -> None:
    gen = torch.Generator().manual_seed(num_tokens * d_model)
    vocab = 50
    tables = torch.randn(num_codebooks, vocab, d_model, generator=gen).to(DEVICE, dtype)
    # ids as a strided view (every other column), positions up to MusicGen-length windows
    input_ids = torch.randint(0, vocab, (num_tokens, 2 * num_codebooks), generator=gen).to(DEVICE)[:, ::2]
    positions = torch.randint(0, 3000, (2 * num_tokens,), generator=gen).to(DEVICE)[::2]  # strided too
    learned = torch.randn(3000, d_model, generator=gen).to(DEVICE, dtype) if position == "learned" else None
    freqs = sinusoid_frequencies(d_model, DEVICE) if position == "sinusoidal" else None
    out = tf.embed_codebooks(input_ids, positions, tables, learned, freqs)
    expected = ref.embed_codebooks(input_ids, positions, tables, learned, freqs)
    assert out.dtype == expected.dtype == dtype
    if dtype == torch.float32 and position != "sinusoidal":
        assert torch.equal(out, expected)
    else:
        assert relative_error(out, expected) <= TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rms,with_bias", [(False, True), (False, False), (True, False)])
@pytest.mark.parametrize("with_update", [True, False])
@pytest.mark.parametrize("num_tokens,d_model", full_shapes([(1, 64), (5, 96), (64, 1024)], [(128, 1536), (512, 2048)]))
def test_add_norm_matches_reference(
    num_tokens: int, d_model: int, with_update: bool, rms: bool, with_bias: bool, dtype: torch.dtype
) -> None:
    gen = torch.Generator().manual_seed(num_tokens + d_model)
    residual = (3 * torch.randn(num_tokens, d_model, generator=gen) + 1).to(DEVICE, dtype)
    update = torch.randn(num_tokens, d_model, generator=gen).to(DEVICE, dtype) if with_update else None
    weight = (1 + 0.5 * torch.randn(d_model, generator=gen)).to(DEVICE, dtype)
    bias = torch.randn(d_model, generator=gen).to(DEVICE, dtype) if with_bias else None
    summed, normed = tf.add_norm(residual, update, weight, bias, 1e-5, rms)
    ref_summed, ref_normed = ref.add_norm(residual, update, weight, bias, 1e-5, rms)
    assert summed.dtype == ref_summed.dtype and normed.dtype == ref_normed.dtype
    if dtype == torch.bfloat16 and not ON_GPU:  # the interpreter's truncating cast
        assert relative_error(summed, ref_summed) <= TOLERANCE[dtype]
    else:
        assert torch.equal(summed, ref_summed)
    if not with_update:
        assert summed is residual
    assert relative_error(normed, ref_normed) <= TOLERANCE[dtype]


def test_add_norm_keeps_the_activations_dtype_with_float32_weights() -> None:
    gen = torch.Generator().manual_seed(9)
    residual = torch.randn(3, 64, generator=gen).to(DEVICE, torch.bfloat16)
    weight, bias = torch.randn(64, generator=gen).to(DEVICE), torch.randn(64, generator=gen).to(DEVICE)
    summed, normed = tf.add_norm(residual, residual, weight, bias, 1e-5, False)
    ref_summed, ref_normed = ref.add_norm(residual, residual, weight, bias, 1e-5, False)
    assert normed.dtype == ref_normed.dtype == torch.bfloat16
    assert relative_error(normed, ref_normed) <= TOLERANCE[torch.bfloat16]


def test_add_norm_of_a_constant_row_is_its_bias() -> None:
    """Zero variance: eps keeps the row finite, as in torch."""
    residual = torch.full((2, 64), 3.0, device=DEVICE)
    weight, bias = torch.ones(64, device=DEVICE), torch.arange(64.0, device=DEVICE)
    _, normed = tf.add_norm(residual, None, weight, bias, 1e-5, False)
    assert torch.equal(normed, ref.add_norm(residual, None, weight, bias, 1e-5, False)[1])


@pytest.mark.parametrize("position", ["learned", "sinusoidal", "t5_relative"])
def test_reference_embedding_is_the_transformers_embedding(position: str) -> None:
    """The reference (and so the kernel) computes exactly what StageTransformer.embed_tokens computes."""
    torch.manual_seed(0)
    config = TransformerConfig(num_layers=1, d_model=48, num_heads=4, d_ff=64, vocab_size=30, output_vocab_size=20,
                               num_codebooks=4, position=position, max_positions=128)
    model = StageTransformer(config)
    input_ids = torch.randint(0, 30, (9, 4))
    positions = torch.randint(0, 128, (9,))
    tables = torch.stack([e.weight.detach() for e in model.embed])
    learned = model.pos_embed.weight.detach() if position == "learned" else None
    freqs = sinusoid_frequencies(48) if position == "sinusoidal" else None
    with torch.no_grad():
        assert torch.equal(ref.embed_codebooks(input_ids, positions, tables, learned, freqs),
                           model.embed_tokens(input_ids, positions))


def test_reference_add_norm_is_the_modules_norm() -> None:
    x, y = torch.randn(4, 32), torch.randn(4, 32)
    for norm in (nn.LayerNorm(32, eps=1e-5), nn.RMSNorm(32, eps=1e-6)):
        nn.init.normal_(norm.weight)
        rms = isinstance(norm, nn.RMSNorm)
        with torch.no_grad():
            summed, normed = ref.add_norm(x, y, norm.weight, None if rms else norm.bias, norm.eps, rms)
            assert torch.equal(summed, x + y) and torch.equal(normed, norm(x + y))


def test_dispatch_runs_the_fused_kernels_only_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    """Routing and derived tensors only (nothing is launched), so it holds on a GPU machine too."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # use_triton sets it for CPU tensors; restored afterwards
    monkeypatch.delenv("VIVACE_TRITON_INTERPRET", raising=False)
    assert dispatch.fused_ops(torch.zeros(1)) is ref
    monkeypatch.setenv("VIVACE_TRITON_INTERPRET", "1")
    assert dispatch.fused_ops(torch.zeros(1)) is tf
    config = TransformerConfig(num_layers=1, d_model=32, num_heads=4, d_ff=64, vocab_size=30, output_vocab_size=20,
                               num_codebooks=4, position="sinusoidal")
    model = StageTransformer(config)
    model.refresh_derived()  # where Triton runs, the stacked tables and frequencies are built once
    assert model.codebook_tables.shape == (4, 30, 32) and model.sinusoid_freqs.shape == (16,)
    model.to(torch.bfloat16)  # casting rebuilds the derived tensors: the frequencies stay float32
    assert model.codebook_tables.dtype == torch.bfloat16 and model.sinusoid_freqs.dtype == torch.float32
    assert torch.equal(model.sinusoid_freqs, sinusoid_frequencies(32))
    monkeypatch.delenv("VIVACE_TRITON_INTERPRET")
    model.refresh_derived()
    assert model.codebook_tables is None and model.sinusoid_freqs is None
