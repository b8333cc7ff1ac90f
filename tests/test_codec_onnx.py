"""ONNX codec export, the onnxruntime backend, backend selection and `vivace export onnx`."""
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from vivace import Engine, PackError, VivaceError
from vivace.cli import main
from vivace.codecs import backend as codec_backend
from vivace.codecs.backend import OnnxRuntimeBackend, TorchBackend, select_backend
from vivace.codecs.soundstream import CodecConfig, SoundStreamDecoder
from vivace.export import onnx_codec
from vivace.export.onnx_codec import export_codec, export_pack_codec
from vivace.families.musiclm.pack import load_pack
from vivace.families.musiclm.random_pack import preset_config
from vivace.packs.manifest import CodecOnnx

TOL = 1e-4
OTHER = CodecConfig(
    num_levels=4, codebook_size=16, codebook_dim=8, channels=6, ratios=(2, 5, 3),
    residual_dilations=(1, 2), kernel_size=5, residual_kernel_size=5,
)


@pytest.fixture(scope="module")
def onnx_pack(tiny_pack: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    pack = Path(shutil.copytree(tiny_pack, tmp_path_factory.mktemp("onnx") / "tiny"))
    assert main(["export", "onnx", str(pack)]) == 0
    return pack


@pytest.mark.parametrize("config", [preset_config("tiny").codec, OTHER], ids=["tiny", "other"])
def test_export_matches_torch_at_other_lengths_and_batches(config: CodecConfig, tmp_path: Path) -> None:
    torch.manual_seed(3)
    codec = SoundStreamDecoder(config).eval()
    with torch.no_grad():
        codec.codebooks.normal_()
    path = tmp_path / "codec.onnx"
    assert export_codec(codec, path) <= TOL
    onnx.checker.check_model(str(path))
    traced = codec.receptive_field_frames() + 5
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch, frames in [(1, 1), (2, 9), (3, traced + 31), (1, 4 * traced)]:
        codes = torch.randint(0, config.codebook_size, (batch, config.num_levels, frames))
        (pcm,) = session.run(None, {"codes": codes.numpy()})
        with torch.inference_mode():
            expected = codec(codes).numpy()
        assert pcm.shape == (batch, frames * config.hop_length) and pcm.dtype == np.float32
        assert np.abs(pcm - expected).max() <= TOL


def test_cli_export_records_the_file_in_pack_json(onnx_pack: Path, capsys: pytest.CaptureFixture) -> None:
    record = json.loads((onnx_pack / "pack.json").read_text())["codec_onnx"]
    assert record["file"] == "codec.onnx" and record["opset"] == onnx_codec.OPSET and 0 <= record["max_abs_error"] <= TOL
    assert (onnx_pack / "codec.onnx").is_file() and not list(onnx_pack.glob("*.tmp"))
    assert load_pack(onnx_pack).codec_onnx == CodecOnnx(**record)
    assert main(["info", str(onnx_pack)]) == 0
    assert json.loads(capsys.readouterr().out)["codec_backend"] == "torch"  # auto, on the CPU
    engine = Engine.from_pack(onnx_pack, codec_backend="onnxruntime")
    assert engine.info()["codec_backend"] == "onnxruntime (CPUExecutionProvider)"


def test_onnxruntime_engine_generates_the_torch_audio(onnx_pack: Path) -> None:
    torch_engine = Engine.from_pack(onnx_pack, codec_backend="torch")
    ort_engine = Engine.from_pack(onnx_pack, codec_backend="onnxruntime")
    assert isinstance(torch_engine.codec, TorchBackend) and isinstance(ort_engine.codec, OnnxRuntimeBackend)
    prompts = ["glassy arpeggios", "low drones"]
    a = torch_engine.generate(prompts, 1.1, seed=2)
    b = ort_engine.generate(prompts, 1.1, seed=2)
    assert a.shape == b.shape == (2, round(1.1 * 24000))
    assert np.abs(a - b).max() <= TOL


def test_onnxruntime_context_range_matches_torch(onnx_pack: Path) -> None:
    pack = load_pack(onnx_pack)
    backend = select_backend(pack, "onnxruntime", torch.device("cpu"))
    codes = torch.randint(0, pack.config.codec.codebook_size, (2, pack.config.codec.num_levels, 60))
    with torch.inference_mode():
        expected = pack.codec(codes[..., :45])[..., 30 * backend.hop_length :]
    assert (backend.context_decoder.range(codes[..., :45], 30, 45) - expected).abs().max() <= TOL
    assert backend.decode(codes[..., :0]).shape == (2, 0)


def test_auto_picks_onnxruntime_only_with_a_gpu_provider(
    tiny_pack: Path, onnx_pack: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert select_backend(load_pack(onnx_pack), "auto", cpu).name == "torch"
    assert select_backend(load_pack(onnx_pack), "auto", cuda).name == "torch"  # onnxruntime without GPU providers
    monkeypatch.setattr(codec_backend, "_onnxruntime_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert select_backend(load_pack(onnx_pack), "auto", cuda).name == "onnxruntime"
    assert select_backend(load_pack(tiny_pack), "auto", cuda).name == "torch"  # no codec.onnx


def test_missing_onnxruntime_names_the_extra(onnx_pack: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pack = load_pack(onnx_pack)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(VivaceError, match=r"pip install 'vivace\[onnx\]', or pip install onnx onnxruntime"):
        select_backend(pack, "onnxruntime", torch.device("cpu"))
    with pytest.raises(VivaceError, match=r"pip install 'vivace\[onnx\]', or pip install onnx onnxruntime"):
        export_codec(pack.codec, onnx_pack / "other.onnx")
    assert select_backend(pack, "auto", torch.device("cuda")).name == "torch"


def test_backend_errors(tiny_pack: Path) -> None:
    pack = load_pack(tiny_pack)
    cpu = torch.device("cpu")
    with pytest.raises(VivaceError, match=r"not available in this build.*vivace\[tensorrt\]"):
        select_backend(pack, "tensorrt", cpu)
    with pytest.raises(VivaceError, match="unknown codec_backend 'tvm'"):
        select_backend(pack, "tvm", cpu)
    with pytest.raises(VivaceError, match="vivace export onnx"):
        Engine.from_pack(tiny_pack, codec_backend="onnxruntime")


def test_bad_codec_onnx_record_is_a_pack_error(onnx_pack: Path, tmp_path: Path) -> None:
    pack = Path(shutil.copytree(onnx_pack, tmp_path / "pack"))
    (pack / "codec.onnx").unlink()
    with pytest.raises(PackError, match="codec_onnx.file 'codec.onnx' is not a file"):
        load_pack(pack)
    data = json.loads((pack / "pack.json").read_text())
    data["codec_onnx"] = {"file": "codec.onnx", "opset": 17, "max_abs_error": 0.0, "extra": 1}
    (pack / "pack.json").write_text(json.dumps(data))
    with pytest.raises(PackError, match="codec_onnx: unknown key 'extra'"):
        load_pack(pack)


def test_failed_verification_leaves_the_pack_unchanged(tiny_pack: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    pack = Path(shutil.copytree(tiny_pack, tmp_path / "pack"))
    manifest = (pack / "pack.json").read_text()
    monkeypatch.setattr(onnx_codec, "verify", lambda codec, path: 0.5)
    with pytest.raises(VivaceError, match="differs from torch by 0.5"):
        export_pack_codec(pack)
    assert main(["export", "onnx", str(pack)]) == 2
    assert "differs from torch" in capsys.readouterr().err
    assert (pack / "pack.json").read_text() == manifest
    assert sorted(p.name for p in pack.iterdir() if "onnx" in p.name) == []
