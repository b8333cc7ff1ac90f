"""The codec decoder as ONNX: codes int64 [batch, levels, frames] -> PCM float32 [batch, frames * hop].

Any decoder module with `config.num_levels` and `config.codebook_size` exports: the MusicLM pack's SoundStream
codec and EnCodec (whose LSTM the exporter writes as an ONNX LSTM). The reflect padding of `pad1d` is traced
on its long-input branch, so an EnCodec graph needs more frames than its widest reflect pad (`min_frames`); the
onnxruntime backend decodes shorter inputs with the module.

Uses torch's TorchScript exporter (dynamo=False): deprecated since torch 2.9 but present, it needs no
onnxscript (the dynamo exporter does) and exports these graphs with symbolic batch and frame
axes. The file is checked with onnx.checker
and against the float32 torch decoder through onnxruntime at several batch sizes and lengths (none of them
the traced one) before `export_pack_codec` records it in pack.json.
"""
from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from torch import nn

from vivace.codecs.backend import install_hint, min_frames
from vivace.errors import VivaceError
from vivace.packs.manifest import read_manifest
from vivace.packs.registry import family_of

ONNX_FILE = "codec.onnx"
OPSET = 17
TOLERANCE = 1e-4  # max |PCM difference| against torch float32


def require(module: str) -> ModuleType:
    try:
        return __import__(module)
    except ImportError:
        raise VivaceError(f"the ONNX codec needs the {module!r} package: {install_hint('onnx')}") from None


def _field_frames(codec: nn.Module) -> int:
    field = getattr(codec, "receptive_field_frames", None)
    return field() if callable(field) else 2 * min_frames(codec)


def _check_shapes(codec: nn.Module) -> list[tuple[int, int]]:
    """(batch, frames) pairs: the fewest frames, one receptive field, and several fields plus an odd remainder."""
    field = _field_frames(codec)
    return [(1, min_frames(codec)), (2, field), (1, 3 * field + 7), (3, 2 * field + 1)]


def verify(codec: nn.Module, onnx_path: str | Path, shapes: list[tuple[int, int]] | None = None) -> float:
    """Max |ONNX - torch| over random codes of each (batch, frames), run with onnxruntime on the CPU."""
    ort = require("onnxruntime")
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(0)
    config = codec.config
    worst = 0.0
    for batch, frames in shapes or _check_shapes(codec):
        codes = torch.randint(0, config.codebook_size, (batch, config.num_levels, frames), generator=generator)
        with torch.inference_mode():
            expected = codec(codes).numpy()
        (got,) = session.run(None, {"codes": codes.numpy()})
        if got.shape != expected.shape:
            raise VivaceError(f"{onnx_path}: ONNX output shape {got.shape} for codes {tuple(codes.shape)}, torch gives {expected.shape}")
        worst = max(worst, float(np.abs(got - expected).max()))
    return worst


def export_codec(codec: nn.Module, path: str | Path, opset: int = OPSET) -> float:
    """Writes the decoder (as float32) to path and returns its verified max abs error; raises above TOLERANCE."""
    onnx = require("onnx")
    require("onnxruntime")
    path = Path(path)
    codec = copy.deepcopy(codec).float().cpu().eval()
    config = codec.config
    example = torch.zeros(1, config.num_levels, _field_frames(codec) + 5, dtype=torch.int64)
    tmp = path.with_name(path.name + ".tmp")
    with warnings.catch_warnings():
        # the TorchScript exporter is deprecated (not removed) in favour of dynamo, which would need onnxscript;
        # the Slice constant-folding notes come from the reversed pad lists of F.pad
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message="Constant folding")
        # pad1d's short-input test (the trace keeps the long-input branch) and the LSTM's note on batch sizes:
        # both are covered by `verify` at other batch sizes and from `min_frames` frames up
        warnings.filterwarnings("ignore", message="Converting a tensor to a Python boolean")
        warnings.filterwarnings("ignore", message="Exporting a model to ONNX with a batch_size other than 1")
        torch.onnx.export(
            codec, (example,), str(tmp), dynamo=False, opset_version=opset,
            input_names=["codes"], output_names=["pcm"],
            dynamic_axes={"codes": {0: "batch", 2: "frames"}, "pcm": {0: "batch", 1: "samples"}},
        )
    try:
        onnx.checker.check_model(str(tmp))
        error = verify(codec, tmp)
        if not error <= TOLERANCE:
            raise VivaceError(f"{path}: ONNX codec differs from torch by {error:.3g} (> {TOLERANCE})")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    return error


def export_pack_codec(pack_path: str | Path, opset: int = OPSET) -> dict:
    """Exports PACK's codec (SoundStream, or EnCodec for a MusicGen pack) to PACK/codec.onnx and records it in
    pack.json under "codec_onnx"."""
    pack_path = Path(pack_path)
    codec = family_of(pack_path).load_codec(pack_path)
    error = export_codec(codec, pack_path / ONNX_FILE, opset)
    record = {"file": ONNX_FILE, "opset": opset, "max_abs_error": error}
    manifest = pack_path / "pack.json"
    data = read_manifest(pack_path)
    data["codec_onnx"] = record
    tmp = manifest.with_name("pack.json.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, manifest)
    return record
