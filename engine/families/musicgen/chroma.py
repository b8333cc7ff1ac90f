"""Reference audio -> one-hot chroma frames, as transformers' MusicgenMelodyFeatureExtractor computes them.

The steps, in the extractor's order: resample to its rate (windowed-sinc, torchaudio's algorithm with the extractor's
rolloff 0.945 and 24 zero crossings), average the channels, keep the first max_samples (chunk_length seconds),
zero-pad to one FFT when shorter, power spectrogram (centred Hann STFT, reflect padding, divided by the window's L2
norm), project onto the chroma filter bank (librosa's, as transformers.audio_utils builds it), divide each frame by
its largest bin, and keep only the argmax of each frame as a one-hot vector. Everything runs in float32 like the
extractor, except the filter bank (float64, then cast).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from vivace.resample import mono

@dataclass(frozen=True)
class ChromaConfig:
    """The feature extractor's settings (its preprocessor_config.json); defaults are facebook/musicgen-melody's."""

    sample_rate: int = 32000
    n_fft: int = 16384
    hop_length: int = 4096
    num_chroma: int = 12
    max_samples: int = 960000  # chunk_length (30 s) * sample_rate: the rest of a longer reference is ignored

    def frames(self, samples: int) -> int:
        """Chroma frames of a reference of this many samples (at sample_rate)."""
        return max(min(samples, self.max_samples), self.n_fft) // self.hop_length + 1


def chroma_filter_bank(sample_rate: int, n_fft: int, num_chroma: int) -> np.ndarray:
    """[num_chroma, n_fft // 2 + 1] float64: librosa's chroma filters (A440 tuning, Gaussian octave weighting centred
    on octave 5 with half-width 2, columns L2-normalised, starting at C), as transformers' chroma_filter_bank."""
    frequencies = np.linspace(0, sample_rate, n_fft, endpoint=False)[1:]
    bins = num_chroma * np.log2(frequencies / (440.0 / 16))
    bins = np.concatenate(([bins[0] - 1.5 * num_chroma], bins))  # the 0 Hz bin: 1.5 octaves below bin 1
    widths = np.concatenate((np.maximum(bins[1:] - bins[:-1], 1.0), [1]))
    distance = np.subtract.outer(bins, np.arange(0, num_chroma, dtype="d")).T
    half = np.round(float(num_chroma) / 2)
    distance = np.remainder(distance + half + 10 * num_chroma, num_chroma) - half
    filters = np.exp(-0.5 * (2 * distance / np.tile(widths, (num_chroma, 1))) ** 2)
    filters = filters / np.sum(filters**2.0, axis=0, keepdims=True) ** 0.5
    filters *= np.tile(np.exp(-0.5 * ((bins / num_chroma - 5.0) / 2.0) ** 2), (num_chroma, 1))
    filters = np.roll(filters, -3 * (num_chroma // 12), axis=0)
    return np.ascontiguousarray(filters[:, : int(1 + n_fft / 2)])


def mono_reference(pcm: np.ndarray | torch.Tensor, sample_rate: int, config: ChromaConfig) -> torch.Tensor:
    """A melody reference as mono float32 at the extractor's rate."""
    return mono(pcm, sample_rate, config.sample_rate)


class ChromaExtractor:
    def __init__(self, config: ChromaConfig) -> None:
        self.config = config
        self.filters = torch.from_numpy(chroma_filter_bank(config.sample_rate, config.n_fft, config.num_chroma)).float()
        self.window = torch.hann_window(config.n_fft)

    def energy(self, wave: torch.Tensor) -> torch.Tensor:
        """Mono float32 [samples] at the extractor's rate -> chroma energy [num_chroma, frames]."""
        c = self.config
        wave = wave[: c.max_samples]
        if wave.shape[0] < c.n_fft:
            short = c.n_fft - wave.shape[0]
            wave = F.pad(wave, (short // 2, short // 2 + short % 2))
        spec = torch.stft(
            wave, c.n_fft, c.hop_length, c.n_fft, self.window, center=True, pad_mode="reflect", return_complex=True,
        )
        spec /= self.window.pow(2.0).sum().sqrt()
        return torch.einsum("cf,ft->ct", self.filters, spec.abs().pow(2))

    def __call__(self, wave: torch.Tensor) -> torch.Tensor:
        """Mono float32 [samples] at the extractor's rate -> one-hot chroma [frames, num_chroma] (float32)."""
        normalised = F.normalize(self.energy(wave), p=float("inf"), dim=0, eps=1e-6).T
        return F.one_hot(normalised.argmax(-1), self.config.num_chroma).float()
