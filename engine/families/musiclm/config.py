"""The MusicLM pack's configuration records: text tower, token rates and window plan, and the whole pack."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

GuidedStage = Literal["semantic", "coarse"]

from vivace.codecs.soundstream import CodecConfig
from vivace.core.sampling import SamplingParams
from vivace.families.musiclm.semantic_tokenizer import SemanticTokenizerConfig
from vivace.model.config import TransformerConfig


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
    # classifier-free guidance of stages that read the prompt's MT tokens: a stage trained with its condition sometimes
    # replaced by a null token carries that token as the last id of its input vocabulary, and its null row reads it
    # in place of every MT token. guidance_scale is the default; > 1 needs a guided stage.
    guided_stages: tuple[GuidedStage, ...] = ()
    guidance_scale: float = 1.0


@dataclass(frozen=True)
class PackConfig:
    family: Literal["musiclm"]
    sample_rate: int
    stages: dict[str, TransformerConfig]
    codec: CodecConfig
    text: TextConfig
    musiclm: MusicLMConfig = field(default_factory=MusicLMConfig)
    name: str = ""
    # what an audio prompt needs (both or neither): the codec's encoder (codec_encoder.safetensors, the decoder's
    # codebooks) and the semantic tokenizer that made the semantic stage's training tokens
    codec_encoder: bool = False
    semantic_tokenizer: SemanticTokenizerConfig | None = None

    @property
    def encodes_audio(self) -> bool:
        return self.codec_encoder and self.semantic_tokenizer is not None

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.codec.hop_length
