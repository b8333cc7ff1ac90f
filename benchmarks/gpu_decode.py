"""Decode steps per host sync and CUDA graphs, end to end: the same greedy tokens, and the time each mode takes.

    python -m benchmarks.gpu_decode [--preset paper] [--dtype bfloat16] [--seconds 2] [--steps-per-sync 16]

Modes, each a fresh Engine on one random-weight pack (vivace.families.musiclm.random_pack.random_pack), greedy decoding:
  per step         steps_per_sync 1: one host round trip per step (the C++ decode batch; Triton sampling on CUDA)
  device loop      steps_per_sync N: N steps per host sync (vivace.core.device_decode)
  device + graphs  the same N steps replayed as one CUDA graph (CUDA only)
The CUDA-graph replay must draw exactly the tokens of the same loop run eagerly (checked before any figure is
written). The per-step and device-loop modes run the same math on different shapes (the loop pads its batch to a
power-of-two bucket, and GPU matrix kernels may round a row differently at another batch size), so their agreement
is measured and recorded: the share of identical windows and of identical tokens. Wall time is the
best of --repeats whole generations after one warm-up; ticks are the pipeline's steps (fewer with several steps
per sync). On the CPU it runs through the Triton interpreter, for checking the script, not for speed:
    TRITON_INTERPRET=1 VIVACE_TRITON_INTERPRET=1 python -m benchmarks.gpu_decode --device cpu --preset tiny \
        --dtype float32 --seconds 0.5 --steps-per-sync 8 --repeats 1 --out /tmp/gpu_decode.json
Results go to benchmarks/results/gpu_decode-<device>-<date>.json (or --out).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import cpu_model, git, gpu_name, versions
from vivace import Engine
from vivace.events import StageProgress, WindowFinished
from vivace.families.musiclm.random_pack import random_pack

RESULTS = Path(__file__).resolve().parent / "results"


def generate(engine: Engine, seconds: float) -> tuple[list, int, float]:
    """Window tokens, pipeline ticks, wall seconds."""
    start = time.perf_counter()
    tokens, steps = [], 0
    for event in engine.events("a slow piano piece", duration_s=seconds, seed=0, temperature=0.0):
        if isinstance(event, WindowFinished):
            tokens.append((event.stage, event.row, event.index, event.tokens))
        elif isinstance(event, StageProgress):
            steps += 1
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    return tokens, steps, time.perf_counter() - start


def agreement(reference: list, tokens: list) -> tuple[float, float]:
    """Shares of identical windows and of identical tokens (position by position within each window)."""
    if len(reference) != len(tokens):
        return 0.0, 0.0
    windows = sum(a == b for a, b in zip(reference, tokens)) / len(reference)
    pairs = [(x, y) for a, b in zip(reference, tokens) for x, y in zip(a[3], b[3])]
    return windows, sum(x == y for x, y in pairs) / max(1, len(pairs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="paper", choices=["tiny", "paper"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--steps-per-sync", type=int, default=16, dest="steps_per_sync")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="result file (default: benchmarks/results/...)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device here: pass --device cpu (with VIVACE_TRITON_INTERPRET=1) to check the script")
    if device.type == "cpu" and not (os.environ.get("TRITON_INTERPRET") == os.environ.get("VIVACE_TRITON_INTERPRET") == "1"):
        sys.exit("on the CPU set TRITON_INTERPRET=1 and VIVACE_TRITON_INTERPRET=1 (before triton is imported)")
    modes = [("per step", 1, False), ("device loop", args.steps_per_sync, False)]
    if device.type == "cuda":
        modes.append(("device + graphs", args.steps_per_sync, True))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        pack = random_pack(Path(tmp) / "pack", preset=args.preset, seed=0)
        drawn: dict[str, list] = {}
        for name, steps_per_sync, graphs in modes:
            engine = Engine.from_pack(pack, device=args.device, dtype=args.dtype, steps_per_sync=steps_per_sync, cuda_graphs=graphs)
            tokens, ticks, _ = generate(engine, args.seconds)  # warm-up: compiles, captures
            if graphs:
                # the engine keeps its loops: the warm-up ran each piece length eagerly once (and captured the repeated
                # ones), so this generation replays graphs
                tokens = generate(engine, args.seconds)[0]
                if tokens != drawn["device loop"]:
                    sys.exit(f"mode {name!r} drew other tokens than the same loop run eagerly: nothing written")
            drawn[name] = tokens
            windows, same = agreement(drawn["per step"], tokens) if name != "per step" else (None, None)
            best = min(generate(engine, args.seconds)[2] for _ in range(args.repeats))
            rows.append({"mode": name, "steps_per_sync": steps_per_sync, "cuda_graphs": graphs, "ticks": ticks,
                         "wall_s": best, "audio_s_per_s": args.seconds / best,
                         "identical_windows_vs_per_step": windows, "identical_tokens_vs_per_step": same})
            versus = f"  same tokens as per step: {same:.4f} ({windows:.3f} of windows)" if same is not None else ""
            print(f"{name:<16} steps/sync {steps_per_sync:>3}  wall {best:8.3f} s  {args.seconds / best:7.3f} s of audio per s"
                  + versus)
    now = datetime.datetime.now(datetime.timezone.utc)
    record = {
        "benchmark": "gpu_decode",
        "date": now.isoformat(timespec="seconds"),
        "device": {"type": device.type, "gpu": gpu_name(), "cpu": cpu_model()},
        "versions": versions(),
        "git_commit": git("rev-parse", "HEAD"),
        "config": vars(args) | {"out": str(args.out), "sampling": "greedy", "tokens": "graphs identical to the eager loop"},
        "results": rows,
    }
    out = args.out or RESULTS / f"gpu_decode-{device.type}-{now.date().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
