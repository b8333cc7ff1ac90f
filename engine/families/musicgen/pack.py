"""MusicGen packs: pack.json (family "musicgen") + decoder / codec / projection safetensors + text/.

decoder.safetensors     the decoder as a vivace stage in stored form (separate q/k/v): num_codebooks summed input
                        embeddings of codebook_size + 1 rows (the last is pad/BOS), sinusoidal positions,
                        cross-attention in every layer (none in a melody pack), one output head per codebook
codec.safetensors       the EnCodec decoder in its stored form (vivace.codecs.encodec)
codec_encoder.safetensors   EnCodec's encoder (vivace.codecs.encodec_encoder; it quantizes with the decoder's
                        codebooks), when musicgen.codec_encoder is true: what audio prompts are encoded with
projection.safetensors  transformers' enc_to_dec_proj, when the text encoder's width differs from the decoder's
chroma_projection.safetensors   melody packs: audio_enc_to_dec_proj, when num_chroma differs from the decoder's width
text/                   the transformers text encoder (T5) and its tokenizer, as save_pretrained wrote them

A MusicGen-Melody pack has a "melody" record in pack.json: its condition is not cross-attention but a prefix of
input embeddings (the projected chroma of a reference, then the projected text states) in front of the codes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vivace.codecs.encodec import (
    EncodecDecoder,
    encodec_config_from_dict,
    encodec_config_to_dict,
    encodec_stored_form,
    load_encodec_decoder,
)
from vivace.codecs.encodec_encoder import EncodecEncoder, read_encodec_encoder
from vivace.errors import PackError
from vivace.families.musicgen.config import FAMILY, MelodyConfig, MusicGenConfig, MusicGenPackConfig
from vivace.families.musicgen.text import MusicGenText
from vivace.model.config import TransformerConfig
from vivace.model.transformer import StageTransformer
from vivace.model.weights import expected_shapes, fuse_attention
from vivace.packs.manifest import (
    TEXT_MODEL_DIR,
    CodecOnnx,
    load_component,
    manifest_header,
    materialize,
    read_codec_onnx,
    read_family_manifest,
    stored_stage,
    write_component,
    write_manifest,
    write_text_model,
)
from vivace.packs.schema import from_dict, naming, to_dict

DECODER, CODEC, CODEC_ENCODER = "decoder", "codec", "codec_encoder"
PROJECTION, CHROMA_PROJECTION = "projection", "chroma_projection"


@dataclass
class MusicGenPack:
    path: Path
    config: MusicGenPackConfig
    decoder: StageTransformer
    codec: EncodecDecoder
    text: MusicGenText
    chroma_projection: nn.Linear | None = None  # melody packs whose num_chroma differs from d_model
    codec_onnx: CodecOnnx | None = None  # codec.onnx, written by `vivace export onnx`
    codec_encoder: EncodecEncoder | None = None  # packs whose musicgen.codec_encoder is true


def validate_musicgen_config(config: MusicGenPackConfig) -> None:
    d, m, codec = config.decoder, config.musicgen, config.codec
    d.validate(DECODER)
    codec.validate()
    if d.position != "sinusoidal" or d.norm != "layernorm" or not d.final_norm:
        raise PackError("decoder: MusicGen needs sinusoidal positions, layernorm and a final norm")
    if d.cross_attention == (config.melody is not None):
        raise PackError(f"decoder: a {'melody' if config.melody else 'MusicGen'} pack needs cross_attention {config.melody is None}")
    if d.num_output_heads != d.num_codebooks:
        raise PackError(f"decoder: {d.num_codebooks} codebooks need as many output heads, got {d.num_output_heads}")
    # the decoder may predict fewer codes than the codec's codebooks hold (transformers allows it): its pad/BOS id is
    # one past its own vocabulary
    if d.output_vocab_size > codec.codebook_size or d.vocab_size != d.output_vocab_size + 1:
        raise PackError(
            f"decoder: vocabularies ({d.vocab_size}, {d.output_vocab_size}) must be at most the codec's "
            f"{codec.codebook_size} codes, plus the pad/BOS row"
        )
    if d.num_codebooks > codec.num_levels:
        raise PackError(f"decoder: {d.num_codebooks} codebooks but the codec has {codec.num_levels} levels")
    if (d.cross_attention and d.cross_dim != d.d_model) or (m.text_hidden != d.d_model and not m.projection):
        raise PackError(
            f"decoder: the condition must be d_model {d.d_model} wide (cross_dim {d.cross_dim}); the text encoder gives "
            f"{m.text_hidden} ({'with' if m.projection else 'without'} a projection)"
        )
    if config.melody is not None:
        validate_melody_config(config.melody, d.d_model)
    for key in ("window_s", "stride_s", "max_duration_s"):
        value = getattr(m, key)
        if not isinstance(value, (int, float)) or not math.isfinite(value) or config.frames(value) <= 0:
            raise PackError(f"musicgen.{key} must be a positive number of seconds (at least one frame), got {value!r}")
    if m.stride_s > m.window_s:
        raise PackError(f"musicgen: stride_s {m.stride_s} exceeds window_s {m.window_s}")
    if not isinstance(m.guidance_scale, (int, float)) or not m.guidance_scale >= 1:
        raise PackError(f"musicgen.guidance_scale must be >= 1, got {m.guidance_scale!r}")
    m.sampling.validate()


def validate_melody_config(melody: MelodyConfig, d_model: int) -> None:
    c = melody.chroma
    for key, value in [("chroma_length", melody.chroma_length), *((f"chroma.{k}", getattr(c, k)) for k in vars(c))]:
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise PackError(f"melody.{key} must be a positive integer, got {value!r}")
    if not isinstance(melody.projection, bool) or (c.num_chroma != d_model and not melody.projection):
        raise PackError(f"melody: {c.num_chroma} chroma bins need a projection to d_model {d_model}, got projection {melody.projection!r}")


def config_to_json(config: MusicGenPackConfig) -> dict[str, Any]:
    return {
        **manifest_header(FAMILY, config.name, config.sample_rate),
        "decoder": to_dict(config.decoder),
        "codec": encodec_config_to_dict(config.codec),
        "musicgen": to_dict(config.musicgen),
        **({"melody": to_dict(config.melody)} if config.melody is not None else {}),
    }


def read_musicgen_config(path: str | Path) -> MusicGenPackConfig:
    path = Path(path)
    manifest = path / "pack.json"
    data = read_family_manifest(path, FAMILY, ("sample_rate", "decoder", "codec", "musicgen"), ("melody",))
    with naming(manifest):
        config = MusicGenPackConfig(
            decoder=from_dict(TransformerConfig, data["decoder"], "decoder"),
            codec=encodec_config_from_dict(data["codec"], "codec"),
            musicgen=from_dict(MusicGenConfig, data["musicgen"], "musicgen"),
            name=data.get("name", ""),
            melody=from_dict(MelodyConfig, data["melody"], "melody") if "melody" in data else None,
        )
        if data["sample_rate"] != config.sample_rate:
            raise PackError(f"sample_rate {data['sample_rate']} differs from the codec's {config.sample_rate}")
        validate_musicgen_config(config)
    return config


def _linear(path: Path, component: str, in_features: int, out_features: int) -> nn.Linear:
    return materialize(lambda: nn.Linear(in_features, out_features), lambda m: dict(m.state_dict()), dict, path, component)


def load_musicgen_pack(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> MusicGenPack:
    """Validates pack.json and every tensor (the first mismatch is named); the decoder is cast to dtype, the codec,
    projection and text encoder stay float32."""
    path = Path(path)
    config = read_musicgen_config(path)
    decoder = materialize(lambda: StageTransformer(config.decoder), stored_stage, fuse_attention, path, DECODER)
    decoder = decoder.to(device=device, dtype=dtype).eval()
    decoder.refresh_derived()
    codec = load_musicgen_codec(path).to(device)
    d_model, melody = config.decoder.d_model, config.melody
    projection = _linear(path, PROJECTION, config.musicgen.text_hidden, d_model) if config.musicgen.projection else None
    chroma_projection = None
    if melody is not None and melody.projection:
        chroma_projection = _linear(path, CHROMA_PROJECTION, melody.chroma.num_chroma, d_model).to(device)
    if not (path / TEXT_MODEL_DIR).is_dir():
        raise PackError(f"{path}: missing the text encoder folder {TEXT_MODEL_DIR}/")
    text = MusicGenText(path / TEXT_MODEL_DIR, projection).to(device)
    encoder = read_encodec_encoder(path, CODEC_ENCODER, config.codec, device) if config.musicgen.codec_encoder else None
    return MusicGenPack(path, config, decoder, codec, text, chroma_projection, read_codec_onnx(path), encoder)


def load_musicgen_codec(path: str | Path) -> EncodecDecoder:
    """Only the EnCodec decoder of a MusicGen pack (CPU, float32), without the decoder transformer or text tower.

    It keeps the codebooks of the levels the decoder predicts (num_codebooks) and drops the rest a codec may store
    (a checkpoint whose codec allows a higher bandwidth): MusicGen never makes codes for them, and a decoder module
    that claims them would make `vivace export onnx` fix the graph's input at levels no generation ever passes."""
    path = Path(path)
    config = read_musicgen_config(path)
    with torch.device("meta"):
        expected = expected_shapes(encodec_stored_form(EncodecDecoder(config.codec)))
    stored = load_component(path, CODEC, expected)
    levels = config.num_codebooks
    used = replace(config.codec, num_levels=levels)
    stored = {**stored, "codebooks": stored["codebooks"][:levels].contiguous()}
    return load_encodec_decoder(used, stored, torch.float32, "cpu", path / f"{CODEC}.safetensors").eval()


