"""MusicGen-Melody's condition: a prefix of input embeddings in front of the codes, as transformers builds it.

prefix = [chroma_length rows of projected chroma ; the projected text states]. The chroma is the reference's one-hot
chroma (vivace.families.musicgen.chroma) through audio_enc_to_dec_proj, repeated when shorter than chroma_length and cut when longer.
Without a reference the chroma is transformers' null chroma: one frame of bin 0. The null condition of guidance is
that null chroma with zeroed text states (not masked: transformers passes no attention mask to the decoder).

Clips longer than one window follow audiocraft's extension: every window reads the chroma of window_s of the
reference starting at the window's start time, the reference repeating past its end. A clip of one window reads the
chroma of the whole reference, as transformers' feature extractor computes it.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from vivace.audio import read_pcm
from vivace.families.musicgen.chroma import ChromaConfig, ChromaExtractor, mono_reference
from vivace.families.musicgen.pack import MusicGenPack

MelodyLike = np.ndarray | torch.Tensor | str | Path


def load_melody(melody: MelodyLike, sample_rate: int | None, config: ChromaConfig) -> torch.Tensor:
    """A reference (a sound file, or PCM [samples] / [channels, samples] at sample_rate) -> mono float32 at the
    chroma extractor's rate."""
    pcm, rate = read_pcm(melody, sample_rate, "melody")
    return mono_reference(pcm, rate, config)


def window_reference(wave: torch.Tensor, start_s: float, window_s: float, sample_rate: int) -> torch.Tensor:
    """audiocraft's extension: window_s of the reference from start_s on, the reference repeating past its end."""
    start, length = int(start_s * sample_rate), int(window_s * sample_rate)
    return wave[torch.arange(start, start + length) % wave.shape[0]]


class MelodyPrefixes:
    """Builds the prefixes of one melody pack's rows in the decoder's dtype and device."""

    def __init__(self, pack: MusicGenPack) -> None:
        melody = pack.config.melody
        assert melody is not None, "a melody pack"
        self.length = melody.chroma_length
        self.num_chroma = melody.chroma.num_chroma
        self.extractor = ChromaExtractor(melody.chroma)
        self.projection = pack.chroma_projection
        self.window_s = pack.config.musicgen.window_s
        decoder = next(pack.decoder.parameters())
        self.dtype, self.device = decoder.dtype, decoder.device

    def chroma(self, wave: torch.Tensor | None, start_s: float | None) -> torch.Tensor:
        """One-hot [frames, num_chroma]: of the whole reference (start_s None), of the window from start_s, or the
        null chroma (no reference)."""
        if wave is None:
            null = torch.zeros(1, self.num_chroma)
            null[:, 0] = 1
            return null
        if start_s is not None:
            wave = window_reference(wave, start_s, self.window_s, self.extractor.config.sample_rate)
        return self.extractor(wave)

    def key(self, chroma: torch.Tensor) -> tuple[int, ...]:
        """The chroma bins the prefix's rows read: equal keys (with equal text) give equal prefixes."""
        bins = chroma.argmax(-1)
        return tuple(bins.repeat(math.ceil(self.length / bins.shape[0]))[: self.length].tolist())

    @torch.inference_mode()
    def prefix(self, chroma: torch.Tensor, text_states: torch.Tensor) -> torch.Tensor:
        """[chroma_length + tokens, d_model]: the projected chroma, repeated or cut to chroma_length, then the text."""
        audio = chroma.to(self.device)
        if self.projection is not None:
            audio = self.projection(audio)
        audio = audio.repeat(math.ceil(self.length / audio.shape[0]), 1)[: self.length]
        return torch.cat([audio, text_states.to(self.device)]).to(self.dtype)
