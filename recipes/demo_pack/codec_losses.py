"""The codec's training objectives: reconstruction terms that fix level and phase (SNR, complex spectrum) beside the
perceptual ones (multi-scale mel, log magnitude), and a small multi-scale STFT discriminator (EnCodec's MS-STFTD,
narrower) with hinge and feature-matching losses.

Why each term: magnitude-only losses leave the phase and the absolute level free, so the decoded waveform came out
uncorrelated with its input (SI-SNR -49 dB) and several dB quiet; the SNR term pins both (it is minimised only at
the input itself, and in dB so that soft and loud clips weigh the same); the complex-spectrum term carries the same
pressure to the high bands the SNR term, dominated by the bass, barely sees. Fitting the waveform leaves the error
periodic in the codec frame (a few per cent of level up and down every 20 ms: a 50 Hz buzz), which per-bin
spectral averages hardly see; the 1 ms envelope term and the discriminator penalise it, and the frame-locked term
aims at it alone: the pulse sits at the same place in every frame, so averaging the envelope's error over frames keeps
it and cancels the rest. A DC offset costs the SNR term almost nothing on loud clips, so it has its own term.
"""
from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from common import ENVELOPE_BLOCK, HOP, SAMPLE_RATE, block_power, envelope_spectrum, line_and_neighbours
from torch import nn

from vivace.families.musiclm.semantic_tokenizer import mel_filterbank

MEL_FFTS = (256, 512, 1024, 2048)
DISCRIMINATOR_FFTS = (256, 512, 1024)


