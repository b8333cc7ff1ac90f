"""The MusicGen pack's configuration records: token layout, text condition, windows, sampling, melody prefix."""
from __future__ import annotations

from dataclasses import dataclass, field

from vivace.codecs.encodec import EncodecConfig
from vivace.core.sampling import SamplingParams
from vivace.families.musicgen.chroma import ChromaConfig
from vivace.model.config import TransformerConfig

FAMILY = "musicgen"


@dataclass(frozen=True)
class MusicGenConfig:
    """Token layout, text condition, windows and sampling defaults of a MusicGen pack."""

    text_hidden: int  # the text encoder's output width
    projection: bool  # enc_to_dec_proj maps text_hidden to d_model (present when they differ)
    window_s: float = 30.0  # the longest clip one decoder window generates (the model's trained context)
    stride_s: float = 18.0  # continuation: each later window keeps window_s - stride_s of audio as its prompt
    max_duration_s: float = 300.0
    guidance_scale: float = 3.0
    sampling: SamplingParams = SamplingParams(temperature=1.0, top_k=250)
    codec_encoder: bool = False  # codec_encoder.safetensors: EnCodec's encoder, which audio prompts need


@dataclass(frozen=True)
class MelodyConfig:
    """MusicGen-Melody's prefix: chroma_length rows of projected chroma (a shorter chroma repeats, a longer one is
    cut), then the projected text states."""

    chroma_length: int = 235
    projection: bool = True  # audio_enc_to_dec_proj maps num_chroma to d_model (present when they differ)
    chroma: ChromaConfig = ChromaConfig()


@dataclass(frozen=True)
class MusicGenPackConfig:
    decoder: TransformerConfig
    codec: EncodecConfig
    musicgen: MusicGenConfig
    name: str = ""
    melody: MelodyConfig | None = None  # a MusicGen-Melody pack
    family: str = field(default=FAMILY, init=False)

    @property
    def sample_rate(self) -> int:
        return self.codec.sampling_rate

    @property
    def frame_rate(self) -> float:
        return self.codec.frame_rate

    @property
    def num_codebooks(self) -> int:
        return self.decoder.num_codebooks

    @property
    def pad_id(self) -> int:
        """The pad / BOS id: one past the codebook, the extra row of every input embedding."""
        return self.decoder.output_vocab_size

    def frames(self, seconds: float) -> int:
        return round(seconds * self.frame_rate)
