"""Frozen configuration records: one per component of a pack, read from and written to pack.json."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from vivace.errors import PackError, VivaceError

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


@dataclass(frozen=True)
class SamplingParams:
    """How one stage draws its tokens. temperature 0 means greedy; top_k 0 and top_p 1.0 disable those filters."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def validate(self) -> None:
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise VivaceError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if isinstance(self.top_k, bool) or int(self.top_k) != self.top_k or self.top_k < 0:
            raise VivaceError(f"top_k must be an integer >= 0, got {self.top_k}")
        if not math.isfinite(self.top_p) or not 0 < self.top_p <= 1:
            raise VivaceError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass(frozen=True)
class CodecConfig:
    """SoundStream-style decoder: RVQ dequantisation then a causal SEANet convolutional decoder."""

    num_levels: int = 12
    codebook_size: int = 1024
    codebook_dim: int = 128
    channels: int = 32  # width of the last decoder block; earlier blocks double per ratio
    ratios: tuple[int, ...] = (8, 5, 4, 3)  # upsampling factors, product = hop length
    residual_dilations: tuple[int, ...] = (1, 3, 9)
    kernel_size: int = 7
    residual_kernel_size: int = 3

    @property
    def hop_length(self) -> int:
        hop = 1
        for ratio in self.ratios:
            hop *= ratio
        return hop


@dataclass(frozen=True)
class TextConfig:
    """Text tower → conditioning tokens: encoder, projection to the joint space, RVQ into num_levels tokens."""

    kind: Literal["builtin", "transformers"] = "builtin"
    hash_buckets: int = 4096  # builtin: hashed word and character-trigram vocabulary
    hidden_dim: int = 64  # builtin: embedding width; transformers: the encoder's hidden size
    embed_dim: int = 128  # joint (MuLan-like) embedding width
    num_levels: int = 12
    codebook_size: int = 1024
    max_length: int = 64  # transformers: tokenizer truncation
    # transformers: an installed Python package whose model/ folder holds the encoder, instead of the pack's text/
    # folder (keeps a large, shared encoder out of the pack)
    encoder_package: str = ""


@dataclass(frozen=True)
class MusicLMConfig:
    """Token rates and the window plan of the MusicLM hierarchy. Lengths are in acoustic frames."""

    semantic_vocab: int = 1024
    semantic_rate: int = 25  # semantic tokens per second
    coarse_levels: int = 4
    fine_levels: int = 8
    semantic_window_s: float = 30.0
    semantic_stride_s: float = 15.0
    coarse_window_s: float = 10.0
    coarse_stride_s: float = 5.0
    fine_chunk_s: float = 3.0
    max_duration_s: float = 300.0
    semantic_sampling: SamplingParams = SamplingParams(temperature=1.0)
    coarse_sampling: SamplingParams = SamplingParams(temperature=0.95)
    fine_sampling: SamplingParams = SamplingParams(temperature=0.4)


@dataclass(frozen=True)
class PackConfig:
    family: Literal["musiclm"]
    sample_rate: int
    stages: dict[str, TransformerConfig]
    codec: CodecConfig
    text: TextConfig
    musiclm: MusicLMConfig = field(default_factory=MusicLMConfig)
    name: str = ""

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.codec.hop_length


T = TypeVar("T")


def from_dict(cls: type[T], data: dict[str, Any], where: str) -> T:
    """Builds a config record from JSON, naming the first unknown or ill-typed key."""
    if not isinstance(data, dict):
        raise PackError(f"{where}: expected an object, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise PackError(f"{where}: unknown key {unknown[0]!r}")
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        default = fields[key].default
        if isinstance(default, SamplingParams):
            value = from_dict(SamplingParams, value, f"{where}.{key}")
        elif isinstance(default, tuple):
            value = tuple(value)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise PackError(f"{where}: {exc}") from None


def to_dict(record: Any) -> dict[str, Any]:
    return dataclasses.asdict(record)


def read_json_object(file: Path) -> dict[str, Any]:
    """A JSON file that must hold an object; any failure is one PackError naming the file."""
    try:
        data = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PackError(f"{file}: unreadable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise PackError(f"{file}: expected a JSON object")
    return data
