"""The stage transformer's configuration: one record describes MusicLM's stages and MusicGen's decoder."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from vivace.errors import PackError

PositionScheme = Literal["t5_relative", "sinusoidal", "learned", "none"]
NormKind = Literal["layernorm", "rmsnorm"]
ActivationKind = Literal["gelu", "relu"]


@dataclass(frozen=True)
class TransformerConfig:
    """One decoder-only stage transformer; the same record describes MusicLM stages and MusicGen's decoder."""

    num_layers: int
    d_model: int
    num_heads: int
    d_ff: int
    vocab_size: int  # rows of each input embedding table
    output_vocab_size: int  # columns of each output head
    num_codebooks: int = 1  # summed input embeddings per position
    num_output_heads: int = 1
    position: PositionScheme = "t5_relative"
    max_positions: int = 4096  # learned positions only
    rel_num_buckets: int = 32
    rel_max_distance: int = 128
    norm: NormKind = "layernorm"
    norm_eps: float = 1e-5
    activation: ActivationKind = "gelu"
    attn_bias: bool = False
    ffn_bias: bool = False
    final_norm: bool = True
    cross_attention: bool = False
    cross_dim: int = 0  # width of the encoder states fed to cross-attention

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    def validate(self, name: str) -> None:
        if self.d_model % self.num_heads:
            raise PackError(f"stage {name!r}: d_model {self.d_model} is not divisible by num_heads {self.num_heads}")
        for key in ("num_layers", "d_model", "num_heads", "d_ff", "vocab_size", "output_vocab_size", "num_codebooks", "num_output_heads"):
            if getattr(self, key) <= 0:
                raise PackError(f"stage {name!r}: {key} must be positive, got {getattr(self, key)}")
        if self.cross_attention and self.cross_dim <= 0:
            raise PackError(f"stage {name!r}: cross_attention needs a positive cross_dim")
