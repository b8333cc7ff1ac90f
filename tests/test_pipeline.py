"""The MusicLM hierarchy end to end on a tiny random pack."""
import numpy as np
import pytest

from vivace import AudioChunk, Engine, StageProgress, Story, VivaceError, WindowFinished, WindowStarted
from vivace.engine import assemble

# Batched and single runs sum the same float32 products in different orders (matmul blocking depends on
# the batch); tokens are equal, and the codec output agrees to rounding.
AUDIO_TOL = 1e-5


def tokens_by_window(events: list) -> dict:
    return {(e.stage, e.row, e.index): e.tokens for e in events if isinstance(e, WindowFinished)}


def test_same_seed_same_audio_and_other_seed_differs(engine: Engine) -> None:
    a = engine.generate("slow solo piano in d minor", 1.5, seed=3)
    b = engine.generate("slow solo piano in d minor", 1.5, seed=3)
    c = engine.generate("slow solo piano in d minor", 1.5, seed=4)
    assert a.shape == (1, int(1.5 * engine.sample_rate)) and a.dtype == np.float32
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert np.isfinite(a).all() and a.std() > 0


def test_batch_equals_single_calls(engine: Engine) -> None:
    prompts = ["upbeat trio with walking bass", "ambient pads", "upbeat trio with walking bass"]
    batch_events = list(engine.events(prompts, 1.5, seed=10))
    batch_audio = assemble(e for e in batch_events if isinstance(e, AudioChunk))
    batch_tokens = tokens_by_window(batch_events)
    assert len(batch_audio) == 3
    for row, prompt in enumerate(prompts):
        events = list(engine.events(prompt, 1.5, seed=10 + row))
        single = tokens_by_window(events)
        assert single == {(stage, 0, index): t for (stage, r, index), t in batch_tokens.items() if r == row}
        audio = assemble(e for e in events if isinstance(e, AudioChunk))[0]
        assert np.abs(audio - batch_audio[row]).max() <= AUDIO_TOL
    assert not np.array_equal(batch_audio[0], batch_audio[2])  # same prompt, different seeds


def test_stream_concatenates_to_generate(engine: Engine) -> None:
    chunks = list(engine.stream("brushed drums and bass", 2.3, seed=5, temperature=0.8))
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert [c.start_sample for c in chunks] == [sum(len(c.pcm) for c in chunks[:i]) for i in range(len(chunks))]
    full = engine.generate("brushed drums and bass", 2.3, seed=5, temperature=0.8)[0]
    assert np.abs(np.concatenate([c.pcm for c in chunks]) - full).max() <= AUDIO_TOL


def ticks_to_first_audio(events: list) -> int:
    """Pipeline steps (one coarse step each, the coarse stage never idles early on) before the first chunk."""
    ticks = 0
    for event in events:
        if isinstance(event, AudioChunk):
            return ticks
        if isinstance(event, StageProgress) and event.stage == "coarse":
            ticks += 1
    raise AssertionError("no audio")


def test_first_audio_comes_before_later_windows_and_does_not_wait_for_the_clip(engine: Engine) -> None:
    events = list(engine.events("strings", 4.0, seed=1))
    first_audio = next(i for i, e in enumerate(events) if isinstance(e, AudioChunk))
    coarse_starts = [i for i, e in enumerate(events) if isinstance(e, WindowStarted) and e.stage == "coarse"]
    fine_done = [i for i, e in enumerate(events) if isinstance(e, WindowFinished) and e.stage == "fine"]
    assert first_audio < coarse_starts[-1]
    assert first_audio < fine_done[-1]
    longer = list(engine.events("strings", 8.0, seed=1))
    assert ticks_to_first_audio(longer) == ticks_to_first_audio(events)


def test_long_request_continues_semantic_windows(engine: Engine) -> None:
    events = list(engine.events("a long piece", 3.5, seed=2))
    windows = [e for e in events if isinstance(e, WindowStarted) and e.stage == "semantic"]
    assert [(w.prefix_start, w.new_start, w.new_end) for w in windows] == [(0, 0, 50), (25, 50, 75), (38, 75, 88)]
    tokens = tokens_by_window(events)
    generated = [t for w in windows for t in tokens[("semantic", 0, w.index)]]
    assert len(generated) == 88


def test_story_switches_condition_at_the_boundary(engine: Engine) -> None:
    story = Story((("calm solo piano", 1.2), ("loud drum solo", 1.6)))
    events = list(engine.events(story, seed=0))
    texts = engine.pack.text.tokens(["calm solo piano", "loud drum solo"]).tolist()
    assert texts[0] != texts[1]
    semantic = [e for e in events if isinstance(e, WindowStarted) and e.stage == "semantic"]
    coarse = [e for e in events if isinstance(e, WindowStarted) and e.stage == "coarse"]
    boundary_tokens, boundary_frames = 30, 60
    assert any(w.new_start == boundary_tokens for w in semantic)
    for w in semantic:
        assert w.new_end <= boundary_tokens or w.new_start >= boundary_tokens
        assert list(w.condition) == texts[0 if w.new_start < boundary_tokens else 1]
    for w in coarse:
        assert w.new_end <= boundary_frames or w.new_start >= boundary_frames
        assert list(w.condition) == texts[0 if w.new_start < boundary_frames else 1]
    audio = assemble(e for e in events if isinstance(e, AudioChunk))
    assert audio.shape == (1, round(2.8 * engine.sample_rate))


@pytest.mark.parametrize(
    "call,message",
    [
        (dict(prompt="", duration_s=1.0), "non-empty string"),
        (dict(prompt="x", duration_s=0.0), "> 0 seconds"),
        (dict(prompt="x", duration_s=-2.0), "> 0 seconds"),
        (dict(prompt="x", duration_s=float("nan")), "> 0 seconds"),
        (dict(prompt="x", duration_s=61.0), "exceeds this pack's limit"),
        (dict(prompt="x", duration_s=1.0, temperature=float("nan")), "temperature"),
        (dict(prompt="x", duration_s=1.0, temperature=-1.0), "temperature"),
        (dict(prompt="x", duration_s=1.0, top_k=-5), "top_k"),
        (dict(prompt="x", duration_s=1.0, top_p=0.0), "top_p"),
        (dict(prompt="x", duration_s=1.0, top_p=float("nan")), "top_p"),
        (dict(prompt="x", duration_s=1.0, seed=-1), "seed"),
        (dict(prompt="x", duration_s=1.0, tempo=3), "unknown sampling argument"),
        (dict(prompt=[], duration_s=1.0), "prompt"),
        (dict(prompt=Story((("a", 1.0), ("", 1.0)))), "non-empty string"),
    ],
)
def test_bad_input_is_rejected_before_any_work(engine: Engine, call: dict, message: str) -> None:
    with pytest.raises(VivaceError, match=message):
        engine.events(**call)


def test_per_stage_sampling_overrides(engine: Engine) -> None:
    requests = engine.requests("x", 1.0, 0, {"top_k": 5, "stage_sampling": {"fine": {"temperature": 0.0}}})
    params = requests[0].sampling
    assert params["semantic"].temperature == 1.0 and params["coarse"].temperature == 0.95
    assert params["fine"].temperature == 0.0
    assert all(p.top_k == 5 for p in params.values())
