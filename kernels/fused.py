"""Elementwise fusions of the stage transformer: the plain-torch references the Triton kernels must match.

embed_codebooks: a token's input embedding is the sum of one row per codebook (MusicGen sums four) plus its
position's embedding (a learned row, or MusicGen's sinusoid). add_norm: the residual stream's update and the next
sublayer's norm, one read of the row instead of three. The references are the exact ops of StageTransformer's
unfused path, so routing the CPU through them changes no bit.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vivace.kernels.sinusoid import sinusoidal_embedding


def embed_codebooks(
    input_ids: torch.Tensor,  # [num_tokens, num_codebooks] int64
    positions: torch.Tensor,  # [num_tokens] int64
    tables: torch.Tensor,  # [num_codebooks, vocab_size, d_model]
    learned_positions: torch.Tensor | None = None,  # [max_positions, d_model]
    sinusoid_freqs: torch.Tensor | None = None,  # [d_model // 2] float32: MusicGen's sinusoidal positions
) -> torch.Tensor:
    """Sum of the codebooks' rows, added left to right in the tables' dtype, plus the position's embedding
    (learned, sinusoidal, or none when both are None)."""
    h = tables[0][input_ids[:, 0]]
    for c in range(1, tables.shape[0]):
        h = h + tables[c][input_ids[:, c]]
    if learned_positions is not None:
        h = h + learned_positions[positions]
    if sinusoid_freqs is not None:
        h = h + sinusoidal_embedding(positions, h.shape[1], sinusoid_freqs).to(h.dtype)
    return h


def add_norm(
    residual: torch.Tensor,  # [num_tokens, d_model]
    update: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    rms: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(residual + update, norm(residual + update)); with update None, (residual, norm(residual))."""
    summed = residual if update is None else residual + update
    shape = (summed.shape[-1],)
    x = summed
    if weight.dtype != summed.dtype:
        # weights in another dtype than the activations (float32 norms over bf16 rows): normalize in float32 and
        # round once, as torch's CPU kernels do; its CUDA kernels refuse mixed dtypes
        x, weight = summed.float(), weight.float()
        bias = None if bias is None else bias.float()
    normed = F.rms_norm(x, shape, weight, eps) if rms else F.layer_norm(x, shape, weight, bias, eps)
    return summed, normed.to(summed.dtype)
