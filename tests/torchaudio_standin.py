"""A stand-in for the two torchaudio calls of transformers' MusicgenMelodyFeatureExtractor (torchaudio is not
installable here): float64 numpy evaluations of their definitions, written from the formulas rather than from
torchaudio's code, so that the extractor's own code (padding, truncation, stereo mixing, filter bank, normalisation,
one-hot) runs unchanged and vivace.families.musicgen.chroma is checked against it.

- transforms.Spectrogram(n_fft, win_length=n_fft, hop_length, power=2, center=True, pad=0, normalized=True):
  |rfft(frame * periodic Hann)|^2 / sum(Hann^2) over frames of the signal reflect-padded by n_fft // 2 each side.
- functional.resample(x, orig, new, rolloff, lowpass_filter_width): y[j] = sum_i x[i] h((i / orig - j / new) * b)
  with b = min(orig, new) * rolloff (rates divided by their gcd), h(t) = sinc(t) cos^2(pi t / 2w) * b / orig for
  |t| < w zero crossings, and ceil(len * new / orig) outputs.
"""
from __future__ import annotations

import importlib
import math
import types
from typing import Any

import numpy as np
import torch


def spectrogram(wave: np.ndarray, n_fft: int, hop_length: int) -> np.ndarray:
    """[..., samples] -> power spectrogram [..., n_fft // 2 + 1, frames], float64."""
    half = n_fft // 2
    padded = np.pad(np.asarray(wave, dtype=np.float64), [(0, 0)] * (wave.ndim - 1) + [(half, half)], mode="reflect")
    frames = 1 + (padded.shape[-1] - n_fft) // hop_length
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    index = np.arange(frames)[:, None] * hop_length + np.arange(n_fft)[None, :]
    spectrum = np.fft.rfft(padded[..., index] * window, axis=-1)  # [..., frames, bins]
    return np.swapaxes(np.abs(spectrum) ** 2 / np.sum(window**2), -1, -2)


def resample(wave: np.ndarray, orig_rate: int, new_rate: int, rolloff: float, zero_crossings: int) -> np.ndarray:
    """[..., samples] -> [..., ceil(samples * new / orig)], float64."""
    gcd = math.gcd(orig_rate, new_rate)
    orig, new = orig_rate // gcd, new_rate // gcd
    cutoff = min(orig, new) * rolloff
    x = np.asarray(wave, dtype=np.float64)
    length = x.shape[-1]
    j = np.arange(math.ceil(new * length / orig))
    reach = math.ceil(zero_crossings * orig / cutoff) + 1
    i = (j * orig) // new
    i = i[:, None] + np.arange(-reach, reach + 1)[None, :]
    t = (i / orig - j[:, None] / new) * cutoff
    inside = (np.abs(t) < zero_crossings) & (i >= 0) & (i < length)
    h = np.sinc(t) * np.cos(np.pi * t / (2 * zero_crossings)) ** 2 * cutoff / orig
    h = np.where(inside, h, 0.0)
    return np.einsum("...jk,jk->...j", x[..., np.clip(i, 0, length - 1)], h)


class Spectrogram:
    def __init__(self, n_fft: int, win_length: int, hop_length: int, power: float, center: bool, pad: int, normalized: bool) -> None:
        assert (win_length, power, center, pad, normalized) == (n_fft, 2, True, 0, True), "the extractor's settings"
        self.n_fft, self.hop_length = n_fft, hop_length

    def __call__(self, wave: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(spectrogram(wave.numpy(), self.n_fft, self.hop_length)).to(wave.dtype)


def _resample(wave: torch.Tensor, orig_freq: int, new_freq: int, rolloff: float, lowpass_filter_width: int) -> torch.Tensor:
    return torch.from_numpy(resample(wave.numpy(), orig_freq, new_freq, rolloff, lowpass_filter_width)).to(wave.dtype)


TORCHAUDIO = types.SimpleNamespace(
    transforms=types.SimpleNamespace(Spectrogram=Spectrogram), functional=types.SimpleNamespace(resample=_resample),
)


def melody_feature_extractor(**kwargs: Any) -> Any:
    """transformers' MusicgenMelodyFeatureExtractor(**kwargs), its torchaudio calls served by this stand-in."""
    module = importlib.import_module("transformers.models.musicgen_melody.feature_extraction_musicgen_melody")
    module.torchaudio = TORCHAUDIO
    return module.MusicgenMelodyFeatureExtractor(**kwargs)
