"""MusicGen-Melody: chroma against transformers' feature extractor, packs against MusicgenMelodyForConditionalGeneration
(same greedy codes, same audio), prefix caching and preemption, and one-line errors."""
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
    copy_of,
    edit_config,
    edit_weights,
    feature_extractor,
    reference,
    vivace_codes,
    write_checkpoint,
)
from torchaudio_standin import melody_feature_extractor
from torchaudio_standin import resample as exact_resample
from torchaudio_standin import spectrogram as exact_spectrogram

from vivace import AudioChunk, Engine, PackError, VivaceError, WindowStarted
from vivace.cli import main
from vivace.core.block_manager import BlockAllocator
from vivace.export.musicgen import convert_musicgen
from vivace.families.musicgen.chroma import ChromaConfig, ChromaExtractor, chroma_filter_bank, mono_reference
from vivace.resample import resample
from vivace.families.musicgen.melody import window_reference

CONFIGS = {
    "projections": TinyMusicGen(melody=True, seed=5),  # text 32 -> 48 and 12 chroma bins -> 48: both projected
    "released-layout": TinyMusicGen(  # 4 x 2048 codes at 32 kHz / 50 Hz and the released extractor; 24 bins, no projection
        melody=True, codebook_size=2048, hidden=24, layers=3, heads=2, ffn=48, text_hidden=24, num_chroma=24,
        chroma_length=16, sampling_rate=32000, ratios=(8, 5, 4, 4), n_fft=16384, hop_length=4096, chunk_length=30, seed=6,
    ),
}
PROMPTS = ("slow piano with drums", "loud rock guitar and bass")
TINY = ChromaConfig(sample_rate=3200, n_fft=512, hop_length=128, num_chroma=12, max_samples=6400)


def noise(seconds: float, rate: int, channels: int = 1, seed: int = 0) -> np.ndarray:
    pcm = (np.random.default_rng(seed).standard_normal((channels, round(seconds * rate))) * 0.3).astype(np.float32)
    return pcm[0] if channels == 1 else pcm


def transformers_chroma(config: ChromaConfig, pcm: np.ndarray, rate: int) -> torch.Tensor:
    extractor = melody_feature_extractor(
        feature_size=config.num_chroma, num_chroma=config.num_chroma, sampling_rate=config.sample_rate,
        n_fft=config.n_fft, hop_length=config.hop_length, chunk_length=config.max_samples // config.sample_rate,
    )
    # transformers resamples tensors only, and reads a stereo reference as a one-item list of [channels, samples]
    audio = torch.from_numpy(pcm) if rate != config.sample_rate else [pcm] if pcm.ndim == 2 else pcm
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return extractor(audio, sampling_rate=rate, return_tensors="pt")["input_features"][0]


@pytest.mark.parametrize("config,rate,seconds,channels", [
    (TINY, 3200, 1.0, 1),
    (TINY, 4410, 0.5, 1),  # resampled 441 -> 320, shorter than chroma_length frames
    (TINY, 3200, 3.0, 2),  # stereo, cut to chunk_length
    (TINY, 3200, 0.05, 1),  # shorter than one FFT: zero-padded
    (ChromaConfig(), 44100, 3.0, 1),  # facebook/musicgen-melody's extractor
    (ChromaConfig(num_chroma=24), 32000, 2.0, 2),
])
def test_chroma_equals_transformers_feature_extractor(config: ChromaConfig, rate: int, seconds: float, channels: int) -> None:
    pcm = noise(seconds, rate, channels, seed=channels + int(seconds * 10))
    extractor = ChromaExtractor(config)
    ours = extractor(mono_reference(pcm, rate, config))
    theirs = transformers_chroma(config, pcm, rate)
    assert ours.shape == theirs.shape == (config.frames(round(seconds * config.sample_rate)), config.num_chroma)
    assert torch.equal(ours, theirs)


