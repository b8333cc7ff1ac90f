"""4-bit group-wise weights for the stage transformers' layers (quantize="int4").

Each weight row is cut into groups of 64 inputs, each group stored as 4-bit integers q in [-8, 7] with one bfloat16
scale: w ≈ q * scale, scale = max|w_group| / 7 (rounded to bfloat16 before q is rounded, so the stored scale is the
one q was made for). Half the bytes of int8 weights, plus 1/16 for the scales: a decode step at batch 1 streams
every weight once, so its linears take about half int8's time where memory bandwidth bounds them.

The layers run vivace's kernel (csrc/int4_linear.cpp, AVX-512 VNNI or AVX2, the same bits): activations quantized
per row and group of 64 to symmetric int8, each group's products summed exactly in int32, the groups added in order
in float32, so a row's output depends on its own inputs only. The weights are stored once, in the kernel's packed layout (_C.int4_pack).
The output heads stay int8 (quantize_stage), as most 4-bit schemes keep theirs at higher precision; they are 2 % of
MusicGen-small's weights, and 4-bit heads were not measured. docs/performance.md ("Reduced-byte weights") has the
speed and the agreement with float32.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from vivace import _C

GROUP = 64  # inputs per scale (csrc/int4_linear.h kInt4Group)
LEVELS = 7  # |q| <= 7 from the scale; -8 only where bfloat16 rounding shrank the scale


@functools.cache
def int4_isas() -> tuple[str, ...]:
    """The instruction sets vivace's int4 kernel runs on this CPU, fastest first ("avx512_vnni", "avx2")."""
    return tuple(_C.int4_linear_isas())


def int4_supported() -> bool:
    """Whether this CPU runs vivace's int4 kernel (AVX-512 VNNI or AVX2)."""
    return bool(int4_isas())


def quantize_int4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float -> q int8 [out, in] in [-8, 7] and float32 scales [out, ceil(in / 64)] (bfloat16 values)."""
    w = weight.detach().float()
    out_features, in_features = w.shape
    groups = -(-in_features // GROUP)
    padded = F.pad(w, (0, groups * GROUP - in_features)).view(out_features, groups, GROUP)
    scales = (padded.abs().amax(dim=2) / LEVELS).clamp(min=torch.finfo(torch.bfloat16).tiny)
    scales = scales.to(torch.bfloat16).float()
    q = torch.round(padded / scales[:, :, None]).clamp(-8, 7).to(torch.int8)
    return q.view(out_features, groups * GROUP)[:, :in_features].contiguous(), scales


def dequantize_int4(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    out_features, in_features = q.shape
    expanded = scales.repeat_interleave(GROUP, dim=1)[:, :in_features]
    return q.float() * expanded


def int4_reference(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The kernel's arithmetic in torch (tests): x [rows, in] quantized per row and group of 64 to symmetric int8,
    exact integer sums per group, the groups added in order in float32 (the kernel fuses each multiply-add, so
    the two agree to float32 rounding, not bit for bit)."""
    rows, in_features = x.shape
    groups = scales.shape[1]
    pad = groups * GROUP - in_features
    xg = F.pad(x.float(), (0, pad)).view(rows, groups, GROUP)
    magnitude = xg.abs().amax(dim=2)
    x_scales = torch.where(magnitude > 0, magnitude / 127.0, torch.ones_like(magnitude))
    xq = torch.round(xg * (1.0 / x_scales)[:, :, None]).clamp(-127, 127)
    qg = F.pad(q.float(), (0, pad)).view(q.shape[0], groups, GROUP)
    sums = torch.einsum("rgk,ngk->rng", xq.double(), qg.double()).float()  # exact: |sum| < 2**24
    out = torch.zeros(rows, q.shape[0])
    for g in range(groups):
        out = out + sums[:, :, g] * (scales[None, :, g] * x_scales[:, g, None])
    return out if bias is None else out + bias.float()


class Int4Linear(nn.Module):
    """A linear layer with 4-bit group-wise weights, held in _C.int4_pack's layout (the only copy)."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        super().__init__()
        self.out_features, self.in_features = q.shape
        packed = _C.int4_pack(q.cpu().contiguous().numpy(), scales.cpu().float().contiguous().numpy())
        self.register_buffer("packed", torch.from_numpy(packed))
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype))
        self.activation = "none"  # "gelu": this layer applies GELU to its outputs (FeedForward.fuse_activation)
        self._native_args: tuple | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int4Linear:
        q, scales = quantize_int4(linear.weight)
        return cls(q, scales, linear.bias, linear.weight.dtype)

    def unpacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(q int8 [out, in], scales float32 [out, groups]) as stored."""
        q, scales = _C.int4_unpack(self.packed.cpu().numpy(), self.out_features, self.in_features)
        return torch.from_numpy(q), torch.from_numpy(scales)

    def dequantized(self) -> torch.Tensor:
        return dequantize_int4(*self.unpacked())

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        self._native_args = None
        return super()._apply(fn, recurse)

    def native_args(self) -> tuple:
        """(packed, bias) as _C.int4_linear and the native stack take them, converted once."""
        if self._native_args is None:
            bias = None if self.bias is None else self.bias.float().numpy()
            self._native_args = (self.packed.numpy(), bias)
        return self._native_args

    def native_ready(self) -> bool:
        """Whether vivace's kernel can run this layer (its weights on the CPU, an instruction set for it)."""
        return self.packed.device.type == "cpu" and int4_supported()

    def use_native(self, x: torch.Tensor) -> bool:
        return x.device.type == "cpu" and x.dtype == torch.float32 and self.native_ready()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if self.use_native(x):
            packed, bias = self.native_args()
            out = torch.from_numpy(_C.int4_linear(rows.detach().contiguous().numpy(), packed, self.out_features, bias,
                                                  torch.get_num_threads(), self.activation))
            return out.view(*x.shape[:-1], self.out_features)
        # elsewhere (CUDA, other dtypes, CPUs with neither AVX-512 VNNI nor AVX2): the dequantized weights, per call
        out = F.linear(rows, self.dequantized().to(device=x.device, dtype=x.dtype), self.bias)
        if self.activation == "gelu":
            out = F.gelu(out)
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        fused = "" if self.activation == "none" else f", activation={self.activation}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"group={GROUP}{fused}")
