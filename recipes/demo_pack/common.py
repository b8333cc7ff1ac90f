"""Shared pieces of the recipe: the dataset on disk, spectral features, and the recipe's fixed configuration."""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vivace.codecs.soundstream import CodecConfig

SAMPLE_RATE = 24000
CODEC = CodecConfig(num_levels=12, codebook_size=256, codebook_dim=64, channels=16, ratios=(8, 5, 4, 3))
HOP = CODEC.hop_length  # 480 samples: 50 frames/s
SEMANTIC_RATE = 25
SEMANTIC_VOCAB = 256
MT_LEVELS = 12
MT_CODEBOOK = 64
EMBED_DIM = 128


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

    def audio(self, index: int, start: int = 0, length: int | None = None) -> torch.Tensor:
        end = self.clips.shape[1] if length is None else start + length
        return torch.from_numpy(self.clips[index, start:end].astype(np.float32) / 32768.0)


def mel_filterbank(n_fft: int, n_mels: int, sample_rate: int = SAMPLE_RATE, fmin: float = 30.0) -> torch.Tensor:
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


def log_mel(audio: torch.Tensor, n_fft: int = 1024, hop: int = 480, n_mels: int = 64) -> torch.Tensor:
    """audio [..., samples] -> log-mel [..., frames, n_mels] at sample_rate / hop frames per second."""
    window = torch.hann_window(n_fft, device=audio.device)
    spec = torch.stft(audio.reshape(-1, audio.shape[-1]), n_fft, hop, window=window, return_complex=True).abs() ** 2
    mel = mel_filterbank(n_fft, n_mels).to(audio.device) @ spec
    frames = audio.shape[-1] // hop
    return torch.log(mel[..., :frames] + 1e-6).transpose(-1, -2).reshape(*audio.shape[:-1], frames, n_mels)


def add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)


def start_run(args: argparse.Namespace) -> np.random.Generator:
    """Applies --threads and --seed; returns the run's numpy generator."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    return np.random.default_rng(args.seed)
