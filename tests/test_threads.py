"""What the torch thread count changes: not the tokens, only the codec audio's last bits.

Each run is its own process (torch's thread count is the process's, and oneDNN keeps the blocking it chose for the
first count it saw). Tokens must be equal at 1 and 2 threads; audio within 1e-5 of each other (oneDNN's convolution
blocking follows the thread count, reordering float32 sums: a few ulps of full scale, far below a 16-bit step of
3e-5); and bytes identical between two runs at the same count, which is what `--threads` is for. Where the streaming
codec runs on vivace's native convolutions (a CPU with AVX-512), whose sums have one order at any thread count, the
audio is identical at 1 and 2 threads too."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vivace import _C
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
    if _C.causal_conv1d_fast():  # the streaming codec on the native convolutions: fixed sums at any thread count
        assert one["pcm"].tobytes() == two["pcm"].tobytes()


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


def fed(governor, timings) -> list[int]:
    """Runs the governor over steps whose duration timings(threads) gives; returns each step's thread count."""
    counts = []
    for _ in range(400):
        threads = governor.threads_for_next_step()
        counts.append(threads)
        governor.step_took(threads, timings(threads))
    return counts


def test_the_governor_keeps_the_faster_count_and_backs_off() -> None:
    from vivace.threads import ThreadGovernor

    quiet = ThreadGovernor(2, probe_every=10, probe_steps=3, max_wait=40)
    counts = fed(quiet, lambda threads: {1: 1.7, 2: 1.0}[threads])
    # a first probe step over 1.5x the step beside it ends the probe: one pair, not three
    assert quiet.current == 2 and counts[:10] == [2] * 10 and counts[10:12] == [1, 2] and counts[12:32] == [2] * 20
    assert counts.count(1) <= 10  # each losing probe doubles the wait: 10, 20, 40, 40, ...
    close = ThreadGovernor(2, probe_every=10, probe_steps=3)
    counts = fed(close, lambda threads: {1: 1.4, 2: 1.0}[threads])
    assert close.current == 2 and counts[10:16] == [1, 2] * 3  # not clearly losing: the whole probe runs
    busy = ThreadGovernor(2, probe_every=10, probe_steps=3, max_wait=40)
    counts = fed(busy, lambda threads: {1: 1.0, 2: 17.0}[threads])
    assert busy.current == 1 and counts[16:26] == [1] * 10 and counts[16:].count(2) <= 10  # probes: 10, 20, 40, 40, ...
    # a neighbour that leaves: the next probe of 2 threads wins them back
    fed(busy, lambda threads: {1: 1.7, 2: 1.0}[threads])
    assert busy.current == 2
    near = ThreadGovernor(2, probe_every=10)
    fed(near, lambda threads: {1: 0.95, 2: 1.0}[threads])  # inside the tenth: no switch
    assert near.current == 2
    arriving = ThreadGovernor(2, probe_every=10, max_wait=160)
    fed(arriving, lambda threads: {1: 1.7, 2: 1.0}[threads])  # quiet: the wait has grown long
    assert arriving.wait == 160 and arriving.current == 2
    counts = fed(arriving, lambda threads: {1: 1.0, 2: 17.0}[threads])
    assert arriving.current == 1 and counts.index(1) <= 3  # the second slow step in a row brings the probe forward
    # one slow step among quiet ones (a request's prefill) brings no probe forward; nor do slow steps on one thread
    prefill = ThreadGovernor(2, probe_every=100)
    counts = fed(prefill, lambda threads, steps=iter(range(10**6)): 5.0 if next(steps) % 30 == 29 else {1: 1.7, 2: 1.0}[threads])
    assert counts[:100] == [2] * 100
    alone = ThreadGovernor(2, probe_every=10, max_wait=1000)
    fed(alone, lambda threads: {1: 1.0, 2: 17.0}[threads])
    assert alone.current == 1 and alone.wait >= 320
    counts = fed(alone, lambda threads, steps=iter(range(10**6)): 3.0 if next(steps) % 2 else 1.0 if threads == 1 else 17.0)
    assert counts.count(2) <= 1  # slow single-thread steps: no probe of 2 threads brought forward
    single = ThreadGovernor(1)
    assert set(fed(single, lambda threads: 1.0)) == {1}


