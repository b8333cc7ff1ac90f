"""bfloat16 weights under float32 activations (quantize="bfloat16").

Every linear of the stage transformers (layers and output heads) keeps its weights in bfloat16: half of float32's
bytes, which a decode step at batch 1 streams once, while the activations, the sums, norms and the KV cache stay
float32. Unlike dtype="bfloat16", which rounds every activation to bfloat16 as well, only the weights are rounded
(relative error at most 2**-9 each), so tokens stay much closer to float32's (docs/performance.md, "Reduced-byte
weights").

On a CPU with AVX-512 the layers run vivace's float32 linear reading the bfloat16 weights in place and widening
them exactly as it reads (csrc/float32_linear.cpp): the same fixed summation order as with float32 weights, so a
row's output depends on its own inputs only, and the native decoder stack runs them. Elsewhere the layer widens its
weights per call and runs F.linear (slower than float32 weights: the engine refuses the mode there).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from vivace import _C


@functools.cache
def bfloat16_weights_supported() -> bool:
    """Whether this CPU runs the bfloat16-weight kernel (float32_linear's AVX-512 form; asked once)."""
    return bool(_C.float32_linear_fast())


class BFloat16Linear(nn.Module):
    """A linear layer with bfloat16 weights and float32 (or wider) activations and outputs."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight.detach().to(torch.bfloat16).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float())
        self.activation = "none"  # the native stack reads it; this layer applies none itself
        self._native_args: tuple | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> BFloat16Linear:
        return cls(linear.weight, linear.bias)

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        self._native_args = None
        return super()._apply(fn, recurse)

    def native_args(self) -> tuple:
        """(weight bits uint16 [out, in], bias float32 or None) as _C.bfloat16_weight_linear and the native stack
        take them, viewed once (numpy has no bfloat16: the bits travel as uint16)."""
        if self._native_args is None:
            bits = self.weight.view(torch.int16).numpy().view("uint16")
            self._native_args = (bits, None if self.bias is None else self.bias.numpy())
        return self._native_args

    def native_ready(self) -> bool:
        """Whether vivace's kernel can run this layer (bfloat16 weights on the CPU, AVX-512)."""
        return self.weight.device.type == "cpu" and self.weight.dtype == torch.bfloat16 and bfloat16_weights_supported()

    def use_native(self, x: torch.Tensor) -> bool:
        return x.device.type == "cpu" and x.dtype == torch.float32 and self.native_ready()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_native(x):
            weight, bias = self.native_args()
            rows = x.reshape(-1, self.in_features).detach().contiguous()
            out = _C.bfloat16_weight_linear(rows.numpy(), weight, bias, torch.get_num_threads())
            return torch.from_numpy(out).view(*x.shape[:-1], self.out_features)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, weights=bfloat16"
