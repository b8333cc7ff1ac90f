"""EnCodec decoder: RVQ codes -> summed codebook vectors -> SEANet decoder with a residual LSTM -> PCM.

Matches transformers' `EncodecModel.decode` for the unchunked mono models (facebook/encodec_24khz, causal; and
facebook/encodec_32khz, MusicGen's codec, non-causal). Every decoder convolution has stride 1, so EnCodec's extra
right padding for strided convolutions is always zero here and the output has exactly frames * hop samples.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from vivace.codecs.soundstream import PaddedConv1d, TrimmedConvTranspose1d, dequantize
from vivace.errors import PackError
from vivace.model.weights import check_tensors, expected_shapes, fold_weight_norm, split_weight_norm
from vivace.packs.schema import from_dict, to_dict

NormType = Literal["weight_norm", "time_group_norm"]
PAD_MODES = ("constant", "reflect", "replicate", "circular")


@dataclass(frozen=True)
class EncodecConfig:
    """Defaults are facebook/encodec_24khz's; MusicGen's 32 kHz codec is `EncodecConfig.musicgen_32khz()`."""

    num_levels: int = 32  # codebooks stored; codes may use fewer (a lower bandwidth)
    codebook_size: int = 1024
    codebook_dim: int = 128  # also the decoder's input width (transformers' hidden_size)
    num_filters: int = 32  # width of the last upsampling block; earlier blocks double per ratio
    upsampling_ratios: tuple[int, ...] = (8, 5, 4, 2)
    num_residual_layers: int = 1  # residual blocks after each upsampling, dilation growth ** j
    residual_kernel_size: int = 3
    dilation_growth_rate: int = 2
    compress: int = 2  # residual hidden width = channels // compress
    use_conv_shortcut: bool = True  # 1x1 convolution on the residual path instead of identity
    kernel_size: int = 7
    last_kernel_size: int = 7
    num_lstm_layers: int = 2
    causal: bool = True
    pad_mode: str = "reflect"
    norm_type: NormType = "weight_norm"
    trim_right_ratio: float = 1.0  # causal transposed convolutions: share of the overhang cut on the right
    audio_channels: int = 1
    sampling_rate: int = 24000

    @staticmethod
    def musicgen_32khz() -> EncodecConfig:
        return EncodecConfig(
            num_levels=4, codebook_size=2048, num_filters=64, upsampling_ratios=(8, 5, 4, 4),
            use_conv_shortcut=False, causal=False, sampling_rate=32000,
        )

    @property
    def hop_length(self) -> int:
        hop = 1
        for ratio in self.upsampling_ratios:
            hop *= ratio
        return hop

    @property
    def frame_rate(self) -> float:
        return self.sampling_rate / self.hop_length

    def validate(self) -> None:
        positive = (
            "num_levels", "codebook_size", "codebook_dim", "num_filters", "num_residual_layers", "residual_kernel_size",
            "dilation_growth_rate", "compress", "kernel_size", "last_kernel_size", "num_lstm_layers", "sampling_rate",
        )
        for key in positive:
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise PackError(f"encodec: {key} must be a positive integer, got {value!r}")
        if not self.upsampling_ratios or any(isinstance(r, bool) or not isinstance(r, int) or r <= 0 for r in self.upsampling_ratios):
            raise PackError(f"encodec: upsampling_ratios must be positive integers, got {list(self.upsampling_ratios)}")
        for key in ("causal", "use_conv_shortcut"):
            if not isinstance(getattr(self, key), bool):
                raise PackError(f"encodec: {key} must be true or false, got {getattr(self, key)!r}")
        if self.pad_mode not in PAD_MODES:
            raise PackError(f"encodec: pad_mode {self.pad_mode!r} is not one of {list(PAD_MODES)}")
        if self.norm_type not in ("weight_norm", "time_group_norm"):
            raise PackError(f"encodec: norm_type {self.norm_type!r} is not 'weight_norm' or 'time_group_norm'")
        ratio = self.trim_right_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio <= 1 or (ratio != 1 and not self.causal):
            raise PackError(f"encodec: trim_right_ratio {ratio!r} must be in [0, 1], and 1 unless causal")
        if self.audio_channels != 1:
            raise PackError(f"encodec: only mono decoders are supported, audio_channels is {self.audio_channels}")


def encodec_config_to_dict(config: EncodecConfig) -> dict[str, Any]:
    return to_dict(config)


def encodec_config_from_dict(data: dict[str, Any], where: str = "encodec") -> EncodecConfig:
    config = from_dict(EncodecConfig, data, where)
    config.validate()
    return config


class EncodecConv1d(PaddedConv1d):
    def __init__(self, config: EncodecConfig, in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1) -> None:
        super().__init__(in_channels, out_channels, kernel_size, dilation, causal=config.causal, pad_mode=config.pad_mode)
        self.norm = nn.GroupNorm(1, out_channels) if config.norm_type == "time_group_norm" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return y if self.norm is None else self.norm(y)


class EncodecConvTranspose1d(TrimmedConvTranspose1d):
    def __init__(self, config: EncodecConfig, in_channels: int, out_channels: int, ratio: int) -> None:
        overhang = ratio  # kernel 2 * ratio, stride ratio
        trim_right = math.ceil(overhang * config.trim_right_ratio) if config.causal else overhang // 2
        super().__init__(in_channels, out_channels, 2 * ratio, ratio, trim_right)
        self.norm = nn.GroupNorm(1, out_channels) if config.norm_type == "time_group_norm" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.ConvTranspose1d.forward(self, x)
        # the group norm sees the untrimmed output, as in transformers
        return self.trim(y if self.norm is None else self.norm(y))


class EncodecResidual(nn.Module):
    def __init__(self, config: EncodecConfig, channels: int, dilation: int) -> None:
        super().__init__()
        hidden = channels // config.compress
        self.conv1 = EncodecConv1d(config, channels, hidden, config.residual_kernel_size, dilation)
        self.conv2 = EncodecConv1d(config, hidden, channels, 1)
        self.shortcut = EncodecConv1d(config, channels, channels, 1) if config.use_conv_shortcut else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(F.elu(self.conv1(F.elu(x))))
        return (x if self.shortcut is None else self.shortcut(x)) + y


class EncodecBlock(nn.Module):
    def __init__(self, config: EncodecConfig, in_channels: int, ratio: int) -> None:
        super().__init__()
        out_channels = in_channels // 2
        self.upsample = EncodecConvTranspose1d(config, in_channels, out_channels, ratio)
        self.residuals = nn.ModuleList(
            EncodecResidual(config, out_channels, config.dilation_growth_rate**j) for j in range(config.num_residual_layers)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.upsample(F.elu(x))
        for residual in self.residuals:
            x = residual(x)
        return x


class EncodecDecoder(nn.Module):
    def __init__(self, config: EncodecConfig) -> None:
        super().__init__()
        self.config = config
        width = config.num_filters * 2 ** len(config.upsampling_ratios)
        self.codebooks = nn.Parameter(torch.zeros(config.num_levels, config.codebook_size, config.codebook_dim))
        self.conv_in = EncodecConv1d(config, config.codebook_dim, width, config.kernel_size)
        self.lstm = nn.LSTM(width, width, config.num_lstm_layers, batch_first=True)
        blocks = []
        for ratio in config.upsampling_ratios:
            blocks.append(EncodecBlock(config, width, ratio))
            width //= 2
        self.blocks = nn.ModuleList(blocks)
        self.conv_out = EncodecConv1d(config, width, config.audio_channels, config.last_kernel_size)

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, levels <= num_levels, frames] -> summed codebook vectors [B, codebook_dim, frames]."""
        return dequantize(self.codebooks, codes)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, levels, frames] -> PCM [B, frames * hop_length]."""
        x = self.conv_in(self.dequantize(codes)).transpose(1, 2)
        x = (self.lstm(x)[0] + x).transpose(1, 2)
        for block in self.blocks:
            x = block(x)
        return self.conv_out(F.elu(x)).squeeze(1)


def encodec_stored_form(module: nn.Module) -> dict[str, torch.Tensor]:
    """An EnCodec module's tensors as stored: weight-normed convolutions as (weight_g, weight_v), as EnCodec trained
    them."""
    state = dict(module.state_dict())
    return split_weight_norm(state) if module.config.norm_type == "weight_norm" else state


ModuleT = TypeVar("ModuleT", bound=nn.Module)


def load_encodec_module(
    module_type: Callable[[EncodecConfig], ModuleT], config: EncodecConfig, stored: dict[str, torch.Tensor],
    dtype: torch.dtype, device: str | torch.device, where: str | Path, component: str,
) -> ModuleT:
    """An EnCodec decoder or encoder from its stored tensors: every name, shape and value checked (the first mismatch
    is named), the weight norm folded."""
    config.validate()
    with torch.device("meta"):
        module = module_type(config)
    check_tensors(component, Path(where), stored, expected_shapes(encodec_stored_form(module)))
    module.load_state_dict(fold_weight_norm(stored), strict=True, assign=True)
    module = module.to(device=device, dtype=dtype).eval()
    module.lstm.flatten_parameters()  # cuDNN wants one contiguous weight chunk; a no-op on the CPU
    return module


def load_encodec_decoder(
    config: EncodecConfig, stored: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu", where: str | Path = "encodec",
) -> EncodecDecoder:
    return load_encodec_module(EncodecDecoder, config, stored, dtype, device, where, "codec")