def test_chroma_pieces_against_their_definitions() -> None:
    """The filter bank is transformers' exactly; resampling (float32, as torchaudio computes it for float32 input) and
    the chroma energy against float64 evaluations of their definitions."""
    from transformers.audio_utils import chroma_filter_bank as theirs

    for rate, n_fft, bins in [(3200, 512, 12), (32000, 16384, 12), (32000, 16384, 24)]:
        assert np.array_equal(chroma_filter_bank(rate, n_fft, bins), theirs(n_fft, bins, rate, tuning=0))
    for orig, new in [(4410, 3200), (44100, 32000), (16000, 32000), (48000, 32000)]:
        pcm = noise(0.5, orig, seed=orig)
        ours = resample(torch.from_numpy(pcm), orig, new).numpy()
        exact = exact_resample(pcm, orig, new, 0.945, 24)
        assert ours.shape == exact.shape
        assert float(np.abs(ours - exact).max()) <= 1e-4 * 0.3  # measured: <= 1.7e-5 on this noise of std 0.3
    extractor = ChromaExtractor(TINY)
    wave = torch.from_numpy(noise(1.0, 3200, seed=3))
    exact = chroma_filter_bank(3200, 512, 12) @ exact_spectrogram(wave.numpy(), 512, 128)
    assert np.allclose(extractor.energy(wave).numpy(), exact, rtol=1e-5, atol=0)


def test_window_reference_repeats_the_reference() -> None:
    wave = torch.arange(10.0)
    assert window_reference(wave, 0.0, 0.4, 10).tolist() == [0, 1, 2, 3]
    assert window_reference(wave, 0.8, 0.5, 10).tolist() == [8, 9, 0, 1, 2]


@pytest.fixture(scope="module", params=list(CONFIGS))
def converted(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, TinyMusicGen]:
    root = tmp_path_factory.mktemp(request.param)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        src = write_checkpoint(root / "src", CONFIGS[request.param])
    return src, convert_musicgen(src, root / "pack"), CONFIGS[request.param]


def melody_features(spec: TinyMusicGen, pcm: np.ndarray, rate: int) -> torch.Tensor:
    audio = torch.from_numpy(pcm) if rate != spec.sampling_rate else pcm
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return feature_extractor(spec)(audio, sampling_rate=rate, return_tensors="pt")["input_features"]


def generated(events: list) -> np.ndarray:
    return np.concatenate([e.pcm for e in events if isinstance(e, AudioChunk)])


def test_greedy_guided_codes_and_audio_match_transformers(converted: tuple[Path, Path, TinyMusicGen]) -> None:
    src, pack, spec = converted
    engine = Engine.from_pack(pack)
    rate = 44100 if spec.sampling_rate == 32000 else 4410
    pcm = noise(3.0 if rate == 44100 else 0.5, rate, seed=1)  # cut to chroma_length / repeated up to it
    frames = 37
    events = list(engine.events(
        PROMPTS[0], frames / engine.config.frame_rate, temperature=0.0, guidance_scale=3.0, melody=pcm, melody_sample_rate=rate,
    ))
    codes, audio = reference(src, PROMPTS[0], frames, input_features=melody_features(spec, pcm, rate))
    ours = vivace_codes(events, spec.num_codebooks)
    assert ours.shape == codes.shape == (spec.num_codebooks, frames)
    np.testing.assert_array_equal(ours, codes)
    assert generated(events).shape == audio.shape
    assert float(np.abs(generated(events) - audio).max()) <= 1e-4
    text_only = list(engine.events(PROMPTS[0], frames / engine.config.frame_rate, temperature=0.0))
    codes_text_only, audio_text_only = reference(src, PROMPTS[0], frames)
    np.testing.assert_array_equal(vivace_codes(text_only, spec.num_codebooks), codes_text_only)
    assert float(np.abs(generated(text_only) - audio_text_only).max()) <= 1e-4
    assert not np.array_equal(codes, codes_text_only)  # the melody moves the codes


