"""Codes out and in: generate(return_codes=True) gives each row's codec codes, AudioChunk.codes each chunk's, and
Engine.decode turns codes back into the audio generate made from them."""
from __future__ import annotations


import numpy as np
import pytest
import torch
from musicgen_checkpoints import converted_32khz_pack, one_thread  # noqa: F401 - autouse fixture

from vivace import Engine, VivaceError


@pytest.fixture(scope="module")
def musicgen(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    return Engine.from_pack(converted_32khz_pack(tmp_path_factory.mktemp("codes"), seed=3, window_s=1.0, stride_s=0.6))


def test_musicgen_codes_decode_to_exactly_the_generated_audio(musicgen: Engine) -> None:
    audio, codes = musicgen.generate(["piano", "drums"], 1.5, seed=2, guidance_scale=3.0, return_codes=True)
    assert np.array_equal(audio, musicgen.generate(["piano", "drums"], 1.5, seed=2, guidance_scale=3.0))
    levels, size = musicgen.config.num_codebooks, musicgen.config.decoder.output_vocab_size
    for row, row_codes in enumerate(codes):
        assert row_codes.dtype == np.int64 and row_codes.shape == (levels, 75)  # 1.5 s at 50 frames/s, two windows
        assert row_codes.min() >= 0 and row_codes.max() < size
        assert np.array_equal(musicgen.decode(row_codes), audio[row])
    assert np.array_equal(musicgen.decode(np.stack(codes)), audio)
    assert np.array_equal(musicgen.decode(torch.from_numpy(codes[0]).int()), audio[0])


def test_streamed_chunks_carry_their_frames(musicgen: Engine) -> None:
    _, codes = musicgen.generate("piano", 1.2, seed=5, return_codes=True)
    chunks = list(musicgen.stream("piano", 1.2, seed=5, chunk_s=0.5))
    hop = musicgen.config.codec.hop_length
    assert [c.codes.shape[1] for c in chunks] == [25, 25, 10]
    assert all(len(c.pcm) == c.codes.shape[1] * hop for c in chunks)
    assert np.array_equal(np.concatenate([c.codes for c in chunks], axis=1), codes[0])


def test_musiclm_codes_decode_to_the_generated_audio(engine: Engine) -> None:
    audio, codes = engine.generate("calm piano", 1.2, seed=1, return_codes=True)
    levels = engine.config.codec.num_levels
    assert codes[0].shape == (levels, round(1.2 * engine.sample_rate / engine.config.codec.hop_length))
    # generate decodes fine chunk by fine chunk with carried convolution state: the same sums in another order
    np.testing.assert_allclose(engine.decode(codes[0]), audio[0], atol=1e-5)


@pytest.mark.parametrize(
    "codes,message",
    [
        ([[1, 2]], "numpy array or a torch tensor"),
        (np.zeros((4, 3), dtype=np.float32), "must be integers"),
        (np.zeros((3, 3), dtype=np.int64), "with this pack's 4 levels, got shape [3, 3]"),
        (np.zeros((2, 2, 4, 3), dtype=np.int64), "got shape [2, 2, 4, 3]"),
        (np.full((4, 3), 64), "must be in [0, 64), got values from 64 to 64"),
        (np.full((4, 3), -1), "got values from -1 to -1"),
        (np.zeros((4, 0), dtype=np.int64), "at least one row and one frame, got shape [4, 0]"),
        (np.zeros((0, 4, 3), dtype=np.int64), "got shape [0, 4, 3]"),
    ],
)
def test_bad_codes_are_one_line(musicgen: Engine, codes, message: str) -> None:
    with pytest.raises(VivaceError) as error:
        musicgen.decode(codes)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_return_codes_must_be_a_bool(musicgen: Engine) -> None:
    with pytest.raises(VivaceError, match="return_codes must be True or False, got 1"):
        musicgen.generate("piano", 0.5, return_codes=1)


def test_async_engine_returns_codes_too(musicgen: Engine) -> None:
    import asyncio

    from vivace import AsyncEngine

    expected_audio, expected_codes = musicgen.generate("piano", 0.6, seed=9, return_codes=True)
    with AsyncEngine(musicgen) as served:
        audio, codes = served.generate("piano", 0.6, seed=9, return_codes=True)
        audio_async, codes_async = asyncio.run(served.generate_async("piano", 0.6, seed=9, return_codes=True))
    for got_audio, got_codes in [(audio, codes), (audio_async, codes_async)]:
        assert np.array_equal(got_audio, expected_audio) and np.array_equal(got_codes[0], expected_codes[0])


