"""SoundStream encoder: PCM -> causal strided convolutions -> embeddings -> RVQ codes, the mirror of
vivace.codecs.soundstream's decoder, whose codebooks it quantizes against.

Every convolution is causal, so the codes of a clip's first n frames do not depend on what follows them. A clip
of n samples gives floor(n / hop_length) frames (a trailing partial frame is dropped, as the decoder cannot give
back less than a frame).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vivace.audio import read_pcm
from vivace.codecs.soundstream import CodecConfig, rvq_quantize
from vivace.resample import mono


class StridedCausalConv1d(nn.Conv1d):
    """Causal convolution with stride: kernel - stride samples of left padding, so each output sees its own stride
    and the samples before it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, (self.kernel_size[0] - self.stride[0], 0)))


class EncoderUnit(nn.Module):
    def __init__(self, channels: int, kernel_size: int, dilation: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(channels, channels // 2, kernel_size, dilation=dilation)
        self.conv2 = nn.Conv1d(channels // 2, channels, 1)
        self.pad = (kernel_size - 1) * dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.elu(self.conv1(F.pad(F.elu(x), (self.pad, 0)))))


class SoundStreamEncoder(nn.Module):
    def __init__(self, config: CodecConfig) -> None:
        super().__init__()
        self.config = config
        width = config.channels
        layers: list[nn.Module] = [StridedCausalConv1d(1, width, config.kernel_size)]
        for ratio in reversed(config.ratios):
            layers += [EncoderUnit(width, config.residual_kernel_size, d) for d in config.residual_dilations]
            layers += [nn.ELU(), StridedCausalConv1d(width, 2 * width, 2 * ratio, stride=ratio)]
            width *= 2
        layers += [nn.ELU(), StridedCausalConv1d(width, config.codebook_dim, 3)]
        self.layers = nn.Sequential(*layers)

    def forward(self, pcm: torch.Tensor) -> torch.Tensor:
        """PCM [B, samples] -> embeddings [B, codebook_dim, samples // hop_length]."""
        frames = pcm.shape[-1] // self.config.hop_length
        return self.layers(pcm[..., : frames * self.config.hop_length].unsqueeze(1))


@torch.inference_mode()
def encode_soundstream(
    encoder: SoundStreamEncoder, codebooks: torch.Tensor, audio: Any, sample_rate: Any, codec_rate: int,
    what: str = "audio",
) -> np.ndarray:
    """Audio (a sound file path, or PCM [samples] / [channels, samples] at sample_rate) -> int64 codes [levels of
    codebooks, samples // hop], downmixed to mono and resampled to codec_rate first. what names the argument in
    errors."""
    pcm, rate = read_pcm(audio, sample_rate, what)
    wave = mono(pcm, rate, codec_rate).to(codebooks.device)
    return soundstream_codes(encoder, codebooks, wave).cpu().numpy()


@torch.inference_mode()
def soundstream_codes(encoder: SoundStreamEncoder, codebooks: torch.Tensor, wave: torch.Tensor) -> torch.Tensor:
    """Mono PCM [samples] at the codec's rate -> int64 codes [levels of codebooks, samples // hop]."""
    return rvq_quantize(codebooks.float(), encoder(wave[None].float()))[0]
