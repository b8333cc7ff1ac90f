"""MusicGen audio streamed in chunks while the decoder runs: each chunk decoded with 16 frames of overlap on either
side (vivace.codecs.context_decoder), across continuation windows, within the overlap's error bound of the whole decode."""

import numpy as np
import pytest
from musicgen_checkpoints import converted_32khz_pack, one_thread  # noqa: F401 - autouse fixture

from vivace import Engine, VivaceError
from vivace.events import AudioChunk, StageProgress, WindowFinished

SECONDS = 2.0


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    # 1 s windows with a 0.6 s stride: a 2 s clip runs three windows, streamed across their boundaries
    return Engine.from_pack(converted_32khz_pack(tmp_path_factory.mktemp("musicgen_stream"), seed=6, window_s=1.0, stride_s=0.6))


def test_streamed_chunks_match_the_whole_decode_within_the_overlap_bound(engine: Engine) -> None:
    whole = engine.generate(["warm synth pads", "fast drums"], duration_s=SECONDS, seed=4)
    events = list(engine.events(["warm synth pads", "fast drums"], duration_s=SECONDS, seed=4, chunk_s=0.3))
    chunks = [e for e in events if isinstance(e, AudioChunk)]
    hop = engine.config.codec.hop_length
    for row in (0, 1):
        mine = [c for c in chunks if c.row == row]
        assert [c.index for c in mine] == list(range(len(mine))) and len(mine) == 7  # 100 frames in chunks of 15
        assert [c.start_sample for c in mine] == [i * 15 * hop for i in range(7)]
        streamed = np.concatenate([c.pcm for c in mine])
        assert streamed.shape == whole[row].shape
        peak = np.abs(whole[row]).max()
        assert peak > 0 and np.abs(streamed - whole[row]).max() <= 1e-3 * peak
    # audio starts while the decoder still runs: the first chunk comes before the last progress event
    first_audio = next(i for i, e in enumerate(events) if isinstance(e, AudioChunk))
    last_progress = max(i for i, e in enumerate(events) if isinstance(e, StageProgress))
    assert first_audio < last_progress
    assert sum(isinstance(e, WindowFinished) for e in events) == 6  # three windows per row


def test_streaming_does_not_change_the_codes(engine: Engine) -> None:
    def tokens(**kwargs):
        return [e.tokens for e in engine.events("calm guitar", duration_s=SECONDS, seed=9, **kwargs) if isinstance(e, WindowFinished)]

    assert tokens(chunk_s=0.5) == tokens()


def test_stream_defaults_to_one_second_chunks_and_generate_stays_whole(engine: Engine) -> None:
    chunks = list(engine.stream("calm guitar", duration_s=SECONDS, seed=1))
    assert len(chunks) == 2
    whole = list(engine.stream("calm guitar", duration_s=SECONDS, seed=1, chunk_s=None))
    assert len(whole) == 1
    np.testing.assert_array_equal(engine.generate("calm guitar", duration_s=SECONDS, seed=1)[0], whole[0].pcm)


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), "1", True])
def test_bad_chunk_lengths_are_refused_before_any_work(engine: Engine, bad) -> None:
    with pytest.raises(VivaceError, match="chunk_s must be a positive number"):
        engine.events("calm guitar", duration_s=SECONDS, chunk_s=bad)