def save_musicgen_pack(
    path: str | Path,
    config: MusicGenPackConfig,
    decoder: dict[str, torch.Tensor],
    codec: dict[str, torch.Tensor],
    projection: dict[str, torch.Tensor] | None,
    text_encoder: Any,
    tokenizer: Any,
    chroma_projection: dict[str, torch.Tensor] | None = None,
    codec_encoder: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Writes stored-form tensors, the text encoder and tokenizer (save_pretrained) and, last, pack.json."""
    validate_musicgen_config(config)
    for key, flag, tensors in [
        ("musicgen.projection", config.musicgen.projection, projection),
        ("melody.projection", config.melody is not None and config.melody.projection, chroma_projection),
        ("musicgen.codec_encoder", config.musicgen.codec_encoder, codec_encoder),
    ]:
        if (tensors is not None) != flag:
            raise PackError(f"{key} is {flag} but its tensors were {'given' if tensors is not None else 'not given'}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    optional = {PROJECTION: projection, CHROMA_PROJECTION: chroma_projection, CODEC_ENCODER: codec_encoder}
    components = {DECODER: decoder, CODEC: codec, **{k: v for k, v in optional.items() if v is not None}}
    for component, tensors in components.items():
        write_component(path, component, tensors)
    write_text_model(path, text_encoder, tokenizer)
    write_manifest(path, config_to_json(config))
    return path
