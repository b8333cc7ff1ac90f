"""SoundStream decoder: RVQ codes -> embeddings -> causal SEANet decoder -> PCM.

Every convolution is causal (left padding only; transposed convolutions trim their right overhang), so
the samples of frame t depend only on frames <= t. A chunk decoded with `receptive_field_frames` of
left context is therefore the same as the matching slice of one full decode.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class CodecConfig:
    """SoundStream-style decoder: RVQ dequantisation then a causal SEANet convolutional decoder."""

    num_levels: int = 12
    codebook_size: int = 1024
    codebook_dim: int = 128
    channels: int = 32  # width of the last decoder block; earlier blocks double per ratio
    ratios: tuple[int, ...] = (8, 5, 4, 3)  # upsampling factors, product = hop length
    residual_dilations: tuple[int, ...] = (1, 3, 9)
    kernel_size: int = 7
    residual_kernel_size: int = 3

    @property
    def hop_length(self) -> int:
        hop = 1
        for ratio in self.ratios:
            hop *= ratio
        return hop


def pad1d(x: torch.Tensor, left: int, right: int, mode: str = "constant") -> torch.Tensor:
    """F.pad, except that reflect also works on inputs no longer than the pad: zeros go on the right first (EnCodec)."""
    if mode != "reflect" or x.shape[-1] > max(left, right):
        return F.pad(x, (left, right), mode)
    extra = max(left, right) - x.shape[-1] + 1
    padded = F.pad(F.pad(x, (0, extra)), (left, right), mode)
    return padded[..., : padded.shape[-1] - extra]


class PaddedConv1d(nn.Conv1d):
    """Length-preserving conv: (k-1)*dilation samples of padding, all on the left when causal, else split with the
    odd one on the left."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1,
        causal: bool = True, pad_mode: str = "constant",
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, dilation=dilation)
        total = (kernel_size - 1) * dilation
        self.pad_left = total if causal else total - total // 2
        self.pad_right = total - self.pad_left
        self.pad_mode = pad_mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(pad1d(x, self.pad_left, self.pad_right, self.pad_mode))


class CausalConv1d(PaddedConv1d):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1) -> None:
        super().__init__(in_channels, out_channels, kernel_size, dilation)

    @property
    def left_context(self) -> int:
        return (self.kernel_size[0] - 1) * self.dilation[0]


class TrimmedConvTranspose1d(nn.ConvTranspose1d):
    """Transposed conv giving exactly stride samples per input sample: of the (k - stride) it overhangs,
    `trim_right` are cut from the right end and the rest from the left."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, trim_right: int) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride)
        self.trim_left = kernel_size - stride - trim_right
        self.trim_right = trim_right

    def trim(self, y: torch.Tensor) -> torch.Tensor:
        return y[..., self.trim_left : y.shape[-1] - self.trim_right]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trim(super().forward(x))


class CausalConvTranspose1d(TrimmedConvTranspose1d):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, trim_right=kernel_size - stride)

    @property
    def left_context(self) -> int:
        return math.ceil(self.kernel_size[0] / self.stride[0]) - 1


def dequantize(codebooks: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """RVQ decode: codes [B, L, frames] with L <= levels of codebooks [levels, size, dim] -> summed vectors [B, dim, frames]."""
    _, size, dim = codebooks.shape
    levels = torch.arange(codes.shape[1], device=codes.device).view(1, -1, 1)
    vectors = codebooks.view(-1, dim)[levels * size + codes.long()]  # [B, L, T, D]
    return vectors.sum(dim=1).transpose(1, 2)


def rvq_quantize(codebooks: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
    """Residual vector quantization against codebooks [levels, size, dim]: embeddings [B, dim, frames] -> codes
    [B, levels, frames]. Each level takes the nearest code of what the levels before left, with EnCodec's distance
    arithmetic (so that near-ties resolve as in transformers)."""
    batch, dim, frames = embeddings.shape
    residual = embeddings.transpose(1, 2).reshape(-1, dim)
    codes = []
    for embed in codebooks:
        distance = -(residual.pow(2).sum(1, keepdim=True) - 2 * residual @ embed.t() + embed.t().pow(2).sum(0, keepdim=True))
        index = distance.max(dim=-1).indices
        residual = residual - F.embedding(index, embed)
        codes.append(index.view(batch, frames))
    return torch.stack(codes, dim=1)


class ResidualUnit(nn.Module):
    def __init__(self, channels: int, kernel_size: int, dilation: int) -> None:
        super().__init__()
        self.conv1 = CausalConv1d(channels, channels // 2, kernel_size, dilation=dilation)
        self.conv2 = CausalConv1d(channels // 2, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.elu(self.conv1(F.elu(x))))


class DecoderBlock(nn.Module):
    def __init__(self, in_channels: int, ratio: int, config: CodecConfig) -> None:
        super().__init__()
        out_channels = in_channels // 2
        self.upsample = CausalConvTranspose1d(in_channels, out_channels, 2 * ratio, stride=ratio)
        self.residuals = nn.ModuleList(
            ResidualUnit(out_channels, config.residual_kernel_size, d) for d in config.residual_dilations
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.upsample(F.elu(x))
        for unit in self.residuals:
            x = unit(x)
        return x


class SoundStreamDecoder(nn.Module):
    def __init__(self, config: CodecConfig) -> None:
        super().__init__()
        self.config = config
        width = config.channels * 2 ** len(config.ratios)
        self.codebooks = nn.Parameter(torch.zeros(config.num_levels, config.codebook_size, config.codebook_dim))
        self.conv_in = CausalConv1d(config.codebook_dim, width, config.kernel_size)
        blocks = []
        for ratio in config.ratios:
            blocks.append(DecoderBlock(width, ratio, config))
            width //= 2
        self.blocks = nn.ModuleList(blocks)
        self.conv_out = CausalConv1d(width, 1, config.kernel_size)

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, num_levels, frames] -> summed codebook vectors [B, codebook_dim, frames]."""
        return dequantize(self.codebooks, codes)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, levels <= num_levels, frames] -> PCM [B, frames * hop_length]."""
        return self.decode_vectors(self.dequantize(codes))

    def decode_vectors(self, vectors: torch.Tensor) -> torch.Tensor:
        """Summed codebook vectors [B, codebook_dim, frames] -> PCM [B, frames * hop_length]."""
        x = self.conv_in(vectors)
        for block in self.blocks:
            x = block(x)
        return self.conv_out(F.elu(x)).squeeze(1)

    def receptive_field_frames(self) -> int:
        """Frames of left context after which a frame's samples no longer depend on earlier frames."""
        frames = self.conv_in.left_context
        rate = 1  # samples per frame at the current layer's input
        for block, ratio in zip(self.blocks, self.config.ratios):
            frames += block.upsample.left_context / rate
            rate *= ratio
            frames += sum(unit.conv1.left_context for unit in block.residuals) / rate
        frames += self.conv_out.left_context / rate
        return math.ceil(frames) + 1
