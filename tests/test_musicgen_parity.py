"""MusicGen packs against transformers' MusicgenForConditionalGeneration.generate: same greedy codes, same audio."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from musicgen_checkpoints import TinyMusicGen, guided_greedy, reference, vivace_codes, write_checkpoint
from musicgen_checkpoints import one_thread  # noqa: F401 - autouse fixture
from vivace import AudioChunk, Engine, WindowStarted
from vivace.export.musicgen import convert_musicgen

CONFIGS = {
    "projection": TinyMusicGen(seed=1),
    "musicgen-layout": TinyMusicGen(  # 4 x 2048 codes at 32 kHz / 50 Hz, as the released models
        codebook_size=2048, hidden=32, layers=3, heads=2, ffn=64, text_hidden=32, sampling_rate=32000,
        ratios=(8, 5, 4, 4), seed=2,
    ),
    "three-codebooks": TinyMusicGen(  # no projection: the text width is the decoder's, set as cross_attention_hidden_size
        codebook_size=128, num_codebooks=3, hidden=40, heads=5, text_hidden=40, cross_hidden=40, seed=3,
    ),
}
PROMPTS = ("slow piano with drums", "loud rock guitar and bass")


@pytest.fixture(scope="module", params=list(CONFIGS))
def converted(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp(request.param)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        src = write_checkpoint(root / "src", CONFIGS[request.param])
    return src, convert_musicgen(src, root / "pack")


def test_greedy_guided_codes_and_audio_match_transformers(converted: tuple[Path, Path]) -> None:
    src, pack = converted
    engine = Engine.from_pack(pack)
    frames = 37
    events = list(engine.events(PROMPTS[0], frames / engine.config.frame_rate, seed=0, temperature=0.0, guidance_scale=3.0))
    codes, audio = reference(src, PROMPTS[0], frames)
    ours = vivace_codes(events, engine.config.num_codebooks)
    assert ours.shape == codes.shape == (engine.config.num_codebooks, frames)
    np.testing.assert_array_equal(ours, codes)
    pcm = np.concatenate([e.pcm for e in events if isinstance(e, AudioChunk)])
    assert pcm.shape == audio.shape
    assert float(np.abs(pcm - audio).max()) <= 1e-4


def test_unconditional_codes_and_audio_match_transformers(converted: tuple[Path, Path]) -> None:
    """prompt None against transformers' get_unconditional_inputs (zero text states under a zero mask, guidance 1)."""
    src, pack = converted
    engine = Engine.from_pack(pack)
    frames = 29
    events = list(engine.events(None, frames / engine.config.frame_rate, seed=0, temperature=0.0))
    codes, audio = reference(src, None, frames)
    np.testing.assert_array_equal(vivace_codes(events, engine.config.num_codebooks), codes)
    pcm = np.concatenate([e.pcm for e in events if isinstance(e, AudioChunk)])
    assert pcm.shape == audio.shape and float(np.abs(pcm - audio).max()) <= 1e-4
    started = next(e for e in events if isinstance(e, WindowStarted))
    assert started.condition == ()
    # a batch mixing text and no text: each row as it runs alone (the text row guided, the other not)
    batch = engine.generate([PROMPTS[0], None], frames / engine.config.frame_rate, seed=[4, 0], temperature=0.0)
    assert np.array_equal(batch[1], np.concatenate([e.pcm for e in events if isinstance(e, AudioChunk)]))
    alone = engine.generate(PROMPTS[0], frames / engine.config.frame_rate, seed=4, temperature=0.0)
    assert np.array_equal(batch[0], alone[0])


def test_audio_prompt_continuation_matches_transformers(converted: tuple[Path, Path]) -> None:
    """generate(input_values=...): the prompt encoded by EnCodec's encoder is the decoder's prefix; the codes and the
    audio (prompt included, re-decoded) are transformers'."""
    src, pack = converted
    engine = Engine.from_pack(pack)
    hop, rate = engine.config.codec.hop_length, engine.sample_rate
    prompt_frames, frames = 9, 33
    pcm = (np.random.default_rng(7).standard_normal(prompt_frames * hop) * 0.3).astype(np.float32)
    events = list(engine.events(
        PROMPTS[1], frames / engine.config.frame_rate, seed=0, temperature=0.0, guidance_scale=3.0,
        audio_prompt=pcm, audio_prompt_sample_rate=rate,
    ))
    codes, audio = reference(src, PROMPTS[1], frames, input_values=torch.from_numpy(pcm)[None, None])
    np.testing.assert_array_equal(engine.encode(pcm, rate), codes[:, :prompt_frames])
    started = next(e for e in events if isinstance(e, WindowStarted))
    assert (started.prefix_start, started.new_start, started.new_end) == (0, prompt_frames, frames)
    np.testing.assert_array_equal(vivace_codes(events, engine.config.num_codebooks), codes[:, prompt_frames:])
    pcm_out = np.concatenate([e.pcm for e in events if isinstance(e, AudioChunk)])
    assert pcm_out.shape == audio.shape and float(np.abs(pcm_out - audio).max()) <= 1e-4


