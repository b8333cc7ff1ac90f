"""`vivace convert musicgen`: pack layout, checkpoint formats, and one-line errors naming the bad tensor or key."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from musicgen_checkpoints import one_thread  # noqa: F401 - autouse fixture
from musicgen_checkpoints import (
    TinyMusicGen,
    build_model,
    copy_of,
    edit_config,
    edit_weights,
    tokenizer,
    write_checkpoint,
)
from safetensors.torch import load_file

from vivace import Engine, PackError, VivaceError
from vivace.cli import main
from vivace.export.musicgen import convert_musicgen
from vivace.kernels.sinusoid import sinusoidal_embedding


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return write_checkpoint(tmp_path_factory.mktemp("musicgen") / "src", TinyMusicGen(seed=4))


def test_pack_layout_and_cli(source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "pack"
    assert main(["convert", "musicgen", str(source), str(out), "--window", "0.5", "--stride", "0.3"]) == 0
    files = sorted(p.name for p in out.iterdir())
    assert files == ["codec.safetensors", "codec_encoder.safetensors", "decoder.safetensors", "pack.json", "projection.safetensors", "text"]
    data = json.loads((out / "pack.json").read_text())
    assert data["musicgen"]["codec_encoder"] is True
    assert (data["family"], data["sample_rate"]) == ("musicgen", 3200)
    assert data["musicgen"]["window_s"] == 0.5 and data["musicgen"]["stride_s"] == 0.3
    decoder = data["decoder"]
    assert (decoder["vocab_size"], decoder["output_vocab_size"], decoder["num_codebooks"], decoder["num_output_heads"]) == (65, 64, 4, 4)
    assert (decoder["position"], decoder["cross_attention"], decoder["attn_bias"], decoder["ffn_bias"]) == ("sinusoidal", True, False, False)
    stored = load_file(out / "decoder.safetensors")
    assert stored["embed.0.weight"].shape == (65, 48) and "layers.0.attn.q_proj.weight" in stored
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "musicgen" and info["guidance_scale"] == 3.0 and info["sampling"]["top_k"] == 250
    assert isinstance(Engine.from_pack(out), Engine)
    wav = tmp_path / "out.wav"
    assert main(["generate", "--pack", str(out), "slow piano", "--duration", "0.1", "--guidance", "2.5", "-o", str(wav), "--quiet"]) == 0
    assert sf.info(str(wav)).frames == 320  # 0.1 s at 3200 Hz


def test_sinusoidal_positions_equal_transformers_table() -> None:
    from transformers.models.musicgen.modeling_musicgen import MusicgenSinusoidalPositionalEmbedding

    for dim in (16, 17, 48, 1024, 2048):
        theirs = MusicgenSinusoidalPositionalEmbedding.get_embedding(2100, dim)
        assert torch.equal(sinusoidal_embedding(torch.arange(2100), dim), theirs)


def test_sharded_and_bin_checkpoints_convert_to_the_same_pack(source: Path, tmp_path: Path) -> None:
    reference = load_file(convert_musicgen(source, tmp_path / "single") / "decoder.safetensors")
    sharded = tmp_path / "sharded"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build_model(TinyMusicGen(seed=4)).save_pretrained(sharded, max_shard_size="100KB")
    tokenizer().save_pretrained(sharded)
    assert (sharded / "model.safetensors.index.json").is_file()
    binary = copy_of(source, tmp_path)
    torch.save(load_file(binary / "model.safetensors"), binary / "pytorch_model.bin")
    (binary / "model.safetensors").unlink()
    for src in (sharded, binary):
        converted = load_file(convert_musicgen(src, tmp_path / f"{src.name}-pack") / "decoder.safetensors")
        assert converted.keys() == reference.keys()
        assert all(torch.equal(converted[k], reference[k]) for k in reference)


def test_checkpoint_written_with_a_position_table(source: Path, tmp_path: Path) -> None:
    """Older transformers stored embed_positions.weights: accepted when it is the sinusoidal table, named if not."""
    src = copy_of(source, tmp_path)
    name = "decoder.model.decoder.embed_positions.weights"
    edit_weights(src, lambda s: s.__setitem__(name, sinusoidal_embedding(torch.arange(256), 48)))
    convert_musicgen(src, tmp_path / "ok")
    edit_weights(src, lambda s: s.__setitem__(name, torch.randn(256, 48)))
    with pytest.raises(PackError, match=f"tensor '{name}' is not MusicGen's sinusoidal table"):
        convert_musicgen(src, tmp_path / "bad")


BAD_WEIGHTS = {
    "nan": (lambda s: s["decoder.model.decoder.layers.1.fc1.weight"].__setitem__((0, 0), float("nan")),
            "'decoder.model.decoder.layers.1.fc1.weight' is not a finite"),
    "missing-head": (lambda s: s.pop("decoder.lm_heads.2.weight"), "missing tensor 'decoder.lm_heads.2.weight'"),
    "shape": (lambda s: s.__setitem__("decoder.model.decoder.embed_tokens.3.weight", torch.zeros(64, 48)),
              r"'decoder.model.decoder.embed_tokens.3.weight' has shape \[64, 48\], expected \[65, 48\]"),
    "codec": (lambda s: s.pop("audio_encoder.quantizer.layers.3.codebook.embed"),
              "missing tensor 'audio_encoder.quantizer.layers.3.codebook.embed'"),
    "codec-encoder": (lambda s: s.pop("audio_encoder.encoder.layers.7.lstm.weight_hh_l0"),
                      "missing tensor 'audio_encoder.encoder.layers.7.lstm.weight_hh_l0'"),
    "codec-encoder-extra": (lambda s: s.__setitem__("audio_encoder.encoder.layers.20.conv.bias", torch.zeros(2)),
                            "unexpected tensor 'audio_encoder.encoder.layers.20.conv.bias'"),
    "text": (lambda s: s.pop("text_encoder.encoder.final_layer_norm.weight"),
             "missing tensor 'text_encoder.encoder.final_layer_norm.weight'"),
    "projection": (lambda s: s.pop("enc_to_dec_proj.bias"), "missing tensor 'enc_to_dec_proj.bias'"),
    "extra": (lambda s: s.__setitem__("decoder.model.decoder.layers.0.extra.weight", torch.zeros(2)),
              "unexpected tensor 'decoder.model.decoder.layers.0.extra.weight'"),
}


@pytest.mark.parametrize("kind", list(BAD_WEIGHTS))
def test_bad_tensor_is_named_and_nothing_is_written(
    kind: str, source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    edit, message = BAD_WEIGHTS[kind]
    src = copy_of(source, tmp_path)
    edit_weights(src, edit)
    with pytest.raises(PackError, match=message):
        convert_musicgen(src, tmp_path / "pack")
    assert main(["convert", "musicgen", str(src), str(tmp_path / "pack")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vivace: error: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_unreadable_or_absent_weights(source: Path, tmp_path: Path) -> None:
    src = copy_of(source, tmp_path)
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(PackError, match="model.safetensors: unreadable"):
        convert_musicgen(src, tmp_path / "pack")
    (src / "model.safetensors").unlink()
    with pytest.raises(PackError, match="no model.safetensors or pytorch_model.bin"):
        convert_musicgen(src, tmp_path / "pack")


@pytest.mark.parametrize("edit,message", [
    (lambda d: d.update(model_type="bark", architectures=["BarkModel"]), r"unknown architecture \(model_type 'bark'"),
    (lambda d: d["decoder"].update(audio_channels=2, num_codebooks=8), "stereo MusicGen"),
    (lambda d: d["decoder"].update(activation_function="relu"), "decoder activation 'relu' is not supported"),
    (lambda d: d.update(decoder_start_token_id=0), "decoder_start_token_id is 0"),
])
def test_unsupported_checkpoints_fail_clearly(edit, message: str, source: Path, tmp_path: Path) -> None:
    src = copy_of(source, tmp_path)
    edit_config(src, edit, "generation_config.json" if "token_id" in message else "config.json")
    with pytest.raises(PackError, match=message):
        convert_musicgen(src, tmp_path / "pack")


def test_damaged_pack_is_named_on_load(source: Path, tmp_path: Path) -> None:
    pack = convert_musicgen(source, tmp_path / "pack")
    edit_weights(pack, lambda state: state.pop("layers.1.cross_attn.v_proj.weight"), "decoder.safetensors")
    with pytest.raises(PackError, match="missing tensor 'layers.1.cross_attn.v_proj.weight' of component 'decoder'"):
        Engine.from_pack(pack)
    edit_config(pack, lambda data: data["musicgen"].update(loudness=1), "pack.json")
    with pytest.raises(PackError, match="musicgen: unknown key 'loudness'"):
        Engine.from_pack(pack)


def test_bad_requests_fail_before_any_work(source: Path, tmp_path: Path) -> None:
    engine = Engine.from_pack(convert_musicgen(source, tmp_path / "pack"))
    for kwargs, message in [
        (dict(guidance_scale=0.5), "guidance_scale must be a finite number >= 1"),
        (dict(top_k=-1), "top_k must be an integer >= 0"),
        (dict(stage_sampling={"fine": {}}), "stage_sampling names unknown stage 'fine'"),
    ]:
        with pytest.raises(VivaceError, match=message):
            engine.generate("piano", 0.1, **kwargs)
    with pytest.raises(VivaceError, match="exceeds this pack's limit"):
        engine.generate("piano", 301.0)
    with pytest.raises(VivaceError, match="story mode"):
        engine.generate([("piano", 1.0)], 1.0)


@pytest.mark.parametrize(
    "missing,message",
    [
        (["tokenizer.json", "tokenizer_config.json"], "missing tokenizer files: tokenizer_config.json, tokenizer.json or spiece.model"),
        (["tokenizer_config.json"], "missing tokenizer files: tokenizer_config.json (save the tokenizer"),
        (["tokenizer.json"], "missing tokenizer files: tokenizer.json or spiece.model"),
    ],
)
def test_a_checkpoint_without_its_tokenizer_is_refused(
    missing: list, message: str, source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without them transformers may build a tokenizer that maps every prompt to unknown tokens."""
    src = copy_of(source, tmp_path)
    for name in missing:
        (src / name).unlink()
    assert main(["convert", "musicgen", str(src), str(tmp_path / "pack")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_a_broken_tokenizer_is_one_line(source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = copy_of(source, tmp_path)
    (src / "tokenizer.json").write_text("{not json")
    assert main(["convert", "musicgen", str(src), str(tmp_path / "pack")]) == 2
    err = capsys.readouterr().err
    assert "the tokenizer does not load" in err and err.count("\n") == 1


def test_generation_config_values_become_the_packs_defaults(source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = copy_of(source, tmp_path)
    edit_config(src, lambda d: d.update(guidance_scale=4.5, top_k=80, temperature=0.7, do_sample=True), "generation_config.json")
    pack = convert_musicgen(src, tmp_path / "sampled")
    assert main(["info", str(pack)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["guidance_scale"] == 4.5 and info["sampling"] == {"temperature": 0.7, "top_k": 80, "top_p": 1.0}
    engine = Engine.from_pack(pack)
    assert np.array_equal(engine.generate("piano", 0.05, seed=1), engine.generate("piano", 0.05, seed=1, guidance_scale=4.5, top_k=80, temperature=0.7))
    edit_config(src, lambda d: d.update(do_sample=False, guidance_scale=1.0), "generation_config.json")
    greedy = json.loads((convert_musicgen(src, tmp_path / "greedy") / "pack.json").read_text())["musicgen"]
    assert greedy["guidance_scale"] == 1.0 and greedy["sampling"]["temperature"] == 0.0
    edit_config(src, lambda d: d.update(do_sample=True, temperature=-1), "generation_config.json")
    with pytest.raises(PackError, match=r"generation_config.json: temperature must be a finite number >= 0, got -1"):
        convert_musicgen(src, tmp_path / "bad")


def test_a_decoder_vocabulary_smaller_than_the_codebook(tmp_path: Path) -> None:
    """transformers' own test configuration: the decoder predicts 40 of the codec's 64 codes, its pad id is 40."""
    from musicgen_checkpoints import reference, vivace_codes

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        src = write_checkpoint(tmp_path / "src", TinyMusicGen(decoder_vocab=40, seed=8))
    engine = Engine.from_pack(convert_musicgen(src, tmp_path / "pack"))
    frames = 23
    events = list(engine.events("slow piano", frames / engine.config.frame_rate, temperature=0.0, guidance_scale=3.0))
    codes, audio = reference(src, "slow piano", frames)
    np.testing.assert_array_equal(vivace_codes(events, 4), codes)
    assert codes.max() < 40
    pcm = np.concatenate([e.pcm for e in events if hasattr(e, "pcm")])
    assert float(np.abs(pcm - audio).max()) <= 1e-4
    # an audio prompt whose codes the decoder cannot read is refused, not fed past its embedding table
    engine.family.encode = lambda audio, rate, what="audio": np.full((4, 3), 50)
    with pytest.raises(VivaceError, match="audio_prompt encodes to code 50, past the 40 codes this pack's decoder reads"):
        engine.generate("slow piano", 0.1, audio_prompt=np.zeros(48, np.float32), audio_prompt_sample_rate=3200)
