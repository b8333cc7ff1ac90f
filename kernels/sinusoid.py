"""MusicGen's sinusoidal position embedding: the table the fused embedding kernels add (and their reference)."""
from __future__ import annotations

import math

import torch


def sinusoidal_embedding(positions: torch.Tensor, dim: int, frequencies: torch.Tensor | None = None) -> torch.Tensor:
    """MusicGen's sinusoidal table: [cos | sin] halves, frequencies exp(-log(10000) * i / (dim/2 - 1))."""
    if frequencies is None:
        frequencies = sinusoid_frequencies(dim, positions.device)
    angles = positions.float().unsqueeze(1) * frequencies.unsqueeze(0)
    emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)
    if dim % 2:
        emb = torch.cat([emb, emb.new_zeros(emb.shape[0], 1)], dim=1)
    return emb


def sinusoid_frequencies(dim: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[dim // 2] float32: the angle of position p in column i (and i + dim // 2) is p * frequencies[i].

    Computed on the CPU, as transformers computes its table, whatever the device."""
    half = dim // 2
    return torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / (half - 1))).to(device)
