"""Position schemes: T5 relative buckets (as a distance table) and MusicGen's sinusoidal embedding."""
from __future__ import annotations

import math

import torch


def t5_relative_bucket(distance: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """Unidirectional T5 bucket of distance = query_pos - key_pos (>= 0 for visible keys).

    Half the buckets hold exact small distances, the rest grow logarithmically up to max_distance,
    after which every distance shares the last bucket.
    """
    distance = distance.clamp(min=0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    log_ratio = torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact)
    large = max_exact + (log_ratio * (num_buckets - max_exact)).to(torch.long)
    large = torch.minimum(large, torch.full_like(large, num_buckets - 1))
    return torch.where(is_small, distance, large)


def distance_bias_table(bucket_bias: torch.Tensor, max_distance: int) -> torch.Tensor:
    """[num_buckets, num_heads] learned bias -> [num_heads, max_distance + 1] indexed by min(distance, max_distance)."""
    num_buckets = bucket_bias.shape[0]
    buckets = t5_relative_bucket(torch.arange(max_distance + 1), num_buckets, max_distance)
    return bucket_bias[buckets].transpose(0, 1).contiguous()


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
