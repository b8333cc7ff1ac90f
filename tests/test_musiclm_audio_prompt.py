"""MusicLM audio prompts: a pack carrying its codec encoder and semantic tokenizer continues a clip, AudioLM-style.

The prompt's semantic tokens and acoustic codes fill the first windows (reported through the events as windows that
started and finished with the prompt's tokens), later windows read them as prefix, and the clip begins with the
prompt re-decoded from its codes. Random tiny packs: this tests the plumbing, not musical quality.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from vivace import Engine
from vivace.cli import main
from vivace.codecs.soundstream import rvq_quantize
from vivace.errors import PackError, VivaceError
from vivace.events import AudioChunk, WindowFinished, WindowStarted
from vivace.families.musiclm.random_pack import random_pack

RATE = 24000
TOKEN_SAMPLES = 960  # one semantic token of the tiny preset: 2 codec frames of 480 samples


@pytest.fixture(scope="module")
def prompted(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    return Engine.from_pack(random_pack(tmp_path_factory.mktemp("prompted") / "pack", encodes_audio=True, seed=3))


def tone(seconds: float, seed: int) -> np.ndarray:
    """A few partials with a random envelope: something the chroma and mel features of the tokenizer vary over."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    wave = sum(rng.uniform(0.1, 0.3) * np.sin(2 * np.pi * rng.uniform(80, 2000) * t) for _ in range(4))
    return (wave * (0.5 + 0.5 * np.abs(np.sin(2 * np.pi * rng.uniform(0.5, 3) * t)))).astype(np.float32)


def test_encode_gives_the_encoders_codes(prompted: Engine) -> None:
    pcm = tone(0.5, 0)
    codes = prompted.encode(pcm, RATE)
    pack = prompted.pack
    with torch.inference_mode():
        expected = rvq_quantize(pack.codec.codebooks, pack.codec_encoder(torch.from_numpy(pcm)[None]))[0].numpy()
    assert codes.shape == (12, 25) and codes.dtype == np.int64
    np.testing.assert_array_equal(codes, expected)
    assert prompted.encode(pcm[::3].copy(), 8000).shape == (12, 25)  # resampled to the pack's rate first


def test_an_audio_prompt_fills_the_first_windows_and_begins_the_clip(prompted: Engine) -> None:
    pcm = tone(0.7, 1)  # 17 whole semantic tokens (0.68 s), 34 codec frames
    tokens, frames = 17, 34
    events = list(prompted.events("piano", 2.0, seed=3, audio_prompt=pcm, audio_prompt_sample_rate=RATE))
    started = [e for e in events if isinstance(e, WindowStarted)]
    finished = {(e.stage, e.index): e.tokens for e in events if isinstance(e, WindowFinished)}
    with torch.inference_mode():
        expected_semantic = prompted.pack.semantic_tokenizer(torch.from_numpy(pcm[: tokens * TOKEN_SAMPLES])).tolist()
    prompt_semantic = [w for w in started if w.stage == "semantic" and w.new_end <= tokens]
    assert [(w.new_start, w.new_end) for w in prompt_semantic] == [(0, tokens)]
    assert list(finished[("semantic", prompt_semantic[0].index)]) == expected_semantic
    first_new = next(w for w in started if w.stage == "semantic" and w.new_start == tokens)
    assert first_new.prefix_start < tokens  # the continuation reads the prompt's tokens as its prefix
    first_coarse = next(w for w in started if w.stage == "coarse" and w.new_start == frames)
    assert first_coarse.prefix_start < frames
    encoded = prompted.encode(pcm, RATE)[:, :frames]
    chunks = [e for e in events if isinstance(e, AudioChunk)]
    codes = np.concatenate([c.codes for c in chunks], axis=1)
    assert codes.shape == (12, 100)
    np.testing.assert_array_equal(codes[:, :frames], encoded)
    audio = np.concatenate([c.pcm for c in chunks])
    assert audio.shape == (100 * 480,)
    # chunk by chunk with carried state against one whole decode: the same up to float rounding
    np.testing.assert_allclose(audio[: frames * 480], prompted.decode(encoded), atol=1e-5)
    # the prompt's windows are reported in the order a consumer expects: each started before it finished
    kinds = [(type(e).__name__, e.stage, e.index) for e in events if isinstance(e, (WindowStarted, WindowFinished))]
    for kind, stage, index in kinds:
        if kind == "WindowFinished":
            assert kinds.index(("WindowStarted", stage, index)) < kinds.index((kind, stage, index))