def test_an_adaptive_engine_draws_the_same_tokens(tiny_pack: Path) -> None:
    import torch

    from vivace import Engine, VivaceError
    from vivace.events import WindowFinished

    fixed = Engine.from_pack(tiny_pack)
    expected = [e.tokens for e in fixed.events("calm piano", 1.0, seed=2) if isinstance(e, WindowFinished)]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        adaptive = Engine.from_pack(tiny_pack, adaptive_threads=True)
        governor = adaptive.thread_governor
        # probes every 4 to 8 steps whichever count wins, so that the run steps on both counts (a probe that loses
        # doubles the wait: with the default max_wait, timing alone decided whether a second probe came at all)
        governor.probe_every = governor.wait = 4
        governor.max_wait = 8
        counts: list[int] = []
        choose = governor.threads_for_next_step
        governor.threads_for_next_step = lambda: counts.append(choose()) or counts[-1]
        got = [e.tokens for e in adaptive.events("calm piano", 1.0, seed=2) if isinstance(e, WindowFinished)]
        assert adaptive.info()["adaptive_threads"] and {1, 2} <= set(counts)
    finally:
        torch.set_num_threads(threads)
    assert got == expected
    with pytest.raises(VivaceError, match="adaptive_threads must be True or False"):
        Engine.from_pack(tiny_pack, adaptive_threads="yes")


def test_threads_auto_on_the_command_line(tiny_pack: Path, tmp_path: Path) -> None:
    out = tmp_path / "auto.wav"
    assert main(["generate", "--pack", str(tiny_pack), "calm piano", "--duration", "0.5", "--threads", "auto", "-o", str(out), "--quiet"]) == 0
    assert out.is_file()


RELEASE = """
import os, torch
from vivace.threads import release_thread_team
torch.set_num_threads(2)
x = torch.randn(512, 512)
before = x @ x  # a parallel region: this thread now owns an OpenMP team
gomp = any("/libgomp" in line for line in open("/proc/self/maps"))
threads = len(os.listdir("/proc/self/task"))
released = release_thread_team()
after_release = len(os.listdir("/proc/self/task"))
again = x @ x  # a new team
print(gomp, released, threads, after_release, bool(torch.equal(before, again)))
"""


def test_release_thread_team_frees_the_openmp_workers() -> None:
    """The calling thread's OpenMP workers exit (AsyncEngine does this before its core's thread starts), and the
    next parallel region starts new ones with the same results. Where torch loaded no libgomp it does nothing."""
    out = subprocess.run([sys.executable, "-c", RELEASE], capture_output=True, text=True, check=True, cwd=REPO)
    gomp, released, threads, after_release, equal = out.stdout.split()
    assert released == gomp and equal == "True"
    if gomp == "True":
        assert int(after_release) < int(threads)


SHARED_TEAM = """
import os, numpy as np, torch
from vivace import _C
torch.set_num_threads(2)
x = torch.randn(512, 512)
x @ x  # torch's team for this thread
gomp = any("/libgomp" in line for line in open("/proc/self/maps"))
before = len(os.listdir("/proc/self/task"))
weight = np.ones((256, 512), np.int8)
out = _C.int8_linear(np.ones((2, 512), np.float32), weight, np.ones(256, np.float32), weight.sum(1, dtype=np.int32), None, 2)
after = len(os.listdir("/proc/self/task"))
print(gomp, _C.parallel_backend(), before, after, float(out[0, 0]))
"""


def test_native_kernels_run_on_torchs_openmp_team() -> None:
    """Where torch loaded libgomp, vivace's kernels run their parallel loops on its team (the workers torch's ops
    use) and start no threads of their own; elsewhere they keep a pool of their own."""
    out = subprocess.run([sys.executable, "-c", SHARED_TEAM], capture_output=True, text=True, check=True, cwd=REPO)
    gomp, backend, before, after, value = out.stdout.split()
    assert float(value) == 512.0
    assert backend == ("openmp" if gomp == "True" else "threads")
    if gomp == "True":
        assert after == before
