"""The demo recipe's stage ablation (recipes/demo_pack/prefill.py): rows started with real semantic tokens, or real
semantic tokens and coarse codes, generate the stages below from exactly those (reported, as an audio prompt's are, as
windows started and finished with the tokens given), and the engine is itself again after the block."""
from __future__ import annotations

import numpy as np
from demo_recipe import import_recipe

from vivace import Engine
from vivace.events import AudioChunk, WindowFinished

(prefill,) = import_recipe("prefill")
real_tokens = prefill.real_tokens
SECONDS, PROMPT = 2.0, "slow piano"


def run(engine: Engine, prompt: str = PROMPT) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(semantic tokens, codes [levels, frames], pcm) of one row."""
    events = list(engine.events(prompt, duration_s=SECONDS, seed=3))
    chunks = [e for e in events if isinstance(e, AudioChunk)]
    semantic = [e.tokens for e in events if isinstance(e, WindowFinished) and e.stage == "semantic"]
    return (np.concatenate(semantic), np.concatenate([c.codes for c in chunks], axis=1),
            np.concatenate([c.pcm for c in chunks]))


def real(engine: Engine) -> tuple[np.ndarray, np.ndarray]:
    """Random 'real' semantic tokens and coarse codes [frames, levels] for SECONDS."""
    config = engine.pack.config
    rng = np.random.default_rng(0)
    frames = round(SECONDS * config.sample_rate / config.codec.hop_length)
    semantic = rng.integers(0, config.musiclm.semantic_vocab, round(SECONDS * config.musiclm.semantic_rate))
    return semantic, rng.integers(0, config.codec.codebook_size, (frames, config.musiclm.coarse_levels))


def test_real_semantic_tokens_leave_the_stages_below_to_generate(engine: Engine) -> None:
    semantic, _ = real(engine)
    plain_semantic, plain_codes, _ = run(engine)
    with real_tokens({PROMPT: (semantic, None)}):
        tokens, codes, _ = run(engine)
    np.testing.assert_array_equal(tokens, semantic)
    assert not np.array_equal(plain_semantic, semantic)
    assert not np.array_equal(codes, plain_codes)  # the coarse stage read the tokens given, not its own


def test_real_coarse_codes_are_decoded_with_generated_fine_levels(engine: Engine) -> None:
    semantic, coarse = real(engine)
    with real_tokens({PROMPT: (semantic, coarse)}):
        tokens, codes, _ = run(engine)
    np.testing.assert_array_equal(tokens, semantic)
    np.testing.assert_array_equal(codes[: coarse.shape[1]].T, coarse)


def test_other_rows_and_later_calls_are_untouched(engine: Engine) -> None:
    semantic, coarse = real(engine)
    _, plain_codes, plain_pcm = run(engine, "fast drums")
    with real_tokens({PROMPT: (semantic, coarse)}):
        _, other_codes, other_pcm = run(engine, "fast drums")  # not a key of the fill: generated as always
    _, after_codes, after_pcm = run(engine, "fast drums")
    for codes, pcm in ((other_codes, other_pcm), (after_codes, after_pcm)):
        np.testing.assert_array_equal(codes, plain_codes)
        np.testing.assert_array_equal(pcm, plain_pcm)
    _, codes, _ = run(engine)
    assert not np.array_equal(codes[: coarse.shape[1]].T, coarse)  # the fill ended with the block
