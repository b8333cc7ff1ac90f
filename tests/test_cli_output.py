"""What `vivace generate` writes and prints: normalised audio (vivace.audio.normalize, the same for API users), the
formats libsndfile writes here, stdout, atomic writes that fail with one line, a quiet stderr without third-party
bars or warnings, and one progress bar in seconds of audio on a terminal."""
from __future__ import annotations

import errno
import io
import math
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from vivace import audio
from vivace.cli import _Progress, _third_party_quiet, main
from vivace.engine import Engine

CEILING = 10 ** (-1 / 20)  # -1 dBFS
DEMO_PACK = Path(__file__).resolve().parent.parent / "packs" / "demo"


def sine(dbfs: float, seconds: float, rate: int, channels: int = 1, freq: float = 997.0) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    wave = 10 ** (dbfs / 20) * np.sin(2 * np.pi * freq * t)
    return np.stack([wave] * channels) if channels > 1 else wave


def generate(pack: Path, out: str, *extra: str) -> list[str]:
    return ["generate", "--pack", str(pack), "calm piano", "--duration", "0.6", "--seed", "1", "-o", out, *extra]


def files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.startswith("vivace: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()


@pytest.fixture(scope="module")
def raw(tiny_pack: Path) -> np.ndarray:
    """What the API returns for generate()'s arguments: float32, not normalised."""
    return Engine.from_pack(tiny_pack).generate("calm piano", 0.6, seed=1)[0]


@pytest.fixture
def no_generation(monkeypatch: pytest.MonkeyPatch) -> None:
    """A refusal must come before any generation."""
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("generation started")

    monkeypatch.setattr(Engine, "events", refuse)


# -- loudness and normalisation (vivace.audio) ------------------------------------------------------------------
@pytest.mark.parametrize("rate", [8000, 16000, 24000, 32000, 44100, 48000])
def test_full_scale_1khz_sine_reads_minus_3_01_lufs(rate: int) -> None:
    # ITU-R BS.1770-4: a 0 dBFS 1 kHz sine in one channel reads -3.01 LKFS, at any rate
    assert audio.loudness(sine(0, 3, rate), rate) == pytest.approx(-3.01, abs=0.01)


@pytest.mark.parametrize(
    "levels_and_seconds,expected",
    [
        ([(-23, 20)], -23.0),  # EBU Tech 3341 case 1 (stereo)
        ([(-33, 20)], -33.0),  # case 2
        ([(-36, 10), (-23, 60), (-36, 10)], -23.0),  # case 3: the relative gate drops the -36 dB parts
        ([(-72, 10), (-36, 10), (-23, 60), (-36, 10), (-72, 10)], -23.0),  # case 4: and the absolute gate the -72
        ([(-26, 20), (-20, 20.1), (-26, 20)], -23.0),  # case 5
    ],
)
def test_loudness_meets_ebu_tech_3341(levels_and_seconds: list, expected: float) -> None:
    rate = 8000  # the tone is 1 kHz: any rate holding it measures the same, and 8 kHz keeps the test fast
    signal = np.concatenate([sine(db, s, rate, channels=2) for db, s in levels_and_seconds], axis=1)
    assert audio.loudness(signal, rate) == pytest.approx(expected, abs=0.1)  # the tolerance EBU 3341 allows


def test_k_weighting_weighs_low_and_high_frequencies() -> None:
    rate = 48000
    one_k = audio.loudness(sine(0, 2, rate), rate)
    assert audio.loudness(sine(0, 2, rate, freq=40), rate) < one_k - 3  # the RLB high-pass
    assert audio.loudness(sine(0, 2, rate, freq=8000), rate) > one_k + 3  # the head's high shelf (+4 dB)


def test_silence_and_short_clips() -> None:
    assert audio.loudness(np.zeros(24000), 24000) == -math.inf
    assert audio.loudness(sine(-80, 1, 24000), 24000) == -math.inf  # below the -70 LUFS gate
    assert audio.loudness(sine(0, 0.1, 24000), 24000) == pytest.approx(-3.01, abs=0.05)  # one block of 0.1 s
    for strategy in ("loudness", "peak"):
        np.testing.assert_array_equal(audio.normalize(np.zeros(100, np.float32), strategy, 24000), np.zeros(100))


def test_normalize_strategies() -> None:
    rate = 24000
    quiet = sine(-30, 2, rate).astype(np.float32)
    loud = audio.normalize(quiet, "loudness", rate)
    assert audio.loudness(loud, rate) == pytest.approx(-14.0, abs=0.01) and np.max(np.abs(loud)) < CEILING
    # a high crest factor: -14 LUFS would put the spike past -1 dBFS, so the gain stops there
    spiky = quiet.copy()
    spiky[1000] = 0.9
    capped = audio.normalize(spiky, "loudness", rate)
    assert np.max(np.abs(capped)) == pytest.approx(CEILING, rel=1e-6) and audio.loudness(capped, rate) < -14.5
    hot = (3.0 * quiet / np.max(np.abs(quiet))).astype(np.float32)
    assert np.max(np.abs(audio.normalize(hot, "peak"))) == pytest.approx(CEILING, rel=1e-6)
    assert np.max(np.abs(audio.normalize(quiet, "peak"))) == pytest.approx(CEILING, rel=1e-6)  # up as well as down
    np.testing.assert_array_equal(audio.normalize(hot, "clip"), np.clip(hot, -CEILING, CEILING).astype(np.float32))
    np.testing.assert_array_equal(audio.normalize(hot, "none"), hot)
    assert loud.dtype == np.float32 and audio.normalize(np.stack([hot, quiet]), "peak").shape == (2, len(hot))


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: audio.normalize(np.zeros(10, np.float32), "rms"), "unknown normalize strategy 'rms'"),
        (lambda: audio.normalize(np.zeros(10, np.float32), "loudness"), "needs the audio's sample_rate"),
        (lambda: audio.normalize(np.array([0.0, np.nan]), "peak"), "NaN or infinite"),
        (lambda: audio.normalize(np.zeros(10, np.int16), "peak"), "must be float PCM"),
        (lambda: audio.normalize(np.zeros(10, np.float32), "peak", peak_db=3.0), "peak_db must be a finite number <= 0"),
        (lambda: audio.loudness(np.zeros(10), 0), "sample_rate must be a positive integer"),
    ],
)
def test_normalize_refuses_bad_input(call, message: str) -> None:
    with pytest.raises(audio.VivaceError, match=message):
        call()


