"""Band-limited resampling and downmixing of PCM: how every audio input (a melody reference, an audio prompt, audio
to encode) reaches the rate a model reads. The filter is torchaudio's sinc_interp_hann with rolloff 0.945 and 24
zero crossings, the settings transformers' MusicgenMelodyFeatureExtractor resamples with."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

RESAMPLE_ROLLOFF = 0.945
RESAMPLE_ZERO_CROSSINGS = 24


def resample(wave: torch.Tensor, orig_rate: int, new_rate: int) -> torch.Tensor:
    """[..., samples] at orig_rate -> [..., ceil(samples * new / orig)] at new_rate, in wave's dtype.

    Band-limited interpolation y[j] = sum_i x[i] h(i / orig - j / new) with a Hann-windowed sinc h cut at
    RESAMPLE_ZERO_CROSSINGS zero crossings of a low-pass at RESAMPLE_ROLLOFF of the lower Nyquist rate. The
    new / orig phases (after dividing by the gcd) each get their own filter, applied as one strided convolution.
    """
    if orig_rate == new_rate:
        return wave
    gcd = math.gcd(orig_rate, new_rate)
    orig, new = orig_rate // gcd, new_rate // gcd
    cutoff = min(orig, new) * RESAMPLE_ROLLOFF
    width = math.ceil(RESAMPLE_ZERO_CROSSINGS * orig / cutoff)
    taps = torch.arange(-width, width + orig, dtype=wave.dtype, device=wave.device)[None, None] / orig
    t = torch.arange(0, -new, -1, dtype=wave.dtype, device=wave.device)[:, None, None] / new + taps
    t *= cutoff
    t = t.clamp_(-RESAMPLE_ZERO_CROSSINGS, RESAMPLE_ZERO_CROSSINGS)
    window = torch.cos(t * math.pi / RESAMPLE_ZERO_CROSSINGS / 2) ** 2
    t *= math.pi
    kernels = torch.where(t == 0, torch.tensor(1.0).to(t), t.sin() / t)
    kernels *= window * (cutoff / orig)  # [new, 1, 2 * width + orig]
    flat = wave.reshape(-1, wave.shape[-1])
    padded = F.pad(flat, (width, width + orig))
    out = F.conv1d(padded[:, None], kernels, stride=orig).transpose(1, 2).reshape(flat.shape[0], -1)
    out = out[:, : math.ceil(new * wave.shape[-1] / orig)]
    return out.reshape(*wave.shape[:-1], out.shape[-1])


def mono(pcm: np.ndarray | torch.Tensor, sample_rate: int, new_rate: int) -> torch.Tensor:
    """[samples] or [channels, samples] at sample_rate -> mono float32 [samples'] at new_rate: resampled, then the
    channels averaged (the melody feature extractor's order)."""
    wave = resample(torch.as_tensor(pcm).to(torch.float32), sample_rate, new_rate)
    return wave.mean(dim=0) if wave.dim() == 2 else wave
