"""Bad packs and pack writes (issue #19): every ill-typed or out-of-range pack.json value is one PackError naming
its path and value; random-pack refuses a non-empty directory; every file of a pack gets the mode open() would give;
a MusicGen codec with more levels than the decoder's codebooks exports the levels generation passes; a missing pack
reads the same whichever command opens it, and install hints name the extra and the plain packages."""
from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import stat
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from musicgen_checkpoints import one_thread  # noqa: F401 - autouse fixture
from musicgen_checkpoints import TinyMusicGen, edit_config, edit_weights, write_checkpoint
from packaging.requirements import Requirement

from vivace import Engine, PackError, VivaceError
from vivace.cli import main
from vivace.codecs import backend as codec_backend
from vivace.export.musicgen import convert_musicgen
from vivace.export.onnx_codec import export_codec, export_pack_codec
from vivace.families.musicgen.pack import read_musicgen_config
from vivace.families.musiclm.pack import load_pack, read_config
from vivace.families.musiclm.random_pack import preset_config, random_pack

TOL = 1e-4


def edited(pack: Path, tmp_path: Path, edit: Callable[[dict], object]) -> Path:
    copy = Path(shutil.copytree(pack, tmp_path / "edited"))
    edit_config(copy, edit, "pack.json")
    return copy


