"""Every output and scratch buffer of the Triton wrappers comes from here, so that tests can poison them all."""
from __future__ import annotations

import torch


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=device)
