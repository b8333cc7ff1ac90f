"""Semantic tokens: 25 Hz k-means units over chroma and coarse log-mel features.

MusicLM takes its semantic tokens from k-means over a w2v-BERT layer. No music-trained self-supervised model is
available offline here, so the recipe clusters features that carry what those tokens are for: harmony and
melody (12-bin chroma, from a 4096-point STFT) and coarse timbre and loudness (32 log-mel bands), with no
phase or fine spectral detail left for the acoustic stages to recover. The features and the nearest-centroid
assignment are the engine's (vivace.families.musiclm.semantic_tokenizer), so the tokens the stages train on are
the tokens an audio prompt gives at inference. Writes DATA/semantic.npy (int16 [pieces, tokens]) and
DATA/semantic_tokenizer.pt (the fitted tokenizer's state).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from common import SAMPLE_RATE, SEMANTIC_RATE, SEMANTIC_VOCAB, TOKENIZER, Dataset
from sklearn.cluster import MiniBatchKMeans

from vivace.families.musiclm.semantic_tokenizer import SemanticTokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("data", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = Dataset.load(args.data)
    tokenizer = SemanticTokenizer(TOKENIZER, SAMPLE_RATE)
    with torch.no_grad():
        per_piece = [tokenizer.features(data.audio(i)).numpy() for i in range(len(data.captions))]
    train = np.concatenate([per_piece[i] for i in data.train_indices])
    mean, std = train.mean(0), train.std(0) + 1e-6
    kmeans = MiniBatchKMeans(SEMANTIC_VOCAB, batch_size=4096, n_init=3, random_state=args.seed).fit((train - mean) / std)
    tokenizer.centroids.copy_(torch.from_numpy(kmeans.cluster_centers_).float())
    tokenizer.mean.copy_(torch.from_numpy(mean).float())
    tokenizer.std.copy_(torch.from_numpy(std).float())
    torch.save(tokenizer.state_dict(), args.data / "semantic_tokenizer.pt")
    # the features computed above, assigned as forward() assigns an audio prompt's: no second pass over the audio
    tokens = np.stack([tokenizer.assign(torch.from_numpy(f)).numpy() for f in per_piece]).astype(np.int16)
    np.save(args.data / "semantic.npy", tokens)
    used = len(np.unique(tokens))
    print(f"semantic tokens {tokens.shape} at {SEMANTIC_RATE} Hz, {used}/{SEMANTIC_VOCAB} units used")


if __name__ == "__main__":
    main()