def test_encode_rounds_and_clips_as_the_server_does() -> None:
    from vivace.server.audio_formats import pcm16

    x = np.array([0.0, 0.5, -0.5, 1.5, -1.5, 1.0 / 32767, 0.36585, -0.46716], dtype=np.float32)
    wav16 = audio.audio_format(None, "wav")
    read = sf.read(io.BytesIO(audio.encode(x, 8000, wav16)), dtype="int16")[0]
    assert read.astype("<i2").tobytes() == pcm16(x)
    assert audio.clipped_samples(x, wav16) == 2
    floats = audio.audio_format(None, "wav", 32)
    np.testing.assert_array_equal(sf.read(io.BytesIO(audio.encode(x, 8000, floats)), dtype="float32")[0], x)
    assert audio.clipped_samples(x, floats) == 0
    read24 = sf.read(io.BytesIO(audio.encode(x, 8000, audio.audio_format(None, "flac", 24))), dtype="int32")[0] >> 8
    np.testing.assert_array_equal(read24, np.rint(np.clip(x.astype(np.float64), -1, 1) * 8388607).astype(np.int32))


def test_rates_a_format_cannot_hold_are_refused() -> None:
    writable = audio.writable_formats()
    for name, rate in [("opus", 32000), ("opus", 3200), ("mp3", 3200)]:
        if name in writable:
            with pytest.raises(audio.VivaceError, match=f"cannot hold this pack's {rate} Hz audio"):
                audio.check_sample_rate(audio.audio_format(None, name), rate)
    for name in writable:
        audio.check_sample_rate(audio.audio_format(None, name), 48000)


# -- files from the command line ----------------------------------------------------------------------------------
def test_default_output_is_loudness_normalised_16_bit_wav(tiny_pack: Path, raw: np.ndarray, tmp_path: Path, capsys) -> None:
    out = tmp_path / "song.wav"
    assert main(generate(tiny_pack, str(out))) == 0
    info = sf.info(str(out))
    assert (info.format, info.subtype, info.samplerate) == ("WAV", "PCM_16", 24000)
    expected = np.rint(audio.normalize(raw, "loudness", 24000) * 32767).astype(np.int16)
    np.testing.assert_array_equal(sf.read(out, dtype="int16")[0], expected)
    written = sf.read(out, dtype="float32")[0]
    assert audio.loudness(written, 24000) == pytest.approx(-14.0, abs=0.05) or np.max(np.abs(written)) >= CEILING - 1e-4
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"wrote {out} (0.60 s at 24000 Hz, WAV 16-bit PCM; after --normalize loudness:")
    assert captured.err.count("\n") == 1


@pytest.mark.parametrize("strategy", ["peak", "clip", "none"])
def test_normalize_flag_matches_the_api(strategy: str, tiny_pack: Path, raw: np.ndarray, tmp_path: Path) -> None:
    out = tmp_path / "song.wav"
    assert main(generate(tiny_pack, str(out), "--normalize", strategy, "--bits", "32", "--quiet")) == 0
    assert sf.info(str(out)).subtype == "FLOAT"
    np.testing.assert_array_equal(sf.read(out, dtype="float32")[0], audio.normalize(raw, strategy, 24000))


