"""Text conditioning: prompt -> text tower -> joint embedding -> RVQ -> conditioning tokens (MuLan's MT)."""
from __future__ import annotations

import re
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vivace.families.musiclm.config import TextConfig


def hashed_features(text: str, num_buckets: int) -> list[int]:
    """Stable ids of the prompt's words and character trigrams (crc32, so the same across processes)."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    pieces = list(words)
    for word in words:
        padded = f"#{word}#"
        pieces.extend(padded[i : i + 3] for i in range(len(padded) - 2))
    return [zlib.crc32(piece.encode()) % num_buckets for piece in pieces]


class BuiltinTextEncoder(nn.Module):
    """Mean of hashed word and trigram embeddings: a small, dependency-free tower for test packs."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.num_buckets = config.hash_buckets
        self.embedding = nn.EmbeddingBag(config.hash_buckets, config.hidden_dim, mode="mean")

    def forward(self, texts: list[str]) -> torch.Tensor:
        ids = [hashed_features(text, self.num_buckets) or [0] for text in texts]
        flat = torch.tensor([i for row in ids for i in row], dtype=torch.long)
        offsets = torch.tensor([0] + [len(row) for row in ids[:-1]]).cumsum(0)
        return self.embedding(flat, offsets)


class TransformersTextEncoder(nn.Module):
    """A transformers encoder saved under the pack's text/ folder, mean-pooled over its tokens."""

    def __init__(self, config: TextConfig, directory: Path) -> None:
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        self.max_length = config.max_length
        self.tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        self.model = AutoModel.from_pretrained(directory, local_files_only=True).eval()

    def forward(self, texts: list[str]) -> torch.Tensor:
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        hidden = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)


class TextConditioner(nn.Module):
    def __init__(self, config: TextConfig, encoder: nn.Module) -> None:
        super().__init__()
        self.config = config
        self.encoder = encoder
        self.projection = nn.Linear(config.hidden_dim, config.embed_dim)
        self.codebooks = nn.Parameter(torch.zeros(config.num_levels, config.codebook_size, config.embed_dim))

    @torch.no_grad()
    def embed(self, texts: list[str]) -> torch.Tensor:
        """Unit-norm joint embeddings [B, embed_dim]."""
        return F.normalize(self.projection(self.encoder(texts).float()), dim=-1)

    @torch.no_grad()
    def quantize(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Residual vector quantisation: [B, embed_dim] -> codes [B, num_levels]."""
        residual = embeddings.float()
        codes = []
        for codebook in self.codebooks.float():
            # Elementwise distances rather than cdist's matmul form: a row's codes must not depend on the batch.
            index = (residual.unsqueeze(1) - codebook.unsqueeze(0)).square().sum(-1).argmin(dim=1)
            codes.append(index)
            residual = residual - codebook[index]
        return torch.stack(codes, dim=1)

    def tokens(self, texts: list[str]) -> torch.Tensor:
        return self.quantize(self.embed(texts))