def test_negative_prompt_is_the_null_rows_text(converted: tuple[Path, Path]) -> None:
    """negative_prompt conditions guidance's null row as the prompt conditions the other: greedy codes equal
    transformers' forward and guidance steps with that null row (guided_greedy, which with the zeroed null text
    gives generate's own codes)."""
    src, pack = converted
    engine = Engine.from_pack(pack)
    frames = 21
    seconds = frames / engine.config.frame_rate
    plain, _ = reference(src, PROMPTS[0], frames)
    np.testing.assert_array_equal(guided_greedy(src, PROMPTS[0], "", frames), plain)
    events = list(engine.events(PROMPTS[0], seconds, seed=0, temperature=0.0, guidance_scale=3.0, negative_prompt=PROMPTS[1]))
    expected = guided_greedy(src, PROMPTS[0], PROMPTS[1], frames)
    np.testing.assert_array_equal(vivace_codes(events, engine.config.num_codebooks), expected)
    assert not np.array_equal(expected, plain)


def test_continuation_windows_match_transformers_with_audio_prompts(tmp_path: Path) -> None:
    """Windows of 40 frames with a 24-frame stride: each later window is transformers' generate with the last 16
    frames as decoder_input_ids (audiocraft's extension)."""
    spec = CONFIGS["projection"]
    src = write_checkpoint(tmp_path / "src", spec)
    pack = convert_musicgen(src, tmp_path / "pack", window_s=0.2, stride_s=0.12)
    engine = Engine.from_pack(pack)
    frames = 90  # windows: [0, 40), [40, 64) after [24, 40), [64, 88) after [48, 64), [88, 90) after [72, 88)
    events = list(engine.events(PROMPTS[1], frames / engine.config.frame_rate, seed=0, temperature=0.0))
    started = [(e.prefix_start, e.new_start, e.new_end) for e in events if isinstance(e, WindowStarted)]
    assert started == [(0, 0, 40), (24, 40, 64), (48, 64, 88), (72, 88, 90)]
    ours = vivace_codes(events, spec.num_codebooks)
    expected, _ = reference(src, PROMPTS[1], 40)
    for prefix_start, new_start, new_end in started[1:]:
        prompt_codes = torch.from_numpy(expected[:, prefix_start:new_start])
        window, _ = reference(src, PROMPTS[1], new_end - prefix_start, decoder_input_ids=prompt_codes)
        np.testing.assert_array_equal(window[:, : new_start - prefix_start], expected[:, prefix_start:new_start])
        expected = np.concatenate([expected, window[:, new_start - prefix_start :]], axis=1)
    np.testing.assert_array_equal(ours, expected)
    from transformers import MusicgenForConditionalGeneration

    codec = MusicgenForConditionalGeneration.from_pretrained(src).audio_encoder.eval()
    with torch.no_grad():
        audio = codec.decode(torch.from_numpy(expected)[None, None], [None]).audio_values[0, 0].numpy()
    pcm = np.concatenate([e.pcm for e in events if isinstance(e, AudioChunk)])
    assert float(np.abs(pcm - audio).max()) <= 1e-4


def test_batch_equals_single_calls_and_survives_preemption(converted: tuple[Path, Path]) -> None:
    """Sampled (top-k 250, temperature 1): a batch of guided pairs in one pool, squeezed so that pairs are preempted
    and recomputed, gives each row what it gives alone."""
    _, pack = converted
    engine = Engine.from_pack(pack)
    seconds = 30 / engine.config.frame_rate
    batch = engine.generate(list(PROMPTS), seconds, seed=[5, 9])
    single = [engine.generate(p, seconds, seed=s)[0] for p, s in zip(PROMPTS, (5, 9))]
    np.testing.assert_array_equal(batch, np.stack(single))
    tight = Engine(engine.family, engine.device, engine.dtype, 16, engine.kv_cache_gb, num_blocks={"decoder": 9})  # a pair needs 6 blocks
    events = list(tight.events(list(PROMPTS) * 2, seconds, seed=[5, 9, 5, 9]))
    assert tight.core.runners["decoder"].stats.preemptions > 0
    pcm = {e.row: e.pcm for e in events if isinstance(e, AudioChunk)}
    for row in range(4):
        np.testing.assert_array_equal(pcm[row], single[row % 2])
    assert not np.array_equal(single[0], single[1])
