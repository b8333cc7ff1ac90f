"""Fuzzing the command line as a new user would: random arguments to `vivace generate` and random values in a pack's
pack.json. Every outcome is a success (a playable file) or exit code 2 with exactly one line on stderr: never a
traceback, never a partial file."""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
import soundfile as sf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vivace.cli import main

NUMBERS = st.one_of(
    st.sampled_from(["0", "-1", "0.01", "0.2", "nan", "inf", "1e9", "abc", "", "2**63", "0x10", "True"]),
    st.floats(min_value=-2, max_value=2, allow_nan=False).map(lambda x: f"{x:.3g}"),
    st.integers(min_value=-5, max_value=300).map(str),
)
OPTIONS = {
    "--duration": NUMBERS, "--seed": NUMBERS, "--temperature": NUMBERS, "--top-k": NUMBERS, "--top-p": NUMBERS,
    "--guidance": NUMBERS, "--device": st.sampled_from(["cpu", "cuda", "cuda:7", "tpu", "meta", ""]),
    "--dtype": st.sampled_from(["float32", "bf16", "int4", ""]), "--codec-backend": st.sampled_from(["auto", "torch", "trt"]),
}
SETTINGS = settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """main(argv)'s exit code and stderr; any exception escaping it (a traceback for a user) fails the test."""
    try:
        code = main(argv)
    except SystemExit as exit:  # argparse's own errors
        code = exit.code
    return code, capsys.readouterr().err


def assert_clean_outcome(code: int, err: str, output: Path) -> None:
    if code == 0:
        audio, rate = sf.read(output)
        assert rate > 0 and len(audio) > 0
        return
    assert code == 2, (code, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert not output.exists(), "a failed run left a file behind"
    assert not [p for p in output.parent.iterdir() if p.name.startswith(f".{output.name}")], "a temporary file was left"


@pytest.fixture(scope="module")
def pack(tiny_pack: Path) -> Path:
    return tiny_pack


@SETTINGS
@given(options=st.dictionaries(st.sampled_from(sorted(OPTIONS)), st.just(None), max_size=4).flatmap(
    lambda chosen: st.fixed_dictionaries({key: OPTIONS[key] for key in chosen})
), prompt=st.sampled_from(["piano", "", "  ", "ü" * 3, "x" * 300]))
def test_generate_arguments(options: dict[str, str], prompt: str, pack: Path, capsys: pytest.CaptureFixture[str]) -> None:
    options.setdefault("--duration", "0.2")
    with tempfile.TemporaryDirectory() as tmp:
        output = Path(tmp) / "out.wav"
        argv = ["generate", "--pack", str(pack), prompt, "-o", str(output), "--quiet"]
        for key, value in options.items():
            argv += [f"{key}={value}"]  # "=" keeps values that start with "-" attached to their flag
        code, err = run_cli(argv, capsys)
        assert_clean_outcome(code, err, output)


def leaf_paths(value: object, path: tuple = ()) -> list[tuple]:
    """Every scalar's path in a JSON document."""
    if isinstance(value, dict):
        return [p for key, item in value.items() for p in leaf_paths(item, (*path, key))]
    if isinstance(value, list):
        return [p for index, item in enumerate(value) for p in leaf_paths(item, (*path, index))]
    return [path]


JSON_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-3, max_value=10**6), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=5), st.sampled_from(["24000", "1", "abc"]), st.lists(st.integers(0, 3), max_size=2), st.just({}),
)


@SETTINGS
@given(data=st.data())
def test_pack_json_values(data: st.DataObject, pack: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = json.loads((pack / "pack.json").read_text())
    path = data.draw(st.sampled_from(leaf_paths(manifest)), label="field")
    value = data.draw(JSON_VALUES, label="value")
    with tempfile.TemporaryDirectory() as tmp:
        broken = Path(shutil.copytree(pack, Path(tmp) / "pack"))
        edited = json.loads((broken / "pack.json").read_text())
        target = edited
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        (broken / "pack.json").write_text(json.dumps(edited))
        output = Path(tmp) / "out.wav"
        code, err = run_cli(["generate", "--pack", str(broken), "piano", "--duration", "0.2", "-o", str(output), "--quiet"], capsys)
        assert_clean_outcome(code, err, output)
