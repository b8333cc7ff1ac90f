"""A pack on disk, whatever its family: pack.json (format, version, family, name, sample rate, the family's records)
and one .safetensors file per component.

Reading checks the format and version here and leaves the rest of pack.json to the family's reader; every component
is checked tensor by tensor against the module it fills (the first missing, unexpected or ill-shaped tensor is named)
before any weight is materialized. Writing stores components first and pack.json last, so a pack without pack.json
is an interrupted write, never a pack.
"""
from __future__ import annotations

import json
import os
import stat
import threading
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
from vivace.packs.schema import check_value, from_dict, naming, read_json_object, shown

FORMAT_NAME = "vivace-pack"
SCHEMA_VERSION = 1
TEXT_MODEL_DIR = "text"
HEADER_KEYS = ("format", "version", "family", "name", "sample_rate")
CODEC_ONNX_KEY = "codec_onnx"  # written by `vivace export onnx` into a pack of any family


@dataclass(frozen=True)
class CodecOnnx:
    """pack.json's optional "codec_onnx" record, written by `vivace export onnx` once the file matched torch."""

    file: str
    opset: int
    max_abs_error: float


def read_manifest(path: str | Path) -> dict:
    """pack.json with its format and version checked; the family's reader checks the rest.

    Every command that opens a pack reads it here first, so a missing directory, a folder without pack.json and a
    pack.json that is not a file all give the same message, whichever command was asked."""
    path = Path(path)
    manifest = path / "pack.json"
    if not manifest.is_file():
        raise PackError(f"{path}: not a pack (no pack.json)")
    data = read_json_object(manifest)
    with naming(manifest):
        if data.get("format") != FORMAT_NAME:
            raise PackError(f"format is {shown(data.get('format'))}, expected {FORMAT_NAME!r}")
        if "version" not in data:
            raise PackError("missing key 'version'")
        version = data["version"]
        if isinstance(version, bool) or not isinstance(version, int):
            raise PackError(f"version must be an integer, got {shown(version)}")
        if version != SCHEMA_VERSION:
            raise PackError(f"unknown pack version {version} (this vivace reads version {SCHEMA_VERSION})")
    return data


def read_family_manifest(path: str | Path, family: str, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict:
    """pack.json of a pack of `family`: the keys that family requires, no key outside the header, required, optional
    and codec_onnx, and a well-typed header (the family's reader checks its own records)."""
    manifest = Path(path) / "pack.json"
    data = read_manifest(path)
    with naming(manifest):
        if data.get("family") != family:
            raise PackError(f"family is {shown(data.get('family'))}, expected {family!r}")
        for key in required:
            if key not in data:
                raise PackError(f"missing key {key!r}")
        unknown = sorted(set(data) - {*HEADER_KEYS, *required, *optional, CODEC_ONNX_KEY})
        if unknown:
            raise PackError(f"unknown key {unknown[0]!r}")
        check_value(data.get("name", ""), str, "name")
        check_value(data["sample_rate"], int, "sample_rate")
    return data


def manifest_header(family: str, name: str, sample_rate: int) -> dict[str, Any]:
    return {"format": FORMAT_NAME, "version": SCHEMA_VERSION, "family": family, "name": name, "sample_rate": sample_rate}


def read_codec_onnx(path: str | Path) -> CodecOnnx | None:
    """The validated "codec_onnx" record of a pack (the family's reader has checked the rest of pack.json), or None."""
    path = Path(path)
    data = read_manifest(path).get(CODEC_ONNX_KEY)
    if data is None:
        return None
    with naming(path / "pack.json"):
        record = from_dict(CodecOnnx, data, CODEC_ONNX_KEY)
    if Path(record.file).name != record.file or not (path / record.file).is_file():
        raise PackError(f"{path}: codec_onnx.file {record.file!r} is not a file in the pack")
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


def new_file_mode(directory: Path) -> int:
    """The permission bits open() gives a new file in directory (0o666 less the umask, or a default ACL's).

    Found by creating a file rather than with os.umask, which can only be read by setting it: for that moment every
    other thread of the process would create its files with the wrong mask."""
    probe = directory / f".vivace-mode-probe-{os.getpid()}-{threading.get_ident()}"
    fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    try:
        return stat.S_IMODE(os.fstat(fd).st_mode)
    finally:
        os.close(fd)
        probe.unlink()


def give_new_file_mode(path: Path) -> None:
    """Sets path (every file under it, for a folder) to the mode open() gives a new file there. safetensors (and so
    transformers' save_pretrained) writes through a private temporary file and keeps its 0600, which would leave
    the weights of a pack unreadable to the other users who can read its pack.json."""
    files = [path] if path.is_file() else [f for f in sorted(path.rglob("*")) if f.is_file() and not f.is_symlink()]
    if not files:
        return
    mode = new_file_mode(path if path.is_dir() else path.parent)
    for file in files:
        if stat.S_IMODE(file.stat().st_mode) != mode:
            os.chmod(file, mode)


def write_component(path: Path, component: str, tensors: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> None:
    """component.safetensors; floating-point tensors cast to dtype when given."""
    cast = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
    file = path / f"{component}.safetensors"
    save_file(cast, str(file))
    give_new_file_mode(file)


def write_text_model(path: Path, *parts: Any) -> None:
    """A transformers text encoder and its tokenizer (anything with save_pretrained) into path/text/."""
    directory = path / TEXT_MODEL_DIR
    for part in parts:
        part.save_pretrained(directory)
    give_new_file_mode(directory)


def write_manifest(path: Path, data: dict[str, Any]) -> None:
    (path / "pack.json").write_text(json.dumps(data, indent=2) + "\n")
