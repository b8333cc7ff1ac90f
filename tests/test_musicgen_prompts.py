"""What MusicGen users call besides a text prompt: unconditional generation (prompt None) and, for packs carrying
EnCodec's encoder, continuation from an audio prompt. Parity with transformers is in test_musicgen_parity.py."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from musicgen_checkpoints import TinyMusicGen, write_checkpoint
from musicgen_checkpoints import one_thread  # noqa: F401 - autouse fixture

from vivace import Engine, VivaceError, WindowStarted
from vivace.export.musicgen import convert_musicgen


@pytest.fixture(scope="module")
def melody_engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    root = tmp_path_factory.mktemp("melody-prompts")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        src = write_checkpoint(root / "src", TinyMusicGen(melody=True, seed=5))
    return Engine.from_pack(convert_musicgen(src, root / "pack"))


def test_unconditional_melody_rows(melody_engine: Engine) -> None:
    """Without text or a reference a row reads the null condition unguided; with a reference but no text it is
    conditioned by the chroma alone and guided against the null chroma."""
    reference = (np.random.default_rng(0).standard_normal(3200) * 0.3).astype(np.float32)
    events = list(melody_engine.events(None, 0.1, seed=1))
    assert next(e for e in events if isinstance(e, WindowStarted)).condition == ()
    plain = melody_engine.generate(None, 0.1, seed=1)
    assert np.array_equal(plain, melody_engine.generate(None, 0.1, seed=1, guidance_scale=1.0))
    with_melody = melody_engine.generate(None, 0.1, seed=1, melody=reference, melody_sample_rate=3200)
    unguided = melody_engine.generate(None, 0.1, seed=1, melody=reference, melody_sample_rate=3200, guidance_scale=1.0)
    assert not np.array_equal(with_melody, plain) and not np.array_equal(with_melody, unguided)


def test_guidance_for_unconditional_rows_alone_is_refused(melody_engine: Engine) -> None:
    with pytest.raises(VivaceError, match="guidance_scale 3.0 has nothing to guide: prompt None is unconditional"):
        melody_engine.generate(None, 0.1, guidance_scale=3.0)
    with pytest.raises(VivaceError, match="guidance_scale 2 has nothing to guide"):
        melody_engine.generate([None, None], 0.1, guidance_scale=2)
    melody_engine.generate([None, "piano"], 0.05, guidance_scale=2)  # the text row is guided


def test_musiclm_refuses_prompt_none_in_one_line(engine: Engine) -> None:
    for prompt in (None, ["calm piano", None]):
        with pytest.raises(VivaceError, match=r"^prompt None \(unconditional generation\) is MusicGen's: every MusicLM stage"):
            engine.generate(prompt, 1.0)




def test_unconditional_from_the_command_line(melody_engine: Engine, tiny_pack: Path, tmp_path: Path, capsys) -> None:
    import soundfile as sf

    from vivace.cli import main

    out = tmp_path / "u.wav"
    argv = ["generate", "--pack", str(melody_engine.pack.path), "--unconditional", "--duration", "0.1", "--seed", "1",
            "--normalize", "none", "--bits", "32", "-o", str(out), "--quiet"]
    assert main(argv) == 0
    np.testing.assert_array_equal(sf.read(out, dtype="float32")[0], melody_engine.generate(None, 0.1, seed=1)[0])
    for argv, message in [
        (["--pack", str(melody_engine.pack.path), "piano", "--unconditional", "--duration", "1"], "--unconditional takes no prompt"),
        (["--pack", str(tiny_pack), "--unconditional", "--duration", "1"], "prompt None (unconditional generation) is MusicGen's"),
    ]:
        assert main(["generate", *argv, "-o", str(tmp_path / "bad.wav")]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
    assert not (tmp_path / "bad.wav").exists()
