"""Semantic tokens: 25 Hz k-means units over chroma and coarse log-mel features.

MusicLM takes its semantic tokens from k-means over a w2v-BERT layer. No music-trained self-supervised model is
available offline here, so the recipe clusters features that carry what those tokens are for: harmony and
melody (12-bin chroma, from a 4096-point STFT) and coarse timbre and loudness (32 log-mel bands), with no
phase or fine spectral detail left for the acoustic stages to recover. Writes DATA/semantic.npy
(int16 [pieces, tokens]) and the fitted centroids.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from common import SAMPLE_RATE, SEMANTIC_RATE, SEMANTIC_VOCAB, Dataset, log_mel
from sklearn.cluster import MiniBatchKMeans

HOP = SAMPLE_RATE // SEMANTIC_RATE


def chroma(audio: torch.Tensor, n_fft: int = 4096) -> torch.Tensor:
    """audio [samples] -> [frames, 12] pitch-class energy, each frame summing to 1."""
    spec = torch.stft(audio, n_fft, HOP, window=torch.hann_window(n_fft), return_complex=True).abs() ** 2
    freqs = torch.fft.rfftfreq(n_fft, 1 / SAMPLE_RATE)
    usable = (freqs > 55) & (freqs < 5000)
    pitch_class = (torch.round(12 * torch.log2(freqs[usable] / 440.0)) % 12).long()
    classes = torch.zeros(12, spec.shape[1]).index_add_(0, pitch_class, spec[usable])
    frames = audio.shape[-1] // HOP
    return (classes / classes.sum(0).clamp(min=1e-8))[:, :frames].T


def features(audio: torch.Tensor) -> np.ndarray:
    mel = log_mel(audio, n_fft=2048, hop=HOP, n_mels=32)
    return torch.cat([3.0 * chroma(audio), mel / 4.0], dim=1).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("data", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = Dataset.load(args.data)
    per_piece = [features(data.audio(i)) for i in range(len(data.captions))]
    train = np.concatenate([per_piece[i] for i in data.train_indices])
    mean, std = train.mean(0), train.std(0) + 1e-6
    kmeans = MiniBatchKMeans(SEMANTIC_VOCAB, batch_size=4096, n_init=3, random_state=args.seed).fit((train - mean) / std)
    tokens = np.stack([kmeans.predict((f - mean) / std) for f in per_piece]).astype(np.int16)
    np.save(args.data / "semantic.npy", tokens)
    np.savez(args.data / "semantic_kmeans.npz", centroids=kmeans.cluster_centers_, mean=mean, std=std)
    used = len(np.unique(tokens))
    print(f"semantic tokens {tokens.shape} at {SEMANTIC_RATE} Hz, {used}/{SEMANTIC_VOCAB} units used")


if __name__ == "__main__":
    main()
