"""What the torch thread count changes: not the tokens, only the codec audio's last bits.

Each run is its own process (torch's thread count is the process's, and oneDNN keeps the blocking it chose for the
first count it saw). Tokens must be equal at 1 and 2 threads; audio within 1e-5 of each other (oneDNN's convolution
blocking follows the thread count, reordering float32 sums: a few ulps of full scale, far below a 16-bit step of
3e-5); and bytes identical between two runs at the same count, which is what `--threads` is for."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vivace.cli import main

REPO = Path(__file__).resolve().parent.parent
RUN = """
import sys
import numpy as np
from vivace.threads import set_threads
set_threads(int(sys.argv[1]))
import torch
from vivace import Engine
from vivace.events import AudioChunk, WindowFinished
engine = Engine.from_pack(sys.argv[2], quantize=None if sys.argv[3] == "none" else sys.argv[3])
tokens, pcm = [], []
for event in engine.events(["slow piano", "brushed drums"], 1.0, seed=3):
    if isinstance(event, WindowFinished):
        tokens.extend(event.tokens)
    elif isinstance(event, AudioChunk):
        pcm.append(event.pcm)
assert torch.get_num_threads() == int(sys.argv[1])
np.savez(sys.argv[4], tokens=np.asarray(tokens), pcm=np.concatenate(pcm))
"""


def run(threads: int, pack: Path, quantize: str, out: Path) -> dict[str, np.ndarray]:
    subprocess.run([sys.executable, "-c", RUN, str(threads), str(pack), quantize, str(out)], check=True, timeout=300)
    with np.load(out) as saved:
        return {key: saved[key] for key in saved.files}


@pytest.mark.parametrize("pack, quantize", [("tiny", "none"), ("demo", "int8")])
def test_tokens_do_not_depend_on_threads_and_audio_only_in_its_last_bits(
    pack: str, quantize: str, tiny_pack: Path, tmp_path: Path,
) -> None:
    path = tiny_pack if pack == "tiny" else REPO / "packs" / "demo"
    one, two, again = (run(t, path, quantize, tmp_path / f"{i}.npz") for i, t in enumerate((1, 2, 1)))
    assert len(one["tokens"]) > 0 and np.array_equal(one["tokens"], two["tokens"])
    assert one["pcm"].shape == two["pcm"].shape
    assert np.abs(one["pcm"] - two["pcm"]).max() <= 1e-5
    assert one["pcm"].tobytes() == again["pcm"].tobytes()  # one count, one set of bytes


@pytest.mark.parametrize("command", [["generate", "--pack", "PACK", "piano", "--duration", "1", "-o", "OUT"],
                                     ["serve", "--pack", "PACK"]])
def test_threads_below_one_are_refused_in_one_line(
    command: list[str], tiny_pack: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    argv = [str(tiny_pack) if a == "PACK" else str(tmp_path / "out.wav") if a == "OUT" else a for a in command]
    assert main([*argv, "--threads", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--threads must be at least 1, got 0" in err
    assert not (tmp_path / "out.wav").exists()