@pytest.mark.parametrize("name", audio.FORMATS)
def test_each_format_from_its_extension(name: str, tiny_pack: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / f"song.{name}"
    code = main(generate(tiny_pack, str(out), "--quiet"))
    if name in audio.writable_formats():
        assert code == 0
        info = sf.info(str(out))
        assert (info.format, info.subtype) == (audio.audio_format(out).container, audio.audio_format(out).subtype)
        assert info.samplerate == 24000 and abs(info.frames - round(0.6 * 24000)) <= 2048  # lossy codecs pad
    else:
        assert code == 2 and "cannot write" in one_error_line(capsys) and files(tmp_path) == []


def test_this_machines_libsndfile_writes_every_format() -> None:
    # the formats the README promises; a libsndfile built without them is refused by name (test above)
    assert audio.writable_formats() == ["wav", "flac", "mp3", "ogg", "opus"]


def test_format_flag_and_bit_depths(tiny_pack: Path, tmp_path: Path) -> None:
    out = tmp_path / "song.audio"
    assert main(generate(tiny_pack, str(out), "--format", "flac", "--bits", "24", "--quiet")) == 0
    assert (sf.info(str(out)).format, sf.info(str(out)).subtype) == ("FLAC", "PCM_24")


@pytest.mark.parametrize(
    "name,extra,message",
    [
        ("song.wav", ["--format", "mp3"], "output {dir}/song.wav ends in .wav but the format asked for is mp3"),
        ("song.mp3", ["--bits", "24"], "a bit depth applies to WAV and FLAC, not to mp3"),
        ("song.flac", ["--bits", "32"], "flac takes 16 or 24-bit samples, not 32"),
        ("song", [], "cannot tell the audio format of output {dir}/song"),
        ("missing/song.wav", [], "output directory {dir}/missing does not exist"),
    ],
)
def test_bad_outputs_are_refused_before_generating(
    name: str, extra: list, message: str, tiny_pack: Path, tmp_path: Path, capsys, no_generation: None,
) -> None:
    assert main(generate(tiny_pack, str(tmp_path / name), *extra)) == 2
    assert message.format(dir=tmp_path) in one_error_line(capsys)
    assert files(tmp_path) == []


def test_a_rate_the_format_cannot_hold_is_refused_before_generating(
    tiny_pack: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch, no_generation: None,
) -> None:
    monkeypatch.setattr(Engine, "sample_rate", property(lambda self: 32000))  # MusicGen's rate: no Opus at 32 kHz
    assert main(generate(tiny_pack, str(tmp_path / "song.opus"))) == 2
    assert "Ogg Opus cannot hold this pack's 32000 Hz audio: Opus only supports sample rates of" in one_error_line(capsys)
    assert files(tmp_path) == []


@pytest.mark.parametrize("failure", ["encoder", "disk"])
def test_a_failed_write_is_one_line_and_leaves_nothing(
    failure: str, tiny_pack: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "song.wav"
    out.write_bytes(b"an earlier take")
    if failure == "encoder":
        real_write = sf.write

        def broken(file: object, data: np.ndarray, *args: object, **kwargs: object) -> None:
            if len(data) <= 64:  # the format check before generation: let it pass, to fail the real write
                return real_write(file, data, *args, **kwargs)
            raise sf.LibsndfileError(2, "Error writing: ")

        monkeypatch.setattr(sf, "write", broken)
        message = "vivace: error: cannot encode WAV 16-bit PCM at 24000 Hz:"
    else:
        real_replace = audio.os.replace

        def full_disk(src: str, dst: object) -> None:
            if str(src).endswith(".tmp"):
                raise OSError(errno.ENOSPC, "No space left on device")
            real_replace(src, dst)

        monkeypatch.setattr(audio.os, "replace", full_disk)
        message = f"vivace: error: could not write {out}: No space left on device"
    assert main(generate(tiny_pack, str(out))) == 2
    assert one_error_line(capsys).startswith(message)
    assert files(tmp_path) == ["song.wav"] and out.read_bytes() == b"an earlier take"


# -- stdout -------------------------------------------------------------------------------------------------------
def test_dash_writes_wav_bytes_to_stdout_and_nothing_else(
    tiny_pack: Path, tmp_path: Path, capsysbinary, monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "song.wav"
    assert main(generate(tiny_pack, str(out), "--quiet")) == 0
    capsysbinary.readouterr()
    real_events = Engine.events

    def chatty(self: Engine, *args: object, **kwargs: object):
        print("a library printing while it runs")
        yield from real_events(self, *args, **kwargs)

    monkeypatch.setattr(Engine, "events", chatty)
    assert main(generate(tiny_pack, "-")) == 0
    captured = capsysbinary.readouterr()
    assert captured.out == out.read_bytes()  # the same bytes as the file: the WAV and nothing else
    assert b"a library printing" in captured.err and b"wrote stdout (0.60 s at 24000 Hz" in captured.err
    assert files(tmp_path) == ["song.wav"]


def test_dash_with_a_format(tiny_pack: Path, capsysbinary) -> None:
    assert main(generate(tiny_pack, "-", "--format", "flac", "--quiet")) == 0
    captured = capsysbinary.readouterr()
    assert captured.out[:4] == b"fLaC" and captured.err == b""
    assert len(sf.read(io.BytesIO(captured.out))[0]) == round(0.6 * 24000)


def test_dash_to_a_terminal_is_refused(tiny_pack: Path, capsys, monkeypatch: pytest.MonkeyPatch, no_generation: None) -> None:
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert main(generate(tiny_pack, "-")) == 2
    assert "stdout, which is a terminal" in one_error_line(capsys)


# -- quiet third-party output -------------------------------------------------------------------------------------
def test_third_party_bars_and_warnings_are_silenced_then_restored() -> None:
    from transformers.utils import logging as hf_logging

    before = (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with _third_party_quiet(verbose=False):
            assert hf_logging.get_verbosity() == hf_logging.ERROR and not hf_logging.is_progress_bar_enabled()
            warnings.warn("from a library", UserWarning)
        assert (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()) == before
        with _third_party_quiet(verbose=True):
            assert (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()) == before
            warnings.warn("shown with --verbose", UserWarning)
    assert [str(w.message) for w in caught] == ["shown with --verbose"]


def test_convert_prints_no_transformers_warnings_or_bars(tmp_path: Path, capsys) -> None:
    from musicgen_checkpoints import TinyMusicGen, write_checkpoint

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        src = write_checkpoint(tmp_path / "src", TinyMusicGen(seed=4))  # its config makes transformers warn
    capsys.readouterr()
    assert main(["convert", "musicgen", str(src), str(tmp_path / "pack")]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out.strip() == str(tmp_path / "pack")


def test_demo_pack_generates_with_a_silent_stderr(tmp_path: Path, capsys) -> None:
    # the demo pack's text tower loads through transformers, whose "Loading weights" bar this keeps off stderr
    out = tmp_path / "demo.wav"
    assert main(["generate", "--pack", str(DEMO_PACK), "slow piano", "--duration", "0.5", "-o", str(out), "--quiet"]) == 0
    assert capsys.readouterr().err == "" and sf.info(str(out)).frames == 12000


# -- a terminal: one bar in seconds of audio, and the override warning -----------------------------------------------
def test_one_progress_bar_in_seconds_of_audio_on_a_terminal(
    tiny_pack: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    argv = ["generate", "--pack", str(tiny_pack), "calm piano", "--duration", "1", "-o", str(tmp_path / "o.wav")]
    assert main([*argv, "--temperature", "0.5", "--stage", "semantic.temperature=0.9"]) == 0
    lines = capsys.readouterr().err.replace("\r", "\n").splitlines()
    warning = [line for line in lines if line.startswith("vivace: warning:")]
    assert warning == [
        "vivace: warning: --temperature 0.5 replaces the pack's per-stage values (temperature coarse 0.95, fine 0.4); "
        "a low value on every stage can freeze the music into a drone: --stage STAGE.KEY=VALUE sets one stage "
        "(see vivace generate --help)"
    ]
    bars = [line for line in lines if "s of audio" in line]
    assert bars and bars[-1].startswith("100%") and "1.0/1.0 s of audio" in bars[-1] and "x real time" in bars[-1]
    assert not [line for line in lines if "tok" in line or "semantic:" in line]
    assert main([*argv, "--quiet", "--temperature", "0.5"]) == 0
    assert capsys.readouterr().err == ""


def test_no_bar_or_warning_without_a_terminal(tiny_pack: Path, tmp_path: Path, capsys) -> None:
    argv = ["generate", "--pack", str(tiny_pack), "calm piano", "--duration", "0.5", "-o", str(tmp_path / "o.wav")]
    assert main([*argv, "--temperature", "0.5"]) == 0
    err = capsys.readouterr().err
    assert err.startswith("wrote ") and err.count("\n") == 1


def test_progress_counts_tokens_until_audio_arrives(capsys) -> None:
    # a family that decodes each clip whole (MusicGen's generate) sends its one AudioChunk at the end
    progress = _Progress(2.0, "decoder")
    progress.tokens("decoder", 50, 100)
    assert progress.bar.n == pytest.approx(1.0)
    progress.tokens("decoder", 40, 100)
    assert progress.bar.n == pytest.approx(1.0)  # never backwards
    progress.audio(2.0)
    assert progress.bar.n == pytest.approx(2.0)
    progress.close()
    assert "2.0/2.0 s of audio" in capsys.readouterr().err
