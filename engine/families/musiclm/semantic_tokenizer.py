"""Semantic tokens from audio: k-means units over chroma and coarse log-mel frames.

MusicLM takes its semantic tokens from k-means over a w2v-BERT layer; a pack trained without one (the bundled demo
pack, recipes/demo_pack/semantic.py) clusters features that carry what those tokens are for: harmony and melody
(12-bin chroma) and coarse timbre and loudness (log-mel bands). A pack that ships its tokenizer
(semantic_tokenizer.safetensors) turns an audio prompt into the semantic prefix its stages were trained on.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from vivace.errors import PackError


def mel_filterbank(n_fft: int, n_mels: int, sample_rate: int, fmin: float = 30.0) -> torch.Tensor:
    """[n_mels, n_fft // 2 + 1] triangular filters on the HTK mel scale."""
    def to_mel(f: np.ndarray) -> np.ndarray:
        return 2595.0 * np.log10(1.0 + f / 700.0)

    def to_hz(m: np.ndarray) -> np.ndarray:
        return 700.0 * (10 ** (m / 2595.0) - 1.0)

    edges = to_hz(np.linspace(to_mel(np.array(fmin)), to_mel(np.array(sample_rate / 2)), n_mels + 2))
    bins = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    lower, center, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    filters = np.maximum(0, np.minimum((bins - lower) / (center - lower), (upper - bins) / (upper - center)))
    return torch.from_numpy(filters).float()


def log_mel(audio: torch.Tensor, sample_rate: int, n_fft: int = 1024, hop: int = 480, n_mels: int = 64) -> torch.Tensor:
    """audio [..., samples] -> natural-log mel energies [..., samples // hop, n_mels]."""
    window = torch.hann_window(n_fft, device=audio.device)
    spec = torch.stft(audio.reshape(-1, audio.shape[-1]), n_fft, hop, window=window, return_complex=True).abs() ** 2
    mel = mel_filterbank(n_fft, n_mels, sample_rate).to(audio.device) @ spec
    frames = audio.shape[-1] // hop
    return torch.log(mel[..., :frames] + 1e-6).transpose(-1, -2).reshape(*audio.shape[:-1], frames, n_mels)


def chroma(audio: torch.Tensor, sample_rate: int, hop: int, n_fft: int = 4096) -> torch.Tensor:
    """audio [samples] -> [samples // hop, 12] pitch-class energy (55 Hz to 5 kHz), each frame summing to 1."""
    spec = torch.stft(audio, n_fft, hop, window=torch.hann_window(n_fft, device=audio.device), return_complex=True).abs() ** 2
    freqs = torch.fft.rfftfreq(n_fft, 1 / sample_rate, device=audio.device)
    usable = (freqs > 55) & (freqs < 5000)
    pitch_class = (torch.round(12 * torch.log2(freqs[usable] / 440.0)) % 12).long()
    classes = torch.zeros(12, spec.shape[1], device=audio.device).index_add_(0, pitch_class, spec[usable])
    frames = audio.shape[-1] // hop
    return (classes / classes.sum(0).clamp(min=1e-8))[:, :frames].T


@dataclass(frozen=True)
class SemanticTokenizerConfig:
    """Feature frames at `rate` per second: chroma_weight * chroma (chroma_n_fft) beside mel_scale * log-mel
    (mel_bands of a mel_n_fft STFT), standardised, then the nearest of `vocab` centroids."""

    vocab: int = 256
    rate: int = 25
    chroma_n_fft: int = 4096
    chroma_weight: float = 3.0
    mel_n_fft: int = 2048
    mel_bands: int = 32
    mel_scale: float = 0.25

    @property
    def dim(self) -> int:
        return 12 + self.mel_bands

    def validate(self, sample_rate: int) -> None:
        if sample_rate % self.rate:
            raise PackError(f"semantic_tokenizer.rate {self.rate} does not divide the sample rate {sample_rate}")
        if self.vocab < 1 or self.mel_bands < 1 or self.chroma_n_fft < 2 or self.mel_n_fft < 2:
            raise PackError("semantic_tokenizer: vocab, mel_bands and the FFT sizes must be positive")


class SemanticTokenizer(nn.Module):
    def __init__(self, config: SemanticTokenizerConfig, sample_rate: int) -> None:
        super().__init__()
        self.config = config
        self.sample_rate = sample_rate
        self.register_buffer("centroids", torch.zeros(config.vocab, config.dim))
        self.register_buffer("mean", torch.zeros(config.dim))
        self.register_buffer("std", torch.ones(config.dim))

    @property
    def hop(self) -> int:
        return self.sample_rate // self.config.rate

    def features(self, audio: torch.Tensor) -> torch.Tensor:
        """Mono PCM [samples] at the pack's rate -> unstandardised features [samples // hop, dim]."""
        c = self.config
        mel = log_mel(audio, self.sample_rate, n_fft=c.mel_n_fft, hop=self.hop, n_mels=c.mel_bands)
        return torch.cat([c.chroma_weight * chroma(audio, self.sample_rate, self.hop, c.chroma_n_fft), c.mel_scale * mel], dim=1)

    @torch.inference_mode()
    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        """Mono PCM [samples] at the pack's rate -> int64 tokens [samples // hop]."""
        return self.assign(self.features(audio.float()))

    @torch.inference_mode()
    def assign(self, features: torch.Tensor) -> torch.Tensor:
        """Unstandardised features [frames, dim] -> int64 tokens [frames]: the nearest centroid of each frame."""
        standardised = (features.float() - self.mean) / self.std
        # elementwise distances, as k-means' predict measures them, so no token depends on the clip's length
        return (standardised.unsqueeze(1) - self.centroids.unsqueeze(0)).square().sum(-1).argmin(1)
