"""CLI: bad input exits 2 with one line naming the flag, and no audio file (or temp file) is left behind."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from safetensors.torch import load_file, save_file

from vivace.cli import main


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.suffix in (".wav", ".flac", ".mp3", ".ogg", ".opus", ".tmp"))


def test_generate_writes_a_wav(tiny_pack: Path, tmp_path: Path) -> None:
    out = tmp_path / "song.wav"
    assert main(["generate", "--pack", str(tiny_pack), "calm piano", "--duration", "1.2", "--seed", "4", "-o", str(out), "--quiet"]) == 0
    audio, rate = sf.read(out)
    assert rate == 24000 and len(audio) == round(1.2 * 24000)
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # as open() would create it, not mkstemp's 0600


def test_story_from_the_command_line(tiny_pack: Path, tmp_path: Path) -> None:
    out = tmp_path / "story.wav"
    argv = ["generate", "--pack", str(tiny_pack), "--segment", "calm piano", "0.6", "--segment", "drums", "0.6", "-o", str(out), "--quiet"]
    assert main(argv) == 0
    assert len(sf.read(out)[0]) == round(1.2 * 24000)


def broken_pack(tiny_pack: Path, tmp_path: Path, kind: str) -> Path:
    pack = Path(shutil.copytree(tiny_pack, tmp_path / f"pack-{kind}"))
    if kind == "version":
        data = json.loads((pack / "pack.json").read_text())
        data["version"] = 7
        (pack / "pack.json").write_text(json.dumps(data))
    else:
        tensors = load_file(pack / "semantic.safetensors")
        del tensors["layers.0.attn.k_proj.weight"]
        save_file(tensors, str(pack / "semantic.safetensors"))
    return pack


@pytest.mark.parametrize(
    "args,message",
    [
        (["", "--duration", "1"], "prompt must be a non-empty string"),
        (["x", "--duration", "0"], "duration must be > 0"),
        (["x", "--duration", "-3"], "duration must be > 0"),
        (["x", "--duration", "1000"], "exceeds this pack's limit"),
        (["x", "--duration", "1", "--temperature", "nan"], "--temperature must be a finite number"),
        (["x", "--duration", "1", "--top-k", "-1"], "--top-k must be an integer >= 0"),
        (["x", "--duration", "1", "--top-p", "1.5"], "--top-p must be in (0, 1]"),
        (["x", "--duration", "1", "--seed", "-4"], "--seed must be an integer"),
        (["x"], "--duration is required"),
        (["x", "--duration", "1", "--steps-per-sync", "0"], "--steps-per-sync must be an integer >= 1"),
        (["x", "--duration", "1", "--steps-per-sync", "4", "--cuda-graphs"], "--cuda-graphs needs a CUDA device"),
        (["x", "--duration", "1", "--codec-backend", "tensorrt"], "--codec-backend 'tensorrt' is not available"),
    ],
)
def test_bad_arguments_exit_2_without_output(tiny_pack: Path, tmp_path: Path, capsys, args: list, message: str) -> None:
    out = tmp_path / "out.wav"
    assert main(["generate", "--pack", str(tiny_pack), *args, "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("kind,message", [("version", "unknown pack version 7"), ("tensor", "missing tensor 'layers.0.attn.k_proj.weight'")])
def test_broken_pack_exits_2(tiny_pack: Path, tmp_path: Path, capsys, kind: str, message: str) -> None:
    pack = broken_pack(tiny_pack, tmp_path, kind)
    assert main(["generate", "--pack", str(pack), "x", "--duration", "1", "-o", str(tmp_path / "o.wav")]) == 2
    assert message in capsys.readouterr().err
    assert leftovers(tmp_path) == []


def test_unwritable_output_exits_2(tiny_pack: Path, tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    for target, message in [(blocker / "o.wav", "does not exist"), (tmp_path / "missing" / "o.wav", "does not exist"),
                            (tmp_path / "o.mp4", "cannot tell the audio format"), (tmp_path, "is a directory")]:
        assert main(["generate", "--pack", str(tiny_pack), "x", "--duration", "1", "-o", str(target)]) == 2
        assert message in capsys.readouterr().err
    assert leftovers(tmp_path) == []


def test_exit_code_from_a_real_process(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "vivace", "generate", "--pack", str(tmp_path / "nope"), "x", "--duration", "1", "-o", str(tmp_path / "o.wav")],
        capture_output=True, text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "not a pack" in result.stderr


def test_info_describes_the_pack(tiny_pack: Path, capsys) -> None:
    assert main(["info", str(tiny_pack)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["sample_rate"] == 24000 and set(info["stages"]) == {"semantic", "coarse", "fine"}


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("vivace: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()


def test_guidance_on_a_musiclm_pack_names_the_flag(tiny_pack: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "o.wav"
    assert main(["generate", "--pack", str(tiny_pack), "x", "--duration", "0.5", "--guidance", "3", "-o", str(out)]) == 2
    err = one_error_line(capsys)
    assert "--guidance 3.0 needs a pack trained for classifier-free guidance" in err and "has no guided stage" in err
    assert "guidance_scale" not in err and leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "entry,message",
    [
        ("fine.temperature=-1", "--stage fine.temperature must be a finite number >= 0, got -1.0"),
        ("fine.top_k=2.5", "--stage fine.top_k must be an integer >= 0, got 2.5"),
        ("coarse.top-p=0", "--stage coarse.top_p must be in (0, 1], got 0.0"),
        ("bogus.top_k=3", "--stage names unknown stage 'bogus' (this pack's stages: semantic, coarse, fine)"),
        ("fine.temp=1", "expected STAGE.KEY=VALUE"),
        ("fine=1", "expected STAGE.KEY=VALUE"),
        ("fine.top_k=abc", "'abc' is not a number"),
    ],
)
def test_bad_stage_flags_exit_2(tiny_pack: Path, tmp_path: Path, capsys, entry: str, message: str) -> None:
    assert main(["generate", "--pack", str(tiny_pack), "x", "--duration", "0.5", "--stage", entry, "-o", str(tmp_path / "o.wav")]) == 2
    assert message in one_error_line(capsys)
    assert leftovers(tmp_path) == []


def test_stage_flags_become_the_apis_stage_sampling() -> None:
    from vivace.cli import stage_sampling

    parsed = stage_sampling(["fine.temperature=0.4", "coarse.top-k=5", "fine.top_p=0.9", "fine.temperature=0.2"])
    assert parsed == {"fine": {"temperature": 0.2, "top_p": 0.9}, "coarse": {"top_k": 5}}
    assert isinstance(parsed["coarse"]["top_k"], int)


def test_a_stage_flag_sets_that_stage_only(tiny_pack: Path, engine, tmp_path: Path) -> None:
    out, default = tmp_path / "fine.wav", tmp_path / "default.wav"
    common = ["generate", "--pack", str(tiny_pack), "calm piano", "--duration", "0.6", "--seed", "2", "--quiet",
              "--normalize", "none", "--bits", "32"]
    assert main([*common, "--stage", "fine.temperature=0", "-o", str(out)]) == 0
    assert main([*common, "-o", str(default)]) == 0
    expected = engine.generate("calm piano", 0.6, seed=2, stage_sampling={"fine": {"temperature": 0.0}})[0]
    written = sf.read(out, dtype="float32")[0]
    np.testing.assert_array_equal(written, expected)
    assert not np.array_equal(written, sf.read(default, dtype="float32")[0])


def test_random_pack_refuses_a_non_empty_directory_unless_forced(tmp_path: Path, capsys) -> None:
    target = tmp_path / "pack"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    assert main(["random-pack", str(target)]) == 2
    assert "not an empty directory" in one_error_line(capsys)
    assert sorted(p.name for p in target.iterdir()) == ["notes.txt"]
    assert main(["random-pack", str(target), "--force"]) == 0
    assert (target / "pack.json").is_file() and (target / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    "argv,message",
    [
        (["generate", "--pack", "p", "x", "--duration", "abc", "-o", "o.wav"], "argument --duration: invalid float value: 'abc'"),
        (["generate", "x", "--duration", "1"], "the following arguments are required: --pack, -o/--output"),
        (["generate", "--pack", "p", "x", "-o", "o.wav", "--normalize", "loud"], "argument --normalize: invalid choice"),
        (["bogus"], "argument command: invalid choice"),
    ],
)
def test_bad_flags_are_one_line_too(argv: list, message: str, capsys) -> None:
    assert main(argv) == 2
    err = one_error_line(capsys)
    assert message in err and "--help" in err


def test_verbose_goes_before_or_after_the_subcommand(tiny_pack: Path, capsys) -> None:
    from vivace.cli import _parser

    for argv in (["--verbose", "info", "p"], ["info", "p", "--verbose"], ["info", "--verbose", "p"]):
        assert _parser().parse_args(argv).verbose is True
    assert _parser().parse_args(["info", "p"]).verbose is False
    assert main(["--verbose", "info", str(tiny_pack)]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "random-tiny"


@pytest.mark.parametrize(
    "args,message",
    [
        (["--duration", "0"], "--duration must be > 0"),
        (["--duration", "nan"], "--duration must be > 0"),
        (["--duration", "1", "--seed", "-1"], "--seed must be an integer"),
        (["--duration", "1", "--temperature", "-1"], "--temperature must be a finite number"),
        (["--duration", "1", "--top-p", "0"], "--top-p must be in (0, 1]"),
        (["--duration", "1", "--stage", "fine.top_k=-2"], "--stage fine.top_k must be an integer >= 0"),
    ],
)
def test_values_that_need_no_pack_are_refused_before_it_loads(
    tiny_pack: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch, args: list, message: str
) -> None:
    from vivace.engine import Engine

    def no_loading(*args, **kwargs):
        raise AssertionError("the pack was loaded")

    monkeypatch.setattr(Engine, "from_pack", no_loading)
    assert main(["generate", "--pack", str(tiny_pack), "x", *args, "-o", str(tmp_path / "o.wav")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err, err
    assert leftovers(tmp_path) == []
