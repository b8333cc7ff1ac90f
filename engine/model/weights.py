"""Stored (training-time) tensor names <-> inference weights.

Packs store what training produces: separate q/k/v projections and weight-normed convolutions
(weight_g, weight_v). Loading fuses q/k/v into one projection (k/v for cross-attention) and folds the
weight norm into plain convolution weights, so every runtime path reads fused weights.
"""
from __future__ import annotations

from pathlib import Path

import torch

from vivace.errors import PackError

_SELF_PARTS = ("q_proj", "k_proj", "v_proj")
_CROSS_PARTS = ("k_proj", "v_proj")


def unfuse_attention(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    stored: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if ".attn.qkv_proj." in name:
            for part, piece in zip(_SELF_PARTS, tensor.chunk(3, dim=0)):
                stored[name.replace("qkv_proj", part)] = piece.contiguous()
        elif ".cross_attn.kv_proj." in name:
            for part, piece in zip(_CROSS_PARTS, tensor.chunk(2, dim=0)):
                stored[name.replace("kv_proj", part)] = piece.contiguous()
        else:
            stored[name] = tensor
    return stored


def fuse_attention(stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    fused: dict[str, torch.Tensor] = {}
    for name, tensor in stored.items():
        if ".attn.q_proj." in name:
            fused[name.replace("q_proj", "qkv_proj")] = torch.cat([stored[name.replace("q_proj", p)] for p in _SELF_PARTS])
        elif ".cross_attn.k_proj." in name:
            fused[name.replace("k_proj", "kv_proj")] = torch.cat([stored[name.replace("k_proj", p)] for p in _CROSS_PARTS])
        elif ".attn.k_proj." in name or ".attn.v_proj." in name or ".cross_attn.v_proj." in name:
            continue
        else:
            fused[name] = tensor
    return fused


def _is_conv_weight(name: str, tensor: torch.Tensor) -> bool:
    return name.endswith(".weight") and tensor.dim() == 3


def split_weight_norm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Plain conv weights -> (weight_g, weight_v) with g the per-output-slice norm (torch's weight_norm, dim=0)."""
    stored: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if _is_conv_weight(name, tensor):
            base = name[: -len("weight")]
            stored[base + "weight_g"] = tensor.norm(dim=(1, 2), keepdim=True)
            stored[base + "weight_v"] = tensor
        else:
            stored[name] = tensor
    return stored


def fold_weight_norm(stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    folded: dict[str, torch.Tensor] = {}
    for name, tensor in stored.items():
        if name.endswith(".weight_g"):
            continue
        if name.endswith(".weight_v"):
            base = name[: -len("weight_v")]
            g = stored[base + "weight_g"].float()
            v = tensor.float()
            folded[base + "weight"] = (g * v / v.norm(dim=(1, 2), keepdim=True)).to(tensor.dtype)
        else:
            folded[name] = tensor
    return folded


def expected_shapes(stored_form: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {name: tuple(tensor.shape) for name, tensor in stored_form.items()}


def check_tensors(component: str, file: Path, stored: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]]) -> None:
    """Stored tensors against the expected names and shapes: the first missing, mis-shaped, unexpected or
    non-finite tensor is named."""
    for name, shape in expected.items():
        if name not in stored:
            raise PackError(f"{file}: missing tensor {name!r} of component {component!r}")
        if tuple(stored[name].shape) != shape:
            raise PackError(f"{file}: tensor {name!r} has shape {list(stored[name].shape)}, expected {list(shape)}")
    for name in stored:
        if name not in expected:
            raise PackError(f"{file}: unexpected tensor {name!r} in component {component!r}")
    for name, tensor in stored.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise PackError(f"{file}: tensor {name!r} holds NaN or infinite values")
