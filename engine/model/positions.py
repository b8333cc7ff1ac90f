"""T5 relative position buckets, as a per-distance bias table (MusicGen's sinusoid: vivace.kernels.sinusoid)."""
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