def test_audio_prompt_with_a_melody_matches_transformers(converted: tuple[Path, Path, TinyMusicGen]) -> None:
    """transformers' melody model takes no input_values: its reference is generate with the prompt's codes (from
    EnCodec's encode) as decoder_input_ids, beside the melody's chroma."""
    src, pack, spec = converted
    engine = Engine.from_pack(pack)
    rate = 44100 if spec.sampling_rate == 32000 else 4410
    melody = noise(3.0 if rate == 44100 else 0.5, rate, seed=2)
    hop = engine.config.codec.hop_length
    prompt = noise(8 * hop / spec.sampling_rate, spec.sampling_rate, seed=3)
    frames = 31
    events = list(engine.events(
        PROMPTS[1], frames / engine.config.frame_rate, temperature=0.0, guidance_scale=3.0, melody=melody,
        melody_sample_rate=rate, audio_prompt=prompt, audio_prompt_sample_rate=spec.sampling_rate,
    ))
    from transformers import MusicgenMelodyForConditionalGeneration

    codec = MusicgenMelodyForConditionalGeneration.from_pretrained(src).audio_encoder.eval()
    with torch.no_grad():
        prompt_codes = codec.encode(torch.from_numpy(prompt)[None, None]).audio_codes[0, 0]
    np.testing.assert_array_equal(engine.encode(prompt, spec.sampling_rate), prompt_codes.numpy())
    codes, audio = reference(
        src, PROMPTS[1], frames, decoder_input_ids=prompt_codes, input_features=melody_features(spec, melody, rate),
    )
    np.testing.assert_array_equal(vivace_codes(events, spec.num_codebooks), codes[:, 8:])
    assert float(np.abs(generated(events) - audio).max()) <= 1e-4


def test_continuation_windows_read_the_reference_from_their_start(tmp_path: Path) -> None:
    """audiocraft's extension: each window is transformers' generate with the last 16 frames as decoder_input_ids and
    the chroma of window_s of the reference from the window's start (the reference repeating)."""
    spec = CONFIGS["projections"]
    src = write_checkpoint(tmp_path / "src", spec)
    engine = Engine.from_pack(convert_musicgen(src, tmp_path / "pack", window_s=0.2, stride_s=0.12))
    pcm = noise(0.3, 3200, seed=2)
    frames = 70  # windows [0, 40), [40, 64) after [24, 40), [64, 70) after [48, 64)
    events = list(engine.events(PROMPTS[1], frames / 200, temperature=0.0, melody=pcm, melody_sample_rate=3200))
    started = [(e.prefix_start, e.new_start, e.new_end) for e in events if isinstance(e, WindowStarted)]
    assert started == [(0, 0, 40), (24, 40, 64), (48, 64, 70)]
    expected = np.zeros((spec.num_codebooks, 0), dtype=np.int64)
    for prefix_start, new_start, new_end in started:
        window = window_reference(torch.from_numpy(pcm), prefix_start / 200, 0.2, 3200).numpy()
        inputs = {"input_features": melody_features(spec, window, 3200)}
        if new_start > prefix_start:
            inputs["decoder_input_ids"] = torch.from_numpy(expected[:, prefix_start:new_start])
        codes, _ = reference(src, PROMPTS[1], new_end - prefix_start, **inputs)
        expected = np.concatenate([expected, codes[:, new_start - prefix_start :]], axis=1)
    np.testing.assert_array_equal(vivace_codes(events, spec.num_codebooks), expected)