@contextmanager
def umask(mask: int) -> Iterator[None]:
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def convert_quietly(src: Path, out: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert_musicgen(src, out)


@pytest.fixture(scope="module")
def deep_codec_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A MusicGen checkpoint whose codec stores 6 RVQ levels (its largest bandwidth allows them) while the decoder
    predicts 4 codebooks, as a codec trained for more bandwidths than the language model uses."""
    spec = TinyMusicGen(seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        src = write_checkpoint(tmp_path_factory.mktemp("deep_codec") / "src", spec)
    frame_rate = spec.sampling_rate // (spec.ratios[0] * spec.ratios[1])
    bits_per_level = 6 * frame_rate  # log2(64) bits per frame
    edit_config(src, lambda d: d["audio_encoder"].update(target_bandwidths=[(6 * bits_per_level + 0.5) / 1000]))
    generator = torch.Generator().manual_seed(1)
    edit_weights(src, lambda state: state.update({
        f"audio_encoder.quantizer.layers.{level}.codebook.embed": torch.randn(spec.codebook_size, 16, generator=generator)
        for level in (4, 5)
    }))
    return src


@pytest.fixture(scope="module")
def deep_codec_pack(deep_codec_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert_quietly(deep_codec_source, tmp_path_factory.mktemp("deep_codec_pack") / "pack")


MUSICLM_BAD = {
    "float for an integer": (lambda d: d["stages"]["semantic"].update(num_layers=4.5),
                             "stages.semantic.num_layers must be a positive integer, got 4.5"),
    "whole float for an integer": (lambda d: d["codec"].update(num_levels=12.0), "codec.num_levels must be a positive integer, got 12.0"),
    "string sample rate": (lambda d: d.update(sample_rate="abc"), 'sample_rate must be a positive integer, got "abc"'),
    "numeric string sample rate": (lambda d: d.update(sample_rate="24000"), 'sample_rate must be a positive integer, got "24000"'),
    "zero sample rate": (lambda d: d.update(sample_rate=0), "sample_rate must be a positive integer, got 0"),
    "string version": (lambda d: d.update(version="1"), 'version must be an integer, got "1"'),
    "boolean version": (lambda d: d.update(version=True), "version must be an integer, got true"),
    "boolean for an integer": (lambda d: d["text"].update(num_levels=True), "text.num_levels must be a positive integer, got true"),
    "integer for a boolean": (lambda d: d["stages"]["fine"].update(attn_bias=0), "stages.fine.attn_bias must be true or false, got 0"),
    "negative size": (lambda d: d["stages"]["coarse"].update(d_ff=-64), "stages.coarse.d_ff must be a positive integer, got -64"),
    "zero in a list": (lambda d: d["codec"].update(ratios=[8, 5, 0, 3]), "codec.ratios[2] must be a positive integer, got 0"),
    "string duration": (lambda d: d["musiclm"].update(fine_chunk_s="0.5"), 'musiclm.fine_chunk_s must be a positive number, got "0.5"'),
    "infinite duration": (lambda d: d["musiclm"].update(max_duration_s=float("inf")),
                          "musiclm.max_duration_s must be a positive number, got Infinity"),
    "rate out of range": (lambda d: d["musiclm"]["fine_sampling"].update(top_p=0), "musiclm.fine_sampling.top_p must be a number in (0, 1], got 0"),
    "negative temperature": (lambda d: d["musiclm"]["coarse_sampling"].update(temperature=-1),
                             "musiclm.coarse_sampling.temperature must be a number >= 0, got -1"),
    "unknown choice": (lambda d: d["text"].update(kind="bert"), 'text.kind must be one of "builtin", "transformers", got "bert"'),
    "string name": (lambda d: d.update(name=3), "name must be a string, got 3"),
    "missing key": (lambda d: d["stages"]["coarse"].pop("d_model"), "stages.coarse: missing key 'd_model'"),
    "unknown top-level key": (lambda d: d.update(licence="cc-by"), "unknown key 'licence'"),
}


@pytest.mark.parametrize("kind", list(MUSICLM_BAD))
def test_item1_ill_typed_or_out_of_range_values_are_named(kind: str, tiny_pack: Path, tmp_path: Path, capsys) -> None:
    edit, message = MUSICLM_BAD[kind]
    pack = edited(tiny_pack, tmp_path, edit)
    with pytest.raises(PackError, match=rf"pack\.json: {re.escape(message)}$"):
        read_config(pack)
    assert main(["info", str(pack)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("vivace: error: ")
    assert preset_config("tiny") == read_config(tiny_pack)
    # a whole number written without its decimal point is still a number of seconds
    relaxed = edited(tiny_pack, tmp_path / "relaxed", lambda d: d["musiclm"].update(semantic_window_s=2))
    assert read_config(relaxed).musiclm.semantic_window_s == 2.0


MUSICGEN_BAD = {
    "string size": (lambda d: d["decoder"].update(num_heads="4"), 'decoder.num_heads must be a positive integer, got "4"'),
    "boolean scale": (lambda d: d["musicgen"].update(guidance_scale=True), "musicgen.guidance_scale must be a number >= 1, got true"),
    "float codec rate": (lambda d: d["codec"].update(sampling_rate=3200.0), "codec.sampling_rate must be a positive integer, got 3200.0"),
    "string sample rate": (lambda d: d.update(sample_rate="3200"), 'sample_rate must be a positive integer, got "3200"'),
    "integer for a boolean": (lambda d: d["musicgen"].update(projection=1), "musicgen.projection must be true or false, got 1"),
}


@pytest.mark.parametrize("kind", list(MUSICGEN_BAD))
def test_item1_musicgen_values_are_named(kind: str, deep_codec_pack: Path, tmp_path: Path) -> None:
    edit, message = MUSICGEN_BAD[kind]
    with pytest.raises(PackError, match=rf"pack\.json: {re.escape(message)}$"):
        read_musicgen_config(edited(deep_codec_pack, tmp_path, edit))


def test_item2_random_pack_refuses_a_non_empty_directory(tmp_path: Path, capsys) -> None:
    target = tmp_path / "pack"
    target.mkdir()
    random_pack(target)  # an empty directory is a fine place for a new pack
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    with pytest.raises(VivaceError, match="already exists and is not an empty directory"):
        random_pack(target, seed=1)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert main(["random-pack", str(target), "--seed", "1"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    (target / "notes.txt").write_text("mine")
    random_pack(target, seed=1, force=True)
    assert (target / "notes.txt").read_text() == "mine"
    assert (target / "semantic.safetensors").read_bytes() != before["semantic.safetensors"]
    assert load_pack(target).config == preset_config("tiny")
    (tmp_path / "file").write_text("x")
    with pytest.raises(VivaceError, match="is not a directory"):
        random_pack(tmp_path / "file", force=True)


def modes(pack: Path) -> dict[str, int]:
    return {str(p.relative_to(pack)): stat.S_IMODE(p.stat().st_mode) for p in sorted(pack.rglob("*")) if p.is_file()}


def test_item3_every_file_of_a_pack_has_the_mode_open_gives(deep_codec_source: Path, tmp_path: Path) -> None:
    with umask(0o027):
        musiclm = random_pack(tmp_path / "musiclm")
        export_pack_codec(musiclm)  # codec.onnx, and pack.json rewritten
        musicgen = convert_quietly(deep_codec_source, tmp_path / "musicgen")
    for pack in (musiclm, musicgen):
        files = modes(pack)
        assert "pack.json" in files and sum(name.endswith(".safetensors") for name in files) >= 2
        assert set(files.values()) == {0o640}, files
    assert "codec.onnx" in modes(musiclm) and any(name.startswith("text/") for name in modes(musicgen))
    assert not [p for p in tmp_path.rglob(".vivace-mode-probe-*")]


def test_item4_export_fixes_the_levels_the_decoder_uses(deep_codec_pack: Path, tmp_path: Path, capsys) -> None:
    import onnxruntime

    data = json.loads((deep_codec_pack / "pack.json").read_text())
    assert (data["codec"]["num_levels"], data["decoder"]["num_codebooks"]) == (6, 4)
    pack = Path(shutil.copytree(deep_codec_pack, tmp_path / "pack"))
    assert main(["export", "onnx", str(pack)]) == 0
    assert json.loads(capsys.readouterr().out)["max_abs_error"] <= TOL
    session = onnxruntime.InferenceSession(str(pack / "codec.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[1] == 4
    auto = Engine.from_pack(pack)  # MusicGen prefers codec.onnx on the CPU
    assert auto.info()["codec_backend"].startswith("onnxruntime")
    reference = Engine.from_pack(pack, codec_backend="torch")
    for duration in (0.3, 0.01):  # the second is shorter than the graph's reflect pads: decoded by the module
        a = auto.generate("soft piano", duration_s=duration, seed=2)
        b = reference.generate("soft piano", duration_s=duration, seed=2)
        assert a.shape == b.shape and np.abs(b).max() > 0
        assert np.abs(a - b).max() <= TOL
    out = tmp_path / "out.wav"
    assert main(["generate", "--pack", str(pack), "soft piano", "--duration", "0.2", "-o", str(out), "--quiet"]) == 0
    assert out.is_file()


def test_item5_one_message_for_a_missing_pack_and_hints_that_install(tiny_pack: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    no_pack_json = tmp_path / "empty"
    no_pack_json.mkdir()
    pack_json_folder = tmp_path / "folder"
    (pack_json_folder / "pack.json").mkdir(parents=True)
    for path in (tmp_path / "missing", no_pack_json, pack_json_folder):
        lines = set()
        for argv in (["export", "onnx", str(path)], ["info", str(path)],
                     ["generate", "--pack", str(path), "piano", "-o", str(tmp_path / "x.wav")]):
            assert main(argv) == 2
            lines.add(capsys.readouterr().err)
        assert lines == {f"vivace: error: {path}: not a pack (no pack.json)\n"}

    # the plain form names exactly the packages of vivace's [onnx] extra, so it installs what the extra would
    extra = [Requirement(r) for r in importlib.metadata.requires("vivace") or []]
    onnx_extra = sorted(r.name for r in extra if r.marker is not None and r.marker.evaluate({"extra": "onnx"}))
    hint = "pip install 'vivace[onnx]', or pip install " + " ".join(onnx_extra)
    pack = load_pack(tiny_pack)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(VivaceError, match=rf"needs onnxruntime: {re.escape(hint)}$"):
        codec_backend.select_backend(pack, "onnxruntime", torch.device("cpu"))
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(VivaceError, match=rf"needs the 'onnx' package: {re.escape(hint)}$"):
        export_codec(pack.codec, tmp_path / "codec.onnx")
