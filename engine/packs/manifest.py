"""A pack on disk, whatever its family: pack.json (format, version, family, name, sample rate, the family's records)
and one .safetensors file per component.

Reading checks the format and version here and leaves the rest of pack.json to the family's reader; every component
is checked tensor by tensor against the module it fills (the first missing, unexpected or ill-shaped tensor is named)
before any weight is materialized. Writing stores components first and pack.json last, so a pack without pack.json
is an interrupted write, never a pack.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from vivace.errors import PackError
from vivace.model.transformer import StageTransformer
from vivace.model.weights import check_tensors, expected_shapes, unfuse_attention
from vivace.packs.schema import from_dict, read_json_object

FORMAT_NAME = "vivace-pack"
SCHEMA_VERSION = 1
TEXT_MODEL_DIR = "text"


@dataclass(frozen=True)
class CodecOnnx:
    """pack.json's optional "codec_onnx" record, written by `vivace export onnx` once the file matched torch."""

    file: str
    opset: int
    max_abs_error: float


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


def read_family_manifest(path: str | Path, family: str, required: tuple[str, ...]) -> dict:
    """pack.json of a pack of `family`, with the keys that family requires."""
    manifest = Path(path) / "pack.json"
    data = read_manifest(path)
    if data.get("family") != family:
        raise PackError(f"{manifest}: family is {data.get('family')!r}, expected {family!r}")
    for key in required:
        if key not in data:
            raise PackError(f"{manifest}: missing key {key!r}")
    return data


def manifest_header(family: str, name: str, sample_rate: int) -> dict[str, Any]:
    return {"format": FORMAT_NAME, "version": SCHEMA_VERSION, "family": family, "name": name, "sample_rate": sample_rate}


def read_codec_onnx(path: str | Path) -> CodecOnnx | None:
    """The validated "codec_onnx" record of a pack (the family's reader has checked the rest of pack.json), or None."""
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


def stored_stage(module: StageTransformer) -> dict[str, torch.Tensor]:
    """A stage transformer's tensors as packs store them (attention projections unfused)."""
    return unfuse_attention(module.state_dict())


def load_component(path: Path, component: str, expected: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    file = path / f"{component}.safetensors"
    if not file.is_file():
        raise PackError(f"{path}: missing file {file.name}")
    try:
        stored = load_file(file)
    except (SafetensorError, OSError) as exc:
        raise PackError(f"{file}: unreadable ({exc})") from None
    check_tensors(component, file, stored, expected)
    return stored


def materialize(
    build: Callable[[], nn.Module], stored_form: Callable[[nn.Module], dict[str, torch.Tensor]],
    prepare: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]], path: Path, component: str,
) -> nn.Module:
    """The module build() makes, filled from component.safetensors: built on the meta device, the stored tensors
    checked against its stored form, then prepare()d (fusions, folded weight norm) and assigned."""
    with torch.device("meta"):
        module = build()
    stored = load_component(path, component, expected_shapes(stored_form(module)))
    module.load_state_dict(prepare(stored), strict=True, assign=True)
    return module


def write_component(path: Path, component: str, tensors: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> None:
    """component.safetensors; floating-point tensors cast to dtype when given."""
    cast = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
    save_file(cast, str(path / f"{component}.safetensors"))


def write_manifest(path: Path, data: dict[str, Any]) -> None:
    (path / "pack.json").write_text(json.dumps(data, indent=2) + "\n")
