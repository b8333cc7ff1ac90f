"""Classifier-free guidance of MusicLM's conditioned stages, on tiny random packs whose semantic and coarse stages
carry a null token."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_engine_core import AUDIO_TOL, outcome, run_joining, solo

from vivace import Engine, VivaceError, WindowFinished, WindowStarted
from vivace.errors import PackError
from vivace.families.musiclm.layout import MusicLMLayout
from vivace.families.musiclm.pack import load_pack
from vivace.families.musiclm.random_pack import random_pack

GREEDY_SEMANTIC = {"semantic": {"temperature": 0.0}}


@pytest.fixture(scope="module")
def guided_pack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_pack(tmp_path_factory.mktemp("packs") / "guided", seed=2, guided_stages=("semantic", "coarse"))


@pytest.fixture(scope="module")
def guided(guided_pack: Path) -> Engine:
    return Engine.from_pack(guided_pack)


def semantic_window(events: list) -> list[int]:
    (tokens,) = [e.tokens for e in events if isinstance(e, WindowFinished) and e.stage == "semantic" and e.index == 0]
    return list(tokens)


def test_layout_puts_the_null_token_last_in_the_guided_stages_vocabularies(guided: Engine) -> None:
    layout = MusicLMLayout.of(guided.pack.config)
    unguided = MusicLMLayout(*(getattr(layout, f) for f in ("mt_levels", "mt_codebook", "semantic_vocab",
                                                             "acoustic_codebook", "coarse_levels", "fine_levels")))
    for stage in ("semantic", "coarse"):
        vocab, output = layout.vocab_sizes(stage)
        assert (vocab - 1, output) == unguided.vocab_sizes(stage)
        assert layout.null_tokens(stage) == [vocab - 1] * layout.mt_levels
    assert layout.vocab_sizes("fine") == unguided.vocab_sizes("fine")
    with pytest.raises(ValueError, match="not trained for guidance"):
        layout.null_tokens("fine")


def test_guided_semantic_window_is_the_dense_reference_mix(guided: Engine, guided_pack: Path) -> None:
    """Greedy tokens of the first semantic window against a plain-torch loop over the stage's dense forward, mixing
    null + (cond - null) * scale. Greedy picks agree unless two logits tie within float32 rounding, which random
    weights make vanishingly rare; the tokens are compared exactly."""
    prompt, scale = "slow solo piano", 2.5
    events = list(guided.events(prompt, 1.0, seed=0, guidance_scale=scale, stage_sampling=GREEDY_SEMANTIC))
    got = semantic_window(events)
    pack = load_pack(guided_pack, device="cpu", dtype=torch.float32)
    layout = MusicLMLayout.of(pack.config)
    model = pack.stages["semantic"]
    condition = layout.mt_tokens(pack.text.tokens([prompt])[0].tolist())
    rows = [condition, layout.null_tokens("semantic")]
    expected = []
    with torch.no_grad():
        for _ in range(len(got)):
            ids = torch.tensor(rows).unsqueeze(-1)
            logits = model.compute_logits(model.forward_dense(ids)[:, -1])[:, 0].float()
            mixed = logits[1] + (logits[0] - logits[1]) * scale
            token = int(mixed.argmax())
            expected.append(token)
            rows = [row + [token + layout.semantic_offset] for row in rows]
    assert got == expected
    unguided = semantic_window(list(guided.events(prompt, 1.0, seed=0, guidance_scale=1.0, stage_sampling=GREEDY_SEMANTIC)))
    assert unguided != expected  # the mix changes what is drawn


def test_a_negative_prompt_equal_to_the_prompt_cancels_guidance(guided: Engine) -> None:
    """With the null rows reading the prompt's own MT tokens, cond - null is zero and the mix is the conditional
    logits: every stage's tokens are those of an unguided run, and the audio is the same."""
    prompt = "upbeat trio with walking bass"
    plain = outcome(list(guided.events(prompt, 1.2, seed=5, guidance_scale=1.0)))
    cancelled = outcome(list(guided.events(prompt, 1.2, seed=5, guidance_scale=3.0, negative_prompt=prompt)))
    guided_run = outcome(list(guided.events(prompt, 1.2, seed=5)))  # the pack's default, 3
    steered = outcome(list(guided.events(prompt, 1.2, seed=5, negative_prompt="loud drum solo")))
    assert cancelled[0] == plain[0]
    np.testing.assert_allclose(cancelled[1], plain[1], atol=AUDIO_TOL, rtol=0)
    assert guided_run[0] != plain[0] and steered[0] != guided_run[0]


