"""Int8 weight-only quantization of the stage transformers' linear layers.

Each weight row (output channel) is stored as int8 with one float scale: w ≈ q * scale, scale = max|w_row| / 127.
Activations, norms, embeddings and the KV cache keep the engine's dtype. Applied after loading by swapping every
nn.Linear inside the layers (attention qkv / o, cross-attention q / kv / o, FFN) and the output heads for an
Int8Linear.

CPU: torch._weight_int8pack_mm, fed bfloat16 activations: its float32-activation path is a scalar loop, its
bfloat16 path is vectorized (docs/performance.md, "int8 weight-only"); it needs in_features to be a multiple of 32,
so other widths dequantize per call. CUDA: dequantize per call and a plain matmul.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from vivace.errors import VivaceError
from vivace.model.transformer import StageTransformer

QUANTIZE_MODES = ("int8",)
PACK_MM_ALIGN = 32


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float -> int8 [out, in] and float32 scales [out], symmetric per output channel."""
    w = weight.detach().float()
    scales = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127.0
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


@functools.cache
def pack_mm_available() -> bool:
    """Whether torch._weight_int8pack_mm runs on this CPU and matches the dequantized product."""
    if not hasattr(torch, "_weight_int8pack_mm"):
        return False
    generator = torch.Generator().manual_seed(0)
    q = torch.randint(-127, 128, (48, 64), dtype=torch.int8, generator=generator)
    scales = torch.rand(48, generator=generator) + 0.5
    x = torch.randn(3, 64, generator=generator)
    try:
        out = torch._weight_int8pack_mm(x.bfloat16(), q, scales.bfloat16()).float()
    except RuntimeError:
        return False
    reference = x @ (q.float() * scales[:, None]).t()
    return bool(((out - reference).norm() <= 0.02 * reference.norm()).item())


class Int8Linear(nn.Module):
    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scales.float())
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype))
        self.register_buffer("scales_bf16", scales.to(torch.bfloat16))

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        q, scales = quantize_weight(linear.weight)
        return cls(q, scales, linear.bias, linear.weight.dtype)

    def use_pack_mm(self, x: torch.Tensor) -> bool:
        return x.device.type == "cpu" and self.in_features % PACK_MM_ALIGN == 0 and pack_mm_available()

    def dequantized(self) -> torch.Tensor:
        return self.weight.float() * self.scales[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if self.use_pack_mm(x):
            out = torch._weight_int8pack_mm(rows.to(torch.bfloat16).contiguous(), self.weight, self.scales_bf16).to(x.dtype)
        else:
            out = F.linear(rows, self.weight.to(x.dtype)) * self.scales.to(x.dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def quantize_linears(module: nn.Module) -> int:
    """Replaces every nn.Linear below module with an Int8Linear; returns how many were replaced."""
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, Int8Linear.from_linear(child))
            count += 1
        else:
            count += quantize_linears(child)
    return count


def quantize_stage(model: StageTransformer) -> int:
    """The decoder layers' linears and the output heads of one StageTransformer (embeddings and norms stay)."""
    return quantize_linears(model.layers) + quantize_linears(model.heads)


def check_quantize(mode: str | None) -> None:
    if mode is not None and mode not in QUANTIZE_MODES:
        raise VivaceError(f"unknown quantize mode {mode!r} (choose None or one of {', '.join(QUANTIZE_MODES)})")
