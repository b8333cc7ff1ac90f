"""CLI: bad input exits 2 with one line, and no WAV (or temp file) is left behind."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf
from safetensors.torch import load_file, save_file

from vivace.cli import main


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.suffix in (".wav", ".tmp"))


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
        (["x", "--duration", "1", "--temperature", "nan"], "temperature"),
        (["x", "--duration", "1", "--top-k", "-1"], "top_k"),
        (["x", "--duration", "1", "--top-p", "1.5"], "top_p"),
        (["x", "--duration", "1", "--seed", "-4"], "seed"),
        (["x"], "duration_s is required"),
        (["x", "--duration", "1", "--steps-per-sync", "0"], "steps_per_sync must be an integer >= 1"),
        (["x", "--duration", "1", "--steps-per-sync", "4", "--cuda-graphs"], "cuda_graphs needs a CUDA device"),
        (["x", "--duration", "1", "--codec-backend", "tensorrt"], "codec_backend 'tensorrt' is not available"),
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
                            (tmp_path / "o.mp3", "must end in .wav"), (tmp_path, "must end in .wav")]:
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