def test_guided_windows_report_the_prompt_condition(guided: Engine) -> None:
    events = list(guided.events("ambient pads", 1.0, seed=1, negative_prompt="rock drums"))
    condition = guided.pack.text.tokens(["ambient pads"])[0].tolist()
    started = [e for e in events if isinstance(e, WindowStarted) and e.stage in ("semantic", "coarse")]
    assert started and all(list(e.condition) == condition for e in started)


def test_guided_requests_joining_at_random_steps_get_their_solo_outputs(guided: Engine) -> None:
    calls = [
        ("slow solo piano", 1.3, 3, {}),
        ("a long piece", 3.5, 4, {"guidance_scale": 1.5}),  # three semantic windows
        ("brushed drums", 0.9, 6, {"guidance_scale": 1.0}),  # unguided beside guided pairs
        ("slow solo piano", 1.3, 7, {"negative_prompt": "loud drums"}),
    ]
    alone = [solo(guided, *call[:3], **call[3]) for call in calls]
    got = run_joining(guided, calls, [0, 2, 5, 11])
    for i, (tokens, audio) in enumerate(alone):
        their_tokens, their_audio = outcome(got[i])
        assert their_tokens == tokens
        assert their_audio.shape == audio.shape and np.abs(their_audio - audio).max() <= AUDIO_TOL
    assert not guided.core.has_unfinished()


def test_guidance_arguments_are_checked(guided: Engine, engine: Engine) -> None:
    for target, options, message in [
        (guided, {"guidance_scale": 0.5}, "guidance_scale must be a finite number >= 1"),
        (guided, {"guidance_scale": float("nan")}, "guidance_scale must be a finite number >= 1"),
        (guided, {"guidance_scale": "3"}, "guidance_scale must be a finite number >= 1"),
        (guided, {"guidance_scale": 1.0, "negative_prompt": "drums"}, "needs guidance_scale > 1"),
        (guided, {"negative_prompt": ""}, "negative_prompt must be a non-empty string"),
        (engine, {"guidance_scale": 3.0}, "has no guided stage"),
        (engine, {"negative_prompt": "drums"}, "runs without guidance"),
    ]:
        with pytest.raises(VivaceError) as error:
            target.events("piano", 1.0, **options)
        assert message in str(error.value), str(error.value)
    assert engine.info()["guided_stages"] == [] and guided.info()["guided_stages"] == ["semantic", "coarse"]
    assert engine.generate("piano", 0.5, seed=1, guidance_scale=1.0).shape == (1, engine.sample_rate // 2)


def test_pack_guidance_settings_are_validated(guided_pack: Path, tmp_path: Path) -> None:
    config = json.loads((guided_pack / "pack.json").read_text())
    assert config["musiclm"]["guided_stages"] == ["semantic", "coarse"]
    for change, message in [
        ({"guided_stages": ["semantic", "semantic"]}, "lists a stage twice"),
        ({"guided_stages": ["fine"]}, "guided_stages[0] must be one of"),
        ({"guidance_scale": 0.5}, "guidance_scale must be a number >= 1"),
        ({"guided_stages": [], "guidance_scale": 2.0}, "needs a stage trained for it"),
    ]:
        broken = tmp_path / f"pack-{len(list(tmp_path.iterdir()))}"
        broken.mkdir()
        for item in guided_pack.iterdir():
            (broken / item.name).symlink_to(item)
        (broken / "pack.json").unlink()
        (broken / "pack.json").write_text(json.dumps({**config, "musiclm": {**config["musiclm"], **change}}))
        with pytest.raises(PackError) as error:
            Engine.from_pack(broken)
        assert message in str(error.value), str(error.value)
