import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import EncodecConfig as TransformersEncodecConfig
from transformers import EncodecModel

from encodec_models import TINY, random_transformers_model

from vivace.codecs.encodec import EncodecConfig, encodec_config_from_dict, encodec_config_to_dict, load_encodec_decoder
from vivace.errors import PackError
from vivace.export.encodec import config_from_transformers, convert_encodec

REAL_32KHZ = dict(
    upsampling_ratios=[8, 5, 4, 4], target_bandwidths=[2.2], num_filters=64, sampling_rate=32000, codebook_size=2048,
    use_causal_conv=False, normalize=False, use_conv_shortcut=False,
)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[EncodecModel, Path]]:
    built = {}
    for seed, (name, kwargs) in enumerate(TINY.items()):
        model = random_transformers_model(kwargs, seed)
        path = tmp_path_factory.mktemp("encodec") / name
        model.save_pretrained(path)
        built[name] = (model, path)
    return built


@torch.no_grad()
def _max_error(model: EncodecModel, src: Path, shapes: list[tuple[int, int, int]]) -> float:
    config, stored = convert_encodec(src)
    decoder = load_encodec_decoder(config, stored)
    generator = torch.Generator().manual_seed(0)
    worst = 0.0
    for batch, levels, frames in shapes:
        codes = torch.randint(0, config.codebook_size, (batch, levels, frames), generator=generator)
        # MusicGen's call: audio_codes [1 chunk, B, K, T], one scale per chunk, None as normalize is off
        expected = model.decode(codes[None], [None], return_dict=False)[0].squeeze(1)
        got = decoder(codes)
        assert got.shape == expected.shape == (batch, frames * config.hop_length)
        assert expected.abs().max() > 0.1
        worst = max(worst, (got - expected).abs().max().item())
    return worst


@pytest.mark.parametrize("name", list(TINY))
def test_decode_matches_transformers(models: dict[str, tuple[EncodecModel, Path]], name: str) -> None:
    model, path = models[name]
    levels = model.config.num_quantizers
    # 1-3 frames are shorter than the reflect pads of the first convolutions
    shapes = [(1, levels, 1), (2, levels, 2), (3, levels, 3), (1, levels, 17), (2, levels, 40), (2, max(1, levels // 2), 9)]
    assert _max_error(model, path, shapes) <= 1e-4


def test_legacy_weight_norm_names_in_pytorch_bin(models: dict[str, tuple[EncodecModel, Path]], tmp_path: Path) -> None:
    model, path = models["causal_24khz"]
    shutil.copy(path / "config.json", tmp_path / "config.json")
    renamed = {
        key.replace("parametrizations.weight.original0", "weight_g").replace("parametrizations.weight.original1", "weight_v"): value
        for key, value in load_file(path / "model.safetensors").items()
    }
    assert any(key.endswith(".conv.weight_v") for key in renamed)
    torch.save(renamed, tmp_path / "pytorch_model.bin")
    assert _max_error(model, tmp_path, [(2, 8, 11)]) <= 1e-4


def test_real_configs() -> None:
    musicgen = config_from_transformers(TransformersEncodecConfig(**REAL_32KHZ).to_dict())
    assert musicgen == EncodecConfig.musicgen_32khz()
    assert (musicgen.num_levels, musicgen.codebook_size, musicgen.hop_length, musicgen.frame_rate) == (4, 2048, 640, 50)
    default = config_from_transformers(TransformersEncodecConfig().to_dict())
    assert default == EncodecConfig() and (default.num_levels, default.frame_rate) == (32, 75)


def test_config_dict_round_trip() -> None:
    config = EncodecConfig.musicgen_32khz()
    assert encodec_config_from_dict(json.loads(json.dumps(encodec_config_to_dict(config)))) == config
    with pytest.raises(PackError, match="unknown key 'hop'"):
        encodec_config_from_dict({"hop": 640})
    with pytest.raises(PackError, match="trim_right_ratio"):
        encodec_config_from_dict({"causal": False, "trim_right_ratio": 0.5})


def _corrupt(src: Path, dst: Path, edit: Callable[[dict, dict[str, torch.Tensor]], object]) -> Path:
    dst.mkdir()
    config = json.loads((src / "config.json").read_text())
    tensors = load_file(src / "model.safetensors")
    edit(config, tensors)
    (dst / "config.json").write_text(json.dumps(config))
    save_file(tensors, dst / "model.safetensors")
    return dst


V_RESIDUAL = "decoder.layers.4.block.1.conv.parametrizations.weight.original1"
CORRUPTIONS = {
    "deleted": (lambda c, t: t.pop(V_RESIDUAL), f"missing tensor '{V_RESIDUAL}'"),
    "deleted codebook": (lambda c, t: t.pop("quantizer.layers.5.codebook.embed"), "missing tensor 'quantizer.layers.5.codebook.embed'"),
    "wrong shape": (
        lambda c, t: t.update({"decoder.layers.1.lstm.weight_hh_l1": torch.zeros(256, 63)}),
        r"tensor 'decoder.layers.1.lstm.weight_hh_l1' has shape \[256, 63\], expected \[256, 64\]",
    ),
    "nan": (lambda c, t: t["decoder.layers.0.conv.bias"].fill_(float("nan")), "'decoder.layers.0.conv.bias' is not a finite"),
    "extra layer": (lambda c, t: t.update({"decoder.layers.30.conv.bias": torch.zeros(1)}), "unexpected tensor 'decoder.layers.30.conv.bias'"),
    "config mismatch": (lambda c, t: c.update(use_conv_shortcut=False), r"unexpected tensor 'decoder\.layers\.\d+\.shortcut\.conv\."),
    "unknown model_type": (lambda c, t: c.update(model_type="dac"), "model_type is 'dac', expected 'encodec'"),
    "chunked": (lambda c, t: c.update(chunk_length_s=1.0, overlap=0.01), "chunked EnCodec"),
    "stereo": (lambda c, t: c.update(audio_channels=2), "only mono"),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_bad_checkpoint_is_named(models: dict[str, tuple[EncodecModel, Path]], tmp_path: Path, kind: str) -> None:
    edit, message = CORRUPTIONS[kind]
    bad = _corrupt(models["causal_24khz"][1], tmp_path / "bad", edit)
    with pytest.raises(PackError, match=message):
        convert_encodec(bad)


def test_loader_names_bad_tensor(models: dict[str, tuple[EncodecModel, Path]]) -> None:
    config, stored = convert_encodec(models["musicgen_32khz"][1])
    missing = {k: v for k, v in stored.items() if k != "blocks.2.upsample.weight_g"}
    with pytest.raises(PackError, match="missing tensor 'blocks.2.upsample.weight_g'"):
        load_encodec_decoder(config, missing)
    with pytest.raises(PackError, match=r"tensor 'codebooks' has shape \[3, 2048, 16\], expected \[4, 2048, 16\]"):
        load_encodec_decoder(config, {**stored, "codebooks": stored["codebooks"][:3]})
    with pytest.raises(PackError, match="unexpected tensor 'lstm.weight_ih_l2'"):
        load_encodec_decoder(config, {**stored, "lstm.weight_ih_l2": stored["lstm.weight_ih_l1"]})
    decoder = load_encodec_decoder(config, stored, dtype=torch.float64)
    assert decoder.codebooks.dtype == torch.float64 and decoder.lstm.weight_hh_l0.dtype == torch.float64
