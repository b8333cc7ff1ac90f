"""Streaming SoundStream decode: codes arrive chunk by chunk, each causal layer carries its left context.

A causal convolution keeps the last (k-1)*dilation samples of its input, so the next chunk starts where
zero padding would have been in a full decode; a transposed convolution keeps the (k - stride) samples it
spills past the end of a chunk and adds them to the next chunk's head (on torch's ops), or runs by its phases as a
causal convolution with the last ceil(k / stride) - 1 inputs kept (on the native convolutions). The concatenated output equals one
full decode (up to float summation order), and each chunk costs only its own frames, unlike
a ContextDecoder (vivace.codecs.context_decoder), which re-decodes `receptive_field_frames` of context every time.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vivace import _C
from vivace.codecs.soundstream import CausalConv1d, CausalConvTranspose1d, SoundStreamDecoder


def _tail(context: torch.Tensor, x: torch.Tensor, length: int) -> torch.Tensor:
    """The last `length` samples of context followed by x, as a tensor of their own (a view would pin all of x)."""
    if x.shape[-1] >= length:
        return x[..., x.shape[-1] - length :].clone()
    return torch.cat([context[..., x.shape[-1] :], x], dim=-1)


def _array(t: torch.Tensor | None) -> object:
    return None if t is None else t.detach().contiguous().numpy()


def _native_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dilation: int, elu: bool,
                 residual: torch.Tensor | None = None, context: torch.Tensor | None = None) -> torch.Tensor:
    return torch.from_numpy(_C.causal_conv1d(_array(x), _array(weight), _array(bias), dilation, elu, _array(residual),
                                             _array(context), torch.get_num_threads()))


def phase_weights(conv: CausalConvTranspose1d) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A causal transposed convolution of stride r as one causal convolution with r * out channels: output sample
    t * r + p is phase p's channels at t, and tap j = p + m * r reads input t - m, so phase p's kernel holds taps
    p, p + r, ... newest last. Returns (weight [r * out, in, ceil(k / r)], bias repeated per phase)."""
    stride, kernel = conv.stride[0], conv.kernel_size[0]
    taps = -(-kernel // stride)
    weight = F.pad(conv.weight.detach(), (0, taps * stride - kernel))  # [in, out, taps * stride]: tap m * stride + p
    inputs, outputs = weight.shape[:2]
    phases = weight.view(inputs, outputs, taps, stride).permute(3, 1, 0, 2).flip(-1)  # [stride, out, in, taps]
    bias = None if conv.bias is None else conv.bias.detach().repeat(stride)
    return phases.reshape(stride * outputs, inputs, taps).contiguous(), bias


class CodecStream:
    """One stream of rows [B]: push(codes [B, L, frames]) -> PCM [B, frames * hop] for exactly those frames.

    native: run every convolution, with the ELU before it and the residual add after it, as one
    vivace._C.causal_conv1d call (float32 on the CPU; None: where its AVX-512 form runs), the transposed ones by
    their phases (phase_weights), else as torch ops. The two agree to float32 rounding, not bit for bit."""

    def __init__(self, codec: SoundStreamDecoder, native: bool | None = None,
                 phases: dict[nn.Module, tuple[torch.Tensor, torch.Tensor | None]] | None = None) -> None:
        """phases: phase_weights of the transposed convolutions, filled as they are first needed; the streams of one
        backend share one, so the weights are copied once per backend, not once per stream."""
        self.codec = codec
        self.frames = 0  # frames decoded so far
        # per layer: a causal convolution's last input samples (before its ELU); a transposed one's last inputs
        # (native) or the output it spilled past the chunk (torch)
        self._carry: dict[nn.Module, torch.Tensor] = {}
        if native is None:
            native = (_C.causal_conv1d_fast() and codec.codebooks.device.type == "cpu"
                      and codec.codebooks.dtype == torch.float32)
        self.native = native
        self._phases = {} if phases is None else phases

    def _context(self, layer: nn.Module, x: torch.Tensor, length: int) -> torch.Tensor:
        """The `length` input samples before x (zeros before the first chunk); keeps x's for the next chunk."""
        context = self._carry.get(layer)
        if context is None:
            context = x.new_zeros(x.shape[0], x.shape[1], length)
        self._carry[layer] = _tail(context, x, length)
        return context

    def _conv(self, conv: CausalConv1d, x: torch.Tensor, elu: bool = False, residual: torch.Tensor | None = None) -> torch.Tensor:
        """conv(ELU(x) if elu else x) (+ residual), x following the previous chunk's input."""
        length = conv.left_context
        context = self._context(conv, x, length) if length else None
        if self.native:
            return _native_conv(x, conv.weight, conv.bias, conv.dilation[0], elu, residual, context)
        joined = x if context is None else torch.cat([context, x], dim=-1)
        y = nn.Conv1d.forward(conv, F.elu(joined) if elu else joined)
        return y if residual is None else residual + y

    def _upsample(self, conv: CausalConvTranspose1d, x: torch.Tensor) -> torch.Tensor:
        """conv(ELU(x)) for x's samples, x following the previous chunk's input."""
        stride = conv.stride[0]
        if self.native:
            if conv not in self._phases:
                self._phases[conv] = phase_weights(conv)
            weight, bias = self._phases[conv]
            taps = weight.shape[-1]
            context = self._context(conv, x, taps - 1) if taps > 1 else None
            y = _native_conv(x, weight, bias, 1, True, context=context)  # [B, stride * out, T]: phase-major
            batch, _, length = y.shape
            return y.view(batch, stride, -1, length).permute(0, 2, 3, 1).reshape(batch, -1, length * stride)
        # the bias goes on once, after the overlap from the previous chunk is added
        emitted = x.shape[-1] * stride
        y = F.conv_transpose1d(F.elu(x), conv.weight, None, stride)
        overlap = self._carry.get(conv)
        if overlap is not None:
            y[..., : overlap.shape[-1]] += overlap
        self._carry[conv] = y[..., emitted:].clone()
        y = y[..., :emitted]
        return y if conv.bias is None else y + conv.bias.view(1, -1, 1)

    @torch.inference_mode()
    def push(self, codes: torch.Tensor) -> torch.Tensor:
        codec = self.codec
        if codes.shape[-1] == 0:
            return codes.new_zeros(codes.shape[0], 0, dtype=codec.codebooks.dtype)
        x = self._conv(codec.conv_in, codec.dequantize(codes))
        for block in codec.blocks:
            x = self._upsample(block.upsample, x)
            for unit in block.residuals:
                x = self._conv(unit.conv2, self._conv(unit.conv1, x, elu=True), elu=True, residual=x)
        self.frames += codes.shape[-1]
        return self._conv(codec.conv_out, x, elu=True).squeeze(1)
