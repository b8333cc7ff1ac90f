"""Shared pieces of the recipe: the dataset on disk, spectral features, and the recipe's fixed configuration."""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vivace.codecs.soundstream import CodecConfig
from vivace.families.musiclm.semantic_tokenizer import SemanticTokenizerConfig
from vivace.families.musiclm.semantic_tokenizer import log_mel as engine_log_mel

SAMPLE_RATE = 24000
CODEC = CodecConfig(num_levels=12, codebook_size=256, codebook_dim=64, channels=16, ratios=(8, 5, 4, 3))
HOP = CODEC.hop_length  # 480 samples: 50 frames/s
ENVELOPE_BLOCK = SAMPLE_RATE // 1000  # 1 ms: the envelopes the codec's losses and its frame-rate figure read
SEMANTIC_RATE = 25
SEMANTIC_VOCAB = 256
TOKENIZER = SemanticTokenizerConfig(vocab=SEMANTIC_VOCAB, rate=SEMANTIC_RATE)
MT_LEVELS = 12
MT_CODEBOOK = 64
EMBED_DIM = 128
EVALUATION_PIECES = 560  # the first data set's size: its 28 held-out pieces are the evaluation set


@dataclass(frozen=True)
class Dataset:
    clips: np.ndarray  # int16 [pieces, samples]
    captions: list[str]
    held_out: np.ndarray  # bool [pieces]
    codes: np.ndarray | None = None  # int16 [pieces, frames, levels], once encode.py has run

    @classmethod
    def load(cls, data: Path) -> Dataset:
        records = [json.loads(line) for line in (data / "pieces.jsonl").read_text().splitlines()]
        clips = np.load(data / "clips.npy", mmap_mode="r")
        codes = np.load(data / "codes.npy", mmap_mode="r") if (data / "codes.npy").is_file() else None
        return cls(clips, [r["caption"] for r in records], np.array([r["held_out"] for r in records]), codes)

    @property
    def train_indices(self) -> np.ndarray:
        return np.flatnonzero(~self.held_out)

    @property
    def test_indices(self) -> np.ndarray:
        return np.flatnonzero(self.held_out)

    @property
    def evaluation_indices(self) -> np.ndarray:
        """The held-out pieces every version of the pack is measured on: those among the first EVALUATION_PIECES
        (piece i is the same whatever the number rendered), so figures stay comparable as the data grows."""
        return self.test_indices[self.test_indices < EVALUATION_PIECES]

    def audio(self, index: int, start: int = 0, length: int | None = None) -> torch.Tensor:
        end = self.clips.shape[1] if length is None else start + length
        return torch.from_numpy(self.clips[index, start:end].astype(np.float32) / 32768.0)


def log_mel(audio: torch.Tensor, n_fft: int = 1024, hop: int = 480, n_mels: int = 64) -> torch.Tensor:
    """audio [..., samples] at SAMPLE_RATE -> log-mel [..., frames, n_mels] at SAMPLE_RATE / hop frames per second."""
    return engine_log_mel(audio, SAMPLE_RATE, n_fft, hop, n_mels)


def block_power(audio: torch.Tensor, block: int = ENVELOPE_BLOCK) -> torch.Tensor:
    """Mean square over consecutive blocks of `block` samples, per row: [..., samples] -> [..., samples // block]
    (a partial last block is dropped). Its square root is the RMS envelope (1 ms blocks: a 1 kHz envelope)."""
    blocks = audio.shape[-1] // block
    return audio[..., : blocks * block].reshape(*audio.shape[:-1], blocks, block).square().mean(-1)


def envelope_spectrum(envelope: torch.Tensor, block: int = ENVELOPE_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(power spectrum of the envelope, its mean removed and Hann-windowed; the bins' frequencies in Hz)."""
    envelope = envelope - envelope.mean(-1, keepdim=True)
    window = torch.hann_window(envelope.shape[-1], periodic=False, device=envelope.device)
    spectrum = torch.fft.rfft(envelope * window, dim=-1).abs().square()
    return spectrum, torch.fft.rfftfreq(envelope.shape[-1], block / SAMPLE_RATE, device=envelope.device)


def line_and_neighbours(spectrum: torch.Tensor, freqs: torch.Tensor, hz: float, width: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean power within ±width of hz, mean power 2-10 Hz either side of it), per row."""
    offset = (freqs - hz).abs()
    return spectrum[..., offset <= width].mean(-1), spectrum[..., (offset >= 2) & (offset <= 10)].mean(-1)


def frame_rate_modulation(audio: torch.Tensor, frame_hz: float = SAMPLE_RATE / CODEC.hop_length) -> torch.Tensor:
    """How much the codec's frame rate modulates the loudness, per row: the envelope's spectral amplitude at frame_hz
    (±0.2 Hz) over its average amplitude 40–60 Hz away from it (10 Hz either side, the ±2 Hz around it excluded).

    The envelope is the RMS over 1 ms blocks (a 1 kHz envelope), mean removed, Hann-windowed. About 1 for music
    (real clips: see the report); a decoder that pulses once per frame shows a sharp line at frame_hz."""
    line, neighbours = line_and_neighbours(*envelope_spectrum(block_power(audio).sqrt()), frame_hz)
    return (line / neighbours).sqrt()


def add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)


def start_run(args: argparse.Namespace) -> np.random.Generator:
    """Applies --threads and --seed; returns the run's numpy generator."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    return np.random.default_rng(args.seed)
