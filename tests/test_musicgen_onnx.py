"""`vivace export onnx` on a MusicGen pack: EnCodec as codec.onnx, recorded in pack.json, decoded by the onnxruntime
backend within 1e-4 of torch, short clips included (the graph refuses fewer frames than its reflect pads)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from musicgen_checkpoints import converted_32khz_pack, one_thread  # noqa: F401 - autouse fixture

from vivace import Engine, VivaceError
from vivace.cli import main
from vivace.codecs.backend import OnnxRuntimeBackend, min_frames
from vivace.families.musicgen.pack import load_musicgen_codec

TOL = 1e-4


@pytest.fixture(scope="module")
def pack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return converted_32khz_pack(tmp_path_factory.mktemp("musicgen_onnx"), seed=4)


def test_musicgen_pack_without_codec_onnx_names_the_export_command(pack: Path) -> None:
    with pytest.raises(VivaceError, match="vivace export onnx"):
        Engine.from_pack(pack, codec_backend="onnxruntime")
    with pytest.raises(VivaceError, match="tensorrt"):
        Engine.from_pack(pack, codec_backend="tensorrt")


def test_export_records_the_graph_and_generation_matches_torch(pack: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["export", "onnx", str(pack)]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["file"] == "codec.onnx" and record["max_abs_error"] <= TOL
    assert json.loads((pack / "pack.json").read_text())["codec_onnx"] == record
    torch_engine = Engine.from_pack(pack, codec_backend="torch")
    ort_engine = Engine.from_pack(pack, codec_backend="onnxruntime")
    assert ort_engine.info()["codec_backend"] == "onnxruntime (CPUExecutionProvider)"
    assert Engine.from_pack(pack).info()["codec_backend"] == "onnxruntime (CPUExecutionProvider)"  # auto, EnCodec
    for duration in (0.4, 0.06):  # 0.06 s: fewer frames than the graph takes, decoded by the module
        a = torch_engine.generate("soft piano", duration_s=duration, seed=3)
        b = ort_engine.generate("soft piano", duration_s=duration, seed=3)
        assert a.shape == b.shape and np.abs(a).max() > 0
        assert np.abs(a - b).max() <= TOL


def test_short_inputs_decode_with_the_module(pack: Path) -> None:
    if not (pack / "codec.onnx").exists():
        main(["export", "onnx", str(pack)])
    codec = load_musicgen_codec(pack)
    backend = OnnxRuntimeBackend(codec, str(pack / "codec.onnx"), torch.device("cpu"))
    shortest = min_frames(codec)
    assert shortest > 1
    for frames in (1, shortest - 1, shortest, shortest + 5):
        codes = torch.randint(0, codec.config.codebook_size, (2, codec.config.num_levels, frames))
        with torch.inference_mode():
            expected = codec(codes)
        assert (backend.decode(codes) - expected).abs().max() <= TOL
