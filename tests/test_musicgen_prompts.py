"""What MusicGen users call besides a text prompt: unconditional generation (prompt None) and, for packs carrying
EnCodec's encoder, continuation from an audio prompt. Parity with transformers is in test_musicgen_parity.py."""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from musicgen_checkpoints import TinyMusicGen, converted, copy_of, edit_config, write_checkpoint
from musicgen_checkpoints import one_thread  # noqa: F401 - autouse fixture

from vivace import Engine, VivaceError, WindowStarted
from vivace.cli import main
from vivace.export.musicgen import convert_musicgen

RATE, HOP = 3200, 16  # TinyMusicGen's codec: 200 frames per second


def noise(frames: int, seed: int, channels: int = 1) -> np.ndarray:
    pcm = (np.random.default_rng(seed).standard_normal((channels, frames * HOP)) * 0.3).astype(np.float32)
    return pcm[0] if channels == 1 else pcm


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return write_checkpoint(tmp_path_factory.mktemp("prompts") / "src", TinyMusicGen(seed=4))


@pytest.fixture(scope="module")
def windowed(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Engine:
    """Windows of 40 frames, stride 24."""
    return Engine.from_pack(convert_musicgen(source, tmp_path_factory.mktemp("windowed") / "pack", window_s=0.2, stride_s=0.12))


@pytest.fixture(scope="module")
def melody_engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    return Engine.from_pack(converted(tmp_path_factory.mktemp("melody-prompts"), TinyMusicGen(melody=True, seed=5)))


def test_unconditional_melody_rows(melody_engine: Engine) -> None:
    """Without text or a reference a row reads the null condition unguided; with a reference but no text it is
    conditioned by the chroma alone and guided against the null chroma."""
    reference = (np.random.default_rng(0).standard_normal(3200) * 0.3).astype(np.float32)
    events = list(melody_engine.events(None, 0.1, seed=1))
    assert next(e for e in events if isinstance(e, WindowStarted)).condition == ()
    plain = melody_engine.generate(None, 0.1, seed=1)
    assert np.array_equal(plain, melody_engine.generate(None, 0.1, seed=1, guidance_scale=1.0))
    with_melody = melody_engine.generate(None, 0.1, seed=1, melody=reference, melody_sample_rate=3200)
    unguided = melody_engine.generate(None, 0.1, seed=1, melody=reference, melody_sample_rate=3200, guidance_scale=1.0)
    assert not np.array_equal(with_melody, plain) and not np.array_equal(with_melody, unguided)


def test_guidance_for_unconditional_rows_alone_is_refused(melody_engine: Engine) -> None:
    with pytest.raises(VivaceError, match="guidance_scale 3.0 has nothing to guide: prompt None is unconditional"):
        melody_engine.generate(None, 0.1, guidance_scale=3.0)
    with pytest.raises(VivaceError, match="guidance_scale 2 has nothing to guide"):
        melody_engine.generate([None, None], 0.1, guidance_scale=2)
    melody_engine.generate([None, "piano"], 0.05, guidance_scale=2)  # the text row is guided


def test_musiclm_refuses_prompt_none_in_one_line(engine: Engine) -> None:
    for prompt in (None, ["calm piano", None]):
        with pytest.raises(VivaceError, match=r"^prompt None \(unconditional generation\) is MusicGen's: every MusicLM stage"):
            engine.generate(prompt, 1.0)




def test_unconditional_from_the_command_line(melody_engine: Engine, tiny_pack: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "u.wav"
    argv = ["generate", "--pack", str(melody_engine.pack.path), "--unconditional", "--duration", "0.1", "--seed", "1",
            "--normalize", "none", "--bits", "32", "-o", str(out), "--quiet"]
    assert main(argv) == 0
    np.testing.assert_array_equal(sf.read(out, dtype="float32")[0], melody_engine.generate(None, 0.1, seed=1)[0])
    for argv, message in [
        (["--pack", str(melody_engine.pack.path), "piano", "--unconditional", "--duration", "1"], "--unconditional takes no prompt"),
        (["--pack", str(tiny_pack), "--unconditional", "--duration", "1"], "prompt None (unconditional generation) is MusicGen's"),
    ]:
        assert main(["generate", *argv, "-o", str(tmp_path / "bad.wav")]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
    assert not (tmp_path / "bad.wav").exists()


def test_an_audio_prompt_past_one_window(windowed: Engine) -> None:
    """A 12-frame prompt, 100 frames in windows of 40: the first window continues the prompt, later ones continue
    the output as without a prompt; the clip begins with the prompt's codes and streams the same codes."""
    prompt = noise(12, seed=1)
    seconds = 100 / windowed.config.frame_rate
    options = dict(seed=3, audio_prompt=prompt, audio_prompt_sample_rate=RATE)
    events = list(windowed.events("piano", seconds, **options))
    started = [(e.prefix_start, e.new_start, e.new_end) for e in events if isinstance(e, WindowStarted)]
    assert started == [(0, 12, 40), (24, 40, 64), (48, 64, 88), (72, 88, 100)]
    audio, codes = windowed.generate("piano", seconds, return_codes=True, **options)
    assert audio.shape == (1, 100 * HOP)
    np.testing.assert_array_equal(codes[0][:, :12], windowed.encode(prompt, RATE))
    streamed = list(windowed.stream("piano", seconds, chunk_s=0.1, **options))
    np.testing.assert_array_equal(np.concatenate([c.codes for c in streamed], axis=1), codes[0])
    assert np.array_equal(windowed.decode(codes[0]), audio[0])
    # the prompt conditions what follows (transformers' codes for it: test_musicgen_parity.py)
    _, unprompted = windowed.generate("piano", seconds, seed=3, return_codes=True)
    assert not np.array_equal(unprompted[0][:, 12:40], codes[0][:, 12:40])


def test_audio_prompts_per_row_and_from_files(windowed: Engine, tmp_path: Path) -> None:
    first, second = noise(6, seed=5), noise(9, seed=6, channels=2)
    file = tmp_path / "prompt.wav"
    sf.write(file, second.T, RATE, subtype="FLOAT")
    batch, codes = windowed.generate(["piano", "drums"], 0.1, seed=[1, 2], audio_prompt=[first, None], audio_prompt_sample_rate=RATE, return_codes=True)
    alone = windowed.generate("piano", 0.1, seed=1, audio_prompt=first, audio_prompt_sample_rate=RATE)
    assert np.array_equal(batch[0], alone[0])
    assert np.array_equal(batch[1], windowed.generate("drums", 0.1, seed=2)[0])
    from_file = windowed.generate("piano", 0.1, seed=1, audio_prompt=str(file), return_codes=True)[1][0]
    np.testing.assert_array_equal(from_file[:, :9], windowed.encode(second.mean(axis=0), RATE))  # downmixed to mono
    # resampled to the codec's rate: 8 kHz PCM of the same length in seconds gives as many frames
    assert windowed.encode(noise(5, seed=7), RATE).shape == windowed.encode(np.zeros(200, np.float32) + 0.1, 8000).shape


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(audio_prompt=np.zeros(40 * HOP, np.float32), audio_prompt_sample_rate=RATE, duration_s=0.5), "audio_prompt of 0.2 s must be shorter than one window (window_s): 0.2 s"),
        (dict(audio_prompt=np.zeros(20 * HOP, np.float32), audio_prompt_sample_rate=RATE), "must be shorter than the duration (the whole clip, the prompt included): 0.1 s"),
        (dict(audio_prompt=np.zeros(10, np.float32)), "audio_prompt_sample_rate is required with a PCM array audio_prompt"),
        (dict(audio_prompt_sample_rate=RATE), "audio_prompt_sample_rate was given without an audio_prompt"),
        (dict(audio_prompt=[np.zeros(10, np.float32)] * 2, audio_prompt_sample_rate=RATE), "got 2 audio prompts for 1 prompts"),
        (dict(audio_prompt=np.full(10, np.nan, np.float32), audio_prompt_sample_rate=RATE), "audio_prompt PCM holds NaN"),
        (dict(audio_prompt="/nonexistent.wav"), "audio file /nonexistent.wav does not exist"),
        (dict(audio_prompt=3), "audio_prompt must be a sound file path or a PCM array, got int"),
    ],
)
def test_bad_audio_prompts_are_one_line(windowed: Engine, options: dict, message: str) -> None:
    with pytest.raises(VivaceError) as error:
        windowed.generate("piano", **{"duration_s": 0.1, **options})
    assert message in str(error.value) and "\n" not in str(error.value)


