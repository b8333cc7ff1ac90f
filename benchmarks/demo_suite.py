"""Demo suite: the bundled trained pack (packs/demo) generating 10 s of music at batch 1 on this machine.

Reports, best of three runs after a warm-up: wall time and real-time factor (audio seconds per wall second; above
1 is faster than real time), time to first audio, and the number of stage steps per run (each tick steps every stage that has work; a step
that admits a window runs its prefill too). The baselines in the same run are the same generation
with float32 weights and with int8 weight-only layers run from Python (`native_layers=False`) against int8 weight-only
with the native decoder stack (`quantize="int8"`, what `make demo` runs), each with one torch thread and with
torch's default; the real-time line is 10 s.
"""
from __future__ import annotations

import time
from typing import Any

import torch
from vivace import AudioChunk, Engine
from vivace.events import StageProgress

from benchmarks.common import ROOT, Options, table, write_result

PACK = ROOT / "packs" / "demo"
PROMPT = "upbeat piano with acoustic bass and rock drums in C major"
MODES = {  # name: Engine.from_pack options
    "float32": {},
    "int8": {"quantize": "int8"},  # what make demo runs: the decode steps' layers in one native call each
    "int8, Python layers": {"quantize": "int8", "native_layers": False},  # the same kernels, layer by layer
}


def one_run(engine: Engine, seconds: float, seed: int) -> dict[str, Any]:
    start = time.perf_counter()
    first_audio = None
    steps = 0
    for event in engine.events(PROMPT, duration_s=seconds, seed=seed):
        if isinstance(event, AudioChunk) and first_audio is None:
            first_audio = time.perf_counter() - start
        elif isinstance(event, StageProgress):
            steps += 1
    wall = time.perf_counter() - start
    return {"wall_s": wall, "first_audio_s": first_audio, "stage_steps": steps}


def run(options: Options) -> None:
    if not (PACK / "pack.json").is_file():
        raise SystemExit(f"demo suite: no pack at {PACK}")
    seconds = 2.0 if options.quick else 10.0
    default_threads = options.threads or torch.get_num_threads()
    rows, results = [], {}
    for mode, kwargs in MODES.items():
        for threads in sorted({1, default_threads}):
            torch.set_num_threads(threads)
            engine = Engine.from_pack(PACK, device=options.device, **kwargs)
            one_run(engine, 1.0, seed=99)  # warm-up
            runs = [one_run(engine, seconds, seed) for seed in range(3)]
            best = min(runs, key=lambda r: r["wall_s"])
            results[f"{mode}_threads_{threads}"] = {"runs": runs, "best_wall_s": best["wall_s"], "real_time_factor": seconds / best["wall_s"]}
            rows.append([mode, threads, seconds, best["wall_s"], seconds / best["wall_s"], best["first_audio_s"], best["stage_steps"]])
    torch.set_num_threads(default_threads)
    print(table(["weights", "threads", "audio s", "wall s", "x real time", "first audio s", "stage steps"], rows,
                title=f"{PACK.name}: \"{PROMPT}\", batch 1"))
    path = write_result("demo", options, {"pack": str(PACK.relative_to(ROOT)), "prompt": PROMPT, "seconds": seconds}, results)
    print(f"wrote {path}")
