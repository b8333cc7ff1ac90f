import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vivace.errors import PackError
from vivace.families.musiclm.pack import load_pack, read_config
from vivace.model.weights import fold_weight_norm, split_weight_norm


def copy_pack(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_load_fuses_qkv_from_stored_projections(tiny_pack: Path) -> None:
    stored = load_file(tiny_pack / "coarse.safetensors")
    pack = load_pack(tiny_pack)
    fused = pack.stages["coarse"].layers[1].attn.qkv_proj.weight
    expected = torch.cat([stored[f"layers.1.attn.{p}_proj.weight"] for p in "qkv"])
    assert torch.equal(fused, expected)


def test_dtype_cast_applies_to_stages(tiny_pack: Path) -> None:
    pack = load_pack(tiny_pack, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in pack.stages["fine"].parameters())


def test_weight_norm_folds_like_torch() -> None:
    conv = torch.nn.utils.parametrizations.weight_norm(torch.nn.Conv1d(6, 5, 3))
    conv_t = torch.nn.utils.parametrizations.weight_norm(torch.nn.ConvTranspose1d(6, 4, 8, stride=4))
    for module in (conv, conv_t):
        stored = {
            "x.weight_g": module.parametrizations.weight.original0.detach(),
            "x.weight_v": module.parametrizations.weight.original1.detach(),
        }
        torch.testing.assert_close(fold_weight_norm(stored)["x.weight"], module.weight.detach(), rtol=1e-6, atol=1e-7)
    plain = {"y.weight": torch.randn(4, 3, 5), "y.bias": torch.randn(4)}
    torch.testing.assert_close(fold_weight_norm(split_weight_norm(plain))["y.weight"], plain["y.weight"])


def test_unknown_version_is_named(tiny_pack: Path, tmp_path: Path) -> None:
    pack = copy_pack(tiny_pack, tmp_path / "p")
    data = json.loads((pack / "pack.json").read_text())
    data["version"] = 99
    (pack / "pack.json").write_text(json.dumps(data))
    with pytest.raises(PackError, match="unknown pack version 99"):
        read_config(pack)


def test_missing_tensor_is_named(tiny_pack: Path, tmp_path: Path) -> None:
    pack = copy_pack(tiny_pack, tmp_path / "p")
    tensors = load_file(pack / "fine.safetensors")
    del tensors["layers.1.ffn.fc2.weight"]
    save_file(tensors, str(pack / "fine.safetensors"))
    with pytest.raises(PackError, match=r"missing tensor 'layers.1.ffn.fc2.weight'"):
        load_pack(pack)


def test_wrong_shape_is_named(tiny_pack: Path, tmp_path: Path) -> None:
    pack = copy_pack(tiny_pack, tmp_path / "p")
    tensors = load_file(pack / "codec.safetensors")
    tensors["conv_in.bias"] = torch.zeros(3)
    save_file(tensors, str(pack / "codec.safetensors"))
    with pytest.raises(PackError, match=r"'conv_in.bias' has shape \[3\]"):
        load_pack(pack)


def test_missing_file_and_bad_config_are_named(tiny_pack: Path, tmp_path: Path) -> None:
    pack = copy_pack(tiny_pack, tmp_path / "p")
    (pack / "semantic.safetensors").unlink()
    with pytest.raises(PackError, match="missing file semantic.safetensors"):
        load_pack(pack)
    data = json.loads((pack / "pack.json").read_text())
    data["stages"]["coarse"]["vocab_size"] += 1
    (pack / "pack.json").write_text(json.dumps(data))
    with pytest.raises(PackError, match="stage 'coarse': vocabularies"):
        read_config(pack)
    with pytest.raises(PackError, match="no pack.json"):
        read_config(tmp_path)