def test_packs_without_an_encoder_refuse_audio_prompts(windowed: Engine, source: Path, engine: Engine, tmp_path: Path) -> None:
    old = Path(shutil.copytree(windowed.pack.path, tmp_path / "old"))  # as packs converted before the encoder
    edit_config(old, lambda data: data["musicgen"].pop("codec_encoder"), "pack.json")
    (old / "codec_encoder.safetensors").unlink()
    old_engine = Engine.from_pack(old)
    assert np.array_equal(old_engine.generate("piano", 0.05, seed=1), windowed.generate("piano", 0.05, seed=1))
    with pytest.raises(VivaceError, match=r"carries no EnCodec encoder \(musicgen.codec_encoder is false"):
        old_engine.generate("piano", 0.1, audio_prompt=noise(4, 0), audio_prompt_sample_rate=RATE)
    normalizing = copy_of(source, tmp_path / "normalizing")
    edit_config(normalizing, lambda data: data["audio_encoder"].update(normalize=True))
    pack = convert_musicgen(normalizing, tmp_path / "normalizing-pack")
    assert json.loads((pack / "pack.json").read_text())["musicgen"]["codec_encoder"] is False
    assert not (pack / "codec_encoder.safetensors").exists()
    with pytest.raises(VivaceError, match="carries no codec encoder: it cannot encode audio"):
        engine.encode(noise(4, 0), RATE)
    with pytest.raises(VivaceError, match="carries no codec encoder and no semantic tokenizer: an audio prompt's"):
        engine.generate("piano", 1.0, audio_prompt=noise(4, 0), audio_prompt_sample_rate=RATE)