def test_continuations_are_deterministic_follow_the_prompt_and_batch_like_solo_runs(prompted: Engine) -> None:
    first, second = tone(0.5, 2), tone(0.5, 3)
    solo = [prompted.generate("piano", 1.5, seed=5, audio_prompt=p, audio_prompt_sample_rate=RATE)[0] for p in (first, second)]
    again = prompted.generate("piano", 1.5, seed=5, audio_prompt=first, audio_prompt_sample_rate=RATE)[0]
    np.testing.assert_array_equal(solo[0], again)
    assert not np.allclose(solo[0][12000:], solo[1][12000:])  # the continuation depends on the prompt
    batch = prompted.generate(["piano", "piano"], 1.5, seed=[5, 5], audio_prompt=[first, second], audio_prompt_sample_rate=RATE)
    np.testing.assert_array_equal(batch[0], solo[0])
    np.testing.assert_array_equal(batch[1], solo[1])
    plain = prompted.generate("piano", 1.5, seed=5)[0]
    assert not np.allclose(plain[:12000], solo[0][:12000])


def test_a_prompt_longer_than_a_window_and_a_story_after_it(prompted: Engine) -> None:
    pcm = tone(3.0, 4)  # longer than the tiny semantic window (2 s)
    events = list(prompted.events([("piano", 3.5), ("drums", 1.5)], seed=1, audio_prompt=pcm, audio_prompt_sample_rate=RATE))
    started = [e for e in events if isinstance(e, WindowStarted)]
    semantic = [w for w in started if w.stage == "semantic"]
    generated = [w for w in semantic if w.new_start >= 75]
    assert generated[0].new_start == 75 and generated[0].new_end - generated[0].prefix_start <= 50
    text = prompted.pack.text.tokens(["piano", "drums"]).tolist()
    for window in generated:
        assert list(window.condition) == text[0 if window.new_start < 88 else 1]  # the story switches at 3.5 s
    audio = np.concatenate([e.pcm for e in events if isinstance(e, AudioChunk)])
    assert audio.shape == (250 * 480,)


def test_prompt_errors_are_one_line(prompted: Engine, engine: Engine) -> None:
    cases = [
        (prompted, dict(audio_prompt=tone(0.02, 0), audio_prompt_sample_rate=RATE), "shorter than one semantic token"),
        (prompted, dict(audio_prompt=tone(1.0, 0), audio_prompt_sample_rate=RATE), "must be shorter than the duration"),
        (prompted, dict(audio_prompt_sample_rate=RATE), "audio_prompt_sample_rate was given without an audio_prompt"),
        (prompted, dict(audio_prompt=[tone(0.2, 0)] * 2, audio_prompt_sample_rate=RATE), "got 2 audio prompts for 1 prompts"),
        (engine, dict(audio_prompt=tone(0.2, 0), audio_prompt_sample_rate=RATE),
         "carries no codec encoder and no semantic tokenizer: an audio prompt's"),
    ]
    for target, options, message in cases:
        with pytest.raises(VivaceError) as error:
            target.generate("piano", 1.0, seed=0, **options)
        assert message in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(VivaceError, match="carries no codec encoder: it cannot encode audio"):
        engine.encode(tone(0.2, 0), RATE)


def test_the_pack_records_its_prompt_parts_and_checks_them(prompted: Engine, tmp_path: Path) -> None:
    data = json.loads((prompted.pack.path / "pack.json").read_text())
    assert data["codec_encoder"] is True and data["semantic_tokenizer"]["vocab"] == 64
    assert prompted.info()["audio_prompts"] is True
    bad = tmp_path / "bad"
    random_pack(bad, encodes_audio=True)
    edited = json.loads((bad / "pack.json").read_text())
    edited["semantic_tokenizer"]["vocab"] = 32
    (bad / "pack.json").write_text(json.dumps(edited))
    with pytest.raises(PackError, match="semantic_tokenizer makes 32 units at 25/s, the semantic stage reads 64 at 25/s"):
        Engine.from_pack(bad)
    (bad / "semantic_tokenizer.safetensors").unlink()
    edited["semantic_tokenizer"]["vocab"] = 64
    (bad / "pack.json").write_text(json.dumps(edited))
    with pytest.raises(PackError, match="semantic_tokenizer"):
        Engine.from_pack(bad)


def test_audio_prompt_from_the_command_line(prompted: Engine, tmp_path: Path) -> None:
    file = tmp_path / "prompt.wav"
    sf.write(file, tone(0.5, 6), RATE, subtype="FLOAT")
    out = tmp_path / "out.wav"
    argv = ["generate", "--pack", str(prompted.pack.path), "piano", "--duration", "1.0", "--audio-prompt", str(file),
            "--normalize", "none", "--bits", "32", "--seed", "2", "-o", str(out), "--quiet"]
    assert main(argv) == 0
    written, rate = sf.read(out, dtype="float32")
    expected = prompted.generate("piano", 1.0, seed=2, audio_prompt=str(file))[0]
    assert rate == RATE
    np.testing.assert_array_equal(written, expected)