def snr_loss(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over rows of the reconstruction error's energy relative to the target's, in dB / 10 (0 for silence out)."""
    error = (predicted - target).square().sum(-1)
    energy = target.square().sum(-1).clamp(min=1e-8)
    return torch.log10(error / energy + 1e-6).mean()


def dc_loss(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over rows of the squared difference of the means relative to the target's mean square: a DC offset costs
    the SNR term only its share of the error energy, which is tiny on all but quiet clips, so it gets its own term."""
    return ((predicted.mean(-1) - target.mean(-1)).square() / target.square().mean(-1).clamp(min=1e-8)).mean()


@lru_cache(maxsize=None)
def _mel(n_fft: int) -> torch.Tensor:
    return mel_filterbank(n_fft, n_fft // 16, SAMPLE_RATE)


def envelope_loss(predicted: torch.Tensor, target: torch.Tensor, block: int = ENVELOPE_BLOCK) -> torch.Tensor:
    """L1 between the log RMS envelopes over 1 ms blocks: a decoder that pulses once per codec frame (a few per cent
    of level, but a sharp line at the frame rate in the envelope's spectrum) pays here at every block."""
    length = predicted.shape[-1] // block * block
    # each row's mean removed first: otherwise a DC offset is the cheapest way to raise a quiet block's RMS, and the
    # decoder learns one (measured: offsets of 0.005-0.018 on clips of 0.05 RMS)
    centred = [x[..., :length] - x[..., :length].mean(-1, keepdim=True) for x in (predicted, target)]
    envelopes = [block_power(x, block) for x in centred]
    return F.l1_loss(0.5 * torch.log(envelopes[0] + 1e-7), 0.5 * torch.log(envelopes[1] + 1e-7))


def frame_locked_loss(predicted: torch.Tensor, target: torch.Tensor, block: int = ENVELOPE_BLOCK) -> torch.Tensor:
    """Mean over rows of the RMS of the envelope error's frame-locked profile, relative to the row's mean envelope.

    The 1 ms RMS envelopes' difference, divided by the target's mean envelope (so soft and loud rows weigh the same),
    is averaged over the crop's codec frames at each of a frame's 1 ms positions, and that profile's mean is
    removed: what is left is the error that repeats with the frame, the buzz at the frame rate and its harmonics
    (common.frame_rate_modulation reads its first harmonic). Crops must start on a frame boundary, as the
    decoder's frames do; error not locked to the frame averages towards zero over the frames."""
    frames = predicted.shape[-1] // HOP
    envelopes = [
        block_power(x[..., : frames * HOP] - x[..., : frames * HOP].mean(-1, keepdim=True), block).add(1e-10).sqrt()
        for x in (predicted, target)
    ]
    error = (envelopes[0] - envelopes[1]) / envelopes[1].mean(-1, keepdim=True).clamp(min=1e-5)
    profile = error.reshape(*error.shape[:-1], frames, HOP // block).mean(-2)
    profile = profile - profile.mean(-1, keepdim=True)
    return profile.square().mean(-1).add(1e-12).sqrt().mean()


def frame_rate_line_loss(predicted: torch.Tensor, target: torch.Tensor, harmonics: tuple[int, ...] = (1, 2),
                         block: int = ENVELOPE_BLOCK) -> torch.Tensor:
    """Mean over rows and frame-rate harmonics of how far the output's envelope line at that harmonic rises above
    the target's own line or, where the target has none, above the target's envelope spectrum 2-10 Hz either side:
    relu(log amplitude ratio).

    This is common.frame_rate_modulation as a loss, measured against the target rather than against 1. It
    weighs what the frame-locked term does not: a pulse too small for that term to tell from other error stands far
    above the neighbours on a sustained solo tone, whose own envelope is nearly still at 50 Hz, and nothing under drums, whose envelope moves at every
    frequency. Crops start on a frame boundary and last whole frames, so each harmonic falls on one bin."""
    (predicted_power, freqs), (target_power, _) = (
        envelope_spectrum(block_power(x - x.mean(-1, keepdim=True), block).add(1e-10).sqrt(), block) for x in (predicted, target)
    )
    loss = predicted.new_zeros(())
    for harmonic in harmonics:
        hz = harmonic * SAMPLE_RATE / HOP
        target_line, target_neighbours = line_and_neighbours(target_power, freqs, hz, 0.2 * harmonic)
        predicted_line, _ = line_and_neighbours(predicted_power, freqs, hz, 0.2 * harmonic)
        floor = torch.maximum(target_line, target_neighbours).clamp(min=1e-12)
        loss = loss + F.relu(0.5 * torch.log(predicted_line / floor + 1e-12)).mean()
    return loss / len(harmonics)


def _spectrum(audio: torch.Tensor, n_fft: int) -> torch.Tensor:
    return torch.stft(audio, n_fft, n_fft // 4, window=torch.hann_window(n_fft, device=audio.device), return_complex=True)


def spectral_loss(predicted: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-magnitude + mel L1 over several resolutions, complex-spectrum L1 on compressed spectra)."""
    magnitude = predicted.new_zeros(())
    complex_term = predicted.new_zeros(())
    for n_fft in MEL_FFTS:
        p, t = _spectrum(predicted, n_fft), _spectrum(target, n_fft)
        p_mag, t_mag = p.abs(), t.abs()
        mel = _mel(n_fft)
        magnitude = magnitude + F.l1_loss(torch.log(p_mag + 1e-5), torch.log(t_mag + 1e-5))
        magnitude = magnitude + F.l1_loss(torch.log(mel @ p_mag + 1e-5), torch.log(mel @ t_mag + 1e-5))
        # magnitude^0.3 with the phase kept: loud bins stop dominating, and a wrong phase costs as much as a wrong level
        p_c = p * (p_mag + 1e-7).pow(-0.7)
        t_c = t * (t_mag + 1e-7).pow(-0.7)
        complex_term = complex_term + F.l1_loss(torch.view_as_real(p_c), torch.view_as_real(t_c))
    return magnitude / len(MEL_FFTS), complex_term / len(MEL_FFTS)


class STFTDiscriminator(nn.Module):
    """One resolution: 2-D convolutions over the (real, imaginary) spectrogram, strided along frequency."""

    def __init__(self, n_fft: int, channels: int = 16) -> None:
        super().__init__()
        self.n_fft = n_fft
        self.convs = nn.ModuleList([
            nn.Conv2d(2, channels, (3, 9), padding=(1, 4)),
            nn.Conv2d(channels, channels, (3, 9), stride=(1, 2), dilation=(1, 1), padding=(1, 4)),
            nn.Conv2d(channels, channels, (3, 9), stride=(1, 2), dilation=(2, 1), padding=(2, 4)),
            nn.Conv2d(channels, channels, (3, 9), stride=(1, 2), dilation=(4, 1), padding=(4, 4)),
            nn.Conv2d(channels, channels, (3, 3), padding=(1, 1)),
        ])
        self.out = nn.Conv2d(channels, 1, (3, 3), padding=(1, 1))

    def forward(self, audio: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        spectrum = torch.stft(audio, self.n_fft, self.n_fft // 4, window=torch.hann_window(self.n_fft, device=audio.device),
                              normalized=True, return_complex=True)
        x = torch.view_as_real(spectrum).permute(0, 3, 2, 1)  # [B, 2, frames, bins]
        features = []
        for conv in self.convs:
            x = F.leaky_relu(conv(x), 0.2)
            features.append(x)
        return self.out(x), features


class MultiScaleSTFTDiscriminator(nn.Module):
    def __init__(self, channels: int = 16) -> None:
        super().__init__()
        self.scales = nn.ModuleList(STFTDiscriminator(n_fft, channels) for n_fft in DISCRIMINATOR_FFTS)

    def forward(self, audio: torch.Tensor) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
        return [scale(audio) for scale in self.scales]


def discriminator_loss(real: list, fake: list) -> torch.Tensor:
    """Hinge loss over the scales (fake scored on detached audio)."""
    return sum(F.relu(1 - r).mean() + F.relu(1 + f).mean() for (r, _), (f, _) in zip(real, fake)) / len(real)


def generator_losses(real: list, fake: list) -> tuple[torch.Tensor, torch.Tensor]:
    """(hinge adversarial loss, feature matching: L1 between real and fake features, relative to the real ones' scale)."""
    adversarial = sum(F.relu(1 - f).mean() for f, _ in fake) / len(fake)
    matching = fake[0][0].new_zeros(())
    count = 0
    for (_, real_features), (_, fake_features) in zip(real, fake):
        for r, f in zip(real_features, fake_features):
            matching = matching + F.l1_loss(f, r.detach()) / (r.detach().abs().mean() + 1e-5)
            count += 1
    return adversarial, matching / count
