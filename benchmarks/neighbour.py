"""Neighbour suite: how much a busy process on one core slows a generation, per thread count and OpenMP wait policy.

The MusicGen-small-shaped pack of the musicgen suite, float32 (decode steps through the native decoder stack on CPUs
with AVX-512; prefill, heads and the Python layers elsewhere through F.linear), a 0.5 s clip (--quick 0.1 s),
guidance 3.0: timed quiet, then with `python -c "while True: pass"` running beside it, in a fresh process per
setting (OpenMP reads its wait policy once, when torch loads): 2 threads (libgomp's default spinning), 1 thread,
2 threads with OMP_WAIT_POLICY=PASSIVE, 2 threads with GOMP_SPINCOUNT=1000, and 2 threads under vivace's ThreadGovernor
(adaptive_threads: all threads or one, whichever steps faster). Each figure is the median of 3 runs; the adaptive
engine's governor carries what it learnt quiet into the busy runs, as a server's would.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

from benchmarks.common import ROOT, Options, table, write_result
from benchmarks.musicgen_suite import ensure_models

SETTINGS = {  # name: (environment, torch threads, adaptive_threads)
    "2 threads": ({}, 2, False),
    "1 thread": ({}, 1, False),
    "2 threads, OMP_WAIT_POLICY=PASSIVE": ({"OMP_WAIT_POLICY": "PASSIVE"}, 2, False),
    "2 threads, GOMP_SPINCOUNT=1000": ({"GOMP_SPINCOUNT": "1000"}, 2, False),
    "auto (adaptive_threads, --threads auto)": ({}, 2, True),
}
RUNS = 3
CHILD = """
import json, statistics, subprocess, sys, time, torch
from vivace import Engine
torch.set_num_threads({threads})
engine = Engine.from_pack({pack!r}, linear_products="linear", adaptive_threads={adaptive})
engine.generate("warm up", 0.05, seed=0)
def run():
    start = time.perf_counter()
    engine.generate("mellow lo-fi hip hop beat", {seconds}, seed=0, guidance_scale=3.0)
    return time.perf_counter() - start
quiet = statistics.median(run() for _ in range({runs}))
busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
try:
    time.sleep(1.0)
    loaded = statistics.median(run() for _ in range({runs}))
finally:
    busy.kill()
print(json.dumps({{"quiet_s": quiet, "busy_s": loaded}}))
"""


def run(options: Options) -> dict[str, Any]:
    _, pack = ensure_models(options.work_dir)
    seconds = 0.1 if options.quick else 0.5
    results: dict[str, Any] = {}
    rows = []
    for name, (env, threads, adaptive) in SETTINGS.items():
        code = CHILD.format(threads=threads, pack=str(pack), seconds=seconds, runs=1 if options.quick else RUNS, adaptive=adaptive)
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env={**os.environ, **env}, check=True,
        )
        record = json.loads(done.stdout.strip().splitlines()[-1])
        record["slowdown"] = record["busy_s"] / record["quiet_s"]
        record["wall_s"] = time.perf_counter() - started
        results[name] = record
        rows.append([name, f"{record['quiet_s']:.2f}", f"{record['busy_s']:.2f}", f"{record['slowdown']:.1f}x"])
    print(table(["setting", "quiet s", "busy neighbour s", "slowdown"], rows,
                title=f"MusicGen-small shape, float32, {seconds} s clip, guidance 3.0: medians of {RUNS} runs"))
    path = write_result("neighbour", options, {"seconds": seconds, "runs": RUNS, "settings": list(SETTINGS)}, results)
    print(f"wrote {path}")
    return results
