"""EnCodec's encoder and codec packs (`vivace convert encodec`, vivace.Codec, `vivace codec`) against transformers'
EncodecModel on the same random weights, in every configuration branch of tests/encodec_models.py."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from encodec_models import TINY, random_transformers_model

from vivace import Codec, Engine, PackError, VivaceError
from vivace.cli import main
from vivace.export.encodec import convert_encodec_pack


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[object, Path]]:
    built = {}
    for seed, (name, kwargs) in enumerate(TINY.items()):
        model = random_transformers_model(kwargs, seed)
        root = tmp_path_factory.mktemp(name)
        model.save_pretrained(root / "src")
        built[name] = (model, convert_encodec_pack(root / "src", root / "pack"))
    return built


@pytest.mark.parametrize("name", list(TINY))
@torch.no_grad()
def test_encode_and_decode_match_transformers(converted, name: str) -> None:
    """Codes equal transformers' encode at its largest bandwidth (every level), for lengths that are and are not whole
    frames; the embeddings within 1e-5; decode within 1e-4 (the decoder's own tests bound it tighter)."""
    model, pack = converted[name]
    codec = Codec.from_pack(pack)
    bandwidth = model.config.target_bandwidths[-1]
    generator = torch.Generator().manual_seed(1)
    for samples in (codec.config.hop_length * 7, codec.config.hop_length * 7 + 3, 5):
        pcm = torch.randn(samples, generator=generator) * 0.3
        expected = model.encode(pcm[None, None], bandwidth=bandwidth).audio_codes[0, 0]
        codes = codec.encode(pcm.numpy(), codec.sample_rate)
        assert codes.shape == tuple(expected.shape) == (codec.num_levels, -(-samples // codec.config.hop_length))
        np.testing.assert_array_equal(codes, expected.numpy())
        torch.testing.assert_close(codec.encoder(pcm[None]), model.encoder(pcm[None, None]), rtol=0, atol=1e-5)
        audio = model.decode(expected[None, None], [None]).audio_values[0, 0].numpy()
        assert float(np.abs(codec.decode(codes) - audio).max()) <= 1e-4
    fewer = codec.encode(pcm.numpy(), codec.sample_rate, levels=1)
    np.testing.assert_array_equal(fewer, codes[:1])  # RVQ: the first level does not depend on the later ones


def test_pack_layout_info_and_engine_refusal(converted, capsys: pytest.CaptureFixture[str]) -> None:
    _, pack = converted["causal_24khz"]
    assert sorted(p.name for p in pack.iterdir()) == ["codec.safetensors", "codec_encoder.safetensors", "pack.json"]
    assert json.loads((pack / "pack.json").read_text())["family"] == "encodec"
    assert main(["info", str(pack)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["family"], info["levels"], info["sample_rate"]) == ("encodec", 8, 24000)
    with pytest.raises(PackError, match="a encodec pack is a codec, not a model that generates: open it with vivace.Codec.from_pack"):
        Engine.from_pack(pack)


def test_the_command_line_round_trip(converted, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, pack = converted["musicgen_32khz"]
    codec = Codec.from_pack(pack)
    pcm = (np.random.default_rng(2).standard_normal((2, 6400)) * 0.2).astype(np.float32)  # stereo: downmixed
    sf.write(tmp_path / "in.wav", pcm.T, 32000, subtype="FLOAT")
    assert main(["codec", "encode", str(tmp_path / "in.wav"), "--pack", str(pack), "-o", str(tmp_path / "codes.npy")]) == 0
    codes = np.load(tmp_path / "codes.npy")
    np.testing.assert_array_equal(codes, codec.encode(pcm.mean(axis=0), 32000))
    out = tmp_path / "out.wav"
    assert main(["codec", "decode", str(tmp_path / "codes.npy"), "--pack", str(pack), "-o", str(out), "--bits", "32"]) == 0
    np.testing.assert_array_equal(sf.read(out, dtype="float32")[0], codec.decode(codes))
    capsys.readouterr()
    for argv, message in [
        (["codec", "encode", str(tmp_path / "in.wav"), "--pack", str(pack), "-o", str(tmp_path / "c.txt")], "as a .npy file"),
        (["codec", "encode", str(tmp_path / "in.wav"), "--pack", str(pack), "--levels", "9", "-o", str(tmp_path / "c.npy")], "levels must be an integer from 1 to 4, got 9"),
        (["codec", "encode", str(tmp_path / "missing.wav"), "--pack", str(pack), "-o", str(tmp_path / "c.npy")], "does not exist"),
        (["codec", "decode", str(tmp_path / "in.wav"), "--pack", str(pack), "-o", str(tmp_path / "d.wav")], "not a .npy array of codes"),
        (["convert", "encodec", str(tmp_path), str(tmp_path / "p")], "not a transformers model directory"),
        (["convert", "encodec", str(pack.parent / "src"), str(tmp_path)], "already exists and is not an empty directory"),
    ]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "c.npy").exists() and not (tmp_path / "d.wav").exists() and not (tmp_path / "p").exists()


@pytest.mark.parametrize(
    "codes,message",
    [
        (np.zeros((5, 3), dtype=np.int64), "got shape [5, 3]"),
        (np.zeros((4, 0), dtype=np.int64), "got shape [4, 0]"),
        (np.full((2, 3), 2048), "got values from 2048 to 2048"),
        (np.zeros((2, 3), dtype=np.float32), "codes must be integers, got float32"),
        (np.zeros((1, 2, 3), dtype=np.int64), "codes must be one clip, [levels, frames], got shape [1, 2, 3]"),
    ],
)
def test_bad_codes_are_one_line(converted, codes, message: str) -> None:
    with pytest.raises(VivaceError) as error:
        Codec.from_pack(converted["musicgen_32khz"][1]).decode(codes)
    assert message in str(error.value)


def test_a_normalizing_codec_is_refused(tmp_path: Path) -> None:
    model = random_transformers_model({**TINY["causal_24khz"], "normalize": True}, 0)
    model.save_pretrained(tmp_path / "src")
    with pytest.raises(PackError, match="normalize is true"):
        convert_encodec_pack(tmp_path / "src", tmp_path / "pack")
    assert not (tmp_path / "pack").exists()
