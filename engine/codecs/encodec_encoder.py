"""EnCodec encoder: PCM -> SEANet encoder with a residual LSTM -> embeddings -> RVQ codes.

Matches transformers' `EncodecModel.encode` for the unchunked mono models without input normalisation (MusicGen's
32 kHz codec among them): the mirror of vivace.codecs.encodec's decoder, whose codebooks it quantizes against.
A clip of n samples gives ceil(n / hop_length) frames: each strided convolution pads its input on the right to a
whole number of strides, as EnCodec does.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vivace.audio import read_pcm
from vivace.codecs.encodec import EncodecConfig, EncodecConv1d, EncodecResidual, encodec_stored_form, load_encodec_module
from vivace.codecs.soundstream import pad1d, rvq_quantize
from vivace.model.weights import expected_shapes
from vivace.packs.manifest import load_component
from vivace.resample import mono


class EncodecDownsample(nn.Conv1d):
    """Kernel 2 * ratio, stride ratio: ceil(length / ratio) frames out. Of the ratio samples of padding, all go left
    when causal, else the odd one left; the right gets what completes the last stride."""

    def __init__(self, config: EncodecConfig, in_channels: int, out_channels: int, ratio: int) -> None:
        super().__init__(in_channels, out_channels, 2 * ratio, stride=ratio)
        self.ratio, self.causal, self.pad_mode = ratio, config.causal, config.pad_mode
        self.norm = nn.GroupNorm(1, out_channels) if config.norm_type == "time_group_norm" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = self.ratio if self.causal else self.ratio - self.ratio // 2
        right = self.ratio - left + (-x.shape[-1]) % self.ratio
        y = super().forward(pad1d(x, left, right, self.pad_mode))
        return y if self.norm is None else self.norm(y)


class EncodecDownBlock(nn.Module):
    def __init__(self, config: EncodecConfig, in_channels: int, ratio: int) -> None:
        super().__init__()
        self.residuals = nn.ModuleList(
            EncodecResidual(config, in_channels, config.dilation_growth_rate**j) for j in range(config.num_residual_layers)
        )
        self.downsample = EncodecDownsample(config, in_channels, 2 * in_channels, ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for residual in self.residuals:
            x = residual(x)
        return self.downsample(F.elu(x))


class EncodecEncoder(nn.Module):
    def __init__(self, config: EncodecConfig) -> None:
        super().__init__()
        self.config = config
        width = config.num_filters
        self.conv_in = EncodecConv1d(config, config.audio_channels, width, config.kernel_size)
        blocks = []
        for ratio in reversed(config.upsampling_ratios):
            blocks.append(EncodecDownBlock(config, width, ratio))
            width *= 2
        self.blocks = nn.ModuleList(blocks)
        self.lstm = nn.LSTM(width, width, config.num_lstm_layers, batch_first=True)
        self.conv_out = EncodecConv1d(config, width, config.codebook_dim, config.last_kernel_size)

    def forward(self, pcm: torch.Tensor) -> torch.Tensor:
        """PCM [B, samples] -> embeddings [B, codebook_dim, ceil(samples / hop_length)]."""
        x = self.conv_in(pcm.unsqueeze(1))
        for block in self.blocks:
            x = block(x)
        x = x.transpose(1, 2)
        x = (self.lstm(x)[0] + x).transpose(1, 2)
        return self.conv_out(F.elu(x))


@torch.inference_mode()
def encode_audio(
    encoder: EncodecEncoder, codebooks: torch.Tensor, audio: Any, sample_rate: Any, what: str = "audio",
) -> np.ndarray:
    """Audio (a sound file path, or PCM [samples] / [channels, samples] at sample_rate) -> int64 codes [levels of
    codebooks, ceil(samples / hop)], as transformers' EncodecModel.encode gives them: downmixed to mono and resampled
    to the codec's rate first. what names the argument in errors."""
    pcm, rate = read_pcm(audio, sample_rate, what)
    wave = mono(pcm, rate, encoder.config.sampling_rate).to(codebooks.device)
    return rvq_quantize(codebooks, encoder(wave[None]))[0].cpu().numpy()


def read_encodec_encoder(path: Path, component: str, config: EncodecConfig, device: str | torch.device = "cpu") -> EncodecEncoder:
    """The encoder stored as component.safetensors of the pack at path (float32)."""
    with torch.device("meta"):
        expected = expected_shapes(encodec_stored_form(EncodecEncoder(config)))
    stored = load_component(path, component, expected)
    return load_encodec_encoder(config, stored, torch.float32, device, path / f"{component}.safetensors")


def load_encodec_encoder(
    config: EncodecConfig, stored: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu", where: str | Path = "codec_encoder",
) -> EncodecEncoder:
    """Checks every stored tensor's name, shape and values (the first mismatch is named), folds the weight norm."""
    return load_encodec_module(EncodecEncoder, config, stored, dtype, device, where, "codec_encoder")
