"""MusicGen packs: pack.json (family "musicgen") + decoder / codec / projection safetensors + text/.

decoder.safetensors     the decoder as a vivace stage in stored form (separate q/k/v): num_codebooks summed input
                        embeddings of codebook_size + 1 rows (the last is pad/BOS), sinusoidal positions,
                        cross-attention in every layer, one output head per codebook
codec.safetensors       the EnCodec decoder in its stored form (vivace.encodec)
projection.safetensors  transformers' enc_to_dec_proj, when the text encoder's width differs from the decoder's
text/                   the transformers text encoder (T5) and its tokenizer, as save_pretrained wrote them
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from vivace.config import SamplingParams, TransformerConfig, from_dict, to_dict
from vivace.encodec import EncodecConfig, EncodecDecoder, encodec_config_from_dict, encodec_config_to_dict, encodec_stored_form, load_encodec_decoder
from vivace.errors import PackError
from vivace.musicgen_text import MusicGenText
from vivace.pack import FORMAT_NAME, SCHEMA_VERSION, TEXT_MODEL_DIR, _load_component, _materialize, _stored_stage, read_manifest
from vivace.transformer import StageTransformer
from vivace.weights import expected_shapes, fuse_attention

FAMILY = "musicgen"
DECODER, CODEC, PROJECTION = "decoder", "codec", "projection"
TOP_KEYS = ("format", "version", "family", "name", "sample_rate", "decoder", "codec", "musicgen")


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


@dataclass(frozen=True)
class MusicGenPackConfig:
    decoder: TransformerConfig
    codec: EncodecConfig
    musicgen: MusicGenConfig
    name: str = ""
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


@dataclass
class MusicGenPack:
    path: Path
    config: MusicGenPackConfig
    decoder: StageTransformer
    codec: EncodecDecoder
    text: MusicGenText


def validate_musicgen_config(config: MusicGenPackConfig) -> None:
    d, m, codec = config.decoder, config.musicgen, config.codec
    d.validate(DECODER)
    codec.validate()
    if d.position != "sinusoidal" or not d.cross_attention or d.norm != "layernorm" or not d.final_norm:
        raise PackError("decoder: MusicGen needs sinusoidal positions, cross-attention, layernorm and a final norm")
    if d.num_output_heads != d.num_codebooks:
        raise PackError(f"decoder: {d.num_codebooks} codebooks need as many output heads, got {d.num_output_heads}")
    if d.output_vocab_size != codec.codebook_size or d.vocab_size != codec.codebook_size + 1:
        raise PackError(
            f"decoder: vocabularies ({d.vocab_size}, {d.output_vocab_size}) do not match the codec's "
            f"{codec.codebook_size} codes plus the pad/BOS row"
        )
    if d.num_codebooks > codec.num_levels:
        raise PackError(f"decoder: {d.num_codebooks} codebooks but the codec has {codec.num_levels} levels")
    if d.cross_dim != d.d_model or (m.text_hidden != d.d_model and not m.projection):
        raise PackError(
            f"decoder: cross-attention reads {d.cross_dim}-wide states; the text encoder gives {m.text_hidden} "
            f"({'with' if m.projection else 'without'} a projection to d_model {d.d_model})"
        )
    for key in ("window_s", "stride_s", "max_duration_s"):
        value = getattr(m, key)
        if not isinstance(value, (int, float)) or not math.isfinite(value) or config.frames(value) <= 0:
            raise PackError(f"musicgen.{key} must be a positive number of seconds (at least one frame), got {value!r}")
    if m.stride_s > m.window_s:
        raise PackError(f"musicgen: stride_s {m.stride_s} exceeds window_s {m.window_s}")
    if not isinstance(m.guidance_scale, (int, float)) or not m.guidance_scale >= 1:
        raise PackError(f"musicgen.guidance_scale must be >= 1, got {m.guidance_scale!r}")
    m.sampling.validate()


def config_to_json(config: MusicGenPackConfig) -> dict[str, Any]:
    return {
        "format": FORMAT_NAME,
        "version": SCHEMA_VERSION,
        "family": FAMILY,
        "name": config.name,
        "sample_rate": config.sample_rate,
        "decoder": to_dict(config.decoder),
        "codec": encodec_config_to_dict(config.codec),
        "musicgen": to_dict(config.musicgen),
    }


def read_musicgen_config(path: str | Path) -> MusicGenPackConfig:
    path = Path(path)
    manifest = path / "pack.json"
    data = read_manifest(path)
    if data.get("family") != FAMILY:
        raise PackError(f"{manifest}: family is {data.get('family')!r}, expected {FAMILY!r}")
    unknown = sorted(set(data) - set(TOP_KEYS))
    if unknown:
        raise PackError(f"{manifest}: unknown key {unknown[0]!r}")
    for key in ("sample_rate", "decoder", "codec", "musicgen"):
        if key not in data:
            raise PackError(f"{manifest}: missing key {key!r}")
    config = MusicGenPackConfig(
        decoder=from_dict(TransformerConfig, data["decoder"], "decoder"),
        codec=encodec_config_from_dict(data["codec"], "codec"),
        musicgen=from_dict(MusicGenConfig, data["musicgen"], "musicgen"),
        name=str(data.get("name", "")),
    )
    if data["sample_rate"] != config.sample_rate:
        raise PackError(f"{manifest}: sample_rate {data['sample_rate']!r} differs from the codec's {config.sample_rate}")
    validate_musicgen_config(config)
    return config


def _projection(config: MusicGenPackConfig) -> nn.Linear:
    return nn.Linear(config.musicgen.text_hidden, config.decoder.d_model)


def load_musicgen_pack(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> MusicGenPack:
    """Validates pack.json and every tensor (the first mismatch is named); the decoder is cast to dtype, the codec,
    projection and text encoder stay float32."""
    path = Path(path)
    config = read_musicgen_config(path)
    decoder = _materialize(lambda: StageTransformer(config.decoder), _stored_stage, fuse_attention, path, DECODER)
    decoder = decoder.to(device=device, dtype=dtype).eval()
    decoder.refresh_derived()
    with torch.device("meta"):
        expected = expected_shapes(encodec_stored_form(EncodecDecoder(config.codec)))
    stored = _load_component(path, CODEC, expected)
    codec = load_encodec_decoder(config.codec, stored, torch.float32, device, path / f"{CODEC}.safetensors")
    projection = None
    if config.musicgen.projection:
        projection = _materialize(lambda: _projection(config), lambda m: dict(m.state_dict()), dict, path, PROJECTION)
    if not (path / TEXT_MODEL_DIR).is_dir():
        raise PackError(f"{path}: missing the text encoder folder {TEXT_MODEL_DIR}/")
    text = MusicGenText(path / TEXT_MODEL_DIR, projection).to(device)
    return MusicGenPack(path, config, decoder, codec, text)


def save_musicgen_pack(
    path: str | Path,
    config: MusicGenPackConfig,
    decoder: dict[str, torch.Tensor],
    codec: dict[str, torch.Tensor],
    projection: dict[str, torch.Tensor] | None,
    text_encoder: Any,
    tokenizer: Any,
) -> Path:
    """Writes stored-form tensors, the text encoder and tokenizer (save_pretrained) and, last, pack.json."""
    validate_musicgen_config(config)
    if (projection is not None) != config.musicgen.projection:
        raise PackError(f"musicgen.projection is {config.musicgen.projection} but projection tensors were {'given' if projection else 'not given'}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    components = {DECODER: decoder, CODEC: codec, **({PROJECTION: projection} if projection is not None else {})}
    for component, tensors in components.items():
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / f"{component}.safetensors"))
    text_encoder.save_pretrained(path / TEXT_MODEL_DIR)
    tokenizer.save_pretrained(path / TEXT_MODEL_DIR)
    (path / "pack.json").write_text(json.dumps(config_to_json(config), indent=2) + "\n")
    return path