def test_prefix_sharing_keeps_melodies_apart_and_survives_preemption(
    converted: tuple[Path, Path, TinyMusicGen], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Rows with the same prompt and melody share their cached prefix blocks; the same prompt with another melody
    does not. A batch gives each row what it gives alone, also when a tight pool preempts and recomputes."""
    _, pack, spec = converted
    engine = Engine.from_pack(pack, block_size=4)
    seconds = 12 / engine.config.frame_rate
    rate = spec.sampling_rate
    a, b = noise(0.5, rate, seed=4), noise(0.5, rate, seed=5)
    rows = [(PROMPTS[0], a, 3), (PROMPTS[0], b, 3), (PROMPTS[0], a, 3), (PROMPTS[1], None, 8)]
    single = [engine.generate(p, seconds, seed=s, melody=m, melody_sample_rate=rate if m is not None else None)[0] for p, m, s in rows]
    assert not np.array_equal(single[0], single[1])
    shared = []
    share = BlockAllocator.share
    monkeypatch.setattr(BlockAllocator, "share", lambda self, block: (shared.append(block), share(self, block))[1])
    prompts, melodies, seeds = ([row[i] for row in rows] for i in range(3))
    batch = engine.generate(prompts, seconds, seed=seeds, melody=melodies, melody_sample_rate=rate)
    assert shared  # the third row reuses the first row's prefix blocks
    for row in range(len(rows)):
        np.testing.assert_array_equal(batch[row], single[row])
    longest = max(engine.family.prefix_tokens(p) for p in prompts) + 12 + spec.num_codebooks
    tight = Engine(engine.family, engine.device, engine.dtype, 4, engine.kv_cache_gb, num_blocks={"decoder": 2 * -(-longest // 4) + 6})
    events = list(tight.events(prompts, seconds, seed=seeds, melody=melodies, melody_sample_rate=rate))
    assert tight.core.runners["decoder"].stats.preemptions > 0
    pcm = {e.row: e.pcm for e in events if isinstance(e, AudioChunk)}
    for row in range(len(rows)):
        np.testing.assert_array_equal(pcm[row], single[row])


def test_melody_pack_layout_cli_and_bad_melodies(converted: tuple[Path, Path, TinyMusicGen], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, pack, spec = converted
    data = json.loads((pack / "pack.json").read_text())
    assert data["melody"] == {
        "chroma_length": spec.chroma_length, "projection": spec.num_chroma != spec.hidden,
        "chroma": {"sample_rate": spec.sampling_rate, "n_fft": spec.n_fft, "hop_length": spec.hop_length,
                   "num_chroma": spec.num_chroma, "max_samples": spec.chunk_length * spec.sampling_rate},
    }
    assert data["decoder"]["cross_attention"] is False
    assert (pack / "chroma_projection.safetensors").is_file() == (spec.num_chroma != spec.hidden)
    assert main(["info", str(pack)]) == 0
    assert json.loads(capsys.readouterr().out)["melody"]["chroma_length"] == spec.chroma_length
    reference_wav = tmp_path / "ref.wav"
    sf.write(reference_wav, noise(0.4, 22050, channels=2).T, 22050)
    out = tmp_path / "out.wav"
    argv = ["generate", "--pack", str(pack), "slow piano", "--duration", "0.05", "--melody", str(reference_wav), "-o", str(out), "--quiet"]
    assert main(argv) == 0
    engine = Engine.from_pack(pack)
    assert sf.info(str(out)).frames == engine.config.frames(0.05) * engine.config.codec.hop_length
    with pytest.raises(VivaceError, match="melody_sample_rate is required"):
        engine.generate("piano", 0.05, melody=noise(0.1, 8000))
    for melody, rate, message in [
        (str(tmp_path / "missing.wav"), None, "does not exist"),
        (str(reference_wav), 22050, "melody_sample_rate is for PCM arrays"),
        (np.full(100, np.nan, dtype=np.float32), 8000, "NaN"),
        (np.zeros((100, 2), dtype=np.float32), 8000, r"\[channels <= 8, samples\], got shape \[100, 2\]"),
        (np.zeros(100, dtype=np.float32), 0, "melody_sample_rate must be a positive integer"),
        ([None, None], 8000, "got 2 melodies for 1 prompts"),
        (None, 8000, "melody_sample_rate was given without a melody"),
    ]:
        with pytest.raises(VivaceError, match=message):
            engine.generate("piano", 0.05, melody=melody, melody_sample_rate=rate)
    bad = tmp_path / "bad.wav"
    bad.write_text("not audio")
    out.unlink()
    assert main(["generate", "--pack", str(pack), "piano", "--duration", "0.05", "--melody", str(bad), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "unreadable audio" in err and "\n" not in err and not out.exists()


def test_a_melody_needs_a_melody_pack(tiny_pack: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = convert_musicgen(write_checkpoint(tmp_path / "src", TinyMusicGen(seed=4)), tmp_path / "pack")
    reference_wav = tmp_path / "ref.wav"
    sf.write(reference_wav, noise(0.2, 3200), 3200)
    capsys.readouterr()
    for pack, message in [(plain, "is not a MusicGen-Melody pack"), (tiny_pack, "a melody needs a MusicGen-Melody pack")]:
        with pytest.raises(VivaceError, match=message):
            Engine.from_pack(pack).generate("piano", 0.05, melody=noise(0.1, 3200), melody_sample_rate=3200)
        out = tmp_path / "out.wav"
        assert main(["generate", "--pack", str(pack), "piano", "--duration", "0.05", "--melody", str(reference_wav), "-o", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err and not out.exists()


MELODY_BAD_WEIGHTS = {
    "chroma-projection": (lambda s: s.pop("audio_enc_to_dec_proj.bias"), "missing tensor 'audio_enc_to_dec_proj.bias'"),
    "chroma-shape": (lambda s: s.__setitem__("audio_enc_to_dec_proj.weight", torch.zeros(48, 13)),
                     r"'audio_enc_to_dec_proj.weight' has shape \[48, 13\], expected \[48, 12\]"),
    "nan": (lambda s: s["decoder.model.decoder.layers.0.fc2.weight"].__setitem__((1, 1), float("inf")),
            "'decoder.model.decoder.layers.0.fc2.weight' is not a finite"),
    "cross-attention": (lambda s: s.__setitem__("decoder.model.decoder.layers.0.encoder_attn.k_proj.weight", torch.zeros(48, 48)),
                        "unexpected tensor 'decoder.model.decoder.layers.0.encoder_attn.k_proj.weight'"),
    "stray": (lambda s: s.__setitem__("chroma_extractor.weight", torch.zeros(2)), "unexpected tensor 'chroma_extractor.weight'"),
}


@pytest.fixture(scope="module")
def melody_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return write_checkpoint(tmp_path_factory.mktemp("melody") / "src", CONFIGS["projections"])


@pytest.mark.parametrize("kind", list(MELODY_BAD_WEIGHTS))
def test_bad_melody_checkpoint_names_the_tensor(kind: str, melody_source: Path, tmp_path: Path) -> None:
    edit, message = MELODY_BAD_WEIGHTS[kind]
    src = copy_of(melody_source, tmp_path)
    edit_weights(src, edit)
    with pytest.raises(PackError, match=message):
        convert_musicgen(src, tmp_path / "pack")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_unsupported_melody_checkpoints_and_damaged_packs(melody_source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = copy_of(melody_source, tmp_path)
    edit_config(src, lambda d: d["decoder"].update(audio_channels=2, num_codebooks=8))
    assert main(["convert", "musicgen", str(src), str(tmp_path / "stereo")]) == 2
    err = capsys.readouterr().err.strip()
    assert "stereo MusicGen-Melody (audio_channels 2) is not supported" in err and "\n" not in err
    edit_config(src, lambda d: d["decoder"].update(audio_channels=1, num_codebooks=4))
    edit_config(src, lambda d: d.update(num_chroma=24), "preprocessor_config.json")
    with pytest.raises(PackError, match="preprocessor_config.json: num_chroma 24 differs from config.json's 12"):
        convert_musicgen(src, tmp_path / "pack")
    pack = convert_musicgen(melody_source, tmp_path / "pack")
    edit_weights(pack, lambda state: state.pop("weight"), "chroma_projection.safetensors")
    with pytest.raises(PackError, match="missing tensor 'weight' of component 'chroma_projection'"):
        Engine.from_pack(pack)
    edit_config(pack, lambda data: data["melody"]["chroma"].update(hop_length=0), "pack.json")
    with pytest.raises(PackError, match="melody.chroma.hop_length must be a positive integer"):
        Engine.from_pack(pack)
    edit_config(pack, lambda data: data["melody"]["chroma"].update(window="hann"), "pack.json")
    with pytest.raises(PackError, match="melody.chroma: unknown key 'window'"):
        Engine.from_pack(pack)
