"""Streaming SoundStream decode: codes arrive chunk by chunk, each causal layer carries its left context.

A causal convolution keeps the last (k-1)*dilation samples of its input, so the next chunk starts where
zero padding would have been in a full decode; a transposed convolution keeps the (k - stride) samples it
spills past the end of a chunk and adds them to the next chunk's head. The concatenated output equals one
full decode (up to float summation order), and each chunk costs only its own frames, unlike
a ContextDecoder (vivace.codecs.context_decoder), which re-decodes `receptive_field_frames` of context every time.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vivace.codecs.soundstream import CausalConv1d, CausalConvTranspose1d, SoundStreamDecoder


class CodecStream:
    """One stream of rows [B]: push(codes [B, L, frames]) -> PCM [B, frames * hop] for exactly those frames."""

    def __init__(self, codec: SoundStreamDecoder) -> None:
        self.codec = codec
        self.frames = 0  # frames decoded so far
        self._carry: dict[nn.Module, torch.Tensor] = {}

    def _conv(self, conv: CausalConv1d, x: torch.Tensor) -> torch.Tensor:
        context = conv.left_context
        if context == 0:
            return nn.Conv1d.forward(conv, x)
        carry = self._carry.get(conv)
        if carry is None:
            carry = x.new_zeros(x.shape[0], x.shape[1], context)
        joined = torch.cat([carry, x], dim=-1)
        self._carry[conv] = joined[..., joined.shape[-1] - context :].clone()  # a view would pin all of joined
        return nn.Conv1d.forward(conv, joined)

    def _upsample(self, conv: CausalConvTranspose1d, x: torch.Tensor) -> torch.Tensor:
        # the bias goes on once, after the overlap from the previous chunk is added
        stride = conv.stride[0]
        emitted = x.shape[-1] * stride
        y = F.conv_transpose1d(x, conv.weight, None, stride)
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
            x = self._upsample(block.upsample, F.elu(x))
            for unit in block.residuals:
                x = x + self._conv(unit.conv2, F.elu(self._conv(unit.conv1, F.elu(x))))
        self.frames += codes.shape[-1]
        return self._conv(codec.conv_out, F.elu(x)).squeeze(1)
