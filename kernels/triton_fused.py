"""Triton kernels for the stage transformer's elementwise fusions; same signatures and semantics as fused.py.

One program per token row. Sums are rounded to the output dtype after every addition, as the unfused torch ops
round them, so in fp32 (and on GPUs in bf16 / fp16) the residual stream matches the reference bit for bit; only
the norm's reductions and the sinusoid's cos / sin differ in their last bits. Grids depend only on tensor shapes
(CUDA-graph safe).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from vivace.kernels import buffers

_NO_POSITION, _LEARNED, _SINUSOIDAL = 0, 1, 2


def _warps(block_d: int) -> int:
    return 4 if block_d <= 1024 else 8


@triton.jit
def _embed_kernel(
    ids_ptr, positions_ptr, tables_ptr, learned_ptr, freqs_ptr, out_ptr,
    stride_it, stride_ic, stride_p, stride_tc, stride_tv, stride_lp, stride_ot,
    num_codebooks, d_model, half,
    POSITION: tl.constexpr, BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    dims = tl.arange(0, BLOCK_D)
    mask = dims < d_model
    dtype = out_ptr.dtype.element_ty
    ids_row = ids_ptr + token * stride_it
    first = tl.load(ids_row).to(tl.int64)
    acc = tl.load(tables_ptr + first * stride_tv + dims, mask=mask, other=0.0).to(tl.float32)
    table = tables_ptr
    for c in range(1, num_codebooks):
        table += stride_tc  # pointer steps: c * stride_tc could pass 2**31 elements in 32-bit arithmetic
        code = tl.load(ids_row + c * stride_ic).to(tl.int64)
        row = tl.load(table + code * stride_tv + dims, mask=mask, other=0.0)
        acc = (acc + row.to(tl.float32)).to(dtype).to(tl.float32)
    if POSITION == 1:
        position = tl.load(positions_ptr + token * stride_p).to(tl.int64)
        acc += tl.load(learned_ptr + position * stride_lp + dims, mask=mask, other=0.0).to(tl.float32)
    if POSITION == 2:
        # columns [0, half) hold cos, [half, 2 * half) sin of the same angles; an odd width ends in a zero
        position = tl.load(positions_ptr + token * stride_p).to(tl.float32)
        column = tl.where(dims < half, dims, dims - half)
        angle = position * tl.load(freqs_ptr + column, mask=dims < 2 * half, other=0.0)
        wave = tl.where(dims < half, tl.cos(angle), tl.sin(angle))
        acc += tl.where(dims < 2 * half, wave, 0.0).to(dtype).to(tl.float32)
    tl.store(out_ptr + token * stride_ot + dims, acc.to(dtype), mask=mask)


def embed_codebooks(
    input_ids: torch.Tensor,  # [num_tokens, num_codebooks] int64
    positions: torch.Tensor,  # [num_tokens] int64
    tables: torch.Tensor,  # [num_codebooks, vocab_size, d_model]
    learned_positions: torch.Tensor | None = None,  # [max_positions, d_model]
    sinusoid_freqs: torch.Tensor | None = None,  # [d_model // 2] float32: MusicGen's sinusoidal positions
) -> torch.Tensor:
    """Sum of the codebooks' rows, added left to right in the tables' dtype, plus the position's embedding
    (learned, sinusoidal, or none when both are None)."""
    num_tokens, num_codebooks = input_ids.shape
    d_model = tables.shape[2]
    assert tables.shape[0] == num_codebooks and tables.stride(2) == 1
    out = buffers.empty((num_tokens, d_model), tables.dtype, tables.device)
    if num_tokens == 0:
        return out
    position = _LEARNED if learned_positions is not None else _SINUSOIDAL if sinusoid_freqs is not None else _NO_POSITION
    learned = learned_positions if learned_positions is not None else tables
    freqs = sinusoid_freqs if sinusoid_freqs is not None else tables
    assert learned.stride(-1) == 1
    block_d = triton.next_power_of_2(d_model)
    _embed_kernel[(num_tokens,)](
        input_ids, positions, tables, learned, freqs, out,
        input_ids.stride(0), input_ids.stride(1), positions.stride(0), tables.stride(0), tables.stride(1),
        learned.stride(0), out.stride(0),
        num_codebooks, d_model, d_model // 2,
        POSITION=position, BLOCK_D=block_d, num_warps=_warps(block_d),
    )
    return out


@triton.jit
def _add_norm_kernel(
    residual_ptr, update_ptr, weight_ptr, bias_ptr, summed_ptr, normed_ptr,
    stride_r, stride_u, stride_s, stride_n,
    d_model, eps,
    HAS_UPDATE: tl.constexpr, HAS_BIAS: tl.constexpr, RMS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    dims = tl.arange(0, BLOCK_D)
    mask = dims < d_model
    x = tl.load(residual_ptr + row * stride_r + dims, mask=mask, other=0.0).to(tl.float32)
    if HAS_UPDATE:
        update = tl.load(update_ptr + row * stride_u + dims, mask=mask, other=0.0).to(tl.float32)
        summed = (x + update).to(summed_ptr.dtype.element_ty)
        tl.store(summed_ptr + row * stride_s + dims, summed, mask=mask)
        x = summed.to(tl.float32)
    if RMS:
        y = x * tl.rsqrt(tl.sum(x * x, axis=0) / d_model + eps)
    else:
        centered = tl.where(mask, x - tl.sum(x, axis=0) / d_model, 0.0)
        y = centered * tl.rsqrt(tl.sum(centered * centered, axis=0) / d_model + eps)
    y = y * tl.load(weight_ptr + dims, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(bias_ptr + dims, mask=mask, other=0.0).to(tl.float32)
    tl.store(normed_ptr + row * stride_n + dims, y.to(normed_ptr.dtype.element_ty), mask=mask)


def add_norm(
    residual: torch.Tensor,  # [num_tokens, d_model]
    update: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    rms: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(residual + update, norm(residual + update)); with update None, (residual, norm(residual))."""
    num_tokens, d_model = residual.shape
    assert residual.stride(1) == 1 and (update is None or update.stride(1) == 1)
    summed = residual if update is None else buffers.empty(residual.shape, torch.promote_types(residual.dtype, update.dtype), residual.device)
    normed = buffers.empty(residual.shape, summed.dtype, residual.device)  # as F.layer_norm / F.rms_norm
    if num_tokens == 0:
        return summed, normed
    block_d = triton.next_power_of_2(d_model)
    _add_norm_kernel[(num_tokens,)](
        residual, update if update is not None else residual, weight, bias if bias is not None else weight,
        summed, normed,
        residual.stride(0), update.stride(0) if update is not None else 0, summed.stride(0), normed.stride(0),
        d_model, eps,
        HAS_UPDATE=update is not None, HAS_BIAS=bias is not None, RMS=rms, BLOCK_D=block_d,
        num_warps=_warps(block_d),
    )
    return summed, normed