def test_audio_prompt_from_the_command_line(windowed: Engine, tiny_pack: Path, tmp_path: Path, capsys) -> None:
    prompt = noise(10, seed=8)
    file = tmp_path / "prompt.wav"
    sf.write(file, prompt, RATE, subtype="FLOAT")
    out = tmp_path / "out.wav"
    argv = ["generate", "--pack", str(windowed.pack.path), "piano", "--duration", "0.15", "--audio-prompt", str(file),
            "--normalize", "none", "--bits", "32", "-o", str(out), "--quiet"]
    assert main(argv) == 0
    expected = windowed.generate("piano", 0.15, audio_prompt=prompt, audio_prompt_sample_rate=RATE)[0]
    np.testing.assert_array_equal(sf.read(out, dtype="float32")[0], expected)
    assert main([*argv, "--negative-prompt", "drums"]) == 0
    steered = windowed.generate("piano", 0.15, audio_prompt=prompt, audio_prompt_sample_rate=RATE, negative_prompt="drums")[0]
    np.testing.assert_array_equal(sf.read(out, dtype="float32")[0], steered)
    for pack, extra, message in [
        (windowed.pack.path, ["--duration", "0.05"], "--audio-prompt of 0.05 s must be shorter than the duration"),
        (windowed.pack.path, ["--duration", "0.2", "--audio-prompt", str(tmp_path / "missing.wav")], "does not exist"),
        (tiny_pack, ["--duration", "1"], "carries no codec encoder and no semantic tokenizer"),
    ]:
        args = ["generate", "--pack", str(pack), "piano", "--audio-prompt", str(file), *extra, "-o", str(tmp_path / "bad.wav")]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "bad.wav").exists()


def test_negative_prompts(melody_engine: Engine, windowed: Engine, engine: Engine) -> None:
    plain = windowed.generate("piano", 0.1, seed=1)
    steered = windowed.generate("piano", 0.1, seed=1, negative_prompt="drums")
    assert not np.array_equal(plain, steered)
    batch = windowed.generate(["piano", "piano"], 0.1, seed=[1, 1], negative_prompt=[None, "drums"])
    assert np.array_equal(batch[0], plain[0]) and np.array_equal(batch[1], steered[0])
    reference = (np.random.default_rng(0).standard_normal(3200) * 0.3).astype(np.float32)
    melody = dict(melody=reference, melody_sample_rate=3200)
    assert not np.array_equal(melody_engine.generate("piano", 0.1, seed=1, **melody),
                              melody_engine.generate("piano", 0.1, seed=1, negative_prompt="rock", **melody))
    for call, message in [
        (lambda: windowed.generate("piano", 0.1, guidance_scale=1.0, negative_prompt="drums"), "needs guidance_scale > 1"),
        (lambda: windowed.generate(["piano", None], 0.1, negative_prompt="drums"), "negative_prompt (row 1) conditions"),
        (lambda: windowed.generate("piano", 0.1, negative_prompt=""), "negative_prompt must be a non-empty string"),
        (lambda: windowed.generate("piano", 0.1, negative_prompt=["a", "b"]), "got 2 negative prompts for 1 prompts"),
        (lambda: engine.generate("piano", 1.0, negative_prompt="drums"), "runs without guidance"),
    ]:
        with pytest.raises(VivaceError) as error:
            call()
        assert message in str(error.value), str(error.value)
