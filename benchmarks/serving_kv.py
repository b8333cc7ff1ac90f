"""KV cache dtypes under load, alternating: the demo pack (int8 weights) with bfloat16 and with int8 KV caches, the
serving suite's 16 requests of 3 / 6 s from 8 closed-loop clients, in rounds that run each dtype once.

The serving suite runs its configurations one after another, so a VM's drift over its ten minutes lands on whichever
runs last; here each round builds a fresh engine for each dtype in turn (one AsyncEngine at a time: two cores'
threads of two engines would keep two OpenMP teams on two cores), so drift falls on both alike. Reported per round
and as medians: aggregate seconds of audio per wall second and time to first audio p95.

python -m benchmarks serving_kv [--threads N] [--quick]   (--quick: 1 round of 8 requests of 2 / 4 s)
"""
from __future__ import annotations

import gc
import statistics
from typing import Any

from vivace import AsyncEngine, Engine

from benchmarks.common import Options, table, write_result
from benchmarks.serving import DEMO_PACK, closed_loop, requests

KV_DTYPES = ("bfloat16", "int8")
CLIENTS = 8


def run(options: Options) -> None:
    rounds = 1 if options.quick else 3
    calls = requests(8, [2.0, 4.0], seed=0) if options.quick else requests(16, [3.0, 6.0], seed=0)
    results: dict[str, list[dict[str, Any]]] = {dtype: [] for dtype in KV_DTYPES}
    for _ in range(rounds):
        for dtype in KV_DTYPES:
            engine = Engine.from_pack(DEMO_PACK, device=options.device, quantize="int8", kv_cache_dtype=dtype,
                                      max_running=CLIENTS, max_waiting=len(calls))
            engine.generate(*calls[0][:2], seed=0)  # warm-up
            with AsyncEngine(engine) as shared:
                results[dtype].append(closed_loop(shared, calls, CLIENTS))
            del engine
            gc.collect()
    rows = []
    for dtype, runs in results.items():
        rows += [[dtype, i + 1, r["audio_s_per_s"], r["first_audio_p95_s"]] for i, r in enumerate(runs)]
        rows.append([dtype, "median", statistics.median(r["audio_s_per_s"] for r in runs),
                     statistics.median(r["first_audio_p95_s"] for r in runs)])
    print(table(["KV caches", "round", "audio s/s", "TTFA p95 s"], rows,
                title=f"demo pack, int8 weights, {CLIENTS} clients, {len(calls)} requests, rounds alternating"), flush=True)
    config = {"pack": str(DEMO_PACK), "quantize": "int8", "clients": CLIENTS, "rounds": rounds, "requests": calls}
    path = write_result("serving_kv", options, config, results)
    print(f"wrote {path}")
